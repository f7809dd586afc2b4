// What the router knows of one worker when it picks where a request goes:
// its health, its latest LoadReport (its role among them), what this router
// has in flight there, measured relay time, and the prefix hashes it says
// it holds.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>

#include "protocol/load_report.h"

namespace fmwire::router {

struct WorkerView {
  std::string name;                 // its endpoint, HOST:PORT
  bool healthy = false;             // connected, not draining, answering keepalives, not refused
  std::string refused;              // why it was refused at registration (its tokenizer); empty: it was not
  bool has_load = false;            // a LoadReport has arrived
  protocol::WorkerLoad load;        // from its latest LoadReport (load.name: the name it gives itself)
  std::uint32_t in_flight = 0;      // streams this router has open there now
  std::uint64_t streams_opened = 0; // streams this router has opened there, all told
  std::uint64_t relay_us = 0;       // measured router<->worker overhead per request; 0: not yet
  // Prefix hashes of full KV blocks it holds (its added/evicted events);
  // empty and publishes_prefixes false when it sends none.
  const std::unordered_set<std::uint64_t>* prefixes = nullptr;
  bool publishes_prefixes = false;
  // The tokenizer whose ids it reads, said in its Hello; 0: none said, or
  // not connected. A request whose ids the router made goes only where
  // this is the router's own.
  std::uint64_t tokenizer_fingerprint = 0;

  // What it serves in disaggregated serving, from its latest report; a
  // worker that has not reported (or an fmwire before protocol 1.2, whose
  // reports say nothing) counts as BOTH.
  protocol::WorkerRole role() const { return has_load ? load.role : protocol::WorkerRole::BOTH; }
};

}  // namespace fmwire::router
