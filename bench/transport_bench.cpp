// bench/transport: what fmwire's transport does on loopback, each number
// against a peer measured in the same run (DESIGN.md, Measuring), on
// 127.0.0.1 only, and for each I/O backend (io_uring, Boost.Asio).
//
// 1. Token streaming at full speed: a server streams one-token Tokens frames
//    (first index, token id, a short text piece) to a client, in two shapes:
//    many streams on one connection, and one stream on each of many
//    connections. Frames per second, and process CPU-seconds per million
//    frames. Peer: gRPC C++ server streaming (callback API on both ends)
//    carrying the same three fields, in the same shapes.
// 2. One-way latency at a fixed offered rate on one stream: the server stamps
//    each frame with steady_clock as it builds it (the text piece carries the
//    stamp), the client takes arrival - stamp; p50 and p99. Peer: gRPC, a
//    synchronous server and client, paced the same way.
// 3. Bulk bytes: KvChunk frames with 1, 4 and 16 MiB attachments over one
//    connection (digested by the sender, checked by the receiver). Peer:
//    iperf3, one TCP stream over loopback, the same byte count. Not UCX:
//    Debian 12's ucx_perftest (ucx-utils 1.13, UCX_TLS=tcp on lo, tag_bw
//    and stream_bw, 1 MiB messages) moved ~0.5 GB/s here where iperf3 moved
//    ~3.1 GB/s, a peer below plain TCP that would only flatter the ratio.
// 4. Connections per second: connect, Hello exchange, close. Peer: raw TCP.
// 5. Connection set-up with --auth-token-file: median connect-to-ready time
//    with the shared-secret challenge and response, against without it.
// 6. TLS (issue 15): token streaming as in 1 with every connection over TLS
//    1.3 with mutual authentication, against fmwire without TLS (frames per
//    CPU-second, target >= 0.7x) and against gRPC with TLS from the same
//    certificates (target >= 5x); bulk bytes as in 3 over TLS against
//    without (reported). Certificates are made at run time with the openssl
//    command (tests/transport/test_pki.h) and removed at the end.
//
// Process layout, for every row: one process. fmwire's server loop runs on a
// thread of its own, the client loop on the main thread; gRPC's server and
// client run in this process too, on gRPC's threads and the main thread. CPU
// is CLOCK_PROCESS_CPUTIME_ID of the whole process over the measured round,
// so the server, the client and any helper thread are all counted. iperf3
// runs as two child processes (it reports throughput only).
//
// Run: build/bench/bench_transport [--quick] [--repetitions N] [--json FILE]
//        [--skip-grpc] [--skip-iperf] [--bulk-mib N] [--attachment-mib N]
//        [--only tokens|latency|bulk|connect|connect-auth|tls]
//        [--backend uring|asio]
// Ratios: > 1 means fmwire is better (ours / peer for rates, peer / ours for
// CPU and latency).
#include <boost/program_options.hpp>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_main.h"
#include "test_pki.h"
#include "bench_results.h"
#include "transport_fmwire.h"
#include "transport_iperf.h"
#include "transport_raw_tcp.h"
#include "transport_measure.h"

#ifdef FMWIRE_HAVE_GRPC
#include "transport_grpc.h"
#endif

