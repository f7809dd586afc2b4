// The fmwire command: one binary, one subcommand per role (DESIGN.md, Roles).
#include <boost/program_options.hpp>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/demo.h"
#include "cli/echo_server_command.h"
#include "cli/gateway_command.h"
#include "cli/generate_command.h"
#include "cli/native_tls_flags.h"
#include "cli/perf_command.h"
#include "cli/router_command.h"
#include "cli/up_command.h"
#include "cli/worker_command.h"
#include "engine/cuda_module.h"
#include "log/log.h"
#include "perf/grpc_tokens.h"
#include "protocol/fmwire.capnp.h"
#include "transport/auth_token.h"

namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: fmwire <command> [options]\n"
    "\n"
    "commands:\n"
    "  up           gateway + router + workers with the built-in model, one command (start here)\n"
    "  generate     stream a completion from a native endpoint (worker, router, echo-server)\n"
    "  worker       serve generation streams from a model (built-in, llama2.c checkpoint, synthetic)\n"
    "  router       route client streams to workers (policies, etcd discovery, failover)\n"
    "  gateway      OpenAI-compatible HTTP (SSE) in front of a router, or of workers with one embedded\n"
    "  echo-server  a native endpoint with no model: streams the prompt's words back\n"
    "  perf         protocol benchmarks across nodes: `perf serve` on one host, `perf run --to` on another\n"
    "  demo         encode a token stream and a KV transfer, decode them from a byte stream, report\n"
    "  version      print the version, the protocol version and where the CUDA module is\n"
    "\n"
    "`fmwire <command> --help` describes a command's options. The I/O backend is io_uring where\n"
    "it can be set up, else Boost.Asio; --backend or FMWIRE_IO_BACKEND=uring|asio forces one.\n";

// The backend named by flag, else by the environment, else automatic.
std::string backend_choice(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* environment = std::getenv("FMWIRE_IO_BACKEND");
  return environment != nullptr ? environment : "";
}

// Parses `arguments` into `values`; true when --help was asked (and printed).
bool parse(const std::vector<std::string>& arguments, const po::options_description& description,
           const po::positional_options_description* positional, po::variables_map& values) {
  po::command_line_parser parser(arguments);
  parser.options(description);
  if (positional != nullptr) parser.positional(*positional);
  po::store(parser.run(), values);
  if (values.count("help")) {
    std::cout << description;
    return true;
  }
  po::notify(values);
  return false;
}

// The HTTP front's --tls-cert, --tls-key and --rate-limit, for `gateway`
// and `up`; `callers` says whom the limits count.
void add_https_and_rate_limit_flags(po::options_description& description, std::string& tls_cert, std::string& tls_key,
                                    std::string& rate_limit, const std::string& callers) {
  const std::string rate_limit_help =
      "RPS[,TPM]: " + callers + ", requests per second and tokens per minute (max_tokens charged on admission, "
      "the unused part given back at the stream's end); past them a 429 with Retry-After; 0: no limit on that one";
  description.add_options()
      ("tls-cert", po::value(&tls_cert),
       "HTTPS: the certificate chain (PEM) to serve, with --tls-key; TLS 1.2 and 1.3 only; read again on SIGHUP "
       "(open streams keep going)")
      ("tls-key", po::value(&tls_key), "HTTPS: the certificate's private key (PEM)")
      ("rate-limit", po::value(&rate_limit), rate_limit_help.c_str());
}

// --rate-limit RPS[,TPM] (gateway/rate_limiter.h); a bad one exits 2.
fmwire::gateway::RateLimits rate_limits_flag(const std::string& text) {
  if (text.empty()) return {};
  auto limits = fmwire::gateway::parse_rate_limits(text);
  if (!limits) throw po::error("--rate-limit: " + limits.error());
  return *limits;
}

// --auth-token-file FILE, which every command with a native connection
// takes (transport/auth_token.h); `help` says who proves it to whom.
void add_auth_token_flag(po::options_description& description, const std::string& help) {
  description.add_options()("auth-token-file", po::value<std::string>()->value_name("FILE"), help.c_str());
}

// The secret of --auth-token-file, null without the flag; an unreadable,
// empty or too short file exits 2 with a line naming it (never the secret).
std::shared_ptr<const fmwire::transport::AuthToken> auth_token_flag(const po::variables_map& values) {
  if (!values.count("auth-token-file")) return nullptr;
  auto token = fmwire::transport::AuthToken::read_file(values["auth-token-file"].as<std::string>());
  if (!token) throw po::error(token.error());
  return *token;
}

