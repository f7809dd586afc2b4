// A bench's child processes (perf/child_process.h, shared with `fmwire
// perf`), under the bench's namespace.
#pragma once

#include "perf/child_process.h"
#include "transport_measure.h"

namespace fmwire::bench {

using perf::ChildProcess;

}  // namespace fmwire::bench
