#include "transport_fmwire.h"

#include <exception>
#include <functional>
#include <future>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_committed.h"
#include "transport/connection.h"
#include "transport/server.h"

#include "loop_until.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
using transport::Connection;
using transport::ConnectionHandler;
using transport::ConnectionOptions;
using transport::EndReason;
using transport::EventLoop;
using transport::kEndStream;
using transport::SendStatus;

// A Server and its service on a loop thread of their own, listening on
// 127.0.0.1 at a free port. stop() (or the destructor) ends the loop once the
// clients have closed, and joins the thread; the service is built and
// destroyed on that thread.
class ServerThread {
 public:
  using MakeService = std::function<std::unique_ptr<ConnectionHandler>(EventLoop&)>;

  ServerThread(const std::string& backend, const ConnectionOptions& options, MakeService make_service) {
    std::promise<void> started;
    std::future<void> started_future = started.get_future();
    thread_ = std::thread([this, backend, options, make_service = std::move(make_service), &started] {
      bool announced = false;
      try {
        EventLoop loop(backend);
        std::unique_ptr<ConnectionHandler> service = make_service(loop);
        transport::Server server(loop, transport::Endpoint{"127.0.0.1", 0}, options, *service);
        loop_ = &loop;
        port_ = server.port();
        announced = true;
        started.set_value();
        loop.run();  // until stop()
        // Clients close first; their connections leave the server here.
        run_until(loop, [&] { return server.connections() == 0; }, 2000ms);
      } catch (...) {
        if (!announced) {
          started.set_exception(std::current_exception());
        } else {
          error_ = std::current_exception();
        }
      }
    });
    try {
      started_future.get();
    } catch (...) {
      thread_.join();
      throw;
    }
  }

  ~ServerThread() {
    try {
      stop();
    } catch (const std::exception& error) {
      std::cerr << "bench_transport: server thread: " << error.what() << "\n";
    }
  }

  std::uint16_t port() const { return port_; }

  // Rethrows what the server's loop threw, if anything.
  void stop() {
    if (!thread_.joinable()) return;
    loop_->stop();
    thread_.join();
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  std::thread thread_;
  EventLoop* loop_ = nullptr;  // on the server thread; stop() is thread-safe
  std::uint16_t port_ = 0;
  std::exception_ptr error_;
};

// Client connections to one port on the calling thread's loop. close_all()
// closes them in order; the destructor (reached early only when a run has
// thrown) drops them without running the loop, so that no handler, which
// may be gone by then, is called: the backend closes their sockets.
class ClientSide {
 public:
  explicit ClientSide(const std::string& backend, const transport::UringOptions& uring = {}) : loop(backend, uring) {}
  ~ClientSide() { connections.clear(); }

