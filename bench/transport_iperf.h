// iperf3 as the bulk peer (perf/iperf3.h, shared with `fmwire perf`), under
// the bench's namespace.
#pragma once

#include "child_process.h"
#include "perf/iperf3.h"

namespace fmwire::bench {

using perf::find_on_path;
using perf::iperf3_bulk;
using perf::iperf3_version;
using perf::IperfLink;

}  // namespace fmwire::bench
