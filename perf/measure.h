// What `fmwire perf` and bench/transport measure with: the process's CPU
// time, the token content every stream carries (so that a receiver can check
// every field), send stamps, percentiles and a pacer's clock.
#pragma once

#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>

#include <cerrno>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fmwire::perf {

using Clock = std::chrono::steady_clock;

// CPU time of the whole process, every thread (server, client, a peer's own
// threads) included.
inline double process_cpu_seconds() {
  timespec now{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

// User and system CPU time of the whole process (getrusage), to tell the
// copies and digests a transport does itself from the kernel's share.
struct CpuTimes {
  double user_s = 0;
  double system_s = 0;
};

inline double timeval_seconds(const timeval& time) {
  return static_cast<double>(time.tv_sec) + static_cast<double>(time.tv_usec) * 1e-6;
}

inline CpuTimes process_cpu_times() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return {timeval_seconds(usage.ru_utime), timeval_seconds(usage.ru_stime)};
}

inline double seconds_between(Clock::time_point start, Clock::time_point end) {
  return std::max(std::chrono::duration<double>(end - start).count(), 1e-12);
}

// ---------------------------------------------------------------- token content

// Token `index` of every stream: a Llama-3-sized id and a short piece, the
// same for fmwire and gRPC.
inline constexpr std::array<std::string_view, 16> kTokenPieces{
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog",
    ",",    " model", " token", " cache", " stream", " server", ".", "\n"};

inline std::uint32_t token_id(std::uint32_t index) { return (index * 7919u + 13u) % 128'256u; }
inline std::string_view token_piece(std::uint32_t index) { return kTokenPieces[index % kTokenPieces.size()]; }

// What a receiver adds up per token, so that every field is read.
inline std::uint64_t token_checksum(std::uint32_t first_index, std::uint32_t id, std::string_view piece) {
  return std::uint64_t{first_index} + id + piece.size() +
         (piece.empty() ? 0 : static_cast<unsigned char>(piece.front()));
}

// The checksum of one whole stream of `frames` tokens.
inline std::uint64_t expected_stream_checksum(std::uint32_t frames) {
  std::uint64_t sum = 0;
  for (std::uint32_t index = 0; index < frames; ++index) sum += token_checksum(index, token_id(index), token_piece(index));
  return sum;
}

// A send time carried in a token's text piece: decimal nanoseconds since the
// run's origin (one process, so both ends read the same steady_clock).
struct Stamp {
  std::array<char, 24> text{};
  std::size_t size = 0;
  std::string_view view() const { return {text.data(), size}; }
};

inline Stamp make_stamp(Clock::time_point origin, Clock::time_point now) {
  Stamp stamp;
  const auto nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(now - origin).count();
  stamp.size = static_cast<std::size_t>(std::to_chars(stamp.text.data(), stamp.text.data() + stamp.text.size(), nanoseconds).ptr -
                                        stamp.text.data());
  return stamp;
}

// Nanoseconds from the stamp in `piece` to `now`; -1 when the piece is not a stamp.
inline std::int64_t nanoseconds_since_stamp(std::string_view piece, Clock::time_point origin, Clock::time_point now) {
  std::int64_t stamped = 0;
  const auto parsed = std::from_chars(piece.data(), piece.data() + piece.size(), stamped);
  if (parsed.ec != std::errc() || parsed.ptr != piece.data() + piece.size()) return -1;
  return std::chrono::duration_cast<std::chrono::nanoseconds>(now - origin).count() - stamped;
}

// One bulk transfer: attachment bytes per second, and the CPU it cost per
// 1e9 bytes, user and system time apart.
struct BulkRun {
  double bytes_per_s = 0;
  double user_s_per_gb = 0;
  double system_s_per_gb = 0;
  std::uint64_t refused_sends = 0;  // send() calls refused for want of credit
};

// p in [0, 1] of `values` (nearest rank); sorts them.
inline double percentile(std::vector<double>& values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const auto rank = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(rank, values.size() - 1)];
}

// Sleeps until `due` on CLOCK_MONOTONIC (steady_clock's clock), with an
// absolute deadline so that lateness does not accumulate: the paced senders'
// clock. Call set_fine_timer_slack() on the sleeping thread first.
inline void sleep_until(Clock::time_point due) {
  const auto nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(due.time_since_epoch()).count();
  timespec deadline{};
  deadline.tv_sec = static_cast<time_t>(nanoseconds / 1'000'000'000);
  deadline.tv_nsec = static_cast<long>(nanoseconds % 1'000'000'000);
  while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, nullptr) == EINTR) {
  }
}

// Linux lets a sleeping thread wake up to 50 us late by default (timer
// slack); a pacer at 100 us intervals wants 1 ns.
inline void set_fine_timer_slack() { ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); }

}  // namespace fmwire::perf
