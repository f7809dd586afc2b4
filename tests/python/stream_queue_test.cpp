// python/stream_queue: the hand-over between the client's loop thread and a
// Python reader, without Python: chunks keep their order and bounds, and no
// wake-up is lost, for a waiting thread or for an asyncio loop's eventfd.
#include <doctest/doctest.h>
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "python/stream_queue.h"

using namespace fmwire;
using namespace fmwire::python;

namespace {

TokenChunk chunk_of(std::uint32_t first_index, const std::vector<std::uint32_t>& ids,
                    const std::vector<std::string_view>& pieces, std::uint64_t wire_bytes) {
  return TokenChunk{first_index, ids, pieces, wire_bytes};
}

}  // namespace

TEST_CASE("chunks handed over in one turn are taken in order with their bounds") {
  StreamQueue queue(1, nullptr);
  const std::vector<std::uint32_t> first_ids{10, 11};
  const std::vector<std::string_view> first_pieces{"a", "bc"};
  const std::vector<std::uint32_t> second_ids{12};
  const std::vector<std::string_view> second_pieces{"d"};
  CHECK(queue.gather(chunk_of(0, first_ids, first_pieces, 30)));
  CHECK_FALSE(queue.gather(chunk_of(2, second_ids, second_pieces, 20)));  // listed once per turn
  CHECK_FALSE(queue.hand_over());  // no notifier to ring

  ChunkBatch taken;
  std::optional<StreamEnd> end;
  REQUIRE(queue.take(taken, end, StreamQueue::kNoWait));
  CHECK(taken.text == "abcd");
  CHECK(taken.token_ids == std::vector<std::uint32_t>{10, 11, 12});
  REQUIRE(taken.entries.size() == 2);
  CHECK(taken.entries[0].ids_end == 2);
  CHECK(taken.entries[0].text_end == 3);
  CHECK(taken.entries[1].first_index == 2);
  CHECK(taken.wire_bytes == 50);
  CHECK_FALSE(end.has_value());
  taken.clear();
  CHECK_FALSE(queue.take(taken, end, StreamQueue::kNoWait));
}

TEST_CASE("turns the reader has not taken yet are appended after the earlier ones") {
  StreamQueue queue(1, nullptr);
  const std::vector<std::uint32_t> ids{1};
  const std::vector<std::string_view> x{"x"}, y{"y"};
  queue.gather(chunk_of(0, ids, x, 10));
  queue.hand_over();
  queue.gather(chunk_of(1, ids, y, 10));
  queue.gather(StreamEnd{Completion{}, std::nullopt});
  queue.hand_over();
  ChunkBatch taken;
  std::optional<StreamEnd> end;
  REQUIRE(queue.take(taken, end, StreamQueue::kNoWait));
  CHECK(taken.text == "xy");
  REQUIRE(taken.entries.size() == 2);
  CHECK(taken.entries[1].ids_end == 2);
  CHECK(taken.entries[1].text_end == 2);
  CHECK(end.has_value());
}

TEST_CASE("an armed stream rings its notifier once per turn, and no ring is lost") {
  // The loop thread hands over turn after turn while the reader takes and
  // re-arms, as an asyncio loop does; every chunk must reach the reader
  // through eventfd wake-ups alone (a lost one leaves it waiting forever).
  auto notifier = std::make_shared<Notifier>();
  constexpr int kStreams = 8;
  constexpr int kTurns = 20000;
  std::vector<std::shared_ptr<StreamQueue>> queues;
  for (int i = 0; i < kStreams; ++i) queues.push_back(std::make_shared<StreamQueue>(i, notifier));

  std::atomic<int> produced_turns{0};
  std::thread loop([&] {
    const std::vector<std::uint32_t> ids{7};
    const std::vector<std::string_view> pieces{"t"};
    for (int turn = 0; turn < kTurns; ++turn) {
      for (auto& queue : queues) queue->gather(chunk_of(static_cast<std::uint32_t>(turn), ids, pieces, 1));
      bool ring = false;
      for (auto& queue : queues) ring = queue->hand_over() || ring;
      if (ring) notifier->ring();
      produced_turns.store(turn + 1);
    }
  });

  std::vector<std::size_t> received(kStreams, 0);
  std::vector<bool> armed(kStreams, false);
  std::size_t total = 0;
  bool stalled = false;
  ChunkBatch taken;
  std::optional<StreamEnd> end;
  while (total < std::size_t{kStreams} * kTurns && !stalled) {
    for (int i = 0; i < kStreams; ++i) {
      if (armed[i]) continue;
      taken.clear();
      if (queues[i]->take(taken, end, StreamQueue::kArm)) {
        received[i] += taken.token_ids.size();
        total += taken.token_ids.size();
      } else {
        armed[i] = true;
      }
    }
    if (total == std::size_t{kStreams} * kTurns) break;
    if (std::find(armed.begin(), armed.end(), false) != armed.end()) continue;  // one has more to take
    pollfd wait{notifier->fd(), POLLIN, 0};
    if (::poll(&wait, 1, 2000) == 0) {
      stalled = true;  // two seconds with no ring while streams are armed and chunks keep coming
      break;
    }
    for (std::uint64_t id : notifier->take_ready()) armed[id] = false;
  }
  loop.join();
  CHECK_FALSE(stalled);
  CHECK(total == std::size_t{kStreams} * kTurns);
}

TEST_CASE("a reader thread that waits is woken by the hand-over") {
  StreamQueue queue(1, nullptr);
  std::thread loop([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    queue.gather(StreamEnd{std::nullopt, ClientError{}});
    queue.hand_over();
  });
  ChunkBatch taken;
  std::optional<StreamEnd> end;
  const bool took = queue.take(taken, end, std::chrono::seconds(10));
  loop.join();
  CHECK(took);
  REQUIRE(end.has_value());
  CHECK(end->error.has_value());
}