// --etcd-cacert, --etcd-cert, --etcd-key: an https --etcd's files, named as
// etcdctl names them (--cacert, --cert, --key).
void add_etcd_tls_flags(po::options_description& description, fmwire::discovery::EtcdTlsFiles& files) {
  description.add_options()
      ("etcd-cacert", po::value(&files.ca_file)->value_name("FILE"),
       "https --etcd: the CA (PEM) etcd's certificate must chain to (default: the system's CAs)")
      ("etcd-cert", po::value(&files.cert_file)->value_name("FILE"),
       "https --etcd: the client certificate (PEM) to present, for an etcd started with --client-cert-auth")
      ("etcd-key", po::value(&files.key_file)->value_name("FILE"), "https --etcd: the client certificate's key (PEM)");
}

// --log-level and --log-format, which every command takes.
struct LogFlags {
  std::string level = "info";
  std::string format = "text";
};

void add_log_options(po::options_description& description, LogFlags& flags) {
  description.add_options()
      ("log-level", po::value(&flags.level)->default_value(flags.level), "debug, info, warn, error or off")
      ("log-format", po::value(&flags.format)->default_value(flags.format),
       "text (a line per event) or json (an object per line, for log collectors), on standard error");
}

// Sets the process's log from its flags; false (with a line why) for a bad value.
bool start_log(const LogFlags& flags, const std::string& process) {
  const auto level = fmwire::log::parse_level(flags.level);
  const auto format = fmwire::log::parse_format(flags.format);
  if (!level || !format) {
    std::cerr << process << ": " << (!level ? "--log-level " + flags.level + ": give debug, info, warn, error or off"
                                             : "--log-format " + flags.format + ": give text or json")
              << "\n";
    return false;
  }
  fmwire::log::configure({*level, *format, process});
  return true;
}

// "a,b,c" -> {"a", "b", "c"}, empty pieces dropped.
std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> pieces;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t end = std::min(text.find(',', begin), text.size());
    if (end > begin) pieces.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return pieces;
}

int run_generate_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::GenerateCommand command;
  std::string backend;
  std::uint64_t seed = 0;
  std::uint32_t connect_timeout_ms = 5000;
  std::string endpoints;
  po::options_description description("usage: fmwire generate --endpoint HOST:PORT[,HOST:PORT...] [options] PROMPT\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("endpoint", po::value(&endpoints)->required(),
       "the worker, router or echo-server, HOST:PORT; or a list, HOST:PORT,...: the first that accepts serves")
      ("max-tokens", po::value(&command.max_tokens)->default_value(command.max_tokens), "tokens to generate at most")
      ("temperature", po::value(&command.temperature)->default_value(command.temperature), "0 is greedy")
      ("seed", po::value(&seed), "sampling seed (default: the endpoint picks one)")
      ("json", po::bool_switch(&command.json), "one JSON object per Tokens and Finish frame")
      ("connect-timeout-ms", po::value(&connect_timeout_ms)->default_value(connect_timeout_ms),
       "connecting and the Hello exchange")
      ("backend", po::value(&backend), "I/O backend: uring or asio")
      ("prompt", po::value(&command.prompt)->required(), "the prompt (positional)");
  po::positional_options_description positional;
  positional.add("prompt", 1);
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) to prove to the endpoint, which must hold the same one");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, &positional, values)) return 0;
  if (!start_log(log_flags, "fmwire generate")) return 2;
  command.auth_token = auth_token_flag(values);
  if (values.count("seed")) command.seed = seed;
  command.endpoints = split_list(endpoints);
  command.connect_timeout = std::chrono::milliseconds(connect_timeout_ms);
  command.tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_generate(command, std::cout);
}

int run_echo_server_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::EchoServerCommand command;
  std::string backend;
  std::uint32_t token_interval_ms = 0;
  std::uint32_t drain_timeout_ms = 10000;
  po::options_description description("usage: fmwire echo-server [options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("listen", po::value(&command.listen)->default_value(command.listen), "HOST:PORT; port 0 picks a free one")
      ("token-interval-ms", po::value(&token_interval_ms)->default_value(0), "pause between frames (0: as fast as credit allows)")
      ("tokens-per-frame", po::value(&command.tokens_per_frame)->default_value(command.tokens_per_frame), "tokens in each Tokens frame")
      ("threads", po::value(&command.threads)->default_value(command.threads), "loop threads sharing the port (one per core)")
      ("drain-timeout-ms", po::value(&drain_timeout_ms)->default_value(drain_timeout_ms), "on SIGINT/SIGTERM, how long open streams may take to finish")
      ("backend", po::value(&backend), "I/O backend: uring or asio");
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) every client must prove; none: clients must hold none");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire echo-server")) return 2;
  command.auth_token = auth_token_flag(values);
  command.token_interval = std::chrono::milliseconds(token_interval_ms);
  command.drain_timeout = std::chrono::milliseconds(drain_timeout_ms);
  command.tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_echo_server(command, std::cout);
}