  // Connects `count` connections and waits for their Hello exchange.
  void connect(std::uint16_t port, int count, const ConnectionOptions& options, ConnectionHandler& handler) {
    std::string problem;
    for (int i = 0; i < count; ++i) {
      loop.backend().connect("127.0.0.1", port, [this, options, &handler, &problem](int fd, std::error_code error) {
        if (error) {
          problem = "connect to 127.0.0.1: " + error.message();
          return;
        }
        connections.push_back(std::make_unique<Connection>(loop, fd, true, options, handler));
      });
    }
    const bool ready = run_until(loop, [&] {
      if (!problem.empty()) return true;
      if (connections.size() < static_cast<std::size_t>(count)) return false;
      for (const auto& connection : connections) {
        if (!connection->ready()) return false;
      }
      return true;
    }, 10'000ms);
    if (!problem.empty()) throw std::runtime_error(problem);
    if (!ready) throw std::runtime_error("fmwire connections not ready within 10 s");
  }

  void close_all() {
    for (auto& connection : connections) {
      if (!connection->closed()) connection->close();
    }
    run_until(loop, [&] {
      for (const auto& connection : connections) {
        if (!connection->closed()) return false;
      }
      return true;
    }, 2000ms);
    connections.clear();
  }

  EventLoop loop;
  std::vector<std::unique_ptr<Connection>> connections;
};

void send_generate_request(Connection& connection, std::uint32_t stream_id, std::uint32_t max_tokens) {
  const SendStatus status = connection.send<protocol::GenerateRequest>(
      stream_id, [&](protocol::GenerateRequestBuilder request) { request.prompt_text("bench").max_tokens(max_tokens); },
      kEndStream);
  if (status != SendStatus::sent) {
    throw std::runtime_error("GenerateRequest not sent: " + std::string(transport::to_string(status)));
  }
}

// ---------------------------------------------------------------- tokens

struct TokenSourceOptions {
  double frames_per_s = 0;   // 0: as fast as credit allows
  Clock::time_point origin;  // paced frames carry ns since this as their text piece
};

// The server of the token tests: answers a GenerateRequest with maxTokens
// one-token Tokens frames, then a Finish. Unpaced, it sends while credit
// lasts (like EchoService). Paced, a pacer thread per stream sleeps until
// each frame is due and posts it to the loop, which stamps it as it builds
// it: the loop waits idle between frames, as it would behind an engine.
class TokenSource final : public ConnectionHandler {
 public:
  TokenSource(EventLoop& loop, TokenSourceOptions options) : loop_(loop), options_(options) {
    if (options_.frames_per_s > 0) {
      interval_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / options_.frames_per_s));
    }
  }
  // Joins the pacers (std::jthread): what they posted and the loop did not
  // run is dropped with the loop.
  ~TokenSource() override = default;

  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override {
    if (frame.kind() != codec::FrameKind::generate_request) return;
    std::uint32_t max_tokens = 0;
    const codec::Status read = codec::read_body<protocol::GenerateRequest>(
        frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& request) {
          max_tokens = request.max_tokens();
        });
    if (!read || max_tokens == 0) {
      connection.reset_stream(frame.header.stream_id, protocol::ErrorCode::BAD_REQUEST, "bad GenerateRequest");
      return;
    }
    const Key key{&connection, frame.header.stream_id};
    streams_[key].max_tokens = max_tokens;
    if (paced()) {
      start_pacer(key, max_tokens);
    } else {
      produce(connection, frame.header.stream_id);
    }
  }

  void on_stream_writable(Connection& connection, std::uint32_t stream_id) override {
    if (!paced()) produce(connection, stream_id);
  }

  void on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason&) override {
    streams_.erase({&connection, stream_id});
  }

  void on_closed(Connection& connection, const EndReason&) override {
    std::erase_if(streams_, [&](const auto& entry) { return entry.first.first == &connection; });
  }

 private:
  struct Generation {
    std::uint32_t max_tokens = 0;
    std::uint32_t next_index = 0;
  };
  using Key = std::pair<Connection*, std::uint32_t>;

  bool paced() const { return options_.frames_per_s > 0; }

  SendStatus send_token(Connection& connection, std::uint32_t stream_id, std::uint32_t index) {
    return connection.send<protocol::Tokens>(stream_id, [&](protocol::Tokens::Builder tokens) {
      tokens.setFirstIndex(index);
      tokens.initTokenIds(1).set(0, token_id(index));
      if (paced()) {
        const Stamp stamp = make_stamp(options_.origin, Clock::now());
        tokens.initTextPieces(1).set(0, capnp::Text::Reader(stamp.text.data(), stamp.size));
      } else {
        const std::string_view piece = token_piece(index);
        tokens.initTextPieces(1).set(0, capnp::Text::Reader(piece.data(), piece.size()));
      }
    });
  }

  // Unpaced: sends while credit lasts; on_stream_writable resumes.
  void produce(Connection& connection, std::uint32_t stream_id) {
    auto found = streams_.find({&connection, stream_id});
    if (found == streams_.end()) return;
    Generation& generation = found->second;
    while (generation.next_index < generation.max_tokens) {
      const SendStatus status = send_token(connection, stream_id, generation.next_index);
      if (status == SendStatus::blocked) return;
      if (status != SendStatus::sent) {
        streams_.erase(found);
        return;
      }
      ++generation.next_index;
    }
    finish(found);
  }

  // Paced: one post per frame, each when it is due.
  void start_pacer(Key key, std::uint32_t frames) {
    pacers_.emplace_back([this, key, frames](std::stop_token stop) {
      set_fine_timer_slack();
      auto due = Clock::now();
      for (std::uint32_t index = 0; index < frames && !stop.stop_requested(); ++index) {
        sleep_until(due);
        loop_.post([this, key] { send_due(key); });
        due += interval_;
      }
    });
  }

  void send_due(Key key) {
    auto found = streams_.find(key);
    if (found == streams_.end()) return;
    Generation& generation = found->second;
    const SendStatus status = send_token(*key.first, key.second, generation.next_index);
    if (status != SendStatus::sent) {  // blocked, at 10,000 frames/s, means the client is stuck
      key.first->reset_stream(key.second, protocol::ErrorCode::INTERNAL,
                              "paced frame refused: " + std::string(transport::to_string(status)));
      return;
    }
    if (++generation.next_index == generation.max_tokens) finish(found);
  }

  void finish(std::map<Key, Generation>::iterator found) {
    auto [connection, stream_id] = found->first;
    const std::uint32_t completion_tokens = found->second.max_tokens;
    streams_.erase(found);
    connection->send<protocol::Finish>(stream_id, [&](protocol::FinishBuilder finish) {
      finish.reason(protocol::FinishReason::MAX_TOKENS).usage(0, completion_tokens, 0);
    }, kEndStream);
  }

  EventLoop& loop_;
  TokenSourceOptions options_;
  Clock::duration interval_{0};
  std::map<Key, Generation> streams_;
  std::vector<std::jthread> pacers_;  // last: joined before the rest goes
};

