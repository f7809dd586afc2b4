#include "engine/sampler.h"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace fmwire::engine {

namespace {

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::uint64_t rotate_left(std::uint64_t x, int bits) { return (x << bits) | (x >> (64 - bits)); }

}  // namespace

// xoshiro256** 1.0 (Blackman and Vigna, https://prng.di.unimi.it/), its
// state filled from splitmix64 as the authors recommend: never all zero.
Random::Random(std::uint64_t seed) {
  for (std::uint64_t& word : state_) word = splitmix64(seed);
}

std::uint64_t Random::next() {
  const std::uint64_t result = rotate_left(state_[1] * 5, 7) * 9;
  const std::uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotate_left(state_[3], 45);
  return result;
}

float Random::next_unit() { return static_cast<float>(next() >> 40) * 0x1.0p-24f; }

std::uint32_t argmax(std::span<const float> logits) {
  std::uint32_t best = 0;
  for (std::uint32_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

Sampler::Sampler(SamplingParams params) : params_(params), random_(params.seed) {}

// llama2.c's sample (run.c): logits / temperature, softmax, then either a
// draw from the whole distribution or from the smallest set of most likely
// tokens whose probabilities add up to more than top_p.
std::uint32_t Sampler::sample(std::span<float> logits) {
  assert(!logits.empty());
  if (params_.temperature <= 0.0f || logits.size() == 1) return argmax(logits);

  const std::uint32_t best = argmax(logits);
  const float max_logit = logits[best];
  float sum = 0.0f;
  for (float& logit : logits) {
    logit = std::exp((logit - max_logit) / params_.temperature);
    sum += logit;
  }
  for (float& probability : logits) probability /= sum;
  const float coin = random_.next_unit();

  const std::uint32_t count = static_cast<std::uint32_t>(logits.size());
  if (params_.top_p >= 1.0f) {
    float cumulative = 0.0f;
    for (std::uint32_t i = 0; i < count; ++i) {
      cumulative += logits[i];
      if (coin < cumulative) return i;
    }
    return count - 1;  // rounding left the sum just under the coin
  }

  // Tokens below this cannot be in the nucleus (run.c's cutoff), which
  // spares sorting the long tail; the most likely token always can.
  const float cutoff = (1.0f - params_.top_p) / static_cast<float>(count - 1);
  order_.clear();
  for (std::uint32_t i = 0; i < count; ++i) {
    if (logits[i] >= cutoff || i == best) order_.push_back(i);
  }
  // Most likely first, the lower id first on ties: one order everywhere.
  std::sort(order_.begin(), order_.end(), [&](std::uint32_t a, std::uint32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::size_t last = order_.size() - 1;
  float nucleus = 0.0f;
  for (std::size_t i = 0; i < order_.size(); ++i) {
    nucleus += logits[order_[i]];
    if (nucleus > params_.top_p) {
      last = i;
      break;
    }
  }
  const float target = coin * nucleus;
  float cumulative = 0.0f;
  for (std::size_t i = 0; i < last; ++i) {
    cumulative += logits[order_[i]];
    if (target < cumulative) return order_[i];
  }
  return order_[last];
}

}  // namespace fmwire::engine
