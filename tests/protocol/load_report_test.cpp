// LoadReport's home (protocol/load_report.h): a WorkerLoad written and read
// back whole, and a report passed on under another name.
#include <doctest/doctest.h>

#include <capnp/message.h>

#include <vector>

#include "protocol/load_report.h"

namespace fmwire::protocol {
namespace {

WorkerLoad busy_worker() {
  WorkerLoad load;
  load.name = "w1";
  load.queue_depth = 1;
  load.running = 2;
  load.paused = 3;
  load.free_kv_blocks = 4;
  load.total_kv_blocks = 5;
  load.cached_kv_blocks = 6;
  load.recent_step_time_us = 7;
  load.draining = true;
  load.prompt_tokens = 8;
  load.cached_prompt_tokens = 9;
  load.generated_tokens = 10;
  load.max_running = 14;
  return load;
}

TEST_CASE("a WorkerLoad written to a LoadReport reads back whole, with the prefix events apart") {
  capnp::MallocMessageBuilder message;
  const std::vector<std::uint64_t> added{11, 12};
  const std::vector<std::uint64_t> evicted{13};
  LoadReportBuilder(message.initRoot<LoadReport>()).load(busy_worker()).prefixes(added, evicted);
  const LoadReportReader report = message.getRoot<LoadReport>().asReader();
  const WorkerLoad load = report.load();
  const WorkerLoad expected = busy_worker();
  CHECK(load.name == expected.name);
  CHECK(load.queue_depth == expected.queue_depth);
  CHECK(load.running == expected.running);
  CHECK(load.paused == expected.paused);
  CHECK(load.free_kv_blocks == expected.free_kv_blocks);
  CHECK(load.total_kv_blocks == expected.total_kv_blocks);
  CHECK(load.cached_kv_blocks == expected.cached_kv_blocks);
  CHECK(load.recent_step_time_us == expected.recent_step_time_us);
  CHECK(load.draining == expected.draining);
  CHECK(load.prompt_tokens == expected.prompt_tokens);
  CHECK(load.cached_prompt_tokens == expected.cached_prompt_tokens);
  CHECK(load.generated_tokens == expected.generated_tokens);
  CHECK(load.max_running == expected.max_running);
  REQUIRE(report.prefixes_added().size() == 2);
  CHECK(report.prefixes_added()[1] == 12);
  REQUIRE(report.prefixes_evicted().size() == 1);
  CHECK(report.prefixes_evicted()[0] == 13);
}

TEST_CASE("a LoadReport passed on names the worker and its health as the one passing it on sees them") {
  capnp::MallocMessageBuilder message;
  LoadReportBuilder(message.initRoot<LoadReport>()).load(busy_worker(), "127.0.0.1:7101", false);
  const WorkerLoad load = LoadReportReader(message.getRoot<LoadReport>().asReader()).load();
  CHECK(load.name == "127.0.0.1:7101");
  CHECK_FALSE(load.draining);
  CHECK(load.running == 2);
}

}  // namespace
}  // namespace fmwire::protocol
