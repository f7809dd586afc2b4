// Per-caller rate limits of the gateway (`--rate-limit RPS[,TPM]`): requests
// per second and tokens per minute, a token bucket each per caller. A
// caller is an API key (by its hash) when the gateway has keys, else a
// client address. Keys are bounded by configuration (an unknown key is
// refused before it reaches here); addresses are not, so the buckets are
// capped and the least recently used one goes first. A bucket untouched for
// a while is full again, the same as a new one; an address evicted while
// its bucket was low gets a full one back, the price of the bound.
//
// Tokens: a generation is charged its max_tokens on admission, and settled
// at its end against what it used (prompt and completion tokens, as the
// Finish reports them; the completion tokens counted so far when it ends in
// an error or a cancel), the difference given back or, for a long prompt,
// owed. Charging on admission bounds what a caller can have in flight at
// once, which charging as tokens come could not: a burst of long streams
// would all be admitted while the bucket still looked full.
//
// Thread-safe (one lock, taken once per request and once per stream end,
// never per token); time is passed in, so that tests need no sleeps.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "codec/codec_error.h"

namespace fmwire::gateway {

struct RateLimits {
  double requests_per_s = 0;     // 0: no limit
  double tokens_per_minute = 0;  // 0: no limit
  bool any() const { return requests_per_s > 0 || tokens_per_minute > 0; }
};

// "RPS" or "RPS,TPM": requests per second, then tokens per minute, each a
// number >= 0 (0: no limit on that one), e.g. "5", "5,20000", "0,20000".
codec::Result<RateLimits, std::string> parse_rate_limits(std::string_view text);

// `per_second` added continuously up to `capacity`; starts full. Taking may
// leave it below zero (a debt paid back over time).
class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;

  TokenBucket(double per_second, double capacity, Clock::time_point now);

  // Seconds until `amount` is there; 0 when it is there now.
  double seconds_until(double amount, Clock::time_point now);
  void take(double amount) { level_ -= amount; }
  void give(double amount) { level_ = std::min(level_ + amount, capacity_); }
  double capacity() const { return capacity_; }

 private:
  void refill(Clock::time_point now);

  double per_second_;
  double capacity_;
  double level_;
  Clock::time_point updated_;
};

// Why a request was refused: a 429 with Retry-After (retry_after_s, 0 when
// waiting cannot help: more tokens asked for than a minute holds).
struct RateRefusal {
  std::uint32_t retry_after_s = 0;
  std::string limit;  // "requests" or "tokens", OpenAI's error type
  std::string message;
};

class RateLimiter {
 public:
  using Clock = TokenBucket::Clock;

  // At most max_buckets callers remembered at once (at least one).
  RateLimiter(RateLimits limits, std::size_t max_buckets);

  const RateLimits& limits() const { return limits_; }
  // Takes `requests` requests and `tokens` tokens from the caller's buckets
  // when both have them; else takes nothing and says how long to wait.
  std::optional<RateRefusal> admit(std::string_view caller, std::uint32_t requests, std::uint32_t tokens,
                                   Clock::time_point now);
  // A generation charged `charged` tokens on admission used `used`.
  void settle(std::string_view caller, std::uint32_t charged, std::uint64_t used);
  std::size_t callers() const;

 private:
  struct Buckets {
    std::string caller;
    TokenBucket requests;
    TokenBucket tokens;
  };
  Buckets& buckets_of(std::string_view caller, Clock::time_point now);

  RateLimits limits_;
  std::size_t max_buckets_;
  mutable std::mutex mutex_;
  std::list<Buckets> recent_;  // the most recently used first
  std::map<std::string, std::list<Buckets>::iterator, std::less<>> by_caller_;
};

// One generation's charge against its caller's tokens per minute: counted
// as its tokens come (the client's loop thread; no lock), settled once, at
// its end (on_finish or on_error, the same thread).
class TokenCharge {
 public:
  TokenCharge(RateLimiter& limiter, std::string caller, std::uint32_t charged)
      : limiter_(limiter), caller_(std::move(caller)), charged_(charged) {}

  void count(std::size_t tokens) { received_ += tokens; }
  void settle_finished(std::uint64_t prompt_tokens, std::uint64_t completion_tokens);
  void settle_failed() { settle_finished(0, received_); }

 private:
  RateLimiter& limiter_;
  std::string caller_;
  std::uint32_t charged_;
  std::uint64_t received_ = 0;
  bool settled_ = false;
};

}  // namespace fmwire::gateway