constexpr const char* kPerfUsage =
    "usage: fmwire perf serve --listen HOST:PORT [options]\n"
    "       fmwire perf run --to HOST:PORT --test tokens|latency|bulk|kv [options]\n"
    "`fmwire perf serve --help` and `fmwire perf run --help` describe the options.\n";

int run_perf_serve_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::PerfServeCommand command;
  std::string backend;
  std::uint16_t iperf3_port = 0;
  std::uint16_t grpc_port = 0;
  std::uint16_t grpc_kv_port = 0;
  po::options_description description("usage: fmwire perf serve --listen HOST:PORT [options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("listen", po::value(&command.listen)->default_value(command.listen), "HOST:PORT; port 0 picks a free one")
      ("iperf3-port", po::value(&iperf3_port), "also run `iperf3 -s -p PORT` (the peer of `perf run --compare`), killed on exit")
      ("grpc-port", po::value(&grpc_port),
       "where the gRPC peer of tokens and latency listens (same host; default: a free port, printed, told to clients)")
      ("grpc-kv-port", po::value(&grpc_kv_port), "where the gRPC peer of kv listens (likewise)")
      ("backend", po::value(&backend), "I/O backend: uring or asio");
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) every `perf run` must prove");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire perf serve")) return 2;
  command.auth_token = auth_token_flag(values);
  if (values.count("iperf3-port")) command.iperf3_port = iperf3_port;
  command.tls = fmwire::cli::load_native_tls(native_tls);
  if (values.count("grpc-port")) command.grpc_port = grpc_port;
  if (values.count("grpc-kv-port")) command.grpc_kv_port = grpc_kv_port;
  command.backend = backend_choice(backend);
  return fmwire::cli::run_perf_serve(command, std::cout);
}

int run_perf_run_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::PerfRunCommand command;
  std::string backend;
  double seconds = 0;
  int repetitions = 0;
  std::uint32_t connect_timeout_ms = 5000;
  po::options_description description(
      "usage: fmwire perf run --to HOST:PORT --test tokens|latency|bulk|kv [options]\n"
      "prints medians over rounds (a warm-up round first); exit 1 when a measurement fails\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("to", po::value(&command.to)->required(), "the `fmwire perf serve` to test against, HOST:PORT")
      ("test", po::value(&command.test)->required(),
       "tokens (token frames/s, CPU on both ends), latency (round trip p50/p99), "
       "bulk (GB/s of KvChunk attachments, CPU on both ends), "
       "kv (GB/s of a KV shard pushed with the KV session's messages: offer, chunks copied into blocks, commit)")
      ("seconds", po::value(&seconds), "measured rounds until this many seconds have passed")
      ("repetitions", po::value(&repetitions), "measured rounds (default 5)")
      ("json", po::value(&command.json_path), "also write the results to FILE (bench results format)")
      ("compare", po::bool_switch(&command.compare),
       "the peers against the same host, as ratios: tokens, latency and kv: gRPC (the servers `perf serve` runs, "
       "where it is built in); bulk and kv: iperf3 (its `perf serve --iperf3-port`)")
      ("iperf3-port", po::value(&command.iperf3_port)->default_value(command.iperf3_port), "where the server host runs iperf3 -s")
      ("frames", po::value(&command.frames)->default_value(command.frames), "tokens: frames per round, over all streams")
      ("streams", po::value(&command.streams)->default_value(command.streams), "tokens: concurrent streams on one connection")
      ("requests", po::value(&command.requests)->default_value(command.requests), "latency: round trips per round")
      ("chunk-bytes", po::value(&command.chunk_bytes)->default_value(command.chunk_bytes), "bulk and kv: attachment bytes per KvChunk (kv: whole 2 MiB blocks)")
      ("bytes", po::value(&command.bytes)->default_value(command.bytes), "bulk and kv: bytes per round (kv: whole blocks, at most 2 GiB)")
      ("connect-timeout-ms", po::value(&connect_timeout_ms)->default_value(connect_timeout_ms),
       "connecting and the Hello exchange")
      ("backend", po::value(&backend), "I/O backend: uring or asio");
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) to prove to `perf serve`");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire perf run")) return 2;
  command.auth_token = auth_token_flag(values);
  if (values.count("seconds")) command.seconds = seconds;
  if (values.count("repetitions")) command.repetitions = repetitions;
  command.connect_timeout = std::chrono::milliseconds(connect_timeout_ms);
  command.tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_perf_run(command, std::cout);
}