// The client of the token tests: reads every field of every Tokens frame
// into a checksum, or, for latency, the stamp into a sample; stops the loop
// when the last stream of the round has closed.
class TokenSink final : public ConnectionHandler {
 public:
  explicit TokenSink(EventLoop& loop) : loop_(loop) {}

  void expect_streams(std::size_t streams) {
    expected_streams_ = streams;
    closed_streams_ = 0;
    frames_ = 0;
    checksum_ = 0;
    failure_.clear();
  }
  // Latency mode from now on: frames with an index below `warmup` are not sampled.
  void sample_latency(Clock::time_point origin, std::uint32_t warmup, std::size_t expected_frames) {
    latency_ = true;
    origin_ = origin;
    warmup_ = warmup;
    latencies_us_.clear();
    latencies_us_.reserve(expected_frames);
  }

  bool round_done() const { return closed_streams_ == expected_streams_; }
  std::uint64_t frames() const { return frames_; }
  std::uint64_t checksum() const { return checksum_; }
  const std::string& failure() const { return failure_; }
  Clock::time_point finished_at() const { return finished_at_; }
  double finished_cpu_seconds() const { return finished_cpu_seconds_; }
  std::vector<double> take_latencies_us() { return std::exchange(latencies_us_, {}); }

  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.kind() != codec::FrameKind::tokens) return;
    const auto arrived = Clock::now();
    const codec::Status read = codec::read_body<protocol::Tokens>(frame, limits_, [&](protocol::Tokens::Reader tokens) {
      const std::uint32_t first = tokens.getFirstIndex();
      const auto ids = tokens.getTokenIds();
      const auto pieces = tokens.getTextPieces();
      if (ids.size() != 1 || pieces.size() != 1) {
        failure_ = "a Tokens frame without exactly one token";
        return;
      }
      const capnp::Text::Reader piece = pieces[0];
      const std::string_view text(piece.begin(), piece.size());
      if (latency_) {
        if (first < warmup_) return;
        const std::int64_t nanoseconds = nanoseconds_since_stamp(text, origin_, arrived);
        if (nanoseconds < 0) {
          failure_ = "a Tokens frame without a send stamp";
          return;
        }
        latencies_us_.push_back(static_cast<double>(nanoseconds) / 1e3);
      } else {
        checksum_ += token_checksum(first, ids[0], text);
      }
    });
    if (!read) failure_ = "unreadable Tokens frame: " + read.error().message;
    ++frames_;
  }

  void on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) override {
    if (reason.error && failure_.empty()) {
      failure_ = "stream " + std::to_string(stream_id) + " failed: " + reason.message;
    }
    if (++closed_streams_ == expected_streams_) {
      finished_at_ = Clock::now();
      finished_cpu_seconds_ = process_cpu_seconds();
      loop_.stop();
    }
  }

  void on_closed(Connection&, const EndReason&) override {}

 private:
  EventLoop& loop_;
  codec::FrameLimits limits_;
  std::size_t expected_streams_ = 0;
  std::size_t closed_streams_ = 0;
  std::uint64_t frames_ = 0;
  std::uint64_t checksum_ = 0;
  std::string failure_;
  Clock::time_point finished_at_;
  double finished_cpu_seconds_ = 0;
  bool latency_ = false;
  Clock::time_point origin_;
  std::uint32_t warmup_ = 0;
  std::vector<double> latencies_us_;
};

