// The physical limit for bulk bytes on this machine: iperf3, one TCP stream
// over 127.0.0.1, run as a child process in the same run as fmwire. The
// server is started one-off (-s -1, bound to 127.0.0.1) on a free port, is
// killed if still there when the run ends, and dies with the bench
// (PR_SET_PDEATHSIG) should the bench itself be killed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "transport_measure.h"

namespace fmwire::bench {

// The absolute path of an executable found on PATH, or nullopt.
std::optional<std::string> find_on_path(std::string_view name);

// "iperf 3.12" or the like, from `iperf3 --version`; empty when unknown.
std::string iperf3_version(const std::string& iperf3_path);

// One iperf3 test sending `bytes` (-n) from client to server: the receiver
// side's bytes per second, and the CPU of both processes (their whole life,
// start-up included) per 1e9 bytes. Throws std::runtime_error when iperf3
// fails.
BulkRun iperf3_bulk(const std::string& iperf3_path, std::uint64_t bytes);

}  // namespace fmwire::bench
