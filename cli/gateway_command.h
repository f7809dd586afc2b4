// `fmwire gateway`: the OpenAI-compatible HTTP front (gateway/http_gateway.h)
// in a process of its own. Requests go on to routers (--router, a list, or
// --etcd, where routers register), failing over between them, or to a
// router embedded in this process that routes to a list of workers
// (--workers). Prints its URL, and drains on SIGINT/SIGTERM: the HTTP side
// first (open streams finish), then the embedded router.
#pragma once

#include <chrono>
#include <iosfwd>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "discovery/etcd_discovery.h"
#include "gateway/rate_limiter.h"
#include "router/router_service.h"
#include "transport/tls_credentials.h"

namespace fmwire::cli {

struct GatewayCommand {
  std::string listen = "127.0.0.1:8000";  // port 0: any free port (printed)
  std::vector<std::string> routers;       // HOST:PORT of each router, or
  std::string etcd;                       // etcd's URL, where routers register, or
  std::string etcd_router_prefix = "/fmwire/routers/";
  discovery::EtcdTlsFiles etcd_tls;       // https etcd: --etcd-cacert, --etcd-cert, --etcd-key
  std::vector<std::string> workers;       // HOST:PORT of each worker, for an embedded router
  std::string api_keys_file;              // one key per line
  std::vector<std::string> api_keys;      // besides the file's
  gateway::RateLimits rate_limits;        // per key (per address without keys); none by default
  std::string tls_cert;                   // HTTPS: certificate chain (PEM), and
  std::string tls_key;                    // its key (PEM); both or neither
  std::string model = "builtin";          // what /v1/models lists
  router::RouterOptions router_options;  // the embedded router's
  std::string tokenizer;                  // the workers' tokenizer.bin, for it; default byte-level
  std::string backend;                    // I/O backend: "", "uring" or "asio"
  unsigned http_threads = 0;              // 0: the gateway's default
  std::chrono::milliseconds upstream_keepalive{1000};   // Ping a silent router after this long
  std::chrono::milliseconds upstream_dead_after{3000};  // a router silent this long is lost
  // Native TLS 1.3, mutual (--native-tls-*): to the routers, and the embedded
  // router's own sockets; null: plaintext.
  std::shared_ptr<const transport::TlsCredentials> native_tls;
  std::chrono::milliseconds drain_timeout{30000};
  // --auth-token-file: proved to its routers (or, with --workers, by the
  // embedded router to the workers); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Returns 0 after a clean drain, 1 when it had to cut streams off, 2 for bad
// options (a port that cannot be listened on included).
int run_gateway(const GatewayCommand& command, std::ostream& out);

// The keys in an API keys file: one per line, surrounding blanks trimmed,
// blank lines and lines starting with # skipped. Errors: the file cannot be
// read, or holds no key.
codec::Result<std::vector<std::string>, std::string> read_api_keys(const std::string& path);

}  // namespace fmwire::cli