// ---------------------------------------------------------------- bulk

// The one transfer of the bulk test, as a receiver's KvAccept would name it
// (the test skips the offer: it measures chunks).
constexpr protocol::KvTransferRef kBulkTransfer{1, 1};

// The receiver of the bulk test: checks each KvChunk's attachment digest
// (where it lies in the receive buffer: no copy), counts the bytes, and
// answers KvCommit with KvCommitted when the totals agree.
class BulkSink final : public ConnectionHandler {
 public:
  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override {
    const std::uint32_t stream_id = frame.header.stream_id;
    Received& received = streams_[{&connection, stream_id}];
    if (frame.kind() == codec::FrameKind::kv_chunk) {
      if (codec::attachment_digest(frame) != frame.descriptor.digest) {
        connection.reset_stream(stream_id, protocol::ErrorCode::DIGEST_MISMATCH, "KvChunk digest mismatch");
        return;
      }
      received.bytes += frame.descriptor.decoded_bytes;
      ++received.chunks;
      return;
    }
    if (frame.kind() != codec::FrameKind::kv_commit) return;
    std::optional<protocol::MessageError> problem =
        protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvCommit"};
    (void)codec::read_body<protocol::KvCommit>(frame, limits_, [&](const protocol::KvCommitReader& commit) {
      problem = commit.check(kBulkTransfer, received.bytes, received.chunks);
    });
    if (problem) {
      connection.reset_stream(stream_id, problem->code, problem->message);
      return;
    }
    connection.send<protocol::KvCommitted>(stream_id, [&](protocol::KvCommittedBuilder committed) {
      committed.transfer(kBulkTransfer).blocks_stored(received.chunks);
    }, kEndStream);
  }

  void on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason&) override {
    streams_.erase({&connection, stream_id});
  }

  void on_closed(Connection& connection, const EndReason&) override {
    std::erase_if(streams_, [&](const auto& entry) { return entry.first.first == &connection; });
  }

 private:
  struct Received {
    std::uint64_t bytes = 0;
    std::uint32_t chunks = 0;
  };
  codec::FrameLimits limits_;
  std::map<std::pair<Connection*, std::uint32_t>, Received> streams_;
};

// The sender of the bulk test: KvChunk frames whose attachments are slices of
// one source buffer, each prepared (digested) as it is sent, as long as
// credit allows; then KvCommit. Stops the loop when the stream has closed.
class BulkSender final : public ConnectionHandler {
 public:
  // `source` outlives every transfer: the connection may send from it in
  // place (by reference) rather than copy it, holding a handle that owns
  // nothing (the aliasing constructor) until each write is done.
  BulkSender(EventLoop& loop, std::span<const std::byte> source)
      : loop_(loop), source_(source), source_owner_(std::shared_ptr<void>(), source.data()) {}

