// `fmwire worker`: serves generation streams from an engine (the built-in
// model, a llama2.c checkpoint, or a synthetic model) on the native
// protocol. Prints its address, and drains on SIGINT/SIGTERM: no new
// streams, open ones finish, then exit.
#pragma once

#include <chrono>
#include <iosfwd>
#include <string>

#include "discovery/etcd_discovery.h"
#include "engine/model_loader.h"
#include "transport/tls_credentials.h"
#include "transport/auth_token.h"
#include "worker/worker_service.h"

namespace fmwire::cli {

struct WorkerCommand {
  std::string listen = "127.0.0.1:7100";  // port 0: any free port (printed)
  std::string metrics_listen;             // HOST:PORT for /metrics (port 0: any, printed); empty: none
  std::string name;                       // in load reports and timings; default: the address
  engine::ModelSpec model;
  std::string backend;                    // I/O backend: "", "uring" or "asio"
  std::chrono::milliseconds load_report_interval{100};
  std::chrono::milliseconds drain_timeout{30000};
  std::string etcd;                       // URL: register there for routers to find
  std::string advertise;                  // HOST:PORT registered in etcd (cli/advertise.h); default: the listen address
  std::string etcd_prefix = "/fmwire/workers/";
  discovery::EtcdTlsFiles etcd_tls;       // https etcd: --etcd-cacert, --etcd-cert, --etcd-key
  std::uint32_t etcd_ttl_s = 5;
  std::string role = "both";              // disaggregated serving: prefill, decode or both
  std::string kv_compress = "auto";       // KV chunks: shuffle+zstd auto, on or off
  std::uint32_t max_waiting = worker::WorkerOptions{}.max_waiting;  // then overloaded; 0: no bound
  std::chrono::milliseconds kv_state_timeout{10000};  // a KV session's deadline per state
  // io_uring sends of at least this many bytes go zero-copy (KV chunks from
  // the cache, registered with the loop, on fixed buffers); 0: never.
  std::size_t zero_copy_min_bytes = 0;
  // Fault injection for tests (FMWIRE_FAULT_CORRUPT_KV_CHUNK): corrupt this
  // chunk of each KV transfer sent after its digest was taken; 0: never.
  std::uint32_t corrupt_kv_chunk = 0;
  // TLS 1.3, mutual, on every native socket: served and KV links to other workers; null: plaintext.
  std::shared_ptr<const transport::TlsCredentials> tls;
  // --auth-token-file: proved by every peer (routers, clients, workers that
  // push KV) and to the workers it pushes KV to; null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Returns 0 after a clean drain, 1 when it had to cut streams off, 2 for bad
// options (a model that cannot be loaded included).
int run_worker(const WorkerCommand& command, std::ostream& out);

}  // namespace fmwire::cli
