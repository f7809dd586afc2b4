#include "gateway/rate_limiter.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

namespace fmwire::gateway {
namespace {

// A whole second's requests at once, at least one.
double request_capacity(double per_second) { return std::max(per_second, 1.0); }

codec::Result<double, std::string> parse_limit(std::string_view text, std::string_view what) {
  double value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size() || !std::isfinite(value) ||
      value < 0) {
    return "bad " + std::string(what) + " '" + std::string(text) + "': a number >= 0 (0: no limit)";
  }
  return value;
}

}  // namespace

codec::Result<RateLimits, std::string> parse_rate_limits(std::string_view text) {
  const std::size_t comma = text.find(',');
  auto requests = parse_limit(text.substr(0, comma), "requests per second");
  if (!requests) return requests.error() + "; the form is RPS[,TPM]";
  RateLimits limits;
  limits.requests_per_s = *requests;
  if (comma != std::string_view::npos) {
    auto tokens = parse_limit(text.substr(comma + 1), "tokens per minute");
    if (!tokens) return tokens.error() + "; the form is RPS[,TPM]";
    limits.tokens_per_minute = *tokens;
  }
  if (!limits.any()) return std::string("0 or 0,0 limits nothing: leave the limit out");
  return limits;
}

TokenBucket::TokenBucket(double per_second, double capacity, Clock::time_point now)
    : per_second_(per_second), capacity_(capacity), level_(capacity), updated_(now) {}

void TokenBucket::refill(Clock::time_point now) {
  if (now <= updated_) return;
  const double elapsed_s = std::chrono::duration<double>(now - updated_).count();
  level_ = std::min(capacity_, level_ + elapsed_s * per_second_);
  updated_ = now;
}

double TokenBucket::seconds_until(double amount, Clock::time_point now) {
  refill(now);
  if (level_ >= amount) return 0;
  return (amount - level_) / per_second_;
}

RateLimiter::RateLimiter(RateLimits limits, std::size_t max_buckets)
    : limits_(limits), max_buckets_(std::max<std::size_t>(max_buckets, 1)) {}

RateLimiter::Buckets& RateLimiter::buckets_of(std::string_view caller, Clock::time_point now) {
  auto found = by_caller_.find(caller);
  if (found != by_caller_.end()) {
    recent_.splice(recent_.begin(), recent_, found->second);
    return recent_.front();
  }
  if (recent_.size() >= max_buckets_) {
    by_caller_.erase(recent_.back().caller);
    recent_.pop_back();
  }
  // A limit of 0 (none) never holds anything back: an endless bucket.
  constexpr double kEndless = std::numeric_limits<double>::infinity();
  const double rps = limits_.requests_per_s, tpm = limits_.tokens_per_minute;
  recent_.push_front(Buckets{std::string(caller),
                             TokenBucket(rps > 0 ? rps : kEndless, rps > 0 ? request_capacity(rps) : kEndless, now),
                             TokenBucket(tpm > 0 ? tpm / 60 : kEndless, tpm > 0 ? tpm : kEndless, now)});
  by_caller_.emplace(recent_.front().caller, recent_.begin());
  return recent_.front();
}

std::optional<RateRefusal> RateLimiter::admit(std::string_view caller, std::uint32_t requests, std::uint32_t tokens,
                                              Clock::time_point now) {
  std::lock_guard lock(mutex_);
  Buckets& buckets = buckets_of(caller, now);
  if (tokens > buckets.tokens.capacity()) {
    return RateRefusal{0, "tokens",
                       "max_tokens " + std::to_string(tokens) + " is over the limit of " +
                           std::to_string(static_cast<std::uint64_t>(limits_.tokens_per_minute)) +
                           " tokens per minute: ask for fewer"};
  }
  const double requests_wait_s = requests > 0 ? buckets.requests.seconds_until(requests, now) : 0;
  const double tokens_wait_s = tokens > 0 ? buckets.tokens.seconds_until(tokens, now) : 0;
  if (requests_wait_s > 0 || tokens_wait_s > 0) {
    const bool by_requests = requests_wait_s >= tokens_wait_s;
    const auto retry_after_s =
        static_cast<std::uint32_t>(std::max(1.0, std::ceil(std::max(requests_wait_s, tokens_wait_s))));
    std::string message = "rate limit reached: ";
    if (by_requests) {
      message += std::to_string(static_cast<std::uint64_t>(std::ceil(limits_.requests_per_s))) + " requests per second";
    } else {
      message += std::to_string(static_cast<std::uint64_t>(limits_.tokens_per_minute)) +
                 " tokens per minute (max_tokens is charged until the stream ends)";
    }
    message += "; retry after " + std::to_string(retry_after_s) + " s";
    return RateRefusal{retry_after_s, by_requests ? "requests" : "tokens", std::move(message)};
  }
  buckets.requests.take(requests);
  buckets.tokens.take(tokens);
  return std::nullopt;
}

void RateLimiter::settle(std::string_view caller, std::uint32_t charged, std::uint64_t used) {
  std::lock_guard lock(mutex_);
  auto found = by_caller_.find(caller);
  if (found == by_caller_.end()) return;  // evicted meanwhile: its new bucket owes nothing
  TokenBucket& tokens = found->second->tokens;
  if (used <= charged) {
    tokens.give(static_cast<double>(charged - used));
  } else {
    tokens.take(static_cast<double>(used - charged));
  }
}

std::size_t RateLimiter::callers() const {
  std::lock_guard lock(mutex_);
  return recent_.size();
}

void TokenCharge::settle_finished(std::uint64_t prompt_tokens, std::uint64_t completion_tokens) {
  if (settled_) return;
  settled_ = true;
  limiter_.settle(caller_, charged_, prompt_tokens + completion_tokens);
}

}  // namespace fmwire::gateway
