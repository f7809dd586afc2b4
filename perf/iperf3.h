// The physical limit for bulk bytes: iperf3, one TCP stream over 127.0.0.1
// (bench_transport), a veth link between two network namespaces (bench_kv),
// or between two hosts (`fmwire perf run --compare`, against the iperf3
// server `fmwire perf serve --iperf3-port` runs), as child processes in the
// same run as fmwire.
// The server is started one-off (-s -1, bound to the link's address), is
// killed if still there when the run ends, and dies with the bench
// (PR_SET_PDEATHSIG) should the bench itself be killed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "perf/child_process.h"
#include "perf/measure.h"

namespace fmwire::perf {

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

// One iperf3 client sending `bytes` to a server already listening at
// server_address:port (a refused connect is tried again for 2 s, while the
// server starts): the receiver side's bytes per second, and the client
// process's CPU. Throws std::runtime_error when iperf3 fails.
struct IperfClientRun {
  double bytes_per_s = 0;
  CpuTimes cpu;
};
IperfClientRun iperf3_client(const std::string& iperf3_path, std::uint64_t bytes, const std::string& server_address,
                             std::uint16_t port, const std::vector<std::string>& prefix = {});

}  // namespace fmwire::perf