int run_perf_command(const std::vector<std::string>& arguments) {
  const std::string mode = arguments.empty() ? "" : arguments.front();
  const std::vector<std::string> rest(arguments.begin() + (arguments.empty() ? 0 : 1), arguments.end());
  if (mode == "serve") return run_perf_serve_command(rest);
  if (mode == "run") return run_perf_run_command(rest);
  if (mode == "--help" || mode == "-h") {
    std::cout << kPerfUsage;
    return 0;
  }
  std::cerr << "fmwire perf: " << (mode.empty() ? "serve or run?" : "unknown mode '" + mode + "'") << "\n" << kPerfUsage;
  return 2;
}

int run_worker_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::WorkerCommand command;
  std::string backend;
  std::uint32_t load_report_interval_ms = 100;
  std::uint32_t drain_timeout_ms = 30000;
  std::uint32_t kv_timeout_ms = 10000;
  std::uint32_t step_us = 0;
  std::uint32_t prefill_ns_per_token = 0;
  std::uint32_t max_context = 0;
  auto& model = command.model;
  po::options_description description("usage: fmwire worker [options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("listen", po::value(&command.listen)->default_value(command.listen), "HOST:PORT; port 0 picks a free one")
      ("metrics-listen", po::value(&command.metrics_listen),
       "serve Prometheus /metrics on HOST:PORT (port 0 picks a free one, printed); default: none")
      ("model", po::value(&model.model)->default_value(model.model),
       "builtin, a llama2.c checkpoint (.bin), or synthetic:NAME (llama-3-8b, llama-3-70b, tiny)")
      ("tokenizer", po::value(&model.tokenizer), "llama2.c tokenizer.bin (default: beside the checkpoint)")
      ("device", po::value(&model.device)->default_value(model.device), "auto, cpu or cuda")
      ("kv-dtype", po::value(&model.kv_dtype)->default_value(model.kv_dtype),
       "KV cache element type: f16, bf16 or f32 (the KV bytes per token, on the wire too)")
      ("kv-blocks", po::value(&model.kv_blocks), "KV cache blocks (default: as many as --kv-memory-mib holds)")
      ("kv-memory-mib", po::value(&model.kv_memory_mib)->default_value(model.kv_memory_mib), "KV cache size")
      ("block-tokens", po::value(&model.block_tokens)->default_value(model.block_tokens), "tokens per KV block")
      ("max-batch-tokens", po::value(&model.batching.max_batch_tokens)->default_value(model.batching.max_batch_tokens),
       "tokens per step (decodes plus prompt chunks)")
      ("max-running", po::value(&model.batching.max_running)->default_value(model.batching.max_running),
       "sequences in the batch at once")
      ("max-waiting", po::value(&command.max_waiting)->default_value(command.max_waiting),
       "requests waiting for a batch slot, at most; past it new ones are refused as overloaded (a gateway's 429 "
       "with Retry-After); 0: no bound")
      ("no-prefix-cache", "do not reuse the KV blocks of shared prompt prefixes")
      ("step-us", po::value(&step_us), "synthetic models: time per step")
      ("prefill-ns-per-token", po::value(&prefill_ns_per_token), "synthetic models: time per prompt token")
      ("max-context", po::value(&max_context), "synthetic models: context length in tokens (default: the named model's)")
      ("name", po::value(&command.name), "name in load reports and timings (default: the address)")
      ("etcd", po::value(&command.etcd), "register in etcd (http://HOST:PORT, or https:// with --etcd-cacert/--etcd-cert/--etcd-key) for routers that watch it")
      ("advertise", po::value(&command.advertise),
       "HOST:PORT to register in etcd, as other hosts reach this one (needed when --listen is 0.0.0.0 or [::]); "
       "port 0: the port listened on")
      ("etcd-prefix", po::value(&command.etcd_prefix)->default_value(command.etcd_prefix), "key prefix in etcd")
      ("etcd-ttl-s", po::value(&command.etcd_ttl_s)->default_value(command.etcd_ttl_s),
       "lease time: a worker that dies leaves etcd this long after")
      ("load-report-interval-ms", po::value(&load_report_interval_ms)->default_value(load_report_interval_ms),
       "how often subscribers get a LoadReport")
      ("drain-timeout-ms", po::value(&drain_timeout_ms)->default_value(drain_timeout_ms),
       "on SIGINT/SIGTERM, how long open streams may take to finish")
      ("role", po::value(&command.role)->default_value(command.role),
       "disaggregated serving: prefill, decode or both (routers with both kinds split requests)")
      ("kv-compress", po::value(&command.kv_compress)->default_value(command.kv_compress),
       "KV chunks sent to decode workers: shuffle+zstd auto (where it shortens the transfer), on or off")
      ("kv-timeout-ms", po::value(&kv_timeout_ms)->default_value(kv_timeout_ms),
       "a KV transfer session ends with a deadline error after this long without progress")
      ("zero-copy-min-bytes", po::value(&command.zero_copy_min_bytes)->default_value(command.zero_copy_min_bytes),
       "io_uring sends of at least this many bytes go zero-copy, KV chunks from the registered cache; 0: never "
       "(on loopback and veth links copying measured faster: bench_kv --zero-copy)")
      ("backend", po::value(&backend), "I/O backend: uring or asio");
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_etcd_tls_flags(description, command.etcd_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) that routers, clients and other workers must prove, and that this worker proves to the workers it pushes KV to; none: peers must hold none");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire worker")) return 2;
  command.auth_token = auth_token_flag(values);
  command.kv_state_timeout = std::chrono::milliseconds(std::max<std::uint32_t>(kv_timeout_ms, 1));
  if (const char* corrupt = std::getenv("FMWIRE_FAULT_CORRUPT_KV_CHUNK")) {
    command.corrupt_kv_chunk = static_cast<std::uint32_t>(std::strtoul(corrupt, nullptr, 10));
  }
  if (values.count("no-prefix-cache")) model.batching.prefix_cache = false;
  if (values.count("step-us")) model.step_time = std::chrono::microseconds(step_us);
  if (values.count("prefill-ns-per-token")) model.prefill_time_per_token = std::chrono::nanoseconds(prefill_ns_per_token);
  if (values.count("max-context")) {
    if (max_context == 0) {
      fmwire::log::error("--max-context must be at least 1");
      return 2;
    }
    model.max_context = max_context;
  }
  if (model.batching.max_batch_tokens == 0 || model.batching.max_running == 0) {
    fmwire::log::error("--max-batch-tokens and --max-running must be at least 1");
    return 2;
  }
  command.load_report_interval = std::chrono::milliseconds(std::max<std::uint32_t>(load_report_interval_ms, 1));
  command.drain_timeout = std::chrono::milliseconds(drain_timeout_ms);
  command.tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_worker(command, std::cout);
}


