// Worker discovery through etcd v3 (DESIGN.md, "Router policies": static
// list or etcd): a worker registers its address under a key prefix with a
// lease it keeps alive; a router watches the prefix, adding workers as they
// appear and dropping them when their key goes (deleted, or its lease ended
// because the worker died). Spoken through etcd's v3 JSON gateway over
// HTTP/1.1 with Boost.Beast: no gRPC stack in the router for a handful of
// calls a second. https endpoints speak TLS 1.2 or 1.3 through Asio's
// OpenSSL streams, checking etcd's certificate against a CA and presenting a
// client certificate (etcd's --client-cert-auth).
//
// Each object runs its own thread (discovery is off the per-frame path);
// callbacks come on that thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec_error.h"

namespace boost::asio::ssl {
class context;
}

namespace fmwire::discovery {

// The files of an https etcd endpoint, as etcdctl names them (--cacert,
// --cert, --key; fmwire's flags are --etcd-cacert, --etcd-cert, --etcd-key):
// PEM each. No CA: the system's trust store. Cert and key: both or neither.
struct EtcdTlsFiles {
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  bool empty() const { return ca_file.empty() && cert_file.empty() && key_file.empty(); }
};

// "http://127.0.0.1:2379", "http://[::1]:2379", "http://etcd-0:2379", or
// https:// with `tls` set. A name is looked up again on every call, off any
// loop.
struct EtcdUrl {
  std::string host;
  std::uint16_t port = 2379;
  // https: TLS 1.2+ with etcd's certificate checked against the CA and the
  // URL's host; null for http.
  std::shared_ptr<boost::asio::ssl::context> tls;
};
// Errors name the URL or the file: a scheme other than http or https, TLS
// files for an http URL, a file that cannot be read or a key that is not
// the certificate's.
codec::Result<EtcdUrl, std::string> parse_etcd_url(const std::string& url, const EtcdTlsFiles& tls = {});

// A worker's key: `prefix` + its address, value the address, under a lease
// of `ttl` renewed every ttl/3. Destroying it revokes the lease, so the key
// goes at once; a killed worker's key goes when the lease runs out.
class EtcdRegistration {
 public:
  static codec::Result<std::unique_ptr<EtcdRegistration>, std::string> start(const EtcdUrl& url, std::string prefix,
                                                                             std::string address,
                                                                             std::chrono::seconds ttl);
  virtual ~EtcdRegistration() = default;
};

// Calls `changed` with the full current set of worker addresses under
// `prefix` once at start, and again after every change. `on_error` hears of
// a lost etcd connection (the watcher retries; the last known set stays).
class EtcdWatcher {
 public:
  using Changed = std::function<void(const std::vector<std::string>& addresses)>;
  using Error = std::function<void(const std::string& message)>;
  static codec::Result<std::unique_ptr<EtcdWatcher>, std::string> start(const EtcdUrl& url, std::string prefix,
                                                                        Changed changed, Error on_error = {});
  virtual ~EtcdWatcher() = default;
};

}  // namespace fmwire::discovery
