#include "cli/etcd_membership.h"

#include <algorithm>
#include <set>

#include "log/log.h"

namespace fmwire::cli {

codec::Result<std::unique_ptr<discovery::EtcdWatcher>, std::string> watch_etcd_endpoints(
    const discovery::EtcdUrl& url, const std::string& prefix, const std::string& what,
    std::function<void(std::vector<transport::Endpoint>)> changed) {
  // The addresses listed last time: each change logs who joined and who
  // left, not the whole list. Only the watcher's thread touches it.
  auto listed = std::make_shared<std::set<std::string>>();
  return discovery::EtcdWatcher::start(
      url, prefix,
      [what, listed, changed = std::move(changed)](const std::vector<std::string>& addresses) {
        std::vector<transport::Endpoint> found;
        std::set<std::string> now;
        for (const std::string& address : addresses) {
          std::string problem;
          if (auto parsed = transport::parse_endpoint(address, &problem)) {
            found.push_back(*parsed);
            now.insert(address);
          } else {
            log::warn("etcd: an address skipped", {{what, address}, {"why", problem}});
          }
        }
        for (const std::string& address : now) {
          if (!listed->contains(address)) log::info("etcd: " + what + " joined", {{what, address}});
        }
        for (const std::string& address : *listed) {
          if (!now.contains(address)) log::info("etcd: " + what + " left", {{what, address}});
        }
        log::info("etcd lists " + std::to_string(found.size()) + " " + what + "(s)", {{"count", found.size()}});
        *listed = std::move(now);
        changed(std::move(found));
      },
      [](const std::string& message) { log::warn("etcd: " + message); });
}

}  // namespace fmwire::cli
