// WorkerCounters: what a worker has done, for tests and its shutdown log.
// Apart from worker_service.h so that the SDK's EngineServer
// (engine_server.h) can hand them over without the service's internals.
#pragma once

#include <cstdint>

namespace fmwire::worker {

// Kept on the loop thread.
struct WorkerCounters {
  std::uint64_t streams_started = 0;
  std::uint64_t streams_finished = 0;   // with a Finish frame
  std::uint64_t streams_cancelled = 0;  // by the peer or a lost connection
  std::uint64_t streams_refused = 0;    // bad requests
  std::uint64_t streams_overloaded = 0; // refused because max_waiting were waiting
  std::uint64_t tokens_sent = 0;
  std::uint64_t prompts_tokenized = 0;  // text prompts; a router that tokenizes sends ids
  std::uint64_t pauses = 0;             // sequences paused for lack of credit
};

}  // namespace fmwire::worker