// Loop threads, at most: far past any core count, so that a typo (an extra
// digit) is refused rather than starting thousands of threads.
constexpr unsigned kMaxLoopThreads = 1024;

// A --threads value: a whole number from 1 to kMaxLoopThreads, read here
// rather than by program_options, which takes "-1" as 4294967295.
std::optional<unsigned> parse_loop_threads(const std::string& text) {
  unsigned threads = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, threads);
  if (error != std::errc() || stop != end || threads == 0 || threads > kMaxLoopThreads) return std::nullopt;
  return threads;
}

int run_router_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::RouterCommand command;
  std::string backend;
  std::string workers;
  std::uint32_t keepalive_ms = 1000;
  std::uint32_t dead_after_ms = 3000;
  std::uint32_t drain_timeout_ms = 30000;
  std::string disaggregate = "auto";
  std::string threads = std::to_string(std::max(std::thread::hardware_concurrency(), 1u));
  auto& router = command.router;
  po::options_description description("usage: fmwire router --listen HOST:PORT --workers HOST:PORT,... [options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("listen", po::value(&command.listen)->default_value(command.listen), "HOST:PORT; port 0 picks a free one")
      ("threads", po::value(&threads)->default_value(threads),
       "loop threads sharing the port, each with its own links to every worker (default: one per core)")
      ("workers", po::value(&workers), "the workers, HOST:PORT,HOST:PORT,...")
      ("metrics-listen", po::value(&command.metrics_listen),
       "serve Prometheus /metrics on HOST:PORT (port 0 picks a free one, printed); default: none")
      ("policy", po::value(&router.policy)->default_value(router.policy), "round-robin, least-loaded, prefix or sla")
      ("etcd", po::value(&command.etcd), "etcd URL (http://HOST:PORT, or https://): workers registered there join and leave")
      ("etcd-prefix", po::value(&command.etcd_prefix)->default_value(command.etcd_prefix), "key prefix of the workers in etcd")
      ("advertise", po::value(&command.advertise),
       "with --etcd, HOST:PORT to register this router as, as other hosts reach it (needed when --listen is 0.0.0.0 "
       "or [::]); port 0: the port listened on")
      ("etcd-router-prefix", po::value(&command.etcd_router_prefix)->default_value(command.etcd_router_prefix),
       "key prefix this router registers under, for gateways that find routers in etcd")
      ("etcd-ttl-s", po::value(&command.etcd_ttl_s)->default_value(command.etcd_ttl_s),
       "lease time: a router that dies leaves etcd this long after")
      ("migrate", po::bool_switch(&router.migrate), "re-issue a lost worker's requests elsewhere, the stream going on")
      ("disaggregate", po::value(&disaggregate)->default_value(disaggregate),
       "auto: split each request between a prefill and a decode worker (fmwire worker --role) while both kinds "
       "are up; off: every request served whole by one worker")
      ("tokenizer", po::value(&command.tokenizer),
       "the workers' llama2.c tokenizer.bin (default: the built-in byte-level one); with --policy prefix or sla, "
       "prompts are tokenized here with it and sent on as ids (with --migrate, those of a stream carried on "
       "too), and a worker whose tokenizer differs is refused with a log line")
      ("block-tokens", po::value(&router.policy_options.block_tokens)->default_value(router.policy_options.block_tokens),
       "the workers' KV block size, for prefix routing")
      ("max-streams", po::value(&router.max_streams)->default_value(router.max_streams),
       "open client streams; then overloaded (split evenly over the loop threads)")
      ("keepalive-ms", po::value(&keepalive_ms)->default_value(keepalive_ms), "Ping a silent worker after this long")
      ("dead-after-ms", po::value(&dead_after_ms)->default_value(dead_after_ms), "a worker silent this long is lost")
      ("name", po::value(&router.name)->default_value(router.name), "name in the hop timings")
      ("drain-timeout-ms", po::value(&drain_timeout_ms)->default_value(drain_timeout_ms),
       "on SIGINT/SIGTERM, how long open streams may take to finish")
      ("backend", po::value(&backend), "I/O backend: uring or asio");
  fmwire::cli::NativeTlsFlags native_tls;
  add_native_tls_flags(description, native_tls);
  add_etcd_tls_flags(description, command.etcd_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) that clients and gateways must prove, and that this router proves to its workers");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire router")) return 2;
  command.auth_token = auth_token_flag(values);
  command.workers = split_list(workers);
  const std::optional<unsigned> loop_threads = parse_loop_threads(threads);
  if (!loop_threads) {
    fmwire::log::error("--threads " + threads + ": give a whole number of loop threads from 1 to " +
                       std::to_string(kMaxLoopThreads));
    return 2;
  }
  command.threads = *loop_threads;
  if (disaggregate != "auto" && disaggregate != "off") {
    fmwire::log::error("--disaggregate " + disaggregate + ": give auto or off");
    return 2;
  }
  router.disaggregate = disaggregate == "auto";
  router.worker_link.connection.keepalive_interval = std::chrono::milliseconds(std::max<std::uint32_t>(keepalive_ms, 1));
  router.worker_link.connection.dead_after = std::chrono::milliseconds(std::max(dead_after_ms, keepalive_ms + 1));
  command.drain_timeout = std::chrono::milliseconds(drain_timeout_ms);
  command.tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_router(command, std::cout);
}

