// bench_kv: what fmwire's KV transfer does, against peers measured in the
// same run (DESIGN.md, Measuring).
//
// The KV of a 2,048-token and a 16,384-token prompt of synthetic:llama-3-8b
// (32 layers, 8 KV heads, head dim 128, fp16: 128 KiB per token, so 256 MiB
// and 2 GiB), in blocks of 16 tokens (2 MiB), pushed from a sender process
// to a receiver process:
//
// - fmwire wire: the KV session's messages (KvOffer -> KvAccept -> KvChunk*
//   -> KvCommit -> KvCommitted), chunks of whole blocks as attachments with
//   their xxh3 digest, sent from the source memory by reference; the
//   receiver copies each chunk into its blocks buffer (kv_fmwire.h): the
//   transport alone.
// - fmwire session: the real session (worker/kv_transfers.h) between two
//   `fmwire worker` processes, prefill and decode, synthetic:llama-3-8b
//   with no step time, this program as their router (kv_session.h): GB/s
//   from the decode Finish's kvTransfer summary, CPU both workers'.
// - iperf3: one TCP stream, the same byte count (the link's limit).
// - gRPC: a client-streaming call carrying the same bytes as protobuf
//   `bytes` messages of the chunk's size, copied into the receiver's blocks
//   buffer likewise (kv_grpc.h).
//
// Links: 127.0.0.1; and, as root, a veth pair between two network
// namespaces the bench makes and removes (kv_netns.h), limited by tc tbf to
// 10 and 1 Gbit/s, with 0.5 ms netem delay sender -> receiver where the
// kernel has netem. At 1 Gbit/s fmwire also runs with shuffle + zstd per
// chunk: effective GB/s (decoded bytes per second) against uncompressed.
//
// Process layout, every row: the receiver and the sender are processes of
// their own (this program again, with a hidden --role), each on its own
// loop (fmwire) or gRPC's threads, started in the namespaces with `ip netns
// exec`. The KV is generated once (kv_content.h) into shared memory that the
// senders map. A sender makes a warm-up transfer on its connection, then
// the measured one; GB/s = 1e9 decoded bytes per second of the sender's
// wall time from offer to commit; CPU = the sender's and the receiver's
// process CPU over the transfer. Each repetition takes fmwire, then gRPC,
// then iperf3 in turn, and the medians are reported.
//
// Session rows: the workers start once per link and prompt, each where
// the wire rows' sender (prefill) or receiver (decode) runs, and the
// router is a role process beside the decode worker; one request per
// repetition, taken after the wire rows, a warm-up request first.
//
// Run: build/bench/bench_kv [--quick] [--repetitions N] [--json FILE]
//        [--links loopback,10g,1g] [--chunk-blocks N] [--skip-grpc] [--skip-iperf]
//        [--skip-session] [--fmwire PATH]
#include <unistd.h>

#include <boost/program_options.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "codec/attachment_codec.h"
#include "engine/kv_geometry.h"
#include "transport/endpoint.h"

#include "bench_main.h"
#include "bench_results.h"
#include "child_process.h"
#include "kv_content.h"
#include "kv_fmwire.h"
#include "kv_netns.h"
#include "kv_session.h"
#include "transport_iperf.h"
#include "transport_measure.h"

#ifdef FMWIRE_HAVE_GRPC
#include "kv_grpc.h"
#endif

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
namespace po = boost::program_options;

// synthetic:llama-3-8b's KV: 32 x 2 x 8 x 128 x 2 bytes = 128 KiB per token.
engine::KvGeometry llama3_8b_geometry() { return perf::llama3_8b_kv_geometry(); }

constexpr std::uint64_t kKvSeed = 0x6b76'2d62'656e'6368ull;

// ---------------------------------------------------------------- roles

// The hidden side of the program: one sender or receiver, started by the
// bench itself (in a namespace or not). Prints "listening PORT" (receivers)
// and one "run ..." line per transfer on stdout; errors on stderr, exit 1.
struct RoleFlags {
  std::string role;
  std::string listen;
  std::string connect;
  std::uint32_t tokens = 0;
  std::uint32_t chunk_blocks = 1;
  std::string kv_source;
  bool compress = false;
  std::uint64_t warmup_bytes = 0;
  std::string backend;
  bool zero_copy = false;
  int transfers = 1;
  // session-router
  std::string prefill;
  std::string decode;
  pid_t prefill_pid = 0;
  pid_t decode_pid = 0;
  int requests = 1;
};

void print_run(const KvSideRun& run) {
  std::printf("run seconds=%.9f cpu=%.9f wire=%llu decoded=%llu\n", run.seconds, run.cpu_seconds,
              static_cast<unsigned long long>(run.wire_bytes), static_cast<unsigned long long>(run.decoded_bytes));
  std::fflush(stdout);
}

transport::Endpoint endpoint_flag(const std::string& text, const char* flag) {
  std::string error;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(text, &error);
  if (!endpoint) throw std::runtime_error(std::string(flag) + " " + text + ": " + error);
  return *endpoint;
}

