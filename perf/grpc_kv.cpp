#include "perf/grpc_kv.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>

#include "kv_transfer.grpc.pb.h"
#include "perf/grpc_credentials.h"

namespace fmwire::perf {
namespace {

namespace pb = grpc_peer;
using namespace std::chrono_literals;

double cpu_now() {
  const CpuTimes times = process_cpu_times();
  return times.user_s + times.system_s;
}

// Lands each message's bytes in the blocks buffer, one call at a time (a
// receiver's blocks are one shard's); counts the calls done.
class KvTransferService final : public pb::KvTransfer::Service {
 public:
  KvTransferService(std::span<std::byte> blocks, std::uint64_t max_bytes, bool keep_runs)
      : blocks_(blocks), max_bytes_(max_bytes), keep_runs_(keep_runs) {}

  grpc::Status Push(grpc::ServerContext*, grpc::ServerReader<pb::KvBytes>* reader, pb::KvStored* stored) override {
    std::lock_guard push_lock(push_mutex_);
    const auto start = Clock::now();
    const double start_cpu_seconds = cpu_now();
    pb::KvBytes message;
    std::uint64_t bytes = 0;
    std::uint32_t chunks = 0;
    grpc::Status status = grpc::Status::OK;
    while (reader->Read(&message)) {
      const std::string& data = message.data();
      if (!make_room(message.offset(), data.size())) {
        status = grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "KvBytes past the end of the blocks (" +
                                                                  std::to_string(max_bytes_) + " bytes at most)");
        break;
      }
      std::memcpy(blocks_.data() + message.offset(), data.data(), data.size());
      bytes += data.size();
      ++chunks;
    }
    stored->set_bytes(bytes);
    stored->set_chunks(chunks);
    std::lock_guard lock(mutex_);
    ++calls_;
    if (keep_runs_) runs_.push_back({seconds_between(start, Clock::now()), cpu_now() - start_cpu_seconds, bytes, bytes});
    if (!status.ok() && failure_.empty()) failure_ = status.error_message();
    done_.notify_all();
    return status;
  }

  std::vector<KvSideRun> wait(int transfers, std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex_);
    if (!done_.wait_for(lock, limit, [&] { return calls_ >= static_cast<std::size_t>(transfers); })) {
      throw std::runtime_error("gRPC receiver: " + std::to_string(calls_) + " of " + std::to_string(transfers) +
                               " transfers within the time allowed");
    }
    if (!failure_.empty()) throw std::runtime_error("gRPC receiver: " + failure_);
    return runs_;
  }

 private:
  // Whether [offset, offset + size) fits the blocks, growing an own buffer
  // (up to max_bytes_) to take it.
  bool make_room(std::uint64_t offset, std::size_t size) {
    if (offset <= blocks_.size() && size <= blocks_.size() - offset) return true;
    if (max_bytes_ == 0 || offset > max_bytes_ || size > max_bytes_ - offset) return false;
    own_.resize(offset + size);
    blocks_ = own_;
    return true;
  }

  std::span<std::byte> blocks_;
  std::uint64_t max_bytes_;  // 0: the caller's blocks, never grown
  bool keep_runs_;
  std::vector<std::byte> own_;
  std::mutex push_mutex_;  // one Push at a time
  std::mutex mutex_;
  std::condition_variable done_;
  std::size_t calls_ = 0;
  std::vector<KvSideRun> runs_;
  std::string failure_;
};

}  // namespace

// ---------------------------------------------------------------- GrpcKvServer

struct GrpcKvServer::State {
  void start(const std::string& host, std::uint16_t requested_port, const transport::TlsFiles& tls) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(grpc_address(host, requested_port), grpc_server_credentials(tls), &port);
    builder.RegisterService(service.get());
    builder.SetMaxReceiveMessageSize(64 << 20);  // fmwire perf's largest chunk (kMaxBulkChunkBytes)
    server = builder.BuildAndStart();
    if (!server || port == 0) throw std::runtime_error("gRPC server could not listen on " + grpc_address(host, requested_port));
  }

  std::unique_ptr<KvTransferService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

GrpcKvServer::GrpcKvServer(const std::string& host, std::uint16_t port, std::span<std::byte> blocks,
                           const transport::TlsFiles& tls)
    : state_(std::make_unique<State>()) {
  state_->service = std::make_unique<KvTransferService>(blocks, 0, true);
  state_->start(host, port, tls);
}

GrpcKvServer::GrpcKvServer(const std::string& host, std::uint16_t port, std::uint64_t max_bytes,
                           const transport::TlsFiles& tls)
    : state_(std::make_unique<State>()) {
  state_->service = std::make_unique<KvTransferService>(std::span<std::byte>(), max_bytes, false);
  state_->start(host, port, tls);
}

GrpcKvServer::~GrpcKvServer() { state_->server->Shutdown(std::chrono::system_clock::now() + 2s); }

std::uint16_t GrpcKvServer::port() const { return static_cast<std::uint16_t>(state_->port); }

std::vector<KvSideRun> GrpcKvServer::wait_runs(int transfers, std::chrono::milliseconds limit) {
  return state_->service->wait(transfers, limit);
}

// ---------------------------------------------------------------- GrpcKvClient

struct GrpcKvClient::State {
  std::string address;
  std::unique_ptr<pb::KvTransfer::Stub> stub;
};

GrpcKvClient::GrpcKvClient(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
                           const transport::TlsFiles& tls)
    : state_(std::make_unique<State>()) {
  state_->address = grpc_address(host, port);
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);  // http_proxy in the environment must not reroute a measurement
  auto channel = grpc::CreateCustomChannel(state_->address, grpc_channel_credentials(tls), arguments);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + timeout)) {
    throw std::runtime_error("gRPC channel to " + state_->address + " not connected within " +
                             std::to_string(timeout.count()) + " ms");
  }
  state_->stub = pb::KvTransfer::NewStub(channel);
}

GrpcKvClient::~GrpcKvClient() = default;

KvSideRun GrpcKvClient::push(std::span<const std::byte> kv, std::uint64_t bytes, std::size_t chunk_bytes) {
  const auto start = Clock::now();
  const double start_cpu_seconds = cpu_now();
  grpc::ClientContext context;
  pb::KvStored stored;
  auto writer = state_->stub->Push(&context, &stored);
  pb::KvBytes message;
  for (std::uint64_t offset = 0; offset < bytes; offset += chunk_bytes) {
    const auto size = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes, bytes - offset));
    message.set_offset(offset);
    message.set_data(kv.data() + offset, size);  // protobuf's bytes field owns a copy
    if (!writer->Write(message)) break;           // the call failed: Finish says why
  }
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  if (!status.ok()) throw std::runtime_error("gRPC Push failed: " + status.error_message());
  if (stored.bytes() != bytes) {
    throw std::runtime_error("gRPC Push stored " + std::to_string(stored.bytes()) + " bytes of " + std::to_string(bytes));
  }
  return {seconds_between(start, Clock::now()), cpu_now() - start_cpu_seconds, bytes, bytes};
}

}  // namespace fmwire::perf
