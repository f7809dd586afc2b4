#include "cli/perf_command.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <future>
#include <span>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cli/role_shutdown.h"
#include "log/log.h"
#include "perf/bulk_handlers.h"
#include "perf/client_connections.h"
#include "perf/grpc_kv.h"
#include "perf/grpc_tokens.h"
#include "perf/iperf3.h"
#include "perf/kv_handlers.h"
#include "perf/measure.h"
#include "perf/perf_service.h"
#include "perf/results.h"
#include "perf/run_until.h"
#include "perf/token_handlers.h"
#include "transport/endpoint.h"
#include "transport/server_group.h"

namespace fmwire::cli {

using namespace std::chrono_literals;
using perf::Clock;
using perf::Comparison;

// ---------------------------------------------------------------- perf serve

int run_perf_serve(const PerfServeCommand& command, std::ostream& out) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    log::error("--listen " + problem);
    return 2;
  }
  // Before the loop thread, which inherits its signal mask.
  RoleShutdown shutdown;

  // The peer of `perf run --test bulk --compare`: killed when this returns
  // (the ChildProcess destructor), and by the kernel should we die first.
  std::unique_ptr<perf::ChildProcess> iperf3_server;
  if (command.iperf3_port) {
    if (const std::optional<std::string> iperf3 = perf::find_on_path("iperf3")) {
      iperf3_server = std::make_unique<perf::ChildProcess>(
          *iperf3, std::vector<std::string>{"-s", "-p", std::to_string(*command.iperf3_port)}, false);
      log::info("iperf3 -s on port " + std::to_string(*command.iperf3_port) + " (" + perf::iperf3_version(*iperf3) +
                   ")");
    } else {
      log::warn("iperf3 not installed: no iperf3 server, --compare runs against this host will skip it");
    }
  }

  // The peers of `perf run --test tokens|latency|kv --compare`, in this
  // process so that the CPU reports count their threads; clients learn their
  // ports from the gRPC port reports. Shut down when this returns, after the
  // group.
  std::unique_ptr<perf::GrpcTokenServer> grpc_tokens;
  std::unique_ptr<perf::GrpcKvServer> grpc_kv;
  if (!perf::grpc_built_in()) {
    if (command.grpc_port || command.grpc_kv_port) {
      log::error("--grpc-port, --grpc-kv-port: gRPC not built in (libgrpc++-dev, grpc_cpp_plugin and protobuf at "
                 "build time)");
      return 2;
    }
    log::warn("gRPC not built in: no gRPC server, --compare runs against this host will skip it");
  } else {
    // With --tls-*, gRPC serves with TLS too, from the same files: a TLS run
    // compares with TLS.
    const transport::TlsFiles grpc_tls = command.tls ? command.tls->files() : transport::TlsFiles{};
    const auto start = [&](const char* flag, std::optional<std::uint16_t> port, auto make) {
      try {
        make(port.value_or(0));
      } catch (const std::exception& error) {
        if (port) {
          log::error(std::string(flag) + ": " + error.what());
          return false;
        }
        log::warn(std::string(error.what()) + ": --compare runs against this host will skip gRPC");
      }
      return true;
    };
    const bool started =
        start("--grpc-port", command.grpc_port,
              [&](std::uint16_t port) {
                grpc_tokens = std::make_unique<perf::GrpcTokenServer>(endpoint->host, port, grpc_tls);
              }) &&
        start("--grpc-kv-port", command.grpc_kv_port, [&](std::uint16_t port) {
          grpc_kv = std::make_unique<perf::GrpcKvServer>(endpoint->host, port, perf::kMaxKvTransferBytes, grpc_tls);
        });
    if (!started) return 1;
  }
  const perf::GrpcPorts grpc_ports{grpc_tokens ? grpc_tokens->port() : std::uint16_t{0},
                                   grpc_kv ? grpc_kv->port() : std::uint16_t{0}};

  transport::ConnectionOptions options = perf::perf_server_options();
  options.auth_token = command.auth_token;
  options.tls = command.tls;
  transport::ServerGroup group(
      1, *endpoint, options,
      [grpc_ports](transport::EventLoop& loop) { return std::make_unique<perf::PerfService>(loop, grpc_ports); },
      command.backend);
  log::info(group.backend_log_line());
  out << "listening on " << transport::Endpoint{endpoint->host, group.port()}.to_string() << std::endl;
  if (grpc_tokens) {
    const std::string grpc_endpoint = transport::Endpoint{endpoint->host, grpc_ports.tokens}.to_string();
    out << "gRPC peer on " << grpc_endpoint << std::endl;
    log::info("gRPC TokenStream server on " + grpc_endpoint + " (gRPC " + perf::grpc_version() + ")");
  }
  if (grpc_kv) {
    const std::string grpc_endpoint = transport::Endpoint{endpoint->host, grpc_ports.kv}.to_string();
    out << "gRPC KV peer on " << grpc_endpoint << std::endl;
    log::info("gRPC KvTransfer server on " + grpc_endpoint);
  }
  group.start();

  shutdown.wait_for_signal();
  return shutdown.drain(group, "perf server shutting down", command.drain_timeout);
}

