// LoadReport's one home (protocol/fmwire.capnp), and WorkerLoad, the one
// struct for a worker's load in every layer: what a worker reports (filled
// from its engine's stats in one place, worker/worker_service.cpp), what a
// router keeps of each worker (WorkerView::load) and passes on to its own
// subscribers, and what the SDK hands over (Client::watch_load). Prefix-hash
// events travel in the same message but are not load: a router applies
// them to its own set, and they are read and written apart.
//
// Subscribing is opening a stream with a LoadReport frame whose body is
// ignored (build it empty); reports then come on that stream.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "protocol/fmwire.capnp.h"
#include "protocol/worker_load.h"

namespace fmwire::protocol {

class LoadReportReader {
 public:
  LoadReportReader(LoadReport::Reader body) : body_(body) {}

  WorkerLoad load() const;
  // Hashes of full KV blocks that entered and left the worker's prefix
  // cache since its previous report (a subscriber's first report: all it holds).
  capnp::List<std::uint64_t>::Reader prefixes_added() const { return body_.getPrefixesAdded(); }
  capnp::List<std::uint64_t>::Reader prefixes_evicted() const { return body_.getPrefixesEvicted(); }

 private:
  LoadReport::Reader body_;
};

class LoadReportBuilder {
 public:
  LoadReportBuilder(LoadReport::Builder body) : body_(body) {}

  // Every field of `load`.
  LoadReportBuilder& load(const WorkerLoad& load) { return this->load(load, load.name, load.draining); }
  // Every field of `load` but its name and draining flag, given instead: a
  // report passed on (a router names the worker by its endpoint, and says
  // draining while the worker is not healthy there).
  LoadReportBuilder& load(const WorkerLoad& load, std::string_view name, bool draining);
  LoadReportBuilder& prefixes(std::span<const std::uint64_t> added, std::span<const std::uint64_t> evicted);

 private:
  LoadReport::Builder body_;
};

}  // namespace fmwire::protocol
