// The results rows, medians and --json writer of every bench: perf/results.h,
// shared with `fmwire perf`, under the bench's namespace.
#pragma once

#include "perf/results.h"

namespace fmwire::bench {

using perf::Comparison;
using perf::compare;
using perf::median;
using perf::ratio_of;
using perf::ratio_text;
using perf::write_results_json;

}  // namespace fmwire::bench
