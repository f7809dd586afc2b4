// examples/watch_load: a worker's (or, through a router, every worker's)
// load as it reports it: queue, batch, KV blocks, step time. A client that
// watches stays connected by itself and subscribes again after a loss.
//
// Run: fmwire worker --listen 127.0.0.1:7000 &
//      watch_load 127.0.0.1:7000
#include <chrono>
#include <cstdio>
#include <future>
#include <string>

#include "transport/client.h"

using namespace std::chrono_literals;

int main(int argc, char** argv) {
  std::string error;
  auto endpoint = argc > 1 ? fmwire::transport::parse_endpoint(argv[1], &error) : std::nullopt;
  if (!endpoint) {
    std::fprintf(stderr, "usage: watch_load HOST:PORT (%s)\n", error.c_str());
    return 2;
  }
  // Declared before the client, so that they outlive its loop thread's callbacks.
  std::promise<void> enough;
  int reports = 0;
  auto client = fmwire::Client::connect(*endpoint);
  if (!client) {
    std::fprintf(stderr, "watch_load: %s\n", client.error().message.c_str());
    return 1;
  }

  // Reports come on the client's loop thread, one per the worker's interval
  // (100 ms by default); here the first three are printed.
  (*client)->watch_load([&](const fmwire::WorkerLoad& load) {
    std::printf("%s: %u waiting, %u running, %u of %u KV blocks free, step %u us, %llu tokens made\n",
                load.name.c_str(), load.queue_depth, load.running, load.free_kv_blocks, load.total_kv_blocks,
                load.recent_step_time_us, static_cast<unsigned long long>(load.generated_tokens));
    if (++reports == 3) enough.set_value();  // once: later reports count on past 3
  });
  // Some work for the reports to show.
  fmwire::GenerateParams params;
  params.prompt = "Load me";
  params.max_tokens = 8;
  auto completion = (*client)->complete(params);
  const bool reported = enough.get_future().wait_for(10s) == std::future_status::ready;
  (*client)->watch_load({});  // an empty function ends the watch
  return completion && reported ? 0 : 1;
}
