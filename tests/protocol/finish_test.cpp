// Finish's home (protocol/finish.h): usage and trailing text as built, and
// timings that grow by one entry per hop on the way back, worker first.
#include <doctest/doctest.h>

#include <capnp/message.h>

#include "protocol/finish.h"

namespace fmwire::protocol {
namespace {

TEST_CASE("a Finish passed on by a hop keeps the timings below it and appends its own") {
  capnp::MallocMessageBuilder worker;
  FinishBuilder(worker.initRoot<Finish>())
      .reason(FinishReason::STOP_SEQUENCE)
      .trailing_text("\xef\xbf\xbd")
      .usage(5, 3, 2)
      .timings("worker w1", Role::WORKER)
      .queue_us(1)
      .prefill_us(2)
      .decode_us(3)
      .first_token_us(4)
      .total_us(5);
  const FinishReader from_worker = worker.getRoot<Finish>().asReader();

  capnp::MallocMessageBuilder router;
  FinishBuilder out(router.initRoot<Finish>());
  out.reason(from_worker.reason()).trailing_text(from_worker.trailing_text());
  out.usage(from_worker.prompt_tokens(), from_worker.completion_tokens(), from_worker.cached_prompt_tokens());
  out.timings(from_worker.timings(), "router r1", Role::ROUTER).total_us(9);
  const FinishReader finish = router.getRoot<Finish>().asReader();

  CHECK(finish.reason() == FinishReason::STOP_SEQUENCE);
  CHECK(finish.trailing_text() == "\xef\xbf\xbd");
  CHECK(finish.has_usage());
  CHECK(finish.prompt_tokens() == 5);
  CHECK(finish.completion_tokens() == 3);
  CHECK(finish.cached_prompt_tokens() == 2);
  REQUIRE(finish.timings().size() == 2);
  const HopTimingReader first = finish.timings()[0];
  const HopTimingReader second = finish.timings()[1];
  CHECK(first.hop() == "worker w1");
  CHECK(first.role() == Role::WORKER);
  CHECK(first.prefill_us() == 2);
  CHECK(first.total_us() == 5);
  CHECK(second.hop() == "router r1");
  CHECK(second.role() == Role::ROUTER);
  CHECK(second.total_us() == 9);
}

TEST_CASE("a Finish without usage or trailing text says so") {
  capnp::MallocMessageBuilder message;
  FinishBuilder(message.initRoot<Finish>()).reason(FinishReason::MAX_TOKENS).trailing_text("");
  const FinishReader finish = message.getRoot<Finish>().asReader();
  CHECK_FALSE(finish.has_usage());
  CHECK(finish.trailing_text().empty());
  CHECK(finish.timings().size() == 0);
}

}  // namespace
}  // namespace fmwire::protocol
