#include "kv_grpc.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "kv_transfer.grpc.pb.h"
#include "transport_measure.h"

namespace fmwire::bench {
namespace {

namespace pb = grpc_peer;
using namespace std::chrono_literals;

double cpu_now() {
  const CpuTimes times = process_cpu_times();
  return times.user_s + times.system_s;
}

// Lands each message's bytes in the blocks buffer; counts the calls done.
class KvTransferService final : public pb::KvTransfer::Service {
 public:
  explicit KvTransferService(std::span<std::byte> blocks) : blocks_(blocks) {}

  grpc::Status Push(grpc::ServerContext*, grpc::ServerReader<pb::KvBytes>* reader, pb::KvStored* stored) override {
    const auto start = Clock::now();
    const double start_cpu_seconds = cpu_now();
    pb::KvBytes message;
    std::uint64_t bytes = 0;
    std::uint32_t chunks = 0;
    grpc::Status status = grpc::Status::OK;
    while (reader->Read(&message)) {
      const std::string& data = message.data();
      if (message.offset() > blocks_.size() || data.size() > blocks_.size() - message.offset()) {
        status = grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "KvBytes past the end of the blocks");
        break;
      }
      std::memcpy(blocks_.data() + message.offset(), data.data(), data.size());
      bytes += data.size();
      ++chunks;
    }
    stored->set_bytes(bytes);
    stored->set_chunks(chunks);
    std::lock_guard lock(mutex_);
    runs_.push_back({seconds_between(start, Clock::now()), cpu_now() - start_cpu_seconds, bytes, bytes});
    if (!status.ok() && failure_.empty()) failure_ = status.error_message();
    done_.notify_all();
    return status;
  }

  // The runs once `transfers` calls are done, or once `limit` passed.
  std::vector<KvSideRun> wait(int transfers, std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex_);
    if (!done_.wait_for(lock, limit, [&] { return runs_.size() >= static_cast<std::size_t>(transfers); })) {
      throw std::runtime_error("gRPC receiver: " + std::to_string(runs_.size()) + " of " + std::to_string(transfers) +
                               " transfers within the time allowed");
    }
    if (!failure_.empty()) throw std::runtime_error("gRPC receiver: " + failure_);
    return runs_;
  }

 private:
  std::span<std::byte> blocks_;
  std::mutex mutex_;
  std::condition_variable done_;
  std::vector<KvSideRun> runs_;
  std::string failure_;
};

// One Push call of kv[0, bytes) in messages of `chunk_bytes`.
void push(pb::KvTransfer::Stub& stub, std::span<const std::byte> kv, std::uint64_t bytes, std::size_t chunk_bytes) {
  grpc::ClientContext context;
  pb::KvStored stored;
  auto writer = stub.Push(&context, &stored);
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
  if (stored.bytes() != bytes) throw std::runtime_error("gRPC Push stored " + std::to_string(stored.bytes()) + " bytes of " + std::to_string(bytes));
}

}  // namespace

std::string grpc_version() { return grpc::Version(); }

std::vector<KvSideRun> grpc_kv_receive(const std::string& host, std::span<std::byte> blocks, int transfers,
                                       const std::function<void(std::uint16_t port)>& on_listening) {
  KvTransferService service(blocks);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(host + ":0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) throw std::runtime_error("gRPC server did not start on " + host);
  on_listening(static_cast<std::uint16_t>(port));
  std::vector<KvSideRun> runs = service.wait(transfers, std::chrono::hours(1));
  server->Shutdown(std::chrono::system_clock::now() + 2s);
  return runs;
}

KvSideRun grpc_kv_send(const std::string& host, std::uint16_t port, std::span<const std::byte> kv,
                       const KvTransferShape& shape, std::uint64_t warmup_bytes) {
  const std::string address = host + ":" + std::to_string(port);
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + 10s)) {
    throw std::runtime_error("gRPC channel to " + address + " not connected within 10 s");
  }
  auto stub = pb::KvTransfer::NewStub(channel);
  const std::size_t chunk_bytes = shape.chunk_bytes();
  const std::uint64_t total_bytes = shape.total_bytes();
  if (warmup_bytes > 0) push(*stub, kv, std::min(total_bytes, (warmup_bytes + chunk_bytes - 1) / chunk_bytes * chunk_bytes), chunk_bytes);
  const auto start = Clock::now();
  const double start_cpu_seconds = cpu_now();
  push(*stub, kv, total_bytes, chunk_bytes);
  return {seconds_between(start, Clock::now()), cpu_now() - start_cpu_seconds, total_bytes, total_bytes};
}

}  // namespace fmwire::bench
