// Runs an EventLoop until a condition holds (perf/run_until.h, shared with
// `fmwire perf`), under the bench's namespace.
#pragma once

#include "perf/run_until.h"
#include "transport_measure.h"

namespace fmwire::bench {

using perf::run_until;

}  // namespace fmwire::bench