namespace fmwire::bench {
namespace {

// ---------------------------------------------------------------- settings

// Many streams on one connection; one stream on each of many connections.
std::vector<TokenShape> token_shapes() {
  std::vector<TokenShape> shapes(2);
  shapes[0].key = "many_streams";
  shapes[0].label = "64 streams x 1 connection";
  shapes[0].connections = 1;
  shapes[0].streams_per_connection = 64;
  shapes[0].frames_per_stream = 8'000;
  shapes[1].key = "stream_per_connection";
  shapes[1].label = "16 connections x 1 stream";
  shapes[1].connections = 16;
  shapes[1].streams_per_connection = 1;
  shapes[1].frames_per_stream = 32'000;
  return shapes;
}

struct BenchSettings {
  int repetitions = 5;
  std::vector<std::string> backends{"uring", "asio"};
  std::vector<TokenShape> shapes = token_shapes();
  // fmwire's rounds carry this many times the frames of gRPC's, so that both
  // last long enough (a fraction of a second or more) to measure.
  std::uint32_t fmwire_frames_factor = 4;
  LatencyPlan latency{.frames_per_s = 10'000, .frames = 10'000, .warmup_frames = 1'000};
  std::vector<std::size_t> chunk_bytes{1u << 20, 4u << 20, 16u << 20};
  std::uint64_t bulk_bytes = 1ull << 30;
  bool skip_grpc = false;
  bool skip_iperf = false;
  int connect_total = 1000;
  int connect_concurrency = 128;
  int connect_setups = 500;  // connect-auth: connections timed each way
  std::string only;  // empty: every section; else tokens, latency, bulk, connect, connect-auth or tls
  std::size_t tls_chunk_bytes = 4u << 20;  // tls: the bulk rows' attachment size
};

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.repetitions = 1;
  settings.shapes[0].frames_per_stream = 200;
  settings.shapes[1].frames_per_stream = 800;
  settings.fmwire_frames_factor = 1;
  settings.latency = {.frames_per_s = 10'000, .frames = 1'000, .warmup_frames = 100};
  settings.bulk_bytes = 32ull << 20;
  settings.connect_total = 64;
  settings.connect_setups = 50;
  return settings;
}

std::string backend_label(const std::string& backend) { return backend == "uring" ? "io_uring" : "asio"; }

// ---------------------------------------------------------------- token streaming

struct ThroughputSummary {
  double frames_per_s = 0;
  double cpu_s_per_million_frames = 0;
};

ThroughputSummary summarize(const std::vector<ThroughputRound>& rounds) {
  std::vector<double> rates, cpu;
  for (const ThroughputRound& round : rounds) {
    rates.push_back(round.frames_per_s);
    cpu.push_back(round.cpu_s_per_million_frames);
  }
  return {median(rates), median(cpu)};
}

void print_throughput_row(const std::string& shape, const std::string& transport, const ThroughputSummary& summary,
                          std::optional<ThroughputSummary> peer) {
  std::optional<double> rate_ratio, cpu_ratio;
  if (peer) {
    rate_ratio = summary.frames_per_s / peer->frames_per_s;
    cpu_ratio = peer->cpu_s_per_million_frames / summary.cpu_s_per_million_frames;
  }
  std::printf("    %-26s %-16s %12.0f %13.3f %14s %14s\n", shape.c_str(), transport.c_str(), summary.frames_per_s,
              summary.cpu_s_per_million_frames, ratio_text(rate_ratio).c_str(), ratio_text(cpu_ratio).c_str());
}

void run_token_throughput(const BenchSettings& settings, std::vector<Comparison>& results) {
  std::printf("Token streaming: one token per frame, server -> client, a warm-up round then the median of %d rounds\n",
              settings.repetitions);
  std::printf("  frames/s over the round; CPU: process CPU-seconds per million frames (server + client + helpers)\n");
  std::printf("  ratios against gRPC: frames/s ours / gRPC; frames per CPU-second ours / gRPC (target >= 5x)\n");
  std::printf("    %-26s %-16s %12s %13s %14s %14s\n", "shape", "transport", "frames/s", "CPU-s/Mframe",
              "rate vs gRPC", "frames/CPU-s");
  for (const TokenShape& shape : settings.shapes) {
    TokenShape fmwire_shape = shape;
    fmwire_shape.frames_per_stream *= settings.fmwire_frames_factor;
    const std::string frames_note = "frames per stream: fmwire " + std::to_string(fmwire_shape.frames_per_stream) +
                                    ", gRPC " + std::to_string(shape.frames_per_stream);
    std::optional<ThroughputSummary> peer;
#ifdef FMWIRE_HAVE_GRPC
    if (!settings.skip_grpc) peer = summarize(grpc_token_throughput(shape, settings.repetitions));
#endif
    for (const std::string& backend : settings.backends) {
      const ThroughputSummary ours = summarize(fmwire_token_throughput(backend, fmwire_shape, settings.repetitions));
      print_throughput_row(shape.label, "fmwire " + backend_label(backend), ours, peer);
      const std::string prefix = "tokens_" + shape.key + "_" + backend + "_";
      results.push_back(compare(prefix + "frames_per_s", ours.frames_per_s, "frames/s",
                                peer ? std::optional(peer->frames_per_s) : std::nullopt, "grpc", true));
      results.push_back(compare(prefix + "cpu_s_per_million_frames", ours.cpu_s_per_million_frames, "CPU-s/Mframe",
                                peer ? std::optional(peer->cpu_s_per_million_frames) : std::nullopt, "grpc", false));
    }
    if (peer) print_throughput_row(shape.label, "gRPC", *peer, std::nullopt);
    std::printf("    %-26s (%s)\n", "", frames_note.c_str());
  }
  std::printf("\n");
}

// ---------------------------------------------------------------- latency

struct LatencySummary {
  double p50_us = 0;
  double p99_us = 0;
};

LatencySummary summarize(const std::vector<LatencyRun>& runs) {
  std::vector<double> p50, p99;
  for (const LatencyRun& run : runs) {
    p50.push_back(run.p50_us);
    p99.push_back(run.p99_us);
  }
  return {median(p50), median(p99)};
}

void run_token_latency(const BenchSettings& settings, std::vector<Comparison>& results) {
  const LatencyPlan& plan = settings.latency;
  std::printf("One-way latency: one stream paced at %.0f frames/s by a sleeping pacer, %u frames, the first %u\n",
              plan.frames_per_s, plan.frames, plan.warmup_frames);
  std::printf("  left out; arrival - send stamp (steady_clock, one process), microseconds, median of %d streams,\n",
              settings.repetitions);
  std::printf("  the transports' streams taken in turn;\n");
  std::printf("  fmwire: the pacer thread posts each frame to the server loop, which stamps, encodes and sends it;\n");
  std::printf("  gRPC: the synchronous handler thread sleeps, stamps and Write()s; both clients read on the main thread\n");
  std::printf("    %-16s %10s %10s %12s %12s\n", "transport", "p50 us", "p99 us", "p50 vs gRPC", "p99 vs gRPC");
  // Interleaved, one stream of each transport per repetition: this VM
  // stalls now and then for milliseconds (every transport alike), and a
  // stall lands in whichever stream is running, so taking all of one
  // transport's streams in a row made the p99 ordering a matter of luck.
  std::vector<LatencyRun> peer_runs;
  std::vector<std::vector<LatencyRun>> our_runs(settings.backends.size());
  for (int repetition = 0; repetition < settings.repetitions; ++repetition) {
#ifdef FMWIRE_HAVE_GRPC
    if (!settings.skip_grpc) peer_runs.push_back(grpc_token_latency(plan, 1).front());
#endif
    for (std::size_t i = 0; i < settings.backends.size(); ++i) {
      our_runs[i].push_back(fmwire_token_latency(settings.backends[i], plan, 1).front());
    }
  }
  std::optional<LatencySummary> peer;
  if (!peer_runs.empty()) peer = summarize(peer_runs);
  for (std::size_t i = 0; i < settings.backends.size(); ++i) {
    const std::string& backend = settings.backends[i];
    const LatencySummary ours = summarize(our_runs[i]);
    std::optional<double> p50_ratio, p99_ratio;
    if (peer) {
      p50_ratio = peer->p50_us / ours.p50_us;
      p99_ratio = peer->p99_us / ours.p99_us;
    }
    std::printf("    %-16s %10.1f %10.1f %12s %12s\n", ("fmwire " + backend_label(backend)).c_str(), ours.p50_us,
                ours.p99_us, ratio_text(p50_ratio).c_str(), ratio_text(p99_ratio).c_str());
    const std::string prefix = "latency_" + backend + "_";
    results.push_back(compare(prefix + "p50", ours.p50_us, "us", peer ? std::optional(peer->p50_us) : std::nullopt,
                              "grpc", false));
    results.push_back(compare(prefix + "p99", ours.p99_us, "us", peer ? std::optional(peer->p99_us) : std::nullopt,
                              "grpc", false));
  }
  if (peer) std::printf("    %-16s %10.1f %10.1f\n", "gRPC", peer->p50_us, peer->p99_us);
  std::printf("\n");
}

// ---------------------------------------------------------------- bulk

struct BulkSummary {
  double bytes_per_s = 0;
  double user_s_per_gb = 0;
  double system_s_per_gb = 0;
  double refused_sends = 0;
};

BulkSummary summarize(const std::vector<BulkRun>& runs) {
  std::vector<double> rates, user, system, refused;
  for (const BulkRun& run : runs) {
    rates.push_back(run.bytes_per_s);
    user.push_back(run.user_s_per_gb);
    system.push_back(run.system_s_per_gb);
    refused.push_back(static_cast<double>(run.refused_sends));
  }
  return {median(rates), median(user), median(system), median(refused)};
}

void print_bulk_row(const std::string& size, const std::string& transport, const BulkSummary& summary,
                    std::optional<double> ratio, const std::string& refused) {
  std::printf("    %-11s %-24s %8.2f %10s %10.3f %10.3f %9s\n", size.c_str(), transport.c_str(),
              summary.bytes_per_s / 1e9, ratio_text(ratio).c_str(), summary.user_s_per_gb, summary.system_s_per_gb,
              refused.c_str());
}

void run_bulk(const BenchSettings& settings, std::vector<Comparison>& results) {
  const double mib = static_cast<double>(settings.bulk_bytes) / (1 << 20);
  std::printf("Bulk: %.0f MiB of KvChunk attachments client -> server on one connection and one stream,\n", mib);
  std::printf("  xxh3 digest made by the sender and checked by the receiver; a warm-up transfer, then the median of %d,\n",
              settings.repetitions);
  std::printf("  iperf3 and each fmwire row taken in turn;\n");
  std::printf("  GB/s = 1e9 attachment bytes per second; peer: iperf3, one TCP stream, the same bytes (target >= 0.9x);\n");
  std::printf("  CPU-s per GB, user and system apart: fmwire's whole process, iperf3's client + server processes;\n");
  std::printf("  refused: send() calls refused for want of credit (before encoding: nothing copied)\n");

  std::string iperf_note;
  const std::optional<std::string> iperf_path = find_on_path("iperf3");
  const bool run_iperf = !settings.skip_iperf && iperf_path;
  if (settings.skip_iperf) {
    iperf_note = "skipped (--skip-iperf)";
  } else if (!iperf_path) {
    iperf_note = "not installed (apt-get install iperf3)";
  } else {
    iperf_note = iperf3_version(*iperf_path) + ", one TCP stream, -n " + std::to_string(settings.bulk_bytes >> 20) +
                 " MiB in 1 MiB blocks, receiver-side rate";
  }

  // io_uring three times: plain sendmsg; zero-copy (SENDMSG_ZC) for every
  // write of 64 KiB or more; and zero-copy with the source buffer registered
  // (SEND_ZC on a fixed buffer), so the threshold and the registered buffers
  // get their numbers.
  struct Row {
    std::string backend;
    std::size_t zero_copy_min_bytes;
    bool registered;
    std::string label;
    std::string key;
    std::vector<BulkRun> runs;
  };
  std::printf("    %-11s %-24s %8s %10s %10s %10s %9s\n", "attachment", "transport", "GB/s", "vs iperf3", "user s/GB",
              "sys s/GB", "refused");
  for (const std::size_t chunk_bytes : settings.chunk_bytes) {
    const std::string size = std::to_string(chunk_bytes >> 20) + " MiB";
    std::vector<Row> rows;
    for (const std::string& backend : settings.backends) {
      const std::string name = "fmwire " + backend_label(backend);
      rows.push_back({backend, 0, false, name, "", {}});
      if (backend == "uring") {
        rows.push_back({backend, 64 * 1024, false, name + " ZC", "_zerocopy", {}});
        rows.push_back({backend, 64 * 1024, true, name + " ZC fixed", "_zerocopy_fixed", {}});
      }
    }
    // In turn, iperf3 and each row once per repetition: the VM's throughput
    // drifts by tens of percent over a minute, and a ratio should compare
    // runs made under the same conditions.
    std::vector<BulkRun> iperf_runs;
    for (int repetition = 0; repetition < settings.repetitions; ++repetition) {
      if (run_iperf) iperf_runs.push_back(iperf3_bulk(*iperf_path, settings.bulk_bytes));
      for (Row& row : rows) {
        row.runs.push_back(
            fmwire_bulk(row.backend, chunk_bytes, settings.bulk_bytes, 1, row.zero_copy_min_bytes, row.registered).front());
      }
    }
    std::optional<BulkSummary> iperf;
    if (!iperf_runs.empty()) {
      iperf = summarize(iperf_runs);
      print_bulk_row(size, "iperf3", *iperf, std::nullopt, "-");
    }
    for (const Row& row : rows) {
      const BulkSummary ours = summarize(row.runs);
      std::optional<double> ratio;
      if (iperf) ratio = ours.bytes_per_s / iperf->bytes_per_s;
      print_bulk_row(size, row.label, ours, ratio, std::to_string(static_cast<long>(ours.refused_sends)));
      results.push_back(compare("bulk_" + std::to_string(chunk_bytes >> 20) + "mib_" + row.backend + row.key,
                                ours.bytes_per_s / 1e9, "GB/s",
                                iperf ? std::optional(iperf->bytes_per_s / 1e9) : std::nullopt, "iperf3", true));
    }
  }
  std::printf("    iperf3: %s\n\n", iperf_note.c_str());
}

// ---------------------------------------------------------------- connections

// The medians of each measure.
ConnectRun summarize(const std::vector<ConnectRun>& runs) {
  std::vector<double> rates, cpu;
  for (const ConnectRun& run : runs) {
    rates.push_back(run.connections_per_s);
    cpu.push_back(run.cpu_us_per_connection);
  }
  return {median(rates), median(cpu)};
}

// What opening a connection costs: a server's accepts (multishot on
// io_uring) and the Hello exchange, against plain blocking sockets doing one
// exchange of the same kind.
void run_connect_rate(const BenchSettings& settings, std::vector<Comparison>& results) {
  std::printf("Connections: %d opened to one server %d at a time (each wave connected, greeted and closed before the\n",
              settings.connect_total, settings.connect_concurrency);
  std::printf("  next), median of %d rounds taken in turn; fmwire: connect, Hello/HelloAck, close; peer: raw TCP,\n",
              settings.repetitions);
  std::printf("  blocking sockets, 16 bytes each way, a server thread accepting one after another;\n");
  std::printf("  CPU = the whole process, both ends\n");
  std::printf("    %-16s %12s %12s %14s %14s\n", "transport", "conn/s", "CPU us/conn", "conn/s vs TCP", "CPU vs TCP");
  std::vector<ConnectRun> peer_runs;
  std::vector<std::vector<ConnectRun>> our_runs(settings.backends.size());
  for (int repetition = 0; repetition < settings.repetitions; ++repetition) {
    peer_runs.push_back(raw_tcp_connect_rate(settings.connect_total, settings.connect_concurrency, 1).front());
    for (std::size_t i = 0; i < settings.backends.size(); ++i) {
      our_runs[i].push_back(
          fmwire_connect_rate(settings.backends[i], settings.connect_total, settings.connect_concurrency, 1).front());
    }
  }
  const ConnectRun peer = summarize(peer_runs);
  for (std::size_t i = 0; i < settings.backends.size(); ++i) {
    const ConnectRun ours = summarize(our_runs[i]);
    const Comparison rate = compare("connect_" + settings.backends[i] + "_per_s", ours.connections_per_s, "conn/s",
                                    peer.connections_per_s, "raw_tcp", true);
    const Comparison cpu = compare("connect_" + settings.backends[i] + "_cpu_us", ours.cpu_us_per_connection,
                                   "CPU-us/conn", peer.cpu_us_per_connection, "raw_tcp", false);
    std::printf("    %-16s %12.0f %12.1f %14s %14s\n", ("fmwire " + backend_label(settings.backends[i])).c_str(),
                ours.connections_per_s, ours.cpu_us_per_connection, ratio_text(ratio_of(rate)).c_str(),
                ratio_text(ratio_of(cpu)).c_str());
    results.push_back(rate);
    results.push_back(cpu);
  }
  std::printf("    %-16s %12.0f %12.1f\n\n", "raw TCP", peer.connections_per_s, peer.cpu_us_per_connection);
}

// What the shared secret adds to opening a connection: the HMAC challenge
// and response in the Hello exchange (two HMAC-SHA256s and a RAND_bytes a
// side, and a third Hello message), against the same Hello without it.
void run_connect_auth(const BenchSettings& settings, std::vector<Comparison>& results) {
  std::printf("Connection set-up with --auth-token-file: %d connections each way opened one at a time (connect to\n",
              settings.connect_setups);
  std::printf("  ready, then closed), to a server with a token and, in turn, to one without; median microseconds\n");
  std::printf("    %-16s %14s %14s %10s\n", "backend", "no token us", "token us", "token/none");
  for (const std::string& backend : settings.backends) {
    const ConnectSetupTimes times = fmwire_connect_setup(backend, settings.connect_setups);
    const double plain = median(times.plain_us);
    const double token = median(times.token_us);
    const Comparison setup =
        compare("connect_auth_" + backend + "_setup_us", token, "us", plain, "fmwire_no_token", false);
    std::printf("    %-16s %14.1f %14.1f %9.2fx\n", ("fmwire " + backend_label(backend)).c_str(), plain, token,
                token / plain);
    results.push_back(setup);
  }
  std::printf("\n");
}

// ---------------------------------------------------------------- TLS

// What TLS costs a token stream and a bulk transfer, and how that compares
// with gRPC paying for TLS in the same way: every connection of both ends
// over TLS, one process (server and client), CPU of the whole process.
void run_tls(const BenchSettings& settings, std::vector<Comparison>& results) {
  transport::test::TestPki pki;
  const std::shared_ptr<const transport::TlsCredentials> tls = pki.credentials("bench-peer");
  const transport::TlsFiles& files = tls->files();
  std::printf("TLS: every connection over TLS 1.3 with mutual authentication, a CA and a P-256 certificate made now;\n");
  std::printf("  fmwire: %s;\n  gRPC: its TLS credentials, from the same files\n", transport::tls_engine_line().c_str());
  std::printf("  Token streaming as above, median of %d rounds; frames per CPU-second: fmwire TLS / fmwire plain\n",
              settings.repetitions);
  std::printf("  (target >= 0.7x) and fmwire TLS / gRPC TLS (target >= 5x)\n");
  std::printf("    %-26s %-20s %12s %13s %14s %14s\n", "shape", "transport", "frames/s", "CPU-s/Mframe", "vs plain",
              "vs gRPC TLS");
  for (const TokenShape& shape : settings.shapes) {
    TokenShape fmwire_shape = shape;
    fmwire_shape.frames_per_stream *= settings.fmwire_frames_factor;
    std::optional<ThroughputSummary> grpc_plain, grpc_tls;
#ifdef FMWIRE_HAVE_GRPC
    if (!settings.skip_grpc) {
      grpc_plain = summarize(grpc_token_throughput(shape, settings.repetitions));
      grpc_tls = summarize(grpc_token_throughput(shape, settings.repetitions, files));
    }
#endif
    const auto cpu_ratio = [](const ThroughputSummary& ours, const std::optional<ThroughputSummary>& peer) {
      return peer ? std::optional(peer->cpu_s_per_million_frames / ours.cpu_s_per_million_frames) : std::nullopt;
    };
    const auto print_row = [&](const std::string& transport, const ThroughputSummary& summary,
                               std::optional<double> vs_plain, std::optional<double> vs_grpc) {
      std::printf("    %-26s %-20s %12.0f %13.3f %14s %14s\n", shape.label.c_str(), transport.c_str(),
                  summary.frames_per_s, summary.cpu_s_per_million_frames, ratio_text(vs_plain).c_str(),
                  ratio_text(vs_grpc).c_str());
    };
    for (const std::string& backend : settings.backends) {
      const ThroughputSummary plain = summarize(fmwire_token_throughput(backend, fmwire_shape, settings.repetitions));
      const ThroughputSummary ours =
          summarize(fmwire_token_throughput(backend, fmwire_shape, settings.repetitions, tls));
      const std::string label = "fmwire " + backend_label(backend);
      print_row(label, plain, std::nullopt, std::nullopt);
      print_row(label + " TLS", ours, cpu_ratio(ours, plain), cpu_ratio(ours, grpc_tls));
      const std::string prefix = "tls_tokens_" + shape.key + "_" + backend + "_cpu_s_per_million_frames";
      results.push_back(compare(prefix + "_vs_plain", ours.cpu_s_per_million_frames, "CPU-s/Mframe",
                                plain.cpu_s_per_million_frames, "fmwire_plaintext", false));
      results.push_back(compare(prefix + "_vs_grpc_tls", ours.cpu_s_per_million_frames, "CPU-s/Mframe",
                                grpc_tls ? std::optional(grpc_tls->cpu_s_per_million_frames) : std::nullopt,
                                "grpc_tls", false));
    }
    if (grpc_plain) print_row("gRPC", *grpc_plain, std::nullopt, std::nullopt);
    if (grpc_tls) print_row("gRPC TLS", *grpc_tls, cpu_ratio(*grpc_tls, grpc_plain), std::nullopt);
  }

  const double mib = static_cast<double>(settings.bulk_bytes) / (1 << 20);
  std::printf("  Bulk: %.0f MiB in %zu MiB KvChunk attachments as above, TLS and plaintext taken in turn, median of %d\n",
              mib, settings.tls_chunk_bytes >> 20, settings.repetitions);
  std::printf("    %-20s %8s %8s %10s %10s %10s\n", "transport", "GB/s", "vs plain", "user s/GB", "sys s/GB",
              "CPU vs plain");
  for (const std::string& backend : settings.backends) {
    std::vector<BulkRun> plain_runs, tls_runs;
    for (int repetition = 0; repetition < settings.repetitions; ++repetition) {
      plain_runs.push_back(fmwire_bulk(backend, settings.tls_chunk_bytes, settings.bulk_bytes, 1).front());
      tls_runs.push_back(fmwire_bulk(backend, settings.tls_chunk_bytes, settings.bulk_bytes, 1, 0, false, tls).front());
    }
    const BulkSummary plain = summarize(plain_runs);
    const BulkSummary ours = summarize(tls_runs);
    const double plain_cpu = plain.user_s_per_gb + plain.system_s_per_gb;
    const double our_cpu = ours.user_s_per_gb + ours.system_s_per_gb;
    const std::string label = "fmwire " + backend_label(backend);
    std::printf("    %-20s %8.2f %8s %10.3f %10.3f %10s\n", label.c_str(), plain.bytes_per_s / 1e9, "-",
                plain.user_s_per_gb, plain.system_s_per_gb, "-");
    std::printf("    %-20s %8.2f %8s %10.3f %10.3f %10s\n", (label + " TLS").c_str(), ours.bytes_per_s / 1e9,
                ratio_text(ours.bytes_per_s / plain.bytes_per_s).c_str(), ours.user_s_per_gb, ours.system_s_per_gb,
                ratio_text(plain_cpu / our_cpu).c_str());
    results.push_back(compare("tls_bulk_" + backend + "_gb_per_s", ours.bytes_per_s / 1e9, "GB/s",
                              plain.bytes_per_s / 1e9, "fmwire_plaintext", true));
    results.push_back(compare("tls_bulk_" + backend + "_cpu_s_per_gb", our_cpu, "CPU-s/GB", plain_cpu,
                              "fmwire_plaintext", false));
  }
  std::printf("\n");
}

std::vector<Comparison> run(const BenchSettings& settings) {
  std::printf("bench/transport on 127.0.0.1, backends:");
  for (const std::string& backend : settings.backends) std::printf(" %s", backend_label(backend).c_str());
#ifdef FMWIRE_HAVE_GRPC
  std::printf("; peers: gRPC %s%s", grpc_version().c_str(), settings.skip_grpc ? " (skipped)" : "");
#else
  std::printf("; peers: gRPC left out (built without libgrpc++-dev/grpc_cpp_plugin)");
#endif
  std::printf(", iperf3%s\n", settings.skip_iperf ? " (skipped)" : "");
  std::printf("One process: fmwire's server loop on its own thread, the client loop on the main thread; gRPC in the\n");
  std::printf("same process on its own threads. CPU = CLOCK_PROCESS_CPUTIME_ID, all threads.\n\n");

  std::vector<Comparison> results;
  if (settings.only.empty() || settings.only == "tokens") run_token_throughput(settings, results);
  if (settings.only.empty() || settings.only == "latency") run_token_latency(settings, results);
  if (settings.only.empty() || settings.only == "bulk") run_bulk(settings, results);
  if (settings.only.empty() || settings.only == "connect") run_connect_rate(settings, results);
  if (settings.only.empty() || settings.only == "connect-auth") run_connect_auth(settings, results);
  if (settings.only.empty() || settings.only == "tls") run_tls(settings, results);
  return results;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  using namespace fmwire::bench;
  std::string only;
  std::string backend;
  int bulk_mib = 0;
  int attachment_mib = 0;
  po::options_description own_flags;
  own_flags.add_options()
      ("bulk-mib", po::value(&bulk_mib), "MiB per bulk transfer (default 1024; --quick 32)")
      ("attachment-mib", po::value(&attachment_mib), "bulk: one attachment size only (default 1, 4 and 16)")
      ("skip-grpc", "leave out the gRPC peer")
      ("skip-iperf", "leave out the iperf3 peer")
      ("only", po::value(&only), "run one section: tokens, latency, bulk, connect, connect-auth or tls")
      ("backend", po::value(&backend), "run fmwire on one I/O backend only: uring or asio");
  const BenchProgram program{
      .name = "transport",
      .caption = "bench_transport: token streaming, latency and bulk bytes on loopback, against gRPC and iperf3",
      .quick_help = "tiny counts, one repetition: a smoke test of a few seconds",
      .repetitions_help = "measured rounds, streams and transfers per row (default 5)"};
  return bench_main(argc, argv, program, own_flags, [&](const CommonFlags& flags, const po::variables_map& values) {
    BenchSettings settings = flags.quick ? quick_settings() : BenchSettings{};
    if (flags.repetitions) settings.repetitions = *flags.repetitions;
    if (values.count("bulk-mib")) {
      if (bulk_mib < 1) throw UsageError("--bulk-mib " + std::to_string(bulk_mib) + " must be at least 1");
      settings.bulk_bytes = static_cast<std::uint64_t>(bulk_mib) << 20;
    }
    if (values.count("attachment-mib")) {
      if (attachment_mib < 1 || attachment_mib > 1024) {
        throw UsageError("--attachment-mib " + std::to_string(attachment_mib) + " must be 1 to 1024");
      }
      settings.chunk_bytes = {static_cast<std::size_t>(attachment_mib) << 20};
    }
    settings.skip_grpc = values.count("skip-grpc") > 0;
    settings.skip_iperf = values.count("skip-iperf") > 0;
    if (!only.empty() && only != "tokens" && only != "latency" && only != "bulk" && only != "connect" &&
        only != "connect-auth" && only != "tls") {
      throw UsageError("--only " + only + ": choose tokens, latency, bulk, connect, connect-auth or tls");
    }
    settings.only = only;
    if (!backend.empty()) {
      if (backend != "uring" && backend != "asio") throw UsageError("--backend " + backend + ": choose uring or asio");
      settings.backends = {backend};
    }
    return run(settings);
  });
}