int run_gateway_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::GatewayCommand command;
  std::string backend;
  std::string rate_limit;
  std::string workers;
  std::string routers;
  std::uint32_t drain_timeout_ms = 30000;
  std::uint32_t keepalive_ms = 1000;
  std::uint32_t dead_after_ms = 3000;
  po::options_description description(
      "usage: fmwire gateway --listen HOST:PORT (--router HOST:PORT,... | --etcd URL | --workers HOST:PORT,...) "
      "[options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("listen", po::value(&command.listen)->default_value(command.listen), "HOST:PORT for HTTP; port 0 picks a free one")
      ("router", po::value(&routers),
       "the routers requests go to, HOST:PORT,...: one connection at a time, the next one when it is lost")
      ("etcd", po::value(&command.etcd), "or find the routers in etcd (http://HOST:PORT, or https://), as they come and go")
      ("etcd-router-prefix", po::value(&command.etcd_router_prefix)->default_value(command.etcd_router_prefix),
       "with --etcd: the key prefix routers register under")
      ("workers", po::value(&workers), "or the workers, HOST:PORT,...: a router runs inside the gateway")
      ("api-keys", po::value(&command.api_keys_file), "file of API keys, one per line (# comments)")
      ("api-key", po::value(&command.api_keys)->composing(), "an API key (repeatable); none: no key needed")
      ("model", po::value(&command.model)->default_value(command.model), "the model name /v1/models lists")
      ("policy", po::value(&command.router_options.policy)->default_value(command.router_options.policy),
       "with --workers: round-robin, least-loaded, prefix or sla")
      ("max-streams", po::value(&command.router_options.max_streams)->default_value(command.router_options.max_streams),
       "with --workers: open streams at once; then 429 overloaded")
      ("tokenizer", po::value(&command.tokenizer),
       "with --workers: their llama2.c tokenizer.bin (default: byte-level), for --policy prefix or sla")
      ("drain-timeout-ms", po::value(&drain_timeout_ms)->default_value(drain_timeout_ms),
       "on SIGINT/SIGTERM, how long open streams may take to finish")
      ("http-threads", po::value(&command.http_threads)->default_value(command.http_threads),
       "threads for HTTP; 0: one per four cores, at least one")
      ("keepalive-ms", po::value(&keepalive_ms)->default_value(keepalive_ms), "Ping a silent router after this long")
      ("dead-after-ms", po::value(&dead_after_ms)->default_value(dead_after_ms),
       "a router silent this long is lost: its streams end retryable, new ones go to the next router")
      ("backend", po::value(&backend), "I/O backend of the native side: uring or asio");
  add_https_and_rate_limit_flags(description, command.tls_cert, command.tls_key, rate_limit,
                                 "per API key (per client address without keys)");
  fmwire::cli::NativeTlsFlags native_tls;
  native_tls.prefix = "native-tls-";
  add_native_tls_flags(description, native_tls);
  add_etcd_tls_flags(description, command.etcd_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) to prove to the routers (with --workers: the embedded router proves it to the workers)");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire gateway")) return 2;
  command.auth_token = auth_token_flag(values);
  command.workers = split_list(workers);
  command.routers = split_list(routers);
  command.rate_limits = rate_limits_flag(rate_limit);
  command.upstream_keepalive = std::chrono::milliseconds(std::max<std::uint32_t>(keepalive_ms, 1));
  command.upstream_dead_after = std::chrono::milliseconds(std::max(dead_after_ms, keepalive_ms + 1));
  command.drain_timeout = std::chrono::milliseconds(drain_timeout_ms);
  command.native_tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_gateway(command, std::cout);
}

