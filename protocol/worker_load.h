// WorkerLoad, the one struct for a worker's load in every layer (see
// load_report.h, the LoadReport message's home, for who fills and reads it).
// Apart from the message's reader and builder so that the SDK's public
// headers (transport/worker_load.h) can name it without them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::protocol {

struct WorkerLoad {
  // The worker's name: the name it gives itself in its own reports
  // (`fmwire worker` names itself by its address); its endpoint, HOST:PORT,
  // in a router's reports.
  std::string name;
  std::uint32_t queue_depth = 0;          // sequences waiting to be admitted
  std::uint32_t running = 0;              // sequences in the batch, paused ones included
  std::uint32_t paused = 0;               // of those, waiting for their readers' credit
  std::uint32_t free_kv_blocks = 0;       // allocatable: free, or cached and held by no sequence
  std::uint32_t total_kv_blocks = 0;
  std::uint32_t cached_kv_blocks = 0;     // full blocks in the prefix cache
  std::uint32_t recent_step_time_us = 0;  // moving average of steps that ran the model
  bool draining = false;                  // takes no new work (shutting down, or not healthy at the router)
  // Counters since the worker started.
  std::uint64_t prompt_tokens = 0;        // admitted prompt tokens
  std::uint64_t cached_prompt_tokens = 0; // of those, served from the prefix cache
  std::uint64_t generated_tokens = 0;
  // Disaggregated serving (minor version 2).
  WorkerRole role = WorkerRole::BOTH;     // what it serves: prefill, decode, or both
  std::uint32_t kv_transfers_active = 0;  // KV sessions open now, either direction
  std::uint32_t kv_reserved_blocks = 0;   // blocks held for incoming transfers
  // Batch slots: sequences it admits at once, at most (its --max-running);
  // 0 when it does not say (an engine of its own, an older fmwire).
  std::uint32_t max_running = 0;
};

// "prefill", "decode" or "both": a role as logs, flags and metrics labels spell it.
std::string_view to_string(WorkerRole role);

}  // namespace fmwire::protocol