  void start(Connection& connection, std::size_t chunk_bytes, std::uint64_t total_bytes) {
    connection_ = &connection;
    chunk_bytes_ = chunk_bytes;
    total_bytes_ = total_bytes;
    sent_bytes_ = 0;
    chunks_ = 0;
    refused_sends_ = 0;
    committed_ = false;
    closed_ = false;
    failure_.clear();
    prepared_.reset();
    stream_id_ = connection.open_stream();
    if (stream_id_ == 0) throw std::runtime_error("no stream for the bulk transfer");
    pump();
  }

  bool done() const { return closed_; }
  bool committed() const { return committed_; }
  const std::string& failure() const { return failure_; }
  Clock::time_point finished_at() const { return finished_at_; }
  std::uint64_t refused_sends() const { return refused_sends_; }

  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.kind() == codec::FrameKind::kv_committed && frame.header.stream_id == stream_id_) {
      committed_ = true;
      finished_at_ = Clock::now();
    }
  }

  void on_stream_writable(Connection&, std::uint32_t stream_id) override {
    if (stream_id == stream_id_) pump();
  }

  void on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) override {
    if (stream_id != stream_id_) return;
    if (reason.error) failure_ = "bulk stream failed: " + reason.message;
    closed_ = true;
    loop_.stop();
  }

  void on_closed(Connection&, const EndReason&) override {}

 private:
  void pump() {
    while (sent_bytes_ < total_bytes_) {
      const std::size_t bytes = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes_, total_bytes_ - sent_bytes_));
      // Kept across a refusal for want of credit: digested once per chunk.
      if (!prepared_) prepared_ = codec_.prepare(source_.first(bytes), codec::AttachmentOptions{.compress = false});
      const std::uint64_t offset = sent_bytes_;
      const SendStatus status = connection_->send<protocol::KvChunk>(stream_id_, [&](protocol::KvChunkBuilder chunk) {
        chunk.transfer(kBulkTransfer).offset(offset);
      }, 0, &*prepared_, source_owner_);
      if (status == SendStatus::blocked) {
        ++refused_sends_;
        return;  // on_stream_writable resumes
      }
      if (status != SendStatus::sent) {
        failure_ = "KvChunk not sent: " + std::string(transport::to_string(status));
        connection_->reset_stream(stream_id_, protocol::ErrorCode::TRANSFER_ABORTED, failure_);
        return;
      }
      prepared_.reset();
      sent_bytes_ += bytes;
      ++chunks_;
    }
    connection_->send<protocol::KvCommit>(stream_id_, [&](protocol::KvCommitBuilder commit) {
      commit.transfer(kBulkTransfer).totals(total_bytes_, chunks_);
    }, kEndStream);
  }

  EventLoop& loop_;
  std::span<const std::byte> source_;
  std::shared_ptr<const void> source_owner_;
  codec::AttachmentCodec codec_;
  std::optional<codec::PreparedAttachment> prepared_;
  Connection* connection_ = nullptr;
  std::uint32_t stream_id_ = 0;
  std::size_t chunk_bytes_ = 0;
  std::uint64_t total_bytes_ = 0;
  std::uint64_t sent_bytes_ = 0;
  std::uint32_t chunks_ = 0;
  std::uint64_t refused_sends_ = 0;
  bool committed_ = false;
  bool closed_ = false;
  std::string failure_;
  Clock::time_point finished_at_;
};

// Windows large enough for a 16 MiB attachment to stream without waiting on
// every chunk: 64 MiB per stream, 256 MiB per connection.
ConnectionOptions bulk_options(std::size_t chunk_bytes) {
  ConnectionOptions options;
  options.initial_stream_credit_bytes = 64u << 20;
  options.initial_connection_credit_bytes = 256ull << 20;
  options.limits.max_attachment_bytes = std::max<std::uint64_t>(options.limits.max_attachment_bytes, chunk_bytes);
  return options;
}

