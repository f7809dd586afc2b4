// Worker discovery through etcd v3 (DESIGN.md, "Router policies": static
// list or etcd): a worker registers its address under a key prefix with a
// lease it keeps alive; a router watches the prefix, adding workers as they
// appear and dropping them when their key goes (deleted, or its lease ended
// because the worker died). Spoken through etcd's v3 JSON gateway over
// HTTP/1.1 with Boost.Beast: no gRPC stack in the router for a handful of
// calls a second.
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

namespace fmwire::discovery {

// "http://127.0.0.1:2379", "http://[::1]:2379", "http://etcd-0:2379" (no
// TLS). A name is looked up again on every call, off any loop.
struct EtcdUrl {
  std::string host;
  std::uint16_t port = 2379;
};
codec::Result<EtcdUrl, std::string> parse_etcd_url(const std::string& url);

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
