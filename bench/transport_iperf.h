// The physical limit for bulk bytes on this machine: iperf3, one TCP stream
// over 127.0.0.1 (bench_transport) or a veth link between two network
// namespaces (bench_kv), run as child processes in the same run as fmwire.
// The server is started one-off (-s -1, bound to the link's address), is
// killed if still there when the run ends, and dies with the bench
// (PR_SET_PDEATHSIG) should the bench itself be killed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "child_process.h"
#include "transport_measure.h"

namespace fmwire::bench {

// The absolute path of an executable found on PATH, or nullopt.
std::optional<std::string> find_on_path(std::string_view name);

// "iperf 3.12" or the like, from `iperf3 --version`; empty when unknown.
std::string iperf3_version(const std::string& iperf3_path);

// Where iperf3's two processes run and meet: by default both here, on
// 127.0.0.1 at a free port. A prefix runs a process through another
// program first (bench_kv: {"/usr/sbin/ip", "netns", "exec", NAME}, which
// execs iperf3 in place, so its CPU is still iperf3's).
struct IperfLink {
  std::vector<std::string> server_prefix;
  std::vector<std::string> client_prefix;
  std::string server_address = "127.0.0.1";
  std::uint16_t port = 0;  // 0: a free port on 127.0.0.1
};

// One iperf3 test sending `bytes` (-n) from client to server: the receiver
// side's bytes per second, and the CPU of both processes (their whole life,
// start-up included) per 1e9 bytes. Throws std::runtime_error when iperf3
// fails.
BulkRun iperf3_bulk(const std::string& iperf3_path, std::uint64_t bytes, const IperfLink& link = {});

}  // namespace fmwire::bench
