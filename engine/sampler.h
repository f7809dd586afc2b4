// Picks the next token from a row of logits: greedy (temperature 0, ties to
// the lowest id) or temperature + top-p (nucleus) with the sequence's own
// seeded generator, so a seeded request gives the same tokens every time.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace fmwire::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  std::uint64_t seed = 0;
};

// A small, fast, fully specified generator (xoshiro256**, seeded through
// splitmix64): the same stream on every platform.
class Random {
 public:
  explicit Random(std::uint64_t seed);
  std::uint64_t next();
  float next_unit();  // [0, 1)

 private:
  std::uint64_t state_[4];
};

class Sampler {
 public:
  explicit Sampler(SamplingParams params);
  // `logits` may be modified (softmax in place). Allocates only on the first
  // call (order_, the nucleus candidates, keeps its capacity), none after.
  std::uint32_t sample(std::span<float> logits);

 private:
  SamplingParams params_;
  Random random_;
  std::vector<std::uint32_t> order_;
};

std::uint32_t argmax(std::span<const float> logits);

}  // namespace fmwire::engine
