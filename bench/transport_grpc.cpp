#include "transport_grpc.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "token_stream.grpc.pb.h"

namespace fmwire::bench {
namespace {

namespace pb = grpc_peer;
using namespace std::chrono_literals;

// ---------------------------------------------------------------- servers

// Streams max_tokens Tokens, each write started when the last one is done:
// gRPC's callback API, whose reactor owns itself (OnDone deletes it, as
// gRPC's reactor contract has it).
class TokenWriter final : public grpc::ServerWriteReactor<pb::Token> {
 public:
  explicit TokenWriter(std::uint32_t max_tokens) : max_tokens_(max_tokens) { write_next(); }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed: the client went away"));
      return;
    }
    write_next();
  }

  void OnDone() override { delete this; }

 private:
  void write_next() {
    if (next_index_ == max_tokens_) {
      Finish(grpc::Status::OK);
      return;
    }
    token_.set_first_index(next_index_);
    token_.set_token_id(token_id(next_index_));
    const std::string_view piece = token_piece(next_index_);
    token_.set_text_piece(piece.data(), piece.size());
    ++next_index_;
    StartWrite(&token_);
  }

  std::uint32_t max_tokens_;
  std::uint32_t next_index_ = 0;
  pb::Token token_;
};

class CallbackTokenService final : public pb::TokenStream::CallbackService {
 public:
  grpc::ServerWriteReactor<pb::Token>* Generate(grpc::CallbackServerContext*,
                                                const pb::GenerateRequest* request) override {
    return new TokenWriter(request->max_tokens());  // deletes itself in OnDone
  }
};

// The paced server: its handler thread sleeps until each frame is due (as
// fmwire's pacer does), stamps it and writes it.
class PacedTokenService final : public pb::TokenStream::Service {
 public:
  PacedTokenService(double frames_per_s, Clock::time_point origin)
      : interval_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / frames_per_s))),
        origin_(origin) {}

  grpc::Status Generate(grpc::ServerContext*, const pb::GenerateRequest* request,
                        grpc::ServerWriter<pb::Token>* writer) override {
    set_fine_timer_slack();
    pb::Token token;
    auto due = Clock::now();
    for (std::uint32_t index = 0; index < request->max_tokens(); ++index) {
      sleep_until(due);
      token.set_first_index(index);
      token.set_token_id(token_id(index));
      const Stamp stamp = make_stamp(origin_, Clock::now());
      token.set_text_piece(stamp.text.data(), stamp.size);
      if (!writer->Write(token)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      due += interval_;
    }
    return grpc::Status::OK;
  }

 private:
  Clock::duration interval_;
  Clock::time_point origin_;
};

// A gRPC server on 127.0.0.1 at a free port; shut down when this goes away.
class RunningServer {
 public:
  explicit RunningServer(grpc::Service& service) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service);
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) throw std::runtime_error("gRPC server did not start on 127.0.0.1");
  }
  ~RunningServer() { server_->Shutdown(std::chrono::system_clock::now() + 2s); }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// A channel of its own: a local subchannel pool and a distinct argument, so
// that it never shares a TCP connection with another; connected on return.
std::shared_ptr<grpc::Channel> connect_channel(const std::string& address, int index) {
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  arguments.SetInt("fmwire.bench.channel", index);
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), arguments);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + 10s)) {
    throw std::runtime_error("gRPC channel to " + address + " not connected within 10 s");
  }
  return channel;
}

// ---------------------------------------------------------------- clients

// What the readers of one round report, from gRPC's threads.
class RoundState {
 public:
  void begin(std::size_t streams) {
    std::lock_guard lock(mutex_);
    remaining_ = streams;
    frames_ = 0;
    checksum_ = 0;
    failure_.clear();
  }

  void stream_done(const grpc::Status& status, std::uint64_t frames, std::uint64_t checksum) {
    std::lock_guard lock(mutex_);
    if (!status.ok() && failure_.empty()) failure_ = "gRPC stream failed: " + status.error_message();
    frames_ += frames;
    checksum_ += checksum;
    if (--remaining_ == 0) {
      finished_at_ = Clock::now();
      finished_cpu_seconds_ = process_cpu_seconds();
      done_.notify_all();  // under the lock: the waiter cannot go before this returns
    }
  }

  // False when the round did not finish within `limit`.
  bool wait(std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex_);
    return done_.wait_for(lock, limit, [&] { return remaining_ == 0; });
  }

  std::uint64_t frames() const { return frames_; }
  std::uint64_t checksum() const { return checksum_; }
  const std::string& failure() const { return failure_; }
  Clock::time_point finished_at() const { return finished_at_; }
  double finished_cpu_seconds() const { return finished_cpu_seconds_; }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  std::size_t remaining_ = 0;
  std::uint64_t frames_ = 0;
  std::uint64_t checksum_ = 0;
  std::string failure_;
  Clock::time_point finished_at_;
  double finished_cpu_seconds_ = 0;
};