// ---------------------------------------------------------------- perf run

namespace {

// A round's limit: no test round on a working link comes near it, and a
// server that stops answering without closing ends the run within it.
constexpr std::chrono::milliseconds kRoundLimit{120'000};

// Rounds as asked: a warm-up, then `repetitions` measured rounds, or
// measured rounds until `seconds` have passed (at least one).
class Rounds {
 public:
  explicit Rounds(const PerfRunCommand& command)
      : repetitions_(command.repetitions.value_or(5)), seconds_(command.seconds) {}

  bool more(std::size_t measured) const {
    if (seconds_) return measured == 0 || perf::seconds_between(start_, Clock::now()) < *seconds_;
    return measured < static_cast<std::size_t>(repetitions_);
  }
  void start_measuring() { start_ = Clock::now(); }

 private:
  int repetitions_;
  std::optional<double> seconds_;
  Clock::time_point start_;
};

// What the server reports of itself, asked for on a connection of its own:
// its process CPU before and after each round, and where its gRPC peer runs.
class ServerReports {
 public:
  ServerReports(perf::ClientConnections& client, const transport::Endpoint& server, std::chrono::milliseconds timeout)
      : client_(client), report_(client.loop) {
    client_.connect(server.host, server.port, 1, {}, report_, timeout);
    connection_ = client_.connections.back().get();
  }

  // Throws std::runtime_error when the server does not answer.
  double cpu_seconds() {
    ask(perf::kCpuReportPrompt);
    if (!report_.number()) throw std::runtime_error(report_.failure());
    return static_cast<double>(*report_.number()) / 1e9;
  }

  // A gRPC peer's port on the server host (`prompt`: perf::kGrpcPortPrompt
  // or kGrpcKvPortPrompt), 0 where it runs none, or
  // nullopt where its answer is not a port (an fmwire that predates it).
  // Throws std::runtime_error when the server does not answer.
  std::optional<std::uint16_t> grpc_port(std::string_view prompt) {
    ask(prompt);
    if (!report_.number() || *report_.number() < 0 || *report_.number() > 65535) return std::nullopt;
    return static_cast<std::uint16_t>(*report_.number());
  }

  transport::EventLoop& loop() { return client_.loop; }

 private:
  void ask(std::string_view prompt) {
    report_.request(*connection_, prompt);
    if (!perf::run_until(client_.loop, [&] { return report_.done(); }, 10'000ms)) {
      throw std::runtime_error("the server sent no report within 10 s");
    }
    if (!report_.number() && report_.failure().starts_with("connection closed")) {
      throw std::runtime_error(report_.failure());
    }
  }

  perf::ClientConnections& client_;
  perf::ReportClient report_;
  transport::Connection* connection_ = nullptr;
};

std::string format(const char* pattern, double value) {
  char text[64];
  std::snprintf(text, sizeof text, pattern, value);
  return text;
}

// Throws std::runtime_error saying why a token or latency round did not end
// well: the server gone, `late` when it did not end in time, or a stream's
// failure.
void check_round(const perf::TokenSink& sink, bool finished, const char* late) {
  if (sink.connection_closed()) {
    throw std::runtime_error("the server closed the connection mid-test" +
                             (sink.failure().empty() ? std::string() : ": " + sink.failure()));
  }
  if (!finished) throw std::runtime_error(late);
  if (!sink.failure().empty()) throw std::runtime_error(sink.failure());
}

// Runs `work` on a thread of its own while `loop` turns on this one: the
// gRPC peer's rounds, during which the fmwire connections (the server's
// reports) must still answer keepalive Pings, or the server closes them
// after ConnectionOptions::dead_after. The loop wakes a few times a second
// only. Returns work's result or rethrows what it threw.
template <typename Result>
Result while_loop_turns(transport::EventLoop& loop, std::function<Result()> work) {
  std::packaged_task<Result()> task(std::move(work));
  std::future<Result> result = task.get_future();
  {
    std::jthread thread(std::move(task));
    while (!perf::run_until(
        loop, [&] { return result.wait_for(0s) == std::future_status::ready; }, kRoundLimit, 250ms)) {
      // the work bounds itself (its round limit): wait on
    }
  }
  return result.get();
}

// The files gRPC's client presents with --tls-*: the same as fmwire's, so
// that a TLS run compares with gRPC over TLS (perf/grpc_credentials.h).
transport::TlsFiles grpc_tls(const PerfRunCommand& command) {
  return command.tls ? command.tls->files() : transport::TlsFiles{};
}

// Where a gRPC peer of tokens, latency or kv runs on the server host, with
// --compare: its port, or nullopt and `note` saying why it is skipped.
std::optional<std::uint16_t> grpc_peer_port(const PerfRunCommand& command, ServerReports& reports,
                                            std::string_view prompt, std::string& note) {
  if (!command.compare) {
    note = "not asked for (--compare)";
    return std::nullopt;
  }
  if (!perf::grpc_built_in()) {
    log::warn("gRPC not built in: the gRPC comparison is skipped");
    note = "gRPC not built in here: skipped";
    return std::nullopt;
  }
  const std::optional<std::uint16_t> port = reports.grpc_port(prompt);
  if (!port) {
    log::warn("the server does not say where a gRPC peer runs (an older fmwire?): the gRPC comparison is skipped");
    note = "the server does not say where a gRPC peer runs (an older fmwire?): skipped";
    return std::nullopt;
  }
  if (*port == 0) {
    log::warn("the server runs no gRPC peer for " + command.test +
              " (gRPC not built in there, or its gRPC server did not start): the gRPC comparison is skipped");
    note = "the server runs no gRPC peer for " + command.test +
           " (gRPC not built in there, or its gRPC server did not start): skipped";
    return std::nullopt;
  }
  return port;
}

// The peer of tokens, after fmwire's rounds: gRPC's TokenStream in the same
// shape (one channel, as many concurrent calls as streams, the same frames
// per stream), rounds as asked (--repetitions, --seconds) after a warm-up,
// the server's CPU from its report as for fmwire (the gRPC server runs in
// its process).
struct GrpcTokensPeer {
  std::optional<double> rate;                    // frames/s, median
  std::optional<double> client_cpu_per_million;  // CPU-s per million frames, median
  std::optional<double> server_cpu_per_million;
  std::string note;
};

GrpcTokensPeer grpc_tokens_peer(const PerfRunCommand& command, const transport::Endpoint& server,
                                ServerReports& reports, std::uint32_t frames_per_stream) {
  GrpcTokensPeer peer;
  const std::optional<std::uint16_t> port = grpc_peer_port(command, reports, perf::kGrpcPortPrompt, peer.note);
  if (!port) return peer;
  const std::string address = transport::Endpoint{server.host, *port}.to_string();
  log::info("gRPC token rounds against " + address);
  perf::GrpcTokenClient client(server.host, *port, 1, command.connect_timeout, grpc_tls(command));
  std::vector<double> rates, client_cpu, server_cpu;
  Rounds rounds(command);
  for (bool warm_up = true; warm_up || rounds.more(rates.size()); warm_up = false) {
    const double server_start = reports.cpu_seconds();
    const perf::GrpcTokenRound measured = while_loop_turns<perf::GrpcTokenRound>(reports.loop(), [&] {
      return client.stream_tokens(static_cast<int>(command.streams), frames_per_stream, kRoundLimit);
    });
    const double server_end = reports.cpu_seconds();
    if (warm_up) {
      rounds.start_measuring();
      continue;
    }
    const double millions = static_cast<double>(measured.frames) / 1e6;
    rates.push_back(static_cast<double>(measured.frames) / measured.seconds);
    client_cpu.push_back(measured.cpu_seconds / millions);
    server_cpu.push_back((server_end - server_start) / millions);
  }
  peer.rate = perf::median(rates);
  peer.client_cpu_per_million = perf::median(client_cpu);
  peer.server_cpu_per_million = perf::median(server_cpu);
  peer.note = "gRPC " + perf::grpc_version() + ", TokenStream (callback API, gRPC's own threads) on " + address +
              ", one channel, " + std::to_string(command.streams) + " concurrent calls, the same frames, " +
              std::to_string(rates.size()) + " rounds";
  return peer;
}

// tokens: frames/s, and CPU per million frames here and on the server.
std::vector<Comparison> run_tokens(const PerfRunCommand& command, const transport::Endpoint& server,
                                   std::ostream& out) {
  perf::ClientConnections client(command.backend, command.tls);
  client.auth_token = command.auth_token;
  ServerReports server_reports(client, server, command.connect_timeout);
  perf::TokenSink sink(client.loop);
  client.connect(server.host, server.port, 1, {}, sink, command.connect_timeout);
  transport::Connection& connection = *client.connections.back();

  const std::uint32_t frames_per_stream = std::max<std::uint32_t>(1, command.frames / command.streams);
  const std::uint64_t frames = std::uint64_t{frames_per_stream} * command.streams;
  const std::uint64_t expected_checksum = perf::expected_stream_checksum(frames_per_stream) * command.streams;
  std::vector<double> rates, client_cpu, server_cpu_per_million;
  Rounds rounds(command);
  for (bool warm_up = true; warm_up || rounds.more(rates.size()); warm_up = false) {
    const double server_start = server_reports.cpu_seconds();
    sink.expect_streams(command.streams);
    const auto start = Clock::now();
    const double client_start = perf::process_cpu_seconds();
    for (std::uint32_t i = 0; i < command.streams; ++i) {
      const std::uint32_t stream_id = connection.open_stream();
      if (stream_id == 0) throw std::runtime_error("no stream free on the connection (--streams too many?)");
      perf::send_generate_request(connection, stream_id, frames_per_stream);
    }
    const bool finished = perf::run_until(
        client.loop, [&] { return sink.round_done() || sink.connection_closed(); }, kRoundLimit, 100ms);
    check_round(sink, finished, "token round not finished within 120 s");
    if (sink.frames() != frames || sink.checksum() != expected_checksum) {
      throw std::runtime_error("received " + std::to_string(sink.frames()) + " token frames of " +
                               std::to_string(frames) + ", or their content differs");
    }
    const double server_end = server_reports.cpu_seconds();
    if (warm_up) {
      rounds.start_measuring();
      continue;
    }
    const double millions = static_cast<double>(frames) / 1e6;
    rates.push_back(static_cast<double>(frames) / perf::seconds_between(start, sink.finished_at()));
    client_cpu.push_back((sink.finished_cpu_seconds() - client_start) / millions);
    server_cpu_per_million.push_back((server_end - server_start) / millions);
  }
  const GrpcTokensPeer peer = grpc_tokens_peer(command, server, server_reports, frames_per_stream);
  client.close_all();

  const double rate = perf::median(rates);
  const double client_median = perf::median(client_cpu);
  const double server_median = perf::median(server_cpu_per_million);
  std::vector<Comparison> rows{
      perf::compare("tokens_frames_per_s", rate, "frames/s", peer.rate, "grpc", true),
      perf::compare("tokens_client_cpu_s_per_million_frames", client_median, "CPU-s/Mframe",
                    peer.client_cpu_per_million, "grpc", false),
      perf::compare("tokens_server_cpu_s_per_million_frames", server_median, "CPU-s/Mframe",
                    peer.server_cpu_per_million, "grpc", false)};
  out << "tokens: " << rates.size() << " rounds of " << frames << " one-token frames on " << command.streams
      << " streams of one connection (medians)\n"
      << "  token frames/s                  " << format("%.0f", rate) << "\n"
      << "  client CPU-s per million frames " << format("%.3f", client_median) << "\n"
      << "  server CPU-s per million frames " << format("%.3f", server_median) << "\n";
  if (peer.rate) {
    out << "  gRPC frames/s                   " << format("%.0f", *peer.rate) << "\n"
        << "  gRPC client CPU-s per Mframe    " << format("%.3f", *peer.client_cpu_per_million) << "\n"
        << "  gRPC server CPU-s per Mframe    " << format("%.3f", *peer.server_cpu_per_million) << "\n"
        << "  fmwire / gRPC frames/s          " << perf::ratio_text(perf::ratio_of(rows[0])) << "\n"
        << "  gRPC / fmwire client CPU/frame  " << perf::ratio_text(perf::ratio_of(rows[1])) << "\n"
        << "  gRPC / fmwire server CPU/frame  " << perf::ratio_text(perf::ratio_of(rows[2])) << "\n";
  }
  out << "  peer: " << peer.note << "\n";
  return rows;
}

// The peer of latency, after fmwire's rounds: rounds as asked of as many
// gRPC round trips (Generate asking for one Token, one call after another on
// one channel) after a warm-up round, medians of each round's percentiles.
struct GrpcLatencyPeer {
  std::optional<double> p50_us;
  std::optional<double> p99_us;
  std::string note;
};

GrpcLatencyPeer grpc_latency_peer(const PerfRunCommand& command, const transport::Endpoint& server,
                                  ServerReports& reports) {
  GrpcLatencyPeer peer;
  const std::optional<std::uint16_t> port = grpc_peer_port(command, reports, perf::kGrpcPortPrompt, peer.note);
  if (!port) return peer;
  const std::string address = transport::Endpoint{server.host, *port}.to_string();
  log::info("gRPC round trips against " + address);
  perf::GrpcTokenClient client(server.host, *port, 1, command.connect_timeout, grpc_tls(command));
  std::vector<double> p50s, p99s, round_trips_us;
  round_trips_us.reserve(command.requests);
  Rounds rounds(command);
  for (bool warm_up = true; warm_up || rounds.more(p50s.size()); warm_up = false) {
    round_trips_us.clear();
    while_loop_turns<bool>(reports.loop(), [&] {
      for (std::uint32_t request = 0; request < command.requests; ++request) {
        round_trips_us.push_back(client.round_trip_us(10'000ms));
      }
      return true;
    });
    if (warm_up) {
      rounds.start_measuring();
      continue;
    }
    p50s.push_back(perf::percentile(round_trips_us, 0.50));
    p99s.push_back(perf::percentile(round_trips_us, 0.99));
  }
  peer.p50_us = perf::median(p50s);
  peer.p99_us = perf::median(p99s);
  peer.note = "gRPC " + perf::grpc_version() + ", TokenStream on " + address +
              ", Generate asking for one Token (synchronous client, callback server), the same requests, " +
              std::to_string(p50s.size()) + " rounds";
  return peer;
}

// latency: round trips of a one-frame answer, one after another on one
// connection, each on a stream of its own.
std::vector<Comparison> run_latency(const PerfRunCommand& command, const transport::Endpoint& server,
                                    std::ostream& out) {
  perf::ClientConnections client(command.backend, command.tls);
  client.auth_token = command.auth_token;
  // Only --compare asks the server anything (where its gRPC peer runs).
  std::optional<ServerReports> server_reports;
  if (command.compare) server_reports.emplace(client, server, command.connect_timeout);
  perf::TokenSink sink(client.loop);
  client.connect(server.host, server.port, 1, {}, sink, command.connect_timeout);
  transport::Connection& connection = *client.connections.back();

  std::vector<double> p50s, p99s;
  std::vector<double> round_trips_us;
  round_trips_us.reserve(command.requests);
  Rounds rounds(command);
  for (bool warm_up = true; warm_up || rounds.more(p50s.size()); warm_up = false) {
    round_trips_us.clear();
    for (std::uint32_t request = 0; request < command.requests; ++request) {
      sink.expect_streams(1);
      const std::uint32_t stream_id = connection.open_stream();
      if (stream_id == 0) throw std::runtime_error("no stream free on the connection");
      const auto sent = Clock::now();
      perf::send_generate_request(connection, stream_id, 1);
      const bool finished = perf::run_until(
          client.loop, [&] { return sink.round_done() || sink.connection_closed(); }, 10'000ms);
      check_round(sink, finished, "no answer to a latency request within 10 s");
      if (sink.frames() != 1) throw std::runtime_error("a latency request answered without its one Tokens frame");
      round_trips_us.push_back(std::chrono::duration<double, std::micro>(sink.first_frame_at() - sent).count());
    }
    if (warm_up) {
      rounds.start_measuring();
      continue;
    }
    p50s.push_back(perf::percentile(round_trips_us, 0.50));
    p99s.push_back(perf::percentile(round_trips_us, 0.99));
  }
  GrpcLatencyPeer peer{std::nullopt, std::nullopt, "not asked for (--compare)"};
  if (server_reports) peer = grpc_latency_peer(command, server, *server_reports);
  client.close_all();

  const double p50 = perf::median(p50s);
  const double p99 = perf::median(p99s);
  std::vector<Comparison> rows{perf::compare("latency_round_trip_p50", p50, "us", peer.p50_us, "grpc", false),
                               perf::compare("latency_round_trip_p99", p99, "us", peer.p99_us, "grpc", false)};
  out << "latency: " << p50s.size() << " rounds of " << command.requests
      << " round trips (GenerateRequest -> one Tokens frame), medians of each round's percentiles\n"
      << "  round trip p50 us               " << format("%.1f", p50) << "\n"
      << "  round trip p99 us               " << format("%.1f", p99) << "\n"
      << "  half the round trip, p50 / p99  " << format("%.1f", p50 / 2) << " / " << format("%.1f", p99 / 2)
      << " us (round trip / 2, not a one-way measurement: the hosts' clocks differ)\n";
  if (peer.p50_us) {
    out << "  gRPC round trip p50 us          " << format("%.1f", *peer.p50_us) << "\n"
        << "  gRPC round trip p99 us          " << format("%.1f", *peer.p99_us) << "\n"
        << "  gRPC / fmwire p50, p99          " << perf::ratio_text(perf::ratio_of(rows[0])) << ", "
        << perf::ratio_text(perf::ratio_of(rows[1])) << "\n";
  }
  out << "  peer: " << peer.note << "\n";
  return rows;
}

// The peer of bulk and kv, after fmwire's rounds: as many iperf3 runs of
// the same bytes, with --compare.
struct IperfPeer {
  std::optional<double> rate;        // bytes/s, median
  std::optional<double> client_cpu;  // CPU-s per GB, median
  std::string note;
};

IperfPeer iperf3_peer(const PerfRunCommand& command, const transport::Endpoint& server, std::uint64_t bytes,
                      std::size_t runs) {
  IperfPeer peer{std::nullopt, std::nullopt, "not asked for (--compare)"};
  if (!command.compare) return peer;
  const std::optional<std::string> iperf3 = perf::find_on_path("iperf3");
  if (!iperf3) {
    log::warn("iperf3 not installed: the iperf3 comparison is skipped");
    peer.note = "iperf3 not installed here: skipped";
    return peer;
  }
  std::vector<double> rates, cpu;
  for (std::size_t run = 0; run < runs; ++run) {
    const perf::IperfClientRun result = perf::iperf3_client(*iperf3, bytes, server.host, command.iperf3_port);
    rates.push_back(result.bytes_per_s);
    cpu.push_back((result.cpu.user_s + result.cpu.system_s) / (static_cast<double>(bytes) / 1e9));
  }
  peer.rate = perf::median(rates);
  peer.client_cpu = perf::median(cpu);
  peer.note = perf::iperf3_version(*iperf3) + ", one TCP stream to " + server.host + ":" +
              std::to_string(command.iperf3_port) + ", the same bytes, " + std::to_string(rates.size()) + " runs";
  return peer;
}

// The rows and the report of a test that moves bytes (bulk, kv): GB/s and
// CPU-s per GB on both ends, medians of the rounds, and iperf3's beside
// them when it ran.
std::vector<Comparison> byte_rate_rows(const std::string& test, const std::string& caption,
                                       const std::vector<double>& rates, const std::vector<double>& client_cpu,
                                       const std::vector<double>& server_cpu_per_gb, const IperfPeer& peer,
                                       std::ostream& out) {
  const double rate = perf::median(rates);
  const double client_median = perf::median(client_cpu);
  const double server_median = perf::median(server_cpu_per_gb);
  std::vector<Comparison> rows{
      perf::compare(test + "_gb_per_s", rate / 1e9, "GB/s", peer.rate ? std::optional(*peer.rate / 1e9) : std::nullopt,
                    "iperf3", true),
      perf::compare(test + "_client_cpu_s_per_gb", client_median, "CPU-s/GB", peer.client_cpu, "iperf3", false),
      perf::compare(test + "_server_cpu_s_per_gb", server_median, "CPU-s/GB", std::nullopt, "", false)};
  out << caption << "\n"
      << "  fmwire GB/s                     " << format("%.3f", rate / 1e9) << "\n"
      << "  client CPU-s per GB             " << format("%.3f", client_median) << "\n"
      << "  server CPU-s per GB             " << format("%.3f", server_median) << "\n";
  if (peer.rate) {
    out << "  iperf3 GB/s                     " << format("%.3f", *peer.rate / 1e9) << "\n"
        << "  iperf3 client CPU-s per GB      " << format("%.3f", *peer.client_cpu) << "\n"
        << "  fmwire / iperf3                 " << perf::ratio_text(perf::ratio_of(rows[0])) << "\n";
  }
  out << "  peer: " << peer.note << "\n";
  return rows;
}

// bulk: GB/s of KvChunk attachments, CPU per GB on both ends; iperf3 on the
// same bytes with --compare.
std::vector<Comparison> run_bulk(const PerfRunCommand& command, const transport::Endpoint& server,
                                 std::ostream& out) {
  const std::vector<std::byte> source = perf::bulk_source_bytes(command.chunk_bytes);
  std::vector<double> rates, client_cpu, server_cpu_per_gb;
  {
    perf::ClientConnections client(command.backend, command.tls);
    client.auth_token = command.auth_token;
    ServerReports server_reports(client, server, command.connect_timeout);
    perf::BulkSender sender(client.loop, source);
    client.connect(server.host, server.port, 1, perf::bulk_options(command.chunk_bytes), sender,
                   command.connect_timeout);
    transport::Connection& connection = *client.connections.back();
    const std::uint64_t warm_up_bytes =
        std::min<std::uint64_t>(command.bytes, std::max<std::uint64_t>(4 * command.chunk_bytes, 64u << 20));
    Rounds rounds(command);
    for (bool warm_up = true; warm_up || rounds.more(rates.size()); warm_up = false) {
      const std::uint64_t bytes = warm_up ? warm_up_bytes : command.bytes;
      const double server_start = server_reports.cpu_seconds();
      const perf::CpuTimes client_start = perf::process_cpu_times();
      const auto start = Clock::now();
      sender.start(connection, command.chunk_bytes, bytes);
      if (!perf::run_until(client.loop, [&] { return sender.done(); }, kRoundLimit, 100ms)) {
        throw std::runtime_error("bulk transfer not finished within 120 s");
      }
      if (!sender.failure().empty()) throw std::runtime_error(sender.failure());
      if (!sender.committed()) throw std::runtime_error("bulk transfer ended without KvCommitted");
      const perf::CpuTimes client_end = perf::process_cpu_times();
      const double server_end = server_reports.cpu_seconds();
      if (warm_up) {
        rounds.start_measuring();
        continue;
      }
      const double gigabytes = static_cast<double>(bytes) / 1e9;
      rates.push_back(static_cast<double>(bytes) / perf::seconds_between(start, sender.finished_at()));
      client_cpu.push_back((client_end.user_s + client_end.system_s - client_start.user_s - client_start.system_s) /
                           gigabytes);
      server_cpu_per_gb.push_back((server_end - server_start) / gigabytes);
    }
    client.close_all();
  }

  const std::string caption = "bulk: " + std::to_string(rates.size()) + " rounds of " + std::to_string(command.bytes) +
                              " bytes in " + std::to_string(command.chunk_bytes) +
                              "-byte KvChunk attachments, digested and checked (medians)";
  return byte_rate_rows("bulk", caption, rates, client_cpu, server_cpu_per_gb,
                        iperf3_peer(command, server, command.bytes, rates.size()), out);
}

// The gRPC peer of kv, after fmwire's rounds: Push calls of the same shard
// in messages of the same size, rounds as asked after a warm-up call, each
// copied into the server's blocks; the server's CPU from its report (its
// KvTransfer server runs in its process).
struct GrpcKvPeer {
  std::optional<double> rate;        // bytes/s, median
  std::optional<double> client_cpu;  // CPU-s per GB, median
  std::optional<double> server_cpu;
  std::string note = "not asked for (--compare)";
};

GrpcKvPeer grpc_kv_peer(const PerfRunCommand& command, const transport::Endpoint& server, ServerReports& reports,
                        std::span<const std::byte> kv, std::uint64_t bytes, std::size_t chunk_bytes) {
  GrpcKvPeer peer;
  const std::optional<std::uint16_t> port = grpc_peer_port(command, reports, perf::kGrpcKvPortPrompt, peer.note);
  if (!port) return peer;
  const std::string address = transport::Endpoint{server.host, *port}.to_string();
  log::info("gRPC KV pushes against " + address);
  perf::GrpcKvClient client(server.host, *port, command.connect_timeout, grpc_tls(command));
  std::vector<double> rates, client_cpu, server_cpu;
  const double gigabytes = static_cast<double>(bytes) / 1e9;
  Rounds rounds(command);
  // The warm-up push is the whole shard: the server's blocks grow to it then.
  for (bool warm_up = true; warm_up || rounds.more(rates.size()); warm_up = false) {
    const double server_start = reports.cpu_seconds();
    const perf::KvSideRun run =
        while_loop_turns<perf::KvSideRun>(reports.loop(), [&] { return client.push(kv, bytes, chunk_bytes); });
    const double server_end = reports.cpu_seconds();
    if (warm_up) {
      rounds.start_measuring();
      continue;
    }
    rates.push_back(static_cast<double>(bytes) / run.seconds);
    client_cpu.push_back(run.cpu_seconds / gigabytes);
    server_cpu.push_back((server_end - server_start) / gigabytes);
  }
  peer.rate = perf::median(rates);
  peer.client_cpu = perf::median(client_cpu);
  peer.server_cpu = perf::median(server_cpu);
  peer.note = "gRPC " + perf::grpc_version() + ", KvTransfer (synchronous streaming API both ends) on " + address +
              ", the same shard in " + std::to_string(chunk_bytes) +
              "-byte bytes messages copied into the server's blocks, " + std::to_string(rates.size()) + " rounds";
  return peer;
}

// kv's rows against gRPC, beside byte_rate_rows' (whose first three rows
// are fmwire's GB/s and CPU-s per GB, client and server).
void append_grpc_kv_rows(std::vector<Comparison>& rows, const GrpcKvPeer& peer, std::ostream& out) {
  const double rate = rows[0].value;
  const double client_cpu = rows[1].value;
  const double server_cpu = rows[2].value;
  rows.push_back(perf::compare("kv_gb_per_s_vs_grpc", rate, "GB/s",
                               peer.rate ? std::optional(*peer.rate / 1e9) : std::nullopt, "grpc", true));
  rows.push_back(perf::compare("kv_client_cpu_s_per_gb_vs_grpc", client_cpu, "CPU-s/GB", peer.client_cpu, "grpc", false));
  rows.push_back(perf::compare("kv_server_cpu_s_per_gb_vs_grpc", server_cpu, "CPU-s/GB", peer.server_cpu, "grpc", false));
  if (peer.rate) {
    out << "  gRPC GB/s                       " << format("%.3f", *peer.rate / 1e9) << "\n"
        << "  gRPC client CPU-s per GB        " << format("%.3f", *peer.client_cpu) << "\n"
        << "  gRPC server CPU-s per GB        " << format("%.3f", *peer.server_cpu) << "\n"
        << "  fmwire / gRPC GB/s              " << perf::ratio_text(perf::ratio_of(rows[rows.size() - 3])) << "\n"
        << "  gRPC / fmwire client CPU per GB " << perf::ratio_text(perf::ratio_of(rows[rows.size() - 2])) << "\n"
        << "  gRPC / fmwire server CPU per GB " << perf::ratio_text(perf::ratio_of(rows[rows.size() - 1])) << "\n";
  }
  out << "  gRPC peer: " << peer.note << "\n";
}

// kv: GB/s of one KV shard pushed with the KV session's messages, CPU per
// GB on both ends; iperf3 on the same bytes with --compare.
std::vector<Comparison> run_kv(const PerfRunCommand& command, const transport::Endpoint& server, std::ostream& out) {
  perf::KvTransferShape shape;
  shape.geometry = perf::llama3_8b_kv_geometry();
  const std::size_t block_bytes = shape.geometry.bytes_per_block();
  shape.chunk_blocks = static_cast<std::uint32_t>(std::max<std::size_t>(1, command.chunk_bytes / block_bytes));
  const std::uint64_t blocks = command.bytes / block_bytes;
  shape.tokens = static_cast<std::uint32_t>(blocks * shape.geometry.block_tokens);
  const std::uint64_t bytes = shape.total_bytes();
  // The shard the sender reads from, as a prefill worker's cache: bytes
  // that are not all alike.
  std::vector<std::byte> kv = perf::bulk_source_bytes(bytes);
  std::vector<double> rates, client_cpu, server_cpu_per_gb;
  GrpcKvPeer grpc;
  {
    perf::ClientConnections client(command.backend, command.tls);
    client.auth_token = command.auth_token;
    ServerReports server_reports(client, server, command.connect_timeout);
    perf::KvSender sender(client.loop, kv);
    client.connect(server.host, server.port, 1, perf::kv_connection_options(protocol::Role::WORKER, "fmwire perf run"),
                   sender, command.connect_timeout);
    transport::Connection& connection = *client.connections.back();
    // The warm-up round is the whole shard: the server's blocks grow to it then.
    Rounds rounds(command);
    for (bool warm_up = true; warm_up || rounds.more(rates.size()); warm_up = false) {
      const double server_start = server_reports.cpu_seconds();
      const double client_start = perf::process_cpu_seconds();
      const auto start = Clock::now();
      sender.start(connection, shape, bytes);
      if (!perf::run_until(client.loop, [&] { return sender.done(); }, kRoundLimit, 100ms)) {
        throw std::runtime_error("KV transfer not finished within 120 s");
      }
      if (!sender.failure().empty()) throw std::runtime_error(sender.failure());
      if (!sender.committed()) throw std::runtime_error("KV transfer ended without KvCommitted");
      const double client_end = perf::process_cpu_seconds();
      const double server_end = server_reports.cpu_seconds();
      if (warm_up) {
        rounds.start_measuring();
        continue;
      }
      const double gigabytes = static_cast<double>(bytes) / 1e9;
      rates.push_back(static_cast<double>(bytes) / perf::seconds_between(start, sender.finished_at()));
      client_cpu.push_back((client_end - client_start) / gigabytes);
      server_cpu_per_gb.push_back((server_end - server_start) / gigabytes);
    }
    grpc = grpc_kv_peer(command, server, server_reports, kv, bytes, shape.chunk_bytes());
    client.close_all();
  }
  const std::string caption = "kv: " + std::to_string(rates.size()) + " rounds of a " + std::to_string(bytes) +
                              "-byte KV shard (" + std::to_string(shape.tokens) + " tokens of Llama 3 8B fp16, " +
                              std::to_string(shape.chunk_bytes()) +
                              "-byte chunks): offer, chunks digested, checked and copied into the server's blocks, "
                              "commit (medians)";
  std::vector<Comparison> rows = byte_rate_rows("kv", caption, rates, client_cpu, server_cpu_per_gb,
                                                iperf3_peer(command, server, bytes, rates.size()), out);
  append_grpc_kv_rows(rows, grpc, out);
  return rows;
}

}  // namespace

int run_perf_run(const PerfRunCommand& command, std::ostream& out) {
  std::string problem;
  const std::optional<transport::Endpoint> server = transport::parse_endpoint(command.to, &problem);
  const auto usage_error = [&](const std::string& message) {
    log::error(message);
    return 2;
  };
  if (!server) return usage_error("--to " + problem);
  if (command.test != "tokens" && command.test != "latency" && command.test != "bulk" && command.test != "kv") {
    return usage_error("unknown --test '" + command.test + "': tokens, latency, bulk or kv");
  }
  if (command.seconds && command.repetitions) return usage_error("--seconds and --repetitions: give one");
  if (command.seconds && *command.seconds <= 0) return usage_error("--seconds must be above 0");
  if (command.repetitions && *command.repetitions < 1) return usage_error("--repetitions must be at least 1");
  if (command.frames == 0 || command.streams == 0 || command.requests == 0 || command.bytes == 0) {
    return usage_error("--frames, --streams, --requests and --bytes must be at least 1");
  }
  if (command.chunk_bytes == 0 || command.chunk_bytes > perf::kMaxBulkChunkBytes) {
    return usage_error("--chunk-bytes must be 1 to " + std::to_string(perf::kMaxBulkChunkBytes) + " (the server's limit)");
  }
  if (command.test == "kv") {
    const std::uint64_t block_bytes = perf::llama3_8b_kv_geometry().bytes_per_block();
    if (command.bytes < block_bytes || command.bytes > perf::kMaxKvTransferBytes) {
      return usage_error("--bytes for kv must be " + std::to_string(block_bytes) + " (one KV block) to " +
                         std::to_string(perf::kMaxKvTransferBytes) + " (the server's limit)");
    }
  }
  if (command.tls) {
    out << "every connection over TLS 1.3 with mutual authentication"
        << (command.compare ? "; gRPC's too, with the same certificates\n" : "\n");
  }
  std::vector<Comparison> rows;
  try {
    if (command.test == "tokens") rows = run_tokens(command, *server, out);
    if (command.test == "latency") rows = run_latency(command, *server, out);
    if (command.test == "bulk") rows = run_bulk(command, *server, out);
    if (command.test == "kv") rows = run_kv(command, *server, out);
  } catch (const std::exception& error) {
    log::error(command.test + " against " + server->to_string() + ": " + error.what());
    return 1;
  }
  out.flush();
  if (!command.json_path.empty()) {
    // TLS rows named apart, so that a plaintext and a TLS run compare in one file set.
    if (command.tls) {
      for (Comparison& row : rows) row.name += " (tls)";
    }
    perf::write_results_json(command.json_path, "perf", rows);
    log::info("wrote " + std::to_string(rows.size()) + " results to " + command.json_path);
  }
  return 0;
}

}  // namespace fmwire::cli
