// The gateway's per-caller rate limits: token buckets on an injected clock
// (no sleeps), the --rate-limit syntax, and the cap on callers remembered.
#include <doctest/doctest.h>

#include <string>

#include "gateway/rate_limiter.h"

namespace fmwire::gateway {
namespace {

using namespace std::chrono_literals;
using Clock = RateLimiter::Clock;

const Clock::time_point kStart{};  // the injected clock's zero

TEST_CASE("token_bucket: starts full, empties, and refills at its rate up to its capacity") {
  TokenBucket bucket(2.0, 4.0, kStart);
  CHECK(bucket.seconds_until(4, kStart) == 0);
  bucket.take(4);
  CHECK(bucket.seconds_until(1, kStart) == doctest::Approx(0.5));
  CHECK(bucket.seconds_until(1, kStart + 500ms) == 0);
  CHECK(bucket.seconds_until(4, kStart + 10s) == 0);
  CHECK(bucket.seconds_until(4.5, kStart + 10s) == doctest::Approx(0.25));  // capped at 4: half a token short
}

TEST_CASE("token_bucket: a debt is paid back before anything can be taken") {
  TokenBucket bucket(1.0, 10.0, kStart);
  bucket.take(15);  // 5 owed
  CHECK(bucket.seconds_until(1, kStart) == doctest::Approx(6.0));
  bucket.give(3);
  CHECK(bucket.seconds_until(1, kStart) == doctest::Approx(3.0));
  bucket.give(100);
  CHECK(bucket.seconds_until(10, kStart) == 0);
  CHECK(bucket.seconds_until(10.5, kStart) == doctest::Approx(0.5));
}

TEST_CASE("rate_limits: RPS and RPS,TPM parse; bad ones are refused with the syntax") {
  auto rps = parse_rate_limits("5");
  REQUIRE(rps);
  CHECK(rps->requests_per_s == 5);
  CHECK(rps->tokens_per_minute == 0);
  auto both = parse_rate_limits("0.5,20000");
  REQUIRE(both);
  CHECK(both->requests_per_s == 0.5);
  CHECK(both->tokens_per_minute == 20000);
  auto tokens_only = parse_rate_limits("0,600");
  REQUIRE(tokens_only);
  CHECK(tokens_only->requests_per_s == 0);
  for (const char* bad : {"", "x", "5,", ",5", "-1", "5,-2", "5,20000,1", "inf", "nan", "1e999", "5 "}) {
    auto parsed = parse_rate_limits(bad);
    CHECK_MESSAGE(!parsed, bad);
    if (!parsed) CHECK(parsed.error().find("RPS[,TPM]") != std::string::npos);
  }
  auto nothing = parse_rate_limits("0,0");
  REQUIRE(!nothing);
  CHECK(nothing.error().find("limits nothing") != std::string::npos);
}

TEST_CASE("rate_limiter: past its requests per second a caller waits, with the wait rounded up to seconds") {
  RateLimiter limiter({2, 0}, 16);
  CHECK(!limiter.admit("key-a", 1, 0, kStart));
  CHECK(!limiter.admit("key-a", 1, 0, kStart));
  auto refused = limiter.admit("key-a", 1, 0, kStart);
  REQUIRE(refused);
  CHECK(refused->retry_after_s == 1);  // 0.5 s, rounded up
  CHECK(refused->limit == "requests");
  CHECK(refused->message.find("2 requests per second") != std::string::npos);
  CHECK(!limiter.admit("key-a", 1, 0, kStart + 500ms));
  CHECK(limiter.admit("key-a", 1, 0, kStart + 500ms));
}

TEST_CASE("rate_limiter: one caller's limit leaves another's untouched") {
  RateLimiter limiter({1, 0}, 16);
  CHECK(!limiter.admit("key-a", 1, 0, kStart));
  CHECK(limiter.admit("key-a", 1, 0, kStart));
  CHECK(!limiter.admit("key-b", 1, 0, kStart));
}

TEST_CASE("rate_limiter: a slow rate's Retry-After is the whole wait, in seconds rounded up") {
  RateLimiter limiter({0.25, 0}, 16);  // one request per 4 s
  CHECK(!limiter.admit("key-a", 1, 0, kStart));
  auto refused = limiter.admit("key-a", 1, 0, kStart + 100ms);
  REQUIRE(refused);
  CHECK(refused->retry_after_s == 4);  // 3.9 s
}

TEST_CASE("rate_limiter: max_tokens is charged on admission and the unused part given back at the end") {
  RateLimiter limiter({0, 600}, 16);  // 10 tokens a second, 600 at most
  CHECK(!limiter.admit("key-a", 0, 500, kStart));
  auto refused = limiter.admit("key-a", 0, 200, kStart);  // 100 left: 10 s short
  REQUIRE(refused);
  CHECK(refused->limit == "tokens");
  CHECK(refused->retry_after_s == 10);
  TokenCharge charge(limiter, "key-a", 500);
  charge.settle_finished(20, 80);  // 100 used: 400 back
  CHECK(!limiter.admit("key-a", 0, 500, kStart));
}

TEST_CASE("rate_limiter: a generation that fails is charged the tokens it received, once") {
  RateLimiter limiter({0, 600}, 16);
  CHECK(!limiter.admit("key-a", 0, 600, kStart));
  TokenCharge charge(limiter, "key-a", 600);
  charge.count(50);
  charge.count(50);
  charge.settle_failed();   // 100 used: 500 back
  charge.settle_failed();   // a second settle changes nothing
  CHECK(!limiter.admit("key-a", 0, 500, kStart));
  CHECK(limiter.admit("key-a", 0, 1, kStart));
}

TEST_CASE("rate_limiter: a long prompt is owed beyond max_tokens, and paid back over time") {
  RateLimiter limiter({0, 60}, 16);  // one token a second
  CHECK(!limiter.admit("key-a", 0, 10, kStart));
  TokenCharge(limiter, "key-a", 10).settle_finished(55, 10);  // 65 used: 5 owed
  auto refused = limiter.admit("key-a", 0, 1, kStart);
  REQUIRE(refused);
  CHECK(refused->retry_after_s == 6);
  CHECK(!limiter.admit("key-a", 0, 1, kStart + 6s));
}

TEST_CASE("rate_limiter: more max_tokens than a minute's limit is refused without a Retry-After") {
  RateLimiter limiter({0, 100}, 16);
  auto refused = limiter.admit("key-a", 1, 101, kStart);
  REQUIRE(refused);
  CHECK(refused->retry_after_s == 0);
  CHECK(refused->message.find("max_tokens 101 is over the limit of 100 tokens per minute") != std::string::npos);
}

TEST_CASE("rate_limiter: a refusal takes nothing from either bucket") {
  RateLimiter limiter({1, 60}, 16);
  CHECK(!limiter.admit("key-a", 1, 60, kStart));
  CHECK(limiter.admit("key-a", 1, 2, kStart + 1s));   // a request there, one of the two tokens
  CHECK(!limiter.admit("key-a", 1, 1, kStart + 1s));  // the refusal took neither
}

TEST_CASE("rate_limiter: callers are capped, the least recently seen forgotten first") {
  RateLimiter limiter({1, 0}, 3);
  for (const char* caller : {"10.0.0.1", "10.0.0.2", "10.0.0.3"}) CHECK(!limiter.admit(caller, 1, 0, kStart));
  CHECK(limiter.admit("10.0.0.1", 1, 0, kStart));  // seen again: the most recent now
  for (int i = 0; i < 1000; ++i) limiter.admit("192.168.0." + std::to_string(i), 1, 0, kStart);
  CHECK(limiter.callers() == 3);
  // 10.0.0.1 was forgotten with the rest: a fresh, full bucket.
  CHECK(!limiter.admit("10.0.0.1", 1, 0, kStart));
  // A charge settled for a forgotten caller changes nothing and creates nothing.
  limiter.settle("10.0.0.9", 100, 0);
  CHECK(limiter.callers() == 3);
}

}  // namespace
}  // namespace fmwire::gateway
