// --advertise HOST:PORT for the roles that register in etcd (worker,
// router): the address peers on other hosts reach this process by, which
// its listen address is not when it listens on 0.0.0.0 or [::] (every
// interface, no one address) or behind a NAT.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "transport/endpoint.h"

namespace fmwire::cli {

// Checks --advertise before anything starts: nullopt when fine, else the
// problem, for an exit with status 2. Registering in etcd while listening on
// every interface without --advertise is one: the 0.0.0.0 or [::] it would
// register reaches no one.
std::optional<std::string> check_advertise(std::string_view role, const transport::Endpoint& listen,
                                           const std::string& advertise, bool registering);

// What to register: --advertise, its port 0 meaning the port listened on;
// without it, the listen host with that port.
std::string advertised_address(const transport::Endpoint& listen, std::uint16_t port, const std::string& advertise);

}  // namespace fmwire::cli
