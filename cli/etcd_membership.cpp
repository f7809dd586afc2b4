#include "cli/etcd_membership.h"

namespace fmwire::cli {

codec::Result<std::unique_ptr<discovery::EtcdWatcher>, std::string> watch_etcd_endpoints(
    const discovery::EtcdUrl& url, const std::string& prefix, const std::string& what,
    std::function<void(std::vector<transport::Endpoint>)> changed, RoleShutdown& log) {
  return discovery::EtcdWatcher::start(
      url, prefix,
      [&log, what, changed = std::move(changed)](const std::vector<std::string>& addresses) {
        std::vector<transport::Endpoint> found;
        for (const std::string& address : addresses) {
          std::string problem;
          if (auto parsed = transport::parse_endpoint(address, &problem)) {
            found.push_back(*parsed);
          } else {
            log.log("etcd: " + what + " '" + address + "' skipped: " + problem);
          }
        }
        log.log("etcd lists " + std::to_string(found.size()) + " " + what + "(s)");
        changed(std::move(found));
      },
      [&log](const std::string& message) { log.log("etcd: " + message); });
}

}  // namespace fmwire::cli