ConnectionOptions server_options(ConnectionOptions options) {
  options.role = protocol::Role::WORKER;
  options.name = "bench-server";
  return options;
}

}  // namespace

// ---------------------------------------------------------------- connections

// Either end of a connection that carries no stream: the connection-rate
// test only opens, greets and closes.
class IdleHandler final : public ConnectionHandler {
 public:
  void on_stream_frame(Connection&, const codec::FrameView&) override {}
  void on_closed(Connection&, const EndReason&) override {}
};

// ---------------------------------------------------------------- runners

std::vector<ThroughputRound> fmwire_token_throughput(const std::string& backend, const TokenShape& shape, int rounds) {
  ServerThread server(backend, server_options({}), [](EventLoop& loop) {
    return std::make_unique<TokenSource>(loop, TokenSourceOptions{});
  });
  ClientSide client(backend);
  TokenSink sink(client.loop);
  client.connect(server.port(), shape.connections, {}, sink);

  const std::size_t streams = static_cast<std::size_t>(shape.connections * shape.streams_per_connection);
  const std::uint64_t expected_checksum = expected_stream_checksum(shape.frames_per_stream) * streams;
  std::vector<ThroughputRound> results;
  for (int round = -1; round < rounds; ++round) {  // round -1 warms up
    sink.expect_streams(streams);
    const auto start = Clock::now();
    const double start_cpu_seconds = process_cpu_seconds();
    for (auto& connection : client.connections) {
      for (int i = 0; i < shape.streams_per_connection; ++i) {
        const std::uint32_t stream_id = connection->open_stream();
        if (stream_id == 0) throw std::runtime_error("fmwire: no stream free on a connection");
        send_generate_request(*connection, stream_id, shape.frames_per_stream);
      }
    }
    if (!run_until(client.loop, [&] { return sink.round_done(); }, 300'000ms, 100ms)) {
      throw std::runtime_error("fmwire token round not finished within 300 s");
    }
    if (!sink.failure().empty()) throw std::runtime_error("fmwire: " + sink.failure());
    if (sink.frames() != shape.frames_per_round() || sink.checksum() != expected_checksum) {
      throw std::runtime_error("fmwire: received " + std::to_string(sink.frames()) + " frames of " +
                               std::to_string(shape.frames_per_round()) + ", or their content differs");
    }
    if (round < 0) continue;
    const double frames = static_cast<double>(sink.frames());
    results.push_back({frames / seconds_between(start, sink.finished_at()),
                       (sink.finished_cpu_seconds() - start_cpu_seconds) / frames * 1e6});
  }
  client.close_all();
  server.stop();
  return results;
}

std::vector<LatencyRun> fmwire_token_latency(const std::string& backend, const LatencyPlan& plan, int repetitions) {
  const auto origin = Clock::now();
  ServerThread server(backend, server_options({}), [&](EventLoop& loop) {
    return std::make_unique<TokenSource>(loop, TokenSourceOptions{plan.frames_per_s, origin});
  });
  ClientSide client(backend);
  TokenSink sink(client.loop);
  client.connect(server.port(), 1, {}, sink);
  const auto limit = std::chrono::milliseconds(static_cast<std::int64_t>(plan.frames / plan.frames_per_s * 1000)) + 30'000ms;

  std::vector<LatencyRun> results;
  for (int repetition = 0; repetition < repetitions; ++repetition) {
    sink.expect_streams(1);
    sink.sample_latency(origin, plan.warmup_frames, plan.frames);
    Connection& connection = *client.connections.front();
    const std::uint32_t stream_id = connection.open_stream();
    if (stream_id == 0) throw std::runtime_error("fmwire: no stream free for the latency test");
    send_generate_request(connection, stream_id, plan.frames);
    if (!run_until(client.loop, [&] { return sink.round_done(); }, limit, 100ms)) {
      throw std::runtime_error("fmwire paced stream not finished in time");
    }
    if (!sink.failure().empty()) throw std::runtime_error("fmwire: " + sink.failure());
    if (sink.frames() != plan.frames) throw std::runtime_error("fmwire: paced stream lost frames");
    results.push_back(summarize_latency(sink.take_latencies_us()));
  }
  client.close_all();
  server.stop();
  return results;
}

std::vector<BulkRun> fmwire_bulk(const std::string& backend, std::size_t chunk_bytes, std::uint64_t total_bytes,
                                 int repetitions, std::size_t zero_copy_min_bytes, bool register_source) {
  const ConnectionOptions options = bulk_options(chunk_bytes);
  ServerThread server(backend, server_options(options), [](EventLoop&) { return std::make_unique<BulkSink>(); });

  // Bytes that are not all alike, so that nothing downstream can shortcut them.
  std::vector<std::byte> source(chunk_bytes);
  std::uint64_t state = 0x9e3779b97f4a7c15ull;
  for (std::byte& byte : source) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    byte = static_cast<std::byte>(state >> 56);
  }

  ClientSide client(backend, transport::UringOptions{.zero_copy_min_bytes = zero_copy_min_bytes});
  if (register_source && !client.loop.register_memory(std::as_bytes(std::span(source)))) {
    throw std::runtime_error("fmwire: the ring refused to register the " + std::to_string(chunk_bytes >> 20) +
                             " MiB source buffer");
  }
  BulkSender sender(client.loop, source);
  client.connect(server.port(), 1, options, sender);
  const std::uint64_t warmup_bytes = std::min<std::uint64_t>(total_bytes, std::max<std::uint64_t>(4 * chunk_bytes, 64u << 20));

  std::vector<BulkRun> results;
  for (int repetition = -1; repetition < repetitions; ++repetition) {  // -1 warms up
    const std::uint64_t bytes = repetition < 0 ? warmup_bytes : total_bytes;
    const CpuTimes start_cpu = process_cpu_times();
    const auto start = Clock::now();
    sender.start(*client.connections.front(), chunk_bytes, bytes);
    if (!run_until(client.loop, [&] { return sender.done(); }, 300'000ms, 100ms)) {
      throw std::runtime_error("fmwire bulk transfer not finished within 300 s");
    }
    if (!sender.failure().empty()) throw std::runtime_error("fmwire: " + sender.failure());
    if (!sender.committed()) throw std::runtime_error("fmwire: bulk transfer ended without KvCommitted");
    if (repetition < 0) continue;
    const CpuTimes end_cpu = process_cpu_times();
    const double gigabytes = static_cast<double>(bytes) / 1e9;
    results.push_back({static_cast<double>(bytes) / seconds_between(start, sender.finished_at()),
                       (end_cpu.user_s - start_cpu.user_s) / gigabytes,
                       (end_cpu.system_s - start_cpu.system_s) / gigabytes, sender.refused_sends()});
  }
  client.close_all();
  if (register_source) client.loop.unregister_memory(std::as_bytes(std::span(source)));
  server.stop();
  return results;
}

std::vector<ConnectRun> fmwire_connect_rate(const std::string& backend, int total, int concurrency, int repetitions) {
  ServerThread server(backend, server_options({}), [](EventLoop&) { return std::make_unique<IdleHandler>(); });
  ClientSide client(backend);
  IdleHandler handler;
  std::vector<ConnectRun> results;
  for (int repetition = -1; repetition < repetitions; ++repetition) {  // -1 warms up
    const int connections = repetition < 0 ? concurrency : total;
    const auto start = Clock::now();
    const double start_cpu_seconds = process_cpu_seconds();
    for (int opened = 0; opened < connections; opened += concurrency) {
      client.connect(server.port(), std::min(concurrency, connections - opened), {}, handler);
      client.close_all();
    }
    if (repetition < 0) continue;
    const double seconds = seconds_between(start, Clock::now());
    results.push_back({connections / seconds, (process_cpu_seconds() - start_cpu_seconds) / connections * 1e6});
  }
  server.stop();
  return results;
}

}  // namespace fmwire::bench