int run_role(const RoleFlags& flags) {
  KvTransferShape shape{llama3_8b_geometry(), flags.tokens, flags.chunk_blocks, flags.compress};
  auto announce = [](std::uint16_t port) {
    std::printf("listening %u\n", static_cast<unsigned>(port));
    std::fflush(stdout);
  };
  if (flags.role == "fmwire-receive") {
    KvBlocks blocks(shape.total_bytes());
    for (const KvSideRun& run : fmwire_kv_receive(flags.backend, endpoint_flag(flags.listen, "--listen"), shape.geometry,
                                                  blocks.bytes(), announce)) {
      print_run(run);
    }
    return 0;
  }
  if (flags.role == "fmwire-send") {
    MappedKv kv(flags.kv_source, shape.total_bytes());
    const KvSendOptions options{.backend = flags.backend,
                                .zero_copy_min_bytes = flags.zero_copy ? 64u * 1024 : 0,
                                .register_source = flags.zero_copy,
                                .warmup_bytes = flags.warmup_bytes};
    print_run(fmwire_kv_send(endpoint_flag(flags.connect, "--connect"), kv.bytes(), shape, options));
    return 0;
  }
  if (flags.role == "session-router") {
    const KvSessionRoute route{.prefill = endpoint_flag(flags.prefill, "--prefill"),
                               .decode = endpoint_flag(flags.decode, "--decode"),
                               .prefill_pid = flags.prefill_pid,
                               .decode_pid = flags.decode_pid,
                               .prompt_tokens = flags.tokens,
                               .requests = flags.requests,
                               .backend = flags.backend};
    for (const KvSessionRun& run : route_kv_sessions(route)) {
      std::printf("%s\n", session_line(run).c_str());
      std::fflush(stdout);
    }
    return 0;
  }
#ifdef FMWIRE_HAVE_GRPC
  if (flags.role == "grpc-receive") {
    KvBlocks blocks(shape.total_bytes());
    for (const KvSideRun& run : grpc_kv_receive(flags.listen, blocks.bytes(), flags.transfers, announce)) print_run(run);
    return 0;
  }
  if (flags.role == "grpc-send") {
    MappedKv kv(flags.kv_source, shape.total_bytes());
    const transport::Endpoint to = endpoint_flag(flags.connect, "--connect");
    print_run(grpc_kv_send(to.host, to.port, kv.bytes(), shape, flags.warmup_bytes));
    return 0;
  }
#endif
  throw std::runtime_error("--role " + flags.role + ": not a role of this build");
}

// Parses the hidden flags of a role process and runs it.
int role_main(int argc, char** argv) {
  RoleFlags flags;
  po::options_description description;
  description.add_options()
      ("role", po::value(&flags.role)->required())
      ("listen", po::value(&flags.listen))
      ("connect", po::value(&flags.connect))
      ("tokens", po::value(&flags.tokens)->required())
      ("chunk-blocks", po::value(&flags.chunk_blocks))
      ("kv-source", po::value(&flags.kv_source))
      ("compress", po::bool_switch(&flags.compress))
      ("warmup-bytes", po::value(&flags.warmup_bytes))
      ("backend", po::value(&flags.backend))
      ("zero-copy", po::bool_switch(&flags.zero_copy))
      ("transfers", po::value(&flags.transfers))
      ("prefill", po::value(&flags.prefill))
      ("decode", po::value(&flags.decode))
      ("prefill-pid", po::value(&flags.prefill_pid))
      ("decode-pid", po::value(&flags.decode_pid))
      ("requests", po::value(&flags.requests));
  try {
    po::variables_map values;
    po::store(po::parse_command_line(argc, argv, description), values);
    po::notify(values);
    return run_role(flags);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_kv --role %s: %s\n", flags.role.c_str(), error.what());
    return 1;
  }
}

// ---------------------------------------------------------------- one measurement

// Where one measurement's two processes run and meet.
struct Placement {
  std::vector<std::string> receiver_prefix;  // empty: here
  std::vector<std::string> sender_prefix;
  std::string receiver_host = "127.0.0.1";
  std::string sender_host = "127.0.0.1";
};

// What one transfer cost, both sides together.
struct Measurement {
  double seconds = 0;
  double cpu_seconds = 0;  // sender + receiver
  std::uint64_t decoded_bytes = 0;
  std::uint64_t wire_bytes = 0;

  double gb_per_s() const { return static_cast<double>(decoded_bytes) / seconds / 1e9; }
  double cpu_s_per_gb() const { return cpu_seconds / (static_cast<double>(decoded_bytes) / 1e9); }
};

std::string self_path() {
  char path[4096];
  const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (length <= 0) throw std::runtime_error("cannot read /proc/self/exe");
  return std::string(path, static_cast<std::size_t>(length));
}

std::string self_directory() {
  const std::string path = self_path();
  return path.substr(0, path.rfind('/'));
}

// This program as a role process, through `prefix` (ip netns exec) if any.
std::unique_ptr<ChildProcess> start_role(const std::vector<std::string>& prefix, const std::vector<std::string>& arguments) {
  std::vector<std::string> command = prefix;
  command.push_back(self_path());
  command.insert(command.end(), arguments.begin(), arguments.end());
  const std::string path = command.front();
  command.erase(command.begin());
  return std::make_unique<ChildProcess>(path, command, true);
}

KvSideRun parse_run(const std::string& line) {
  KvSideRun run;
  unsigned long long wire = 0, decoded = 0;
  if (std::sscanf(line.c_str(), "run seconds=%lf cpu=%lf wire=%llu decoded=%llu", &run.seconds, &run.cpu_seconds, &wire,
                  &decoded) != 4) {
    throw std::runtime_error("not a run line: " + line);
  }
  run.wire_bytes = wire;
  run.decoded_bytes = decoded;
  return run;
}

