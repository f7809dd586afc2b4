// bench/gateway_admission: what the gateway's per-request admission costs,
// alone, on one thread (issue 15): the API key check (SHA-256 of the
// presented key, then CRYPTO_memcmp against every configured key's hash),
// the rate limiter (one lock, the caller's two token buckets), and both as
// a request pays them (a caller found by its key, then admitted and its
// token charge settled). The peer is the check the gateway made before:
// a constant-time compare of the presented key with each key kept in clear
// text. Ratio peer / ours (below 1: the hashed check costs more); the
// figure that matters is ours in ns against a request's other costs (an
// HTTP parse, a JSON parse, a native round trip: tens of microseconds).
//
// Run: build/bench/bench_gateway_admission [--quick] [--repetitions N] [--json FILE]
#include <boost/program_options.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "bench_main.h"
#include "bench_results.h"
#include "gateway/api_keys.h"
#include "gateway/rate_limiter.h"

namespace fmwire::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Keeps a value the optimiser would otherwise drop.
template <typename T>
void keep(const T& value) {
  asm volatile("" : : "g"(&value) : "memory");
}

// The check before issue 15: clear-text keys, no early exit.
bool constant_time_equal(std::string_view a, std::string_view b) {
  const std::size_t length = std::max(a.size(), b.size());
  unsigned char difference = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < length; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    difference |= static_cast<unsigned char>(x ^ y);
  }
  return difference == 0;
}

std::vector<std::string> keys_of(int count) {
  std::vector<std::string> keys;
  for (int i = 0; i < count; ++i) keys.push_back("sk-bench-" + std::to_string(i) + "-0123456789abcdefghijklmnopqrstuv");
  return keys;
}

// Median ns per call of `op` over `repetitions` runs of `calls` calls,
// after a tenth as many unmeasured.
template <typename Op>
double ns_per_call(int repetitions, int calls, Op op) {
  for (int i = 0; i < calls / 10 + 1; ++i) op(i);  // warm: caches, the allocator, OpenSSL's first calls
  std::vector<double> runs;
  for (int r = 0; r < repetitions; ++r) {
    const Clock::time_point start = Clock::now();
    for (int i = 0; i < calls; ++i) op(i);
    runs.push_back(std::chrono::duration<double, std::nano>(Clock::now() - start).count() / calls);
  }
  return median(runs);
}

std::vector<Comparison> run(int repetitions, int calls) {
  std::vector<Comparison> rows;
  for (int key_count : {1, 16}) {
    const std::vector<std::string> clear = keys_of(key_count);
    const gateway::ApiKeys hashed(clear);
    const std::string presented = clear.back();  // the last key: every one compared either way
    const double ours = ns_per_call(repetitions, calls, [&](int) { keep(hashed.find(presented)); });
    const double peer = ns_per_call(repetitions, calls, [&](int) {
      bool match = false;
      for (const std::string& allowed : clear) match |= constant_time_equal(presented, allowed);
      keep(match);
    });
    rows.push_back(compare("key check, " + std::to_string(key_count) + " key(s): SHA-256 + CRYPTO_memcmp", ours,
                           "ns", peer, "clear-text constant-time compare", false));
  }

  const std::vector<std::string> clear = keys_of(16);
  const gateway::ApiKeys hashed(clear);
  const gateway::KeyHash key = *hashed.find(clear.front());
  const std::string bucket(reinterpret_cast<const char*>(key.data()), key.size());
  // Limits high enough that every call is admitted: the cost of the check, not of a refusal.
  gateway::RateLimiter limiter({1e12, 1e15}, 10'000);
  const double limiter_ns = ns_per_call(repetitions, calls, [&](int) {
    keep(limiter.admit(bucket, 1, 256, Clock::now()));
    limiter.settle(bucket, 256, 100);
  });
  rows.push_back(compare("rate limiter: admit + settle, one key", limiter_ns, "ns", std::nullopt, "", false));

  // Callers by address, more of them than are remembered: every call a
  // miss that evicts the least recently seen.
  std::vector<std::string> addresses;
  for (int i = 0; i < 20'000; ++i) addresses.push_back("10." + std::to_string(i / 65536) + "." +
                                                       std::to_string(i / 256 % 256) + "." + std::to_string(i % 256));
  gateway::RateLimiter by_address({1e12, 0}, 10'000);
  const double evicting_ns = ns_per_call(repetitions, calls, [&](int i) {
    keep(by_address.admit(addresses[static_cast<std::size_t>(i) % addresses.size()], 1, 0, Clock::now()));
  });
  rows.push_back(compare("rate limiter: admit by address, 20,000 addresses over a cap of 10,000", evicting_ns, "ns",
                         std::nullopt, "", false));

  const std::string presented = clear.back();
  const double both_ns = ns_per_call(repetitions, calls, [&](int) {
    const auto found = hashed.find(presented);
    keep(limiter.admit(std::string_view(reinterpret_cast<const char*>(found->data()), found->size()), 1, 256,
                       Clock::now()));
    limiter.settle(bucket, 256, 100);
  });
  const double peer_ns = ns_per_call(repetitions, calls, [&](int) {
    bool match = false;
    for (const std::string& allowed : clear) match |= constant_time_equal(presented, allowed);
    keep(match);
  });
  rows.push_back(compare("a request's admission: key check (16 keys) + rate limits", both_ns, "ns", peer_ns,
                         "clear-text key check alone, no limits", false));
  return rows;
}

void print(const std::vector<Comparison>& rows, int repetitions, int calls) {
  std::printf("bench/gateway_admission: one thread, median of %d run(s) of %d calls; ratio peer / ours\n", repetitions,
              calls);
  std::printf("%-72s %10s %10s %8s\n", "", "ours ns", "peer ns", "ratio");
  for (const Comparison& row : rows) {
    std::printf("%-72s %10.1f %10s %8s\n", row.name.c_str(), row.value,
                row.peer.empty() ? "-" : std::to_string(static_cast<long>(row.peer_value + 0.5)).c_str(),
                ratio_text(ratio_of(row)).c_str());
  }
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  using namespace fmwire::bench;
  boost::program_options::options_description own_flags;
  const BenchProgram program{
      .name = "gateway_admission",
      .caption = "bench_gateway_admission: the gateway's API key check and rate limiter, ns per request",
      .quick_help = "fewer calls, one run each: a smoke test",
      .repetitions_help = "measured runs per row (default 7)"};
  return bench_main(argc, argv, program, own_flags, [](const CommonFlags& flags, const auto&) {
    const int repetitions = flags.repetitions.value_or(flags.quick ? 1 : 7);
    const int calls = flags.quick ? 2'000 : 200'000;
    std::vector<Comparison> rows = run(repetitions, calls);
    print(rows, repetitions, calls);
    return rows;
  });
}
