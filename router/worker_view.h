// What the router knows of one worker when it picks where a request goes:
// its health, its latest LoadReport, what this router has in flight there,
// measured relay time, and the prefix hashes it says it holds.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>

namespace fmwire::router {

struct WorkerView {
  std::string name;                 // its endpoint, HOST:PORT
  bool healthy = false;             // connected, not draining, answering keepalives
  bool has_load = false;            // a LoadReport has arrived
  std::uint32_t queue_depth = 0;    // from its LoadReport
  std::uint32_t running = 0;
  std::uint32_t paused = 0;
  std::uint32_t free_blocks = 0;
  std::uint32_t total_blocks = 0;
  std::uint32_t cached_blocks = 0;
  std::uint32_t recent_step_us = 0;
  std::uint64_t prompt_tokens = 0;         // its counters since it started
  std::uint64_t cached_prompt_tokens = 0;  // of those, served from its prefix cache
  std::uint64_t generated_tokens = 0;
  std::uint32_t in_flight = 0;      // streams this router has open there now
  std::uint64_t relay_us = 0;       // measured router<->worker overhead per request; 0: not yet
  // Prefix hashes of full KV blocks it holds (its added/evicted events);
  // empty and publishes_prefixes false when it sends none.
  const std::unordered_set<std::uint64_t>* prefixes = nullptr;
  bool publishes_prefixes = false;
};

}  // namespace fmwire::router