int run_up_command(const std::vector<std::string>& arguments) {
  LogFlags log_flags;
  fmwire::cli::UpCommand command;
  std::string backend;
  std::string rate_limit;
  std::uint32_t drain_timeout_ms = 30000;
  auto& model = command.model;
  po::options_description description("usage: fmwire up [options]\noptions");
  description.add_options()
      ("help,h", "show this help")
      ("port", po::value(&command.port)->default_value(command.port), "HTTP port; 0 picks a free one")
      ("host", po::value(&command.host)->default_value(command.host), "HTTP address: a name, IPv4 or IPv6")
      ("workers", po::value(&command.workers)->default_value(command.workers),
       "workers, each with its own engine (with --disaggregate: none unless given, besides the prefill and decode ones)")
      ("disaggregate", "disaggregated prefill/decode: one prefill and one decode worker, each request split "
       "between them (the KV pushed worker to worker)")
      ("prefill-workers", po::value(&command.prefill_workers), "prefill workers (default 1); implies --disaggregate")
      ("decode-workers", po::value(&command.decode_workers), "decode workers (default 1); implies --disaggregate")
      ("model", po::value(&model.model)->default_value(model.model),
       "builtin, a llama2.c checkpoint (.bin), or synthetic:NAME (llama-3-8b, llama-3-70b, tiny)")
      ("tokenizer", po::value(&model.tokenizer), "llama2.c tokenizer.bin (default: beside the checkpoint)")
      ("device", po::value(&model.device)->default_value(model.device), "auto, cpu or cuda")
      ("kv-dtype", po::value(&model.kv_dtype)->default_value(model.kv_dtype), "KV cache element type: f16, bf16 or f32")
      ("kv-memory-mib", po::value(&model.kv_memory_mib)->default_value(model.kv_memory_mib), "KV cache size per worker")
      ("policy", po::value(&command.policy)->default_value(command.policy), "least-loaded, prefix, round-robin or sla")
      ("no-demo", "serve at once, without streaming a demo completion first")
      ("demo-prompt", po::value(&command.demo_prompt)->default_value(command.demo_prompt), "the demo's prompt")
      ("drain-timeout-ms", po::value(&drain_timeout_ms)->default_value(drain_timeout_ms),
       "on SIGINT/SIGTERM, how long open streams may take to finish")
      ("http-threads", po::value(&command.http_threads)->default_value(command.http_threads),
       "threads for HTTP; 0: one per four cores, at least one")
      ("backend", po::value(&backend), "I/O backend of the native side: uring or asio");
  add_https_and_rate_limit_flags(description, command.tls_cert, command.tls_key, rate_limit, "per client address");
  fmwire::cli::NativeTlsFlags native_tls;
  native_tls.prefix = "native-tls-";
  add_native_tls_flags(description, native_tls);
  add_auth_token_flag(description,
                      "the shared secret (at least 16 bytes, surrounding whitespace trimmed) that every native hop inside proves (gateway -> router -> workers on 127.0.0.1), so no other local user can open streams on their ports");
  add_log_options(description, log_flags);
  po::variables_map values;
  if (parse(arguments, description, nullptr, values)) return 0;
  if (!start_log(log_flags, "fmwire up")) return 2;
  command.auth_token = auth_token_flag(values);
  command.rate_limits = rate_limits_flag(rate_limit);
  if (values.count("no-demo")) command.demo = false;
  if (values.count("disaggregate") || values.count("prefill-workers") || values.count("decode-workers")) {
    if (!values.count("prefill-workers")) command.prefill_workers = 1;
    if (!values.count("decode-workers")) command.decode_workers = 1;
    if (values["workers"].defaulted()) command.workers = 0;
  }
  command.drain_timeout = std::chrono::milliseconds(drain_timeout_ms);
  command.native_tls = fmwire::cli::load_native_tls(native_tls);
  command.backend = backend_choice(backend);
  return fmwire::cli::run_up(command, std::cout);
}