// One server-streaming call read with the callback API: every field of
// every Token into a checksum, as fmwire's client does.
class TokenReader final : public grpc::ClientReadReactor<pb::Token> {
 public:
  TokenReader(pb::TokenStream::Stub& stub, std::uint32_t max_tokens, RoundState& round) : round_(round) {
    request_.set_max_tokens(max_tokens);
    stub.async()->Generate(&context_, &request_, this);
    StartRead(&token_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream has ended: OnDone follows
    ++frames_;
    checksum_ += token_checksum(token_.first_index(), token_.token_id(), token_.text_piece());
    StartRead(&token_);
  }

  void OnDone(const grpc::Status& status) override { round_.stream_done(status, frames_, checksum_); }

  // Ends the call early; OnDone follows.
  void cancel() { context_.TryCancel(); }

 private:
  RoundState& round_;
  grpc::ClientContext context_;
  pb::GenerateRequest request_;
  pb::Token token_;
  std::uint64_t frames_ = 0;
  std::uint64_t checksum_ = 0;
};

}  // namespace

std::string grpc_version() { return grpc::Version(); }

std::vector<ThroughputRound> grpc_token_throughput(const TokenShape& shape, int rounds) {
  CallbackTokenService service;
  RunningServer server(service);
  std::vector<std::unique_ptr<pb::TokenStream::Stub>> stubs;
  for (int i = 0; i < shape.connections; ++i) {
    stubs.push_back(pb::TokenStream::NewStub(connect_channel(server.address(), i)));
  }

  const std::size_t streams = static_cast<std::size_t>(shape.connections * shape.streams_per_connection);
  const std::uint64_t expected_checksum = expected_stream_checksum(shape.frames_per_stream) * streams;
  RoundState state;
  std::vector<ThroughputRound> results;
  for (int round = -1; round < rounds; ++round) {  // round -1 warms up
    state.begin(streams);
    std::vector<std::unique_ptr<TokenReader>> readers;
    readers.reserve(streams);
    const auto start = Clock::now();
    const double start_cpu_seconds = process_cpu_seconds();
    for (auto& stub : stubs) {
      for (int i = 0; i < shape.streams_per_connection; ++i) {
        readers.push_back(std::make_unique<TokenReader>(*stub, shape.frames_per_stream, state));
      }
    }
    if (!state.wait(300'000ms)) {
      // The readers may only go once gRPC is done with them.
      for (auto& reader : readers) reader->cancel();
      if (!state.wait(10'000ms)) {  // they cannot be destroyed safely: stop here
        std::fprintf(stderr, "bench_transport: gRPC readers still running 10 s after their cancel\n");
        std::terminate();
      }
      throw std::runtime_error("gRPC token round not finished within 300 s");
    }
    if (!state.failure().empty()) throw std::runtime_error(state.failure());
    if (state.frames() != shape.frames_per_round() || state.checksum() != expected_checksum) {
      throw std::runtime_error("gRPC: received " + std::to_string(state.frames()) + " frames of " +
                               std::to_string(shape.frames_per_round()) + ", or their content differs");
    }
    if (round < 0) continue;
    const double frames = static_cast<double>(state.frames());
    results.push_back({frames / seconds_between(start, state.finished_at()),
                       (state.finished_cpu_seconds() - start_cpu_seconds) / frames * 1e6});
  }
  return results;
}

std::vector<LatencyRun> grpc_token_latency(const LatencyPlan& plan, int repetitions) {
  const auto origin = Clock::now();
  PacedTokenService service(plan.frames_per_s, origin);
  RunningServer server(service);
  auto stub = pb::TokenStream::NewStub(connect_channel(server.address(), 0));

  std::vector<LatencyRun> results;
  for (int repetition = 0; repetition < repetitions; ++repetition) {
    grpc::ClientContext context;
    pb::GenerateRequest request;
    request.set_max_tokens(plan.frames);
    std::vector<double> latencies_us;
    latencies_us.reserve(plan.frames);
    std::uint32_t frames = 0;
    auto reader = stub->Generate(&context, request);
    pb::Token token;
    while (reader->Read(&token)) {
      const auto arrived = Clock::now();
      ++frames;
      if (token.first_index() < plan.warmup_frames) continue;
      const std::int64_t nanoseconds = nanoseconds_since_stamp(token.text_piece(), origin, arrived);
      if (nanoseconds < 0) throw std::runtime_error("gRPC: a Token without a send stamp");
      latencies_us.push_back(static_cast<double>(nanoseconds) / 1e3);
    }
    const grpc::Status status = reader->Finish();
    if (!status.ok()) throw std::runtime_error("gRPC paced stream failed: " + status.error_message());
    if (frames != plan.frames) throw std::runtime_error("gRPC: paced stream lost frames");
    results.push_back(summarize_latency(std::move(latencies_us)));
  }
  return results;
}

}  // namespace fmwire::bench
