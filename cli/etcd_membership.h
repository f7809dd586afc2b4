// Who is there, from etcd, for the roles that follow a set of peers there
// (a router its workers, a gateway its routers): an EtcdWatcher whose
// addresses arrive parsed as endpoints, with each peer that joins or leaves,
// each address that does not parse, and each etcd error logged.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "discovery/etcd_discovery.h"
#include "transport/endpoint.h"

namespace fmwire::cli {

// `changed` gets every endpoint under `prefix` once before this returns,
// then again after every change, on the watcher's thread. `what` names
// them in the log lines ("worker", "router"). Errors: etcd cannot be reached
// at start.
codec::Result<std::unique_ptr<discovery::EtcdWatcher>, std::string> watch_etcd_endpoints(
    const discovery::EtcdUrl& url, const std::string& prefix, const std::string& what,
    std::function<void(std::vector<transport::Endpoint>)> changed);

}  // namespace fmwire::cli
