// One worker's load as the native SDK hands it over (Client::watch_load):
// the numbers of its LoadReport that say how busy it is, without the
// prefix-hash events a router keeps for itself (protocol/fmwire.capnp).
#pragma once

#include <cstdint>
#include <string>

namespace fmwire {

struct WorkerLoad {
  // The worker's name: its endpoint, HOST:PORT, when the report comes
  // through a router; the name the worker gives itself when it comes from
  // the worker (`fmwire worker` names itself by its address too).
  std::string name;
  std::uint32_t queue_depth = 0;          // sequences waiting to be admitted
  std::uint32_t running = 0;              // sequences in the batch
  std::uint32_t paused = 0;               // of those, waiting for their readers' credit
  std::uint32_t free_kv_blocks = 0;       // allocatable: free, or cached and held by no sequence
  std::uint32_t total_kv_blocks = 0;
  std::uint32_t cached_kv_blocks = 0;     // full blocks in the prefix cache
  std::uint32_t recent_step_time_us = 0;
  bool draining = false;                  // takes no new work (shutting down, or not healthy at the router)
};

}  // namespace fmwire