int run_demo_command(const std::vector<std::string>& arguments) {
  fmwire::cli::DemoOptions options;
  po::options_description description("fmwire demo options");
  description.add_options()
      ("help,h", "show this help")
      ("seed", po::value(&options.seed)->default_value(options.seed), "seed for the data and the piece sizes")
      ("kv-bytes", po::value(&options.kv_bytes)->default_value(options.kv_bytes), "size of the KV chunk")
      ("max-piece-bytes", po::value(&options.max_piece_bytes)->default_value(options.max_piece_bytes),
       "largest piece the byte stream is delivered in")
      ("quiet,q", po::bool_switch(&options.quiet), "print the summary only");
  po::variables_map values;
  po::store(po::command_line_parser(arguments).options(description).run(), values);
  if (values.count("help")) {
    std::cout << description;
    return 0;
  }
  po::notify(values);
  if (options.kv_bytes > (64u << 20)) {
    std::cerr << "fmwire demo: --kv-bytes " << options.kv_bytes << " is over the attachment limit of 67108864\n";
    return 2;
  }
  return fmwire::cli::run_demo(options, std::cout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string command = argv[1];
  const std::vector<std::string> arguments(argv + 2, argv + argc);
  try {
    if (command == "demo") return run_demo_command(arguments);
    if (command == "generate") return run_generate_command(arguments);
    if (command == "echo-server") return run_echo_server_command(arguments);
    if (command == "perf") return run_perf_command(arguments);
    if (command == "worker") return run_worker_command(arguments);
    if (command == "router") return run_router_command(arguments);
    if (command == "gateway") return run_gateway_command(arguments);
    if (command == "up") return run_up_command(arguments);
    if (command == "version" || command == "--version") {
      std::cout << "fmwire " << FMWIRE_VERSION << ", protocol " << fmwire::protocol::PROTOCOL_MAJOR << "."
                << fmwire::protocol::PROTOCOL_MINOR << "\n";
      // Where a worker would open the CUDA backend from (not opened here).
      const fmwire::engine::CudaModuleFile cuda = fmwire::engine::find_cuda_module();
      std::cout << "CUDA module: " << (cuda.path.empty() ? cuda.problem : cuda.path) << "\n";
      std::cout << "gRPC peer (perf --compare): "
                << (fmwire::perf::grpc_built_in() ? "gRPC " + fmwire::perf::grpc_version() : std::string("not built in"))
                << "\n";
      return 0;
    }
    if (command == "help" || command == "--help" || command == "-h") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "fmwire: unknown command '" << command << "'\n\n" << kUsage;
    return 2;
  } catch (const po::error& error) {
    std::cerr << "fmwire " << command << ": " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    fmwire::log::error(error.what());
    return 1;
  }
}
