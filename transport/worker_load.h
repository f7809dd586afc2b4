// The SDK's name for one worker's load as Client::watch_load hands it
// over: protocol::WorkerLoad (protocol/worker_load.h), the one struct every
// layer uses for it (the worker's report, the router's view, the SDK).
#pragma once

#include "protocol/worker_load.h"

namespace fmwire {

using protocol::WorkerLoad;

}  // namespace fmwire
