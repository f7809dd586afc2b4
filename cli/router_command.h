// `fmwire router`: the native-protocol front door (router/router_service.h)
// in a process of its own: takes client streams, routes each to a worker
// from a static list or from etcd, relays, and drains on SIGINT/SIGTERM.
// With --threads N, N loops share the port, shared nothing: a client's
// connection and its streams stay on the loop that accepted it.
#pragma once

#include <chrono>
#include <iosfwd>
#include <string>
#include <vector>

#include "discovery/etcd_discovery.h"
#include "router/router_service.h"
#include "transport/tls_credentials.h"

namespace fmwire::cli {

struct RouterCommand {
  std::string listen = "127.0.0.1:7000";
  // Loop threads serving the port (transport/server_group.h), each with a
  // RouterService and links to every worker of its own; at least 1.
  unsigned threads = 1;
  std::string metrics_listen;           // HOST:PORT for /metrics (port 0: any, printed); empty: none
  std::vector<std::string> workers;     // HOST:PORT each
  std::string etcd;                     // URL: workers from etcd instead of (or besides) the list
  std::string etcd_prefix = "/fmwire/workers/";
  discovery::EtcdTlsFiles etcd_tls;       // https etcd: --etcd-cacert, --etcd-cert, --etcd-key
  // With --etcd the router registers too, for gateways and clients to find:
  // this address (cli/advertise.h; default: the listen address) under this
  // prefix, under a lease of etcd_ttl_s.
  std::string advertise;
  std::string etcd_router_prefix = "/fmwire/routers/";
  std::uint32_t etcd_ttl_s = 5;
  std::string tokenizer;                // the workers' llama2.c tokenizer.bin; default byte-level (load_router_tokenizer)
  router::RouterOptions router;
  std::string backend;
  std::chrono::milliseconds drain_timeout{30000};
  // TLS 1.3, mutual, on every native socket: clients and worker links; null: plaintext.
  std::shared_ptr<const transport::TlsCredentials> tls;
  // --auth-token-file: proved by its clients and to its workers (the same
  // secret sits in router.worker_link.connection); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

int run_router(const RouterCommand& command, std::ostream& out);

}  // namespace fmwire::cli
