#include "transport_fmwire.h"

#include <exception>
#include <functional>
#include <future>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>

#include "perf/bulk_handlers.h"
#include "perf/client_connections.h"
#include "perf/token_handlers.h"
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
using perf::bulk_options;
using perf::BulkSender;
using perf::BulkSink;
using perf::ClientConnections;
using perf::send_generate_request;
using perf::TokenSink;
using perf::TokenSource;
using perf::TokenSourceOptions;

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

// Stamps the moment the Hello exchange is done, on the loop thread: the
// connect() that waits for it polls every millisecond, too coarse to time.
class ReadyStamp final : public ConnectionHandler {
 public:
  Clock::time_point ready_at{};
  void on_ready(Connection&) override { ready_at = Clock::now(); }
  void on_stream_frame(Connection&, const codec::FrameView&) override {}
  void on_closed(Connection&, const EndReason&) override {}
};

// ---------------------------------------------------------------- runners

std::vector<ThroughputRound> fmwire_token_throughput(const std::string& backend, const TokenShape& shape, int rounds,
                                                     std::shared_ptr<const transport::TlsCredentials> tls) {
  ConnectionOptions options;
  options.tls = tls;
  ServerThread server(backend, server_options(options), [](EventLoop& loop) {
    return std::make_unique<TokenSource>(loop, TokenSourceOptions{});
  });
  ClientConnections client(backend, tls);
  TokenSink sink(client.loop);
  client.connect("127.0.0.1", server.port(), shape.connections, {}, sink);

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
  ClientConnections client(backend);
  TokenSink sink(client.loop);
  client.connect("127.0.0.1", server.port(), 1, {}, sink);
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
                                 int repetitions, std::size_t zero_copy_min_bytes, bool register_source,
                                 std::shared_ptr<const transport::TlsCredentials> tls) {
  const ConnectionOptions options = bulk_options(chunk_bytes);
  ConnectionOptions with_tls = options;
  with_tls.tls = tls;
  ServerThread server(backend, server_options(with_tls), [](EventLoop&) { return std::make_unique<BulkSink>(); });

  const std::vector<std::byte> source = perf::bulk_source_bytes(chunk_bytes);

  ClientConnections client(backend, tls, transport::UringOptions{.zero_copy_min_bytes = zero_copy_min_bytes});
  if (register_source && !client.loop.register_memory(std::as_bytes(std::span(source)))) {
    throw std::runtime_error("fmwire: the ring refused to register the " + std::to_string(chunk_bytes >> 20) +
                             " MiB source buffer");
  }
  BulkSender sender(client.loop, source);
  client.connect("127.0.0.1", server.port(), 1, options, sender);
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
  ClientConnections client(backend);
  IdleHandler handler;
  std::vector<ConnectRun> results;
  for (int repetition = -1; repetition < repetitions; ++repetition) {  // -1 warms up
    const int connections = repetition < 0 ? concurrency : total;
    const auto start = Clock::now();
    const double start_cpu_seconds = process_cpu_seconds();
    for (int opened = 0; opened < connections; opened += concurrency) {
      client.connect("127.0.0.1", server.port(), std::min(concurrency, connections - opened), {}, handler);
      client.close_all();
    }
    if (repetition < 0) continue;
    const double seconds = seconds_between(start, Clock::now());
    results.push_back({connections / seconds, (process_cpu_seconds() - start_cpu_seconds) / connections * 1e6});
  }
  server.stop();
  return results;
}

ConnectSetupTimes fmwire_connect_setup(const std::string& backend, int connects) {
  auto made = transport::AuthToken::from_secret("a bench secret of thirty-two bytes");
  if (!made) throw std::runtime_error(made.error());
  ConnectionOptions with_token;
  with_token.auth_token = *made;
  ServerThread plain(backend, server_options({}), [](EventLoop&) { return std::make_unique<IdleHandler>(); });
  ServerThread tokened(backend, server_options(with_token), [](EventLoop&) { return std::make_unique<IdleHandler>(); });
  ClientConnections client(backend);
  ReadyStamp handler;
  ConnectSetupTimes times;
  for (int i = -8; i < connects; ++i) {  // the first few warm up
    for (const bool token : {false, true}) {
      const auto start = Clock::now();
      client.connect("127.0.0.1", token ? tokened.port() : plain.port(), 1, token ? with_token : ConnectionOptions{},
                     handler);
      const double us = seconds_between(start, handler.ready_at) * 1e6;
      client.close_all();
      client.connections.clear();
      if (i >= 0) (token ? times.token_us : times.plain_us).push_back(us);
    }
  }
  plain.stop();
  tokened.stop();
  return times;
}

}  // namespace fmwire::bench
