// The floor for opening connections on this machine: plain blocking sockets
// on 127.0.0.1 in the same process, in the same waves as fmwire's
// connection-rate test, with one small exchange standing in for the Hello.
#pragma once

#include <vector>

#include "transport_measure.h"

namespace fmwire::bench {

// `total` connections, `concurrency` at a time: the client connects a wave,
// sends 16 bytes on each and reads 16 back, then closes them; a server
// thread accepts, reads, answers and closes, one connection after another.
// A warm-up wave, then `repetitions` measured rounds. Throws
// std::runtime_error when a socket call fails.
std::vector<ConnectRun> raw_tcp_connect_rate(int total, int concurrency, int repetitions);

}  // namespace fmwire::bench