// Reads a role's lines until one starting with `prefix`; throws with what
// the role said otherwise.
std::string expect_line(ChildProcess& role, const std::string& name, const std::string& prefix,
                        std::chrono::milliseconds limit) {
  std::string said;
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    const std::optional<std::string> line =
        role.read_line(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
    if (!line) break;
    if (line->rfind(prefix, 0) == 0) return *line;
    said += *line + "\n";
  }
  const std::optional<int> status = role.wait(1000ms);
  throw std::runtime_error(name + " gave no '" + prefix + "' line (exit " +
                           (status ? std::to_string(*status) : std::string("none: still running")) + "): " + said +
                           role.read_output(200ms));
}

struct TransferPlan {
  std::string transport;  // "fmwire" or "grpc"
  std::uint32_t tokens = 0;
  std::uint32_t chunk_blocks = 1;
  bool compress = false;
  std::uint64_t warmup_bytes = 0;
  std::string backend;
  bool zero_copy = false;
  std::string kv_source;
};

// One transfer: the receiver started and listening, then the sender; their
// run lines read; both waited for.
Measurement measure_transfer(const Placement& placement, const TransferPlan& plan, std::chrono::milliseconds limit) {
  const int transfers = plan.warmup_bytes > 0 ? 2 : 1;
  std::vector<std::string> common{"--tokens", std::to_string(plan.tokens), "--chunk-blocks",
                                  std::to_string(plan.chunk_blocks)};
  if (!plan.backend.empty()) common.insert(common.end(), {"--backend", plan.backend});
  std::vector<std::string> receiver_arguments{"--role", plan.transport + "-receive", "--listen",
                                              placement.receiver_host + (plan.transport == "grpc" ? "" : ":0"),
                                              "--transfers", std::to_string(transfers)};
  receiver_arguments.insert(receiver_arguments.end(), common.begin(), common.end());
  auto receiver = start_role(placement.receiver_prefix, receiver_arguments);
  const std::string listening = expect_line(*receiver, plan.transport + " receiver", "listening ", 60'000ms);
  const std::string port = listening.substr(std::string("listening ").size());

  std::vector<std::string> sender_arguments{"--role", plan.transport + "-send", "--connect",
                                            placement.receiver_host + ":" + port, "--kv-source", plan.kv_source,
                                            "--warmup-bytes", std::to_string(plan.warmup_bytes)};
  sender_arguments.insert(sender_arguments.end(), common.begin(), common.end());
  if (plan.compress) sender_arguments.push_back("--compress");
  if (plan.zero_copy) sender_arguments.push_back("--zero-copy");
  auto sender = start_role(placement.sender_prefix, sender_arguments);
  const KvSideRun sent = parse_run(expect_line(*sender, plan.transport + " sender", "run ", limit));
  KvSideRun received;
  for (int transfer = 0; transfer < transfers; ++transfer) {
    received = parse_run(expect_line(*receiver, plan.transport + " receiver", "run ", 30'000ms));
  }
  for (auto* role : {sender.get(), receiver.get()}) {
    const std::optional<int> status = role->wait(30'000ms);
    if (!status || *status != 0) {
      throw std::runtime_error(plan.transport + " role ended with exit " +
                               (status ? std::to_string(*status) : std::string("none: still running")) + ": " +
                               role->read_output(200ms));
    }
  }
  if (received.decoded_bytes != sent.decoded_bytes) {
    throw std::runtime_error(plan.transport + ": the receiver stored " + std::to_string(received.decoded_bytes) +
                             " bytes of " + std::to_string(sent.decoded_bytes));
  }
  return {sent.seconds, sent.cpu_seconds + received.cpu_seconds, sent.decoded_bytes, sent.wire_bytes};
}

// ---------------------------------------------------------------- session rows

// A disaggregated request: one token from the prefill worker, one decoded
// after the transfer, so that the decode Finish follows the transfer at once.
constexpr std::uint32_t kSessionMaxTokens = 2;
// synthetic:llama-3-8b's context, as Llama-3-8B's; longer prompts get
// --max-context (Llama-3.1-8B: the same KV per token, 128K of context).
constexpr std::uint32_t kSyntheticContext = 8192;

// The prefill and the decode `fmwire worker` of a session cell.
struct WorkerPair {
  std::unique_ptr<ChildProcess> prefill;
  std::unique_ptr<ChildProcess> decode;
  transport::Endpoint prefill_endpoint;
  transport::Endpoint decode_endpoint;
};

// One worker, through `prefix` (ip netns exec) if any, listening on `host`
// (a free port): synthetic:llama-3-8b, f16 KV, with no step or prompt time
// (the engine's thread still writes every KV row of the prompt, as the
// synthetic model does), no prefix cache (each request's KV is computed and
// sent whole), KV chunks uncompressed, and a cache of exactly one request's
// blocks, so that after the warm-up every block is paged in. With
// `zero_copy`, chunks of 64 KiB and more go zero-copy from the cache.
std::unique_ptr<ChildProcess> start_worker(const std::vector<std::string>& prefix, const std::string& fmwire_path,
                                           const std::string& role, const std::string& host, std::uint32_t tokens,
                                           const std::string& backend, bool zero_copy, transport::Endpoint& endpoint) {
  const engine::KvGeometry geometry = llama3_8b_geometry();
  const std::uint32_t context = tokens + kSessionMaxTokens;
  const std::uint32_t blocks = (context + geometry.block_tokens - 1) / geometry.block_tokens;
  std::vector<std::string> command = prefix;
  command.insert(command.end(), {fmwire_path, "worker", "--listen", host + ":0", "--model", "synthetic:llama-3-8b",
                                 "--kv-dtype", "f16", "--role", role, "--kv-blocks", std::to_string(blocks),
                                 "--step-us", "0", "--prefill-ns-per-token", "0", "--no-prefix-cache",
                                 "--kv-compress", "off", "--kv-timeout-ms", "60000", "--name", role});
  if (context > kSyntheticContext) command.insert(command.end(), {"--max-context", std::to_string(context)});
  if (!backend.empty()) command.insert(command.end(), {"--backend", backend});
  if (zero_copy) command.insert(command.end(), {"--zero-copy-min-bytes", "65536"});
  const std::string path = command.front();
  command.erase(command.begin());
  auto worker = std::make_unique<ChildProcess>(path, command, true);
  const std::string listening = expect_line(*worker, "fmwire worker --role " + role, "listening on ", 60'000ms);
  endpoint = endpoint_flag(listening.substr(std::string("listening on ").size()), "the worker's address");
  return worker;
}

// The prefill worker where the sender runs, the decode worker where the receiver does.
WorkerPair start_workers(const Placement& placement, const std::string& fmwire_path, std::uint32_t tokens,
                         const std::string& backend, bool zero_copy) {
  WorkerPair pair;
  pair.decode = start_worker(placement.receiver_prefix, fmwire_path, "decode", placement.receiver_host, tokens, backend,
                             zero_copy, pair.decode_endpoint);
  pair.prefill = start_worker(placement.sender_prefix, fmwire_path, "prefill", placement.sender_host, tokens, backend,
                              zero_copy, pair.prefill_endpoint);
  return pair;
}

// One measured request with the bench as the router (a role process beside
// the decode worker, so that the decode request is there before the Offer),
// after a warm-up request of the same size when asked.
KvSessionRun measure_session(const Placement& placement, const WorkerPair& workers, std::uint32_t tokens, bool warm_up,
                             const std::string& backend, std::chrono::milliseconds limit) {
  const int requests = warm_up ? 2 : 1;
  std::vector<std::string> arguments{"--role", "session-router", "--tokens", std::to_string(tokens),
                                     "--prefill", workers.prefill_endpoint.to_string(),
                                     "--decode", workers.decode_endpoint.to_string(),
                                     "--prefill-pid", std::to_string(workers.prefill->pid()),
                                     "--decode-pid", std::to_string(workers.decode->pid()),
                                     "--requests", std::to_string(requests)};
  if (!backend.empty()) arguments.insert(arguments.end(), {"--backend", backend});
  auto router = start_role(placement.receiver_prefix, arguments);
  KvSessionRun run;
  for (int request = 0; request < requests; ++request) {
    run = parse_session_line(expect_line(*router, "session router", "session ", limit));
  }
  const std::optional<int> status = router->wait(30'000ms);
  if (!status || *status != 0) {
    throw std::runtime_error("session router ended with exit " +
                             (status ? std::to_string(*status) : std::string("none: still running")) + ": " +
                             router->read_output(200ms));
  }
  if (run.compressed) throw std::runtime_error("session: the prefill worker compressed its KV despite --kv-compress off");
  return run;
}

// ---------------------------------------------------------------- settings

struct LinkPlan {
  std::string key;    // in result names: "loopback", "netns 10G", "netns 1G"
  std::uint64_t rate_bits_per_s = 0;  // 0: loopback, unshaped
};

struct BenchSettings {
  int repetitions = 3;
  std::vector<std::uint32_t> prompt_tokens{2048, 16384};
  std::uint32_t chunk_blocks = 4;
  // Compressed, one block per chunk: the loop thread compresses each chunk
  // while the last is on the wire, and a larger one leaves the link idle
  // for longer (at 1 Gbit/s: 0.92-1.07x uncompressed at 1 block, 0.71-0.74x
  // at 4, on this 2-core VM under load).
  std::uint32_t compressed_chunk_blocks = 1;
  std::vector<std::string> links{"loopback", "10g", "1g"};
  std::uint64_t warmup_bytes = 64ull << 20;
  std::uint32_t delay_us = 500;  // netem, sender -> receiver, where there is netem
  std::string backend;           // fmwire's: empty, the default choice
  bool zero_copy = false;
  bool skip_grpc = false;
  bool skip_iperf = false;
  bool skip_session = false;
  std::string fmwire_path;  // the `fmwire` program, for the session rows
};

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.repetitions = 1;
  settings.prompt_tokens = {256, 1024};
  settings.warmup_bytes = 0;
  return settings;
}

std::optional<LinkPlan> link_plan(const std::string& name) {
  if (name == "loopback") return LinkPlan{"loopback", 0};
  if (name == "10g") return LinkPlan{"netns 10G", 10'000'000'000ull};
  if (name == "1g") return LinkPlan{"netns 1G", 1'000'000'000ull};
  return std::nullopt;
}

// ---------------------------------------------------------------- report

std::optional<double> median_of(const std::vector<double>& values) {
  if (values.empty()) return std::nullopt;
  return median(values);
}

// The repetitions of one (link, prompt) cell.
struct Cell {
  std::vector<double> fmwire_gb_per_s, fmwire_cpu_s_per_gb;
  std::vector<KvSessionRun> sessions;
  std::vector<double> grpc_gb_per_s, grpc_cpu_s_per_gb;
  std::vector<double> iperf_gb_per_s, iperf_cpu_s_per_gb;
  std::vector<double> compressed_gb_per_s, compression_ratio;
};

// One table row: which side, GB/s and CPU-s/GB, then the ratios.
void print_row(const std::string& link_label, const std::string& prompt, const std::string& side, double gb_per_s,
               std::optional<double> cpu_s_per_gb, const std::string& ratios = "") {
  char cpu[32] = "";
  if (cpu_s_per_gb) std::snprintf(cpu, sizeof cpu, "%.3f", *cpu_s_per_gb);
  std::printf("    %-12s %-10s %-15s %8.2f %10s%s\n", link_label.c_str(), prompt.c_str(), side.c_str(), gb_per_s, cpu,
              ratios.c_str());
}

std::string ratio_columns(const Comparison& vs_iperf, const Comparison& vs_grpc, const Comparison& cpu_vs_grpc) {
  char text[64];
  std::snprintf(text, sizeof text, " %10s %12s %12s", ratio_text(ratio_of(vs_iperf)).c_str(),
                ratio_text(ratio_of(vs_grpc)).c_str(), ratio_text(ratio_of(cpu_vs_grpc)).c_str());
  return text;
}

// The median of one field over a cell's sessions.
double session_median(const std::vector<KvSessionRun>& runs, double (*field)(const KvSessionRun&)) {
  std::vector<double> values;
  for (const KvSessionRun& run : runs) values.push_back(field(run));
  return median(values);
}

void report_cell(const std::string& link_label, const std::string& link_key, std::uint32_t tokens, const Cell& cell,
                 std::vector<Comparison>& results) {
  const double gb = median(cell.fmwire_gb_per_s);
  const double cpu = median(cell.fmwire_cpu_s_per_gb);
  const std::optional<double> iperf = median_of(cell.iperf_gb_per_s);
  const std::optional<double> grpc = median_of(cell.grpc_gb_per_s);
  const std::optional<double> grpc_cpu = median_of(cell.grpc_cpu_s_per_gb);
  const std::string prefix = "kv " + std::to_string(tokens) + " tokens " + link_key;
  const Comparison vs_iperf = compare(prefix + " GB/s", gb, "GB/s", iperf, "iperf3", true);
  const Comparison vs_grpc = compare(prefix + " vs grpc GB/s", gb, "GB/s", grpc, "grpc", true);
  const Comparison cpu_vs_grpc = compare(prefix + " cpu-s per GB", cpu, "CPU-s/GB", grpc_cpu, "grpc", false);
  results.push_back(vs_iperf);
  if (grpc) results.push_back(vs_grpc);
  if (grpc) results.push_back(cpu_vs_grpc);
  const std::string prompt = std::to_string(tokens) + " tok";
  print_row(link_label, prompt, "fmwire wire", gb, cpu, ratio_columns(vs_iperf, vs_grpc, cpu_vs_grpc));
  if (!cell.sessions.empty()) {
    const std::vector<KvSessionRun>& runs = cell.sessions;
    const double session_gb = session_median(runs, [](const KvSessionRun& run) { return run.gb_per_s(); });
    const double session_cpu = session_median(runs, [](const KvSessionRun& run) { return run.cpu_s_per_gb(); });
    const std::string session_prefix = "kv session " + std::to_string(tokens) + " tokens " + link_key;
    const Comparison session_vs_iperf = compare(session_prefix + " GB/s", session_gb, "GB/s", iperf, "iperf3", true);
    const Comparison session_vs_grpc = compare(session_prefix + " vs grpc GB/s", session_gb, "GB/s", grpc, "grpc", true);
    const Comparison session_cpu_vs_grpc =
        compare(session_prefix + " cpu-s per GB", session_cpu, "CPU-s/GB", grpc_cpu, "grpc", false);
    const Comparison session_vs_wire =
        compare(session_prefix + " vs wire GB/s", session_gb, "GB/s", gb, "fmwire wire", true);
    results.push_back(session_vs_iperf);
    if (grpc) results.push_back(session_vs_grpc);
    results.push_back(session_cpu_vs_grpc);
    results.push_back(session_vs_wire);
    const double prefill_engine = session_median(runs, [](const KvSessionRun& run) {
      return run.prefill_cpu.engine_s / (static_cast<double>(run.bytes) / 1e9);
    });
    const double prefill_other = session_median(runs, [](const KvSessionRun& run) {
      return run.prefill_cpu.other_s / (static_cast<double>(run.bytes) / 1e9);
    });
    const double decode_engine = session_median(runs, [](const KvSessionRun& run) {
      return run.decode_cpu.engine_s / (static_cast<double>(run.bytes) / 1e9);
    });
    const double decode_other = session_median(runs, [](const KvSessionRun& run) {
      return run.decode_cpu.other_s / (static_cast<double>(run.bytes) / 1e9);
    });
    results.push_back(Comparison{session_prefix + " prefill worker cpu-s per GB", prefill_engine + prefill_other,
                                 "CPU-s/GB", "", 0, 0});
    results.push_back(Comparison{session_prefix + " decode worker cpu-s per GB", decode_engine + decode_other,
                                 "CPU-s/GB", "", 0, 0});
    char versus_wire[64];
    std::snprintf(versus_wire, sizeof versus_wire, "  (%.2fx wire)", session_vs_wire.ratio);
    print_row("", "", "fmwire session", session_gb, session_cpu,
              ratio_columns(session_vs_iperf, session_vs_grpc, session_cpu_vs_grpc) + versus_wire);
    const double receiver_ms = session_median(runs, [](const KvSessionRun& run) { return run.transfer_us / 1e3; });
    const double sender_ms = session_median(runs, [](const KvSessionRun& run) { return run.sender_transfer_us / 1e3; });
    const double prefill_ms = session_median(runs, [](const KvSessionRun& run) { return run.prefill_us / 1e3; });
    const double request_ms = session_median(runs, [](const KvSessionRun& run) { return run.request_seconds * 1e3; });
    std::printf("    %-12s %-10s   session: Offer->Committed %.1f ms at the decode worker, %.1f ms at the prefill "
                "worker;\n", "", "", receiver_ms, sender_ms);
    std::printf("    %-12s %-10s   prefill engine %.1f ms; request %.1f ms (router: prefill sent to both Finish read);\n",
                "", "", prefill_ms, request_ms);
    std::printf("    %-12s %-10s   CPU-s/GB prefill worker %.3f engine + %.3f loop, decode worker %.3f engine + %.3f loop\n",
                "", "", prefill_engine, prefill_other, decode_engine, decode_other);
  }
  if (grpc) print_row("", "", "gRPC", *grpc, *grpc_cpu);
  if (iperf) print_row("", "", "iperf3", *iperf, median(cell.iperf_cpu_s_per_gb));
  if (!cell.compressed_gb_per_s.empty()) {
    const double compressed = median(cell.compressed_gb_per_s);
    const double ratio = median(cell.compression_ratio);
    results.push_back(compare(prefix + " compressed effective GB/s", compressed, "GB/s", gb, "fmwire uncompressed", true));
    results.push_back(Comparison{prefix + " compression ratio", ratio, "x", "", 0, 0});
    char note[160];
    std::snprintf(note, sizeof note, "  compressed: %.2fx the uncompressed GB/s, %.3f decoded/wire bytes",
                  compressed / gb, ratio);
    print_row("", "", "fmwire wire z", compressed, std::nullopt, note);
  }
}

// ---------------------------------------------------------------- the bench

std::vector<Comparison> run(const BenchSettings& settings) {
  SignalCleanup signal_cleanup;  // first: before any thread or child
  const engine::KvGeometry geometry = llama3_8b_geometry();
  std::uint32_t largest_tokens = 0;
  for (const std::uint32_t tokens : settings.prompt_tokens) largest_tokens = std::max(largest_tokens, tokens);

  std::printf("bench/kv: KV of synthetic:llama-3-8b (%u layers x %u KV heads x %u dims, fp16: %zu KiB per token),\n",
              geometry.layers, geometry.kv_heads, geometry.head_dim, geometry.bytes_per_token() >> 10);
  std::printf("  blocks of %u tokens (%zu MiB), KvChunks of %u blocks (%zu MiB); sender and receiver each a process;\n",
              geometry.block_tokens, geometry.bytes_per_block() >> 20, settings.chunk_blocks,
              (geometry.bytes_per_block() * settings.chunk_blocks) >> 20);
  const auto generate_start = Clock::now();
  SharedKv kv(std::uint64_t{largest_tokens} * geometry.bytes_per_token());
  fill_fp16_kv(kv.bytes(), geometry, kKvSeed);
  std::printf("  KV content: fp16, each (layer, K|V, head, dim) channel N(0, std) with std one of 8 steps in [0.05, 1];\n");
  std::printf("  %.0f MiB generated in %.1f s into shared memory the senders map\n",
              static_cast<double>(kv.bytes().size()) / (1 << 20), seconds_between(generate_start, Clock::now()));

  const std::optional<std::string> iperf_path = settings.skip_iperf ? std::nullopt : find_on_path("iperf3");
  std::printf("  peers: iperf3 %s; gRPC ", iperf_path ? iperf3_version(*iperf_path).c_str()
                                                      : (settings.skip_iperf ? "(skipped)" : "(not installed)"));
#ifdef FMWIRE_HAVE_GRPC
  const bool run_grpc = !settings.skip_grpc;
  std::printf("%s%s\n", grpc_version().c_str(), run_grpc ? ", sync streaming API both ends" : " (skipped)");
#else
  const bool run_grpc = false;
  std::printf("left out (built without libgrpc++-dev/grpc_cpp_plugin)\n");
#endif
  std::printf("  warm-up transfer of %llu MiB per connection, then the measured one; median of %d repetitions,\n",
              static_cast<unsigned long long>(settings.warmup_bytes >> 20), settings.repetitions);
  std::printf("  fmwire wire, fmwire session, gRPC and iperf3 taken in turn each repetition\n");
  std::printf("  GB/s: 1e9 decoded bytes per second; CPU-s/GB: sender + receiver process CPU over the transfer\n");
  std::printf("  (iperf3's: both processes' whole life, start-up included);\n");
  std::printf("  compressed (fmwire z, at 1 Gbit/s): shuffle + zstd 1, chunks of %u block(s), decoded bytes per second;\n",
              settings.compressed_chunk_blocks);
  std::printf("  targets: >= 0.9x iperf3 GB/s, >= 1.5x gRPC GB/s, gRPC CPU / fmwire CPU >= 3x\n");
  std::printf("  fmwire wire: the KV session's messages played by the bench's own sender and receiver processes\n");
  std::printf("  (kv_fmwire.h): the transport alone, sent from the source memory, one copy into the receiver's blocks\n");
  const bool run_sessions = !settings.skip_session && ::access(settings.fmwire_path.c_str(), X_OK) == 0;
  if (run_sessions) {
    std::printf("  fmwire session: the real session (worker/kv_transfers.h) between two `fmwire worker` processes,\n");
    std::printf("  prefill (where the sender runs) and decode (where the receiver runs), synthetic:llama-3-8b, f16 KV,\n");
    std::printf("  no step or prompt time, no prefix cache, a KV cache of one request's blocks (%u MiB at %u tokens%s);\n",
                static_cast<unsigned>(((largest_tokens + kSessionMaxTokens + geometry.block_tokens - 1) /
                                       geometry.block_tokens * geometry.bytes_per_block()) >> 20),
                largest_tokens,
                largest_tokens + kSessionMaxTokens > kSyntheticContext ? ", with --max-context over Llama-3-8B's 8,192"
                                                                       : "");
    std::printf("  the bench routes one request of max_tokens %u at a time, a warm-up first, from a process beside\n",
                kSessionMaxTokens);
    std::printf("  the decode worker; GB/s: the decode Finish's kvTransfer bytes / transferUs (Offer to Committed at\n");
    std::printf("  the decode worker, the prefill overlapped); CPU-s/GB: both workers' CPU over the request\n");
    std::printf("  (/proc/PID/task/*/stat, 10 ms ticks), the prefill engine writing the prompt's KV rows included.\n");
    std::printf("  Its KV is what the synthetic model writes: each token's K and V rows one repeated byte, so it\n");
    std::printf("  compresses to nearly nothing and says nothing about real KV: sessions run --kv-compress off\n");
  } else {
    std::printf("  fmwire session rows skipped: %s\n", settings.skip_session ? "--skip-session"
                                                                            : ("no fmwire program at " + settings.fmwire_path +
                                                                               " (--fmwire PATH)").c_str());
  }
  std::printf("\n");

  // The namespaces, made once for every shaped link.
  std::unique_ptr<NetnsLink> netns;
  std::string netns_problem;
  bool wants_netns = false;
  for (const std::string& name : settings.links) wants_netns |= name != "loopback";
  if (wants_netns) {
    try {
      netns = std::make_unique<NetnsLink>(signal_cleanup);
      std::printf("  namespaces %s (receiver, %s) and %s (sender, %s), veth pair, tc tbf;%s\n",
                  netns->receiver_namespace().c_str(), netns->receiver_address().c_str(),
                  netns->sender_namespace().c_str(), netns->sender_address().c_str(),
                  netns->has_netem() ? " netem delay sender -> receiver" : " netem missing in this kernel: no delay");
    } catch (const NetnsUnavailable& error) {
      netns_problem = error.what();
      std::printf("  netns rows skipped: %s\n", netns_problem.c_str());
    }
  }

  std::vector<Comparison> results;
  std::printf("    %-12s %-10s %-15s %8s %10s %10s %12s %12s\n", "link", "prompt", "side", "GB/s", "CPU-s/GB",
              "vs iperf3", "vs gRPC GB/s", "vs gRPC CPU");
  for (const std::string& name : settings.links) {
    const LinkPlan link = *link_plan(name);
    Placement placement;
    std::string label = link.key;
    if (link.rate_bits_per_s > 0) {
      if (!netns) continue;
      const std::uint32_t delay_us = netns->has_netem() ? settings.delay_us : 0;
      netns->shape(link.rate_bits_per_s, delay_us);
      placement.receiver_prefix = netns->exec_prefix(netns->receiver_namespace());
      placement.sender_prefix = netns->exec_prefix(netns->sender_namespace());
      placement.receiver_host = netns->receiver_address();
      placement.sender_host = netns->sender_address();
      if (delay_us > 0) label += " +" + std::to_string(delay_us) + "us";
    }
    IperfLink iperf_link;
    if (link.rate_bits_per_s > 0) {
      iperf_link = {placement.receiver_prefix, placement.sender_prefix, placement.receiver_host, 5201};
    }
    const bool compress_here = link.rate_bits_per_s == 1'000'000'000ull;
    for (const std::uint32_t tokens : settings.prompt_tokens) {
      const std::uint64_t bytes = std::uint64_t{tokens} * geometry.bytes_per_token();
      // A generous limit: a tenth of the link's rate, or 100 MB/s on loopback.
      const double floor_bytes_per_s = link.rate_bits_per_s > 0 ? link.rate_bits_per_s / 80.0 : 1e8;
      const auto limit = std::chrono::milliseconds(static_cast<std::int64_t>(bytes / floor_bytes_per_s * 1000) + 60'000);
      TransferPlan plan{"fmwire", tokens, settings.chunk_blocks, false, settings.warmup_bytes, settings.backend,
                        settings.zero_copy, kv.path()};
      Cell cell;
      // Started once per cell, stopped (killed) when it is done.
      const std::optional<WorkerPair> workers =
          run_sessions ? std::optional(start_workers(placement, settings.fmwire_path, tokens, settings.backend, settings.zero_copy))
                       : std::nullopt;
      for (int repetition = 0; repetition < settings.repetitions; ++repetition) {
        plan.transport = "fmwire";
        plan.compress = false;
        const Measurement ours = measure_transfer(placement, plan, limit);
        cell.fmwire_gb_per_s.push_back(ours.gb_per_s());
        cell.fmwire_cpu_s_per_gb.push_back(ours.cpu_s_per_gb());
        if (compress_here) {
          plan.compress = true;
          plan.chunk_blocks = settings.compressed_chunk_blocks;
          const Measurement compressed = measure_transfer(placement, plan, limit);
          plan.compress = false;
          plan.chunk_blocks = settings.chunk_blocks;
          cell.compressed_gb_per_s.push_back(compressed.gb_per_s());
          cell.compression_ratio.push_back(static_cast<double>(compressed.decoded_bytes) /
                                           static_cast<double>(compressed.wire_bytes));
        }
        if (workers) {
          const bool warm_up = repetition == 0 && settings.warmup_bytes > 0;
          cell.sessions.push_back(measure_session(placement, *workers, tokens, warm_up, settings.backend, limit));
        }
        if (run_grpc) {
          plan.transport = "grpc";
          const Measurement peer = measure_transfer(placement, plan, limit);
          cell.grpc_gb_per_s.push_back(peer.gb_per_s());
          cell.grpc_cpu_s_per_gb.push_back(peer.cpu_s_per_gb());
        }
        if (iperf_path) {
          const BulkRun peer = iperf3_bulk(*iperf_path, bytes, iperf_link);
          cell.iperf_gb_per_s.push_back(peer.bytes_per_s / 1e9);
          cell.iperf_cpu_s_per_gb.push_back(peer.user_s_per_gb + peer.system_s_per_gb);
        }
      }
      report_cell(label, link.key, tokens, cell, results);
      std::fflush(stdout);
    }
    if (compress_here) {
      // What the decision the worker will make (codec::decide_compression)
      // says for this link, from a sample of the same KV.
      codec::AttachmentCodec codec;
      const std::size_t sample_bytes = std::min<std::size_t>(kv.bytes().size(), 32u << 20);
      const codec::CompressionSpeeds speeds = codec::measure_compression(
          codec, kv.bytes().first(sample_bytes), codec::AttachmentOptions{.compress = true, .element_bytes = 2},
          static_cast<double>(link.rate_bits_per_s) / 8);
      const codec::CompressionDecision decision = codec::decide_compression(speeds);
      std::printf("    %-12s decide_compression: compress %.0f MB/s, decompress %.0f MB/s, ratio %.3f: %s "
                  "(%.0f MB/s raw, %.0f MB/s compressed, predicted)\n",
                  "", speeds.compress_bytes_per_s / 1e6, speeds.decompress_bytes_per_s / 1e6, speeds.ratio,
                  decision.compress ? "compress" : "send as is", decision.raw_bytes_per_s / 1e6,
                  decision.compressed_bytes_per_s / 1e6);
    }
  }
  if (!netns_problem.empty()) std::printf("\n  netns rows skipped: %s\n", netns_problem.c_str());
  std::printf("\n");
  return results;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  using namespace fmwire::bench;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--role" || std::string(argv[i]).rfind("--role=", 0) == 0) return role_main(argc, argv);
  }
  std::string links;
  int chunk_blocks = 0;
  int warmup_mib = -1;
  std::string backend;
  std::string fmwire_path;
  po::options_description own_flags;
  own_flags.add_options()
      ("links", po::value(&links), "comma-separated: loopback, 10g, 1g (default all; 10g and 1g need root)")
      ("chunk-blocks", po::value(&chunk_blocks), "KV blocks (2 MiB each) per KvChunk and per gRPC message (default 4)")
      ("warmup-mib", po::value(&warmup_mib), "MiB of the warm-up transfer per connection (default 64; --quick 0)")
      ("backend", po::value(&backend), "fmwire's I/O backend: uring or asio (default: the usual choice)")
      ("zero-copy", "fmwire sends zero-copy from the KV registered with io_uring")
      ("skip-grpc", "leave out the gRPC peer")
      ("skip-iperf", "leave out the iperf3 peer")
      ("skip-session", "leave out the session rows (two `fmwire worker` processes)")
      ("fmwire", po::value(&fmwire_path), "the fmwire program, for the session rows (default: ../cli/fmwire beside this one)");
  const BenchProgram program{
      .name = "kv",
      .caption = "bench_kv: KV-cache transfer (synthetic:llama-3-8b, fp16) against iperf3 and gRPC, on loopback and "
                 "shaped veth links",
      .quick_help = "prompts of 256 and 1024 tokens, one repetition, no warm-up: under a minute",
      .repetitions_help = "measured transfers per row (default 3)"};
  return bench_main(argc, argv, program, own_flags, [&](const CommonFlags& flags, const po::variables_map& values) {
    BenchSettings settings = flags.quick ? quick_settings() : BenchSettings{};
    if (flags.repetitions) settings.repetitions = *flags.repetitions;
    if (values.count("links")) {
      settings.links.clear();
      std::stringstream list(links);
      for (std::string name; std::getline(list, name, ',');) {
        if (!link_plan(name)) throw UsageError("--links " + links + ": choose from loopback, 10g, 1g");
        settings.links.push_back(name);
      }
    }
    if (values.count("chunk-blocks")) {
      if (chunk_blocks < 1 || chunk_blocks > 32) throw UsageError("--chunk-blocks " + std::to_string(chunk_blocks) + " must be 1 to 32");
      settings.chunk_blocks = static_cast<std::uint32_t>(chunk_blocks);
    }
    if (values.count("warmup-mib")) {
      if (warmup_mib < 0) throw UsageError("--warmup-mib must be 0 or more");
      settings.warmup_bytes = static_cast<std::uint64_t>(warmup_mib) << 20;
    }
    if (!backend.empty() && backend != "uring" && backend != "asio") throw UsageError("--backend " + backend + ": choose uring or asio");
    settings.backend = backend;
    settings.zero_copy = values.count("zero-copy") > 0;
    settings.skip_grpc = values.count("skip-grpc") > 0;
    settings.skip_iperf = values.count("skip-iperf") > 0;
    settings.skip_session = values.count("skip-session") > 0;
    settings.fmwire_path = fmwire_path.empty() ? self_directory() + "/../cli/fmwire" : fmwire_path;
    return run(settings);
  });
}
