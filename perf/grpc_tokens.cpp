#include "perf/grpc_tokens.h"

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string_view>

#include "perf/grpc_credentials.h"
#include "token_stream.grpc.pb.h"

namespace fmwire::perf {
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
  explicit PacedTokenService(GrpcPacing pacing)
      : interval_(
            std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / pacing.frames_per_s))),
        origin_(pacing.origin) {}

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

// A channel of its own: a local subchannel pool and a distinct argument, so
// that it never shares a TCP connection with another; connected on return.
std::shared_ptr<grpc::Channel> connect_channel(const std::string& address, int index, std::chrono::milliseconds timeout,
                                               const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  arguments.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);  // http_proxy in the environment must not reroute a measurement
  arguments.SetInt("fmwire.perf.channel", index);
  auto channel = grpc::CreateCustomChannel(address, credentials, arguments);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + timeout)) {
    throw std::runtime_error("gRPC channel to " + address + " not connected within " +
                             std::to_string(timeout.count()) + " ms");
  }
  return channel;
}

}  // namespace

bool grpc_built_in() { return true; }

std::string grpc_version() { return grpc::Version(); }

// ---------------------------------------------------------------- GrpcTokenServer

struct GrpcTokenServer::State {
  void start(const std::string& host, std::uint16_t requested_port, const transport::TlsFiles& tls = {}) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(grpc_address(host, requested_port), grpc_server_credentials(tls), &port);
    builder.RegisterService(service.get());
    server = builder.BuildAndStart();
    if (!server || port == 0) throw std::runtime_error("gRPC server could not listen on " + grpc_address(host, requested_port));
  }

  std::unique_ptr<grpc::Service> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

GrpcTokenServer::GrpcTokenServer(const std::string& host, std::uint16_t port, const transport::TlsFiles& tls)
    : state_(std::make_unique<State>()) {
  state_->service = std::make_unique<CallbackTokenService>();
  state_->start(host, port, tls);
}

GrpcTokenServer::GrpcTokenServer(const std::string& host, std::uint16_t port, GrpcPacing pacing)
    : state_(std::make_unique<State>()) {
  state_->service = std::make_unique<PacedTokenService>(pacing);
  state_->start(host, port);
}

GrpcTokenServer::~GrpcTokenServer() {
  // Calls still open after the grace are cancelled: their reactors end.
  state_->server->Shutdown(std::chrono::system_clock::now() + 2s);
}

std::uint16_t GrpcTokenServer::port() const { return static_cast<std::uint16_t>(state_->port); }

// ---------------------------------------------------------------- GrpcTokenClient

struct GrpcTokenClient::State {
  std::string address;
  std::vector<std::unique_ptr<pb::TokenStream::Stub>> stubs;
};

GrpcTokenClient::GrpcTokenClient(const std::string& host, std::uint16_t port, int channels,
                                 std::chrono::milliseconds timeout, const transport::TlsFiles& tls)
    : state_(std::make_unique<State>()) {
  state_->address = grpc_address(host, port);
  const std::shared_ptr<grpc::ChannelCredentials> credentials = grpc_channel_credentials(tls);
  for (int i = 0; i < channels; ++i) {
    const std::shared_ptr<grpc::Channel> channel = connect_channel(state_->address, i, timeout, credentials);
    state_->stubs.push_back(pb::TokenStream::NewStub(channel));
  }
}

GrpcTokenClient::~GrpcTokenClient() = default;

GrpcTokenRound GrpcTokenClient::stream_tokens(int streams_per_channel, std::uint32_t frames_per_stream,
                                              std::chrono::milliseconds limit) {
  const std::size_t streams = state_->stubs.size() * static_cast<std::size_t>(streams_per_channel);
  const std::uint64_t expected_frames = std::uint64_t{frames_per_stream} * streams;
  const std::uint64_t expected_checksum = expected_stream_checksum(frames_per_stream) * streams;
  RoundState state;
  state.begin(streams);
  std::vector<std::unique_ptr<TokenReader>> readers;
  readers.reserve(streams);
  const auto start = Clock::now();
  const double start_cpu_seconds = process_cpu_seconds();
  for (auto& stub : state_->stubs) {
    for (int i = 0; i < streams_per_channel; ++i) {
      readers.push_back(std::make_unique<TokenReader>(*stub, frames_per_stream, state));
    }
  }
  if (!state.wait(limit)) {
    // The readers may only go once gRPC is done with them.
    for (auto& reader : readers) reader->cancel();
    if (!state.wait(10'000ms)) {  // they cannot be destroyed safely: stop here
      std::fprintf(stderr, "gRPC token readers still running 10 s after their cancel\n");
      std::terminate();
    }
    throw std::runtime_error("gRPC token round not finished within " + std::to_string(limit.count() / 1000) + " s");
  }
  if (!state.failure().empty()) throw std::runtime_error(state.failure());
  if (state.frames() != expected_frames || state.checksum() != expected_checksum) {
    throw std::runtime_error("gRPC: received " + std::to_string(state.frames()) + " frames of " +
                             std::to_string(expected_frames) + ", or their content differs");
  }
  return {state.frames(), seconds_between(start, state.finished_at()),
          state.finished_cpu_seconds() - start_cpu_seconds};
}

double GrpcTokenClient::round_trip_us(std::chrono::milliseconds limit) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + limit);
  pb::GenerateRequest request;
  request.set_max_tokens(1);
  pb::Token token, extra;
  const auto start = Clock::now();
  auto reader = state_->stubs.front()->Generate(&context, request);
  const bool read = reader->Read(&token);
  const auto arrived = Clock::now();
  const bool more = read && reader->Read(&extra);
  const grpc::Status status = reader->Finish();
  if (!status.ok()) throw std::runtime_error("gRPC round trip failed: " + status.error_message());
  if (!read || more) throw std::runtime_error("gRPC: a round trip answered without its one Token");
  if (token.first_index() != 0 || token.token_id() != token_id(0) || token.text_piece() != token_piece(0)) {
    throw std::runtime_error("gRPC: a round trip's Token differs from the one sent");
  }
  return std::chrono::duration<double, std::micro>(arrived - start).count();
}

std::vector<double> GrpcTokenClient::paced_latencies_us(std::uint32_t frames, std::uint32_t warmup,
                                                        Clock::time_point origin) {
  grpc::ClientContext context;
  pb::GenerateRequest request;
  request.set_max_tokens(frames);
  std::vector<double> latencies_us;
  latencies_us.reserve(frames);
  std::uint32_t received = 0;
  auto reader = state_->stubs.front()->Generate(&context, request);
  pb::Token token;
  while (reader->Read(&token)) {
    const auto arrived = Clock::now();
    ++received;
    if (token.first_index() < warmup) continue;
    const std::int64_t nanoseconds = nanoseconds_since_stamp(token.text_piece(), origin, arrived);
    if (nanoseconds < 0) throw std::runtime_error("gRPC: a Token without a send stamp");
    latencies_us.push_back(static_cast<double>(nanoseconds) / 1e3);
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) throw std::runtime_error("gRPC paced stream failed: " + status.error_message());
  if (received != frames) throw std::runtime_error("gRPC: paced stream lost frames");
  return latencies_us;
}

}  // namespace fmwire::perf
