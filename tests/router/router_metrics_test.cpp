// A router's /metrics page over several loop threads
// (router/router_metrics.h): what merge_router_metrics makes of the loops'
// snapshots, and how the merged page renders.
#include "router/router_metrics.h"

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace fmwire::router {
namespace {

WorkerRow row(const std::string& name, bool healthy, std::uint32_t in_flight, std::uint64_t opened) {
  WorkerRow made;
  made.view.name = name;
  made.view.healthy = healthy;
  made.view.in_flight = in_flight;
  made.view.streams_opened = opened;
  made.healthy_loops = healthy ? 1 : 0;
  return made;
}

RouterMetrics loop_snapshot(std::uint64_t started, std::vector<WorkerRow> workers) {
  RouterMetrics loop;
  loop.name = "router";
  loop.policy = "least-loaded";
  loop.counters.streams_started = started;
  loop.counters.frames_relayed = started * 10;
  loop.open_streams = 1;
  loop.workers = std::move(workers);
  loop.loop_streams_started = {started};
  return loop;
}

// The line of `series` ("name{labels}") on the page, value included; empty when absent.
std::string line_of(const std::string& page, const std::string& series) {
  const std::size_t at = page.find("\n" + series + " ");
  if (at == std::string::npos) return {};
  return page.substr(at + 1, page.find('\n', at + 1) - at - 1);
}

TEST_CASE("merged loops sum their counters and keep each loop's stream count") {
  std::vector<RouterMetrics> loops{loop_snapshot(3, {}), loop_snapshot(5, {})};
  loops[0].counters.refusals[protocol::ErrorCode::NO_WORKER] = 1;
  loops[1].counters.refusals[protocol::ErrorCode::NO_WORKER] = 2;
  loops[1].counters.refusals[protocol::ErrorCode::OVERLOADED] = 4;
  const RouterMetrics merged = merge_router_metrics(loops);
  CHECK(merged.counters.streams_started == 8);
  CHECK(merged.counters.frames_relayed == 80);
  CHECK(merged.open_streams == 2);
  CHECK(merged.counters.refusals.at(protocol::ErrorCode::NO_WORKER) == 3);
  CHECK(merged.counters.refusals.at(protocol::ErrorCode::OVERLOADED) == 4);
  CHECK(merged.loop_streams_started == std::vector<std::uint64_t>{3, 5});
}

TEST_CASE("a worker seen by every loop is one row: streams summed, healthy on as many loops as it is") {
  WorkerRow reported = row("127.0.0.1:9001", true, 1, 4);
  reported.view.has_load = true;
  reported.view.load.running = 7;
  reported.view.relay_us = 30;
  WorkerRow unreported = row("127.0.0.1:9001", false, 2, 6);
  unreported.view.relay_us = 10;
  const std::vector<RouterMetrics> loops{loop_snapshot(1, {row("127.0.0.1:9001", true, 0, 0)}),
                                         loop_snapshot(1, {unreported, row("127.0.0.1:9002", true, 0, 1)}),
                                         loop_snapshot(1, {reported})};
  const RouterMetrics merged = merge_router_metrics(loops);
  REQUIRE(merged.workers.size() == 2);
  const WorkerRow& first = merged.workers[0];
  CHECK(first.view.name == "127.0.0.1:9001");
  CHECK(first.healthy_loops == 2);
  CHECK_FALSE(first.view.healthy);
  CHECK(first.view.in_flight == 3);
  CHECK(first.view.streams_opened == 10);
  CHECK(first.view.has_load);
  CHECK(first.view.load.running == 7);  // the worker's own report, from the loop that had one
  CHECK(first.view.relay_us == 20);     // the mean of the loops that measured it
  CHECK(merged.workers[1].view.name == "127.0.0.1:9002");  // known to one loop only: added after
  CHECK(merged.workers[1].healthy_loops == 1);
}

TEST_CASE("the merged page shows the loops and each worker's health as the share of loops") {
  const std::vector<RouterMetrics> loops{loop_snapshot(2, {row("127.0.0.1:9001", true, 0, 2)}),
                                         loop_snapshot(4, {row("127.0.0.1:9001", false, 0, 4)})};
  const std::string page = render_router_metrics(merge_router_metrics(loops));
  CHECK(line_of(page, "fmwire_router_loop_threads") == "fmwire_router_loop_threads 2");
  CHECK(line_of(page, "fmwire_router_loop_streams_started_total{loop=\"0\"}") ==
        "fmwire_router_loop_streams_started_total{loop=\"0\"} 2");
  CHECK(line_of(page, "fmwire_router_loop_streams_started_total{loop=\"1\"}") ==
        "fmwire_router_loop_streams_started_total{loop=\"1\"} 4");
  CHECK(line_of(page, "fmwire_router_worker_healthy{worker=\"127.0.0.1:9001\"}") ==
        "fmwire_router_worker_healthy{worker=\"127.0.0.1:9001\"} 0.5");
  CHECK(line_of(page, "fmwire_router_worker_streams_opened_total{worker=\"127.0.0.1:9001\"}") ==
        "fmwire_router_worker_streams_opened_total{worker=\"127.0.0.1:9001\"} 6");
}

TEST_CASE("one loop's page says healthy as 1 or 0") {
  const std::vector<RouterMetrics> one{loop_snapshot(1, {row("127.0.0.1:9001", true, 0, 1)})};
  const std::string page = render_router_metrics(merge_router_metrics(one));
  CHECK(line_of(page, "fmwire_router_worker_healthy{worker=\"127.0.0.1:9001\"}") ==
        "fmwire_router_worker_healthy{worker=\"127.0.0.1:9001\"} 1");
  CHECK(line_of(page, "fmwire_router_loop_threads") == "fmwire_router_loop_threads 1");
}

TEST_CASE("merging no snapshot is a programmer error") {
  CHECK_THROWS_AS(merge_router_metrics({}), std::invalid_argument);
}

}  // namespace
}  // namespace fmwire::router
