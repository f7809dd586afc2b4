#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/sampler.h"

namespace fmwire::engine {
namespace {

std::vector<std::uint32_t> draw(SamplingParams params, const std::vector<float>& logits, int count) {
  Sampler sampler(params);
  std::vector<std::uint32_t> tokens;
  for (int i = 0; i < count; ++i) {
    std::vector<float> row = logits;  // sample() may overwrite it
    tokens.push_back(sampler.sample(row));
  }
  return tokens;
}

TEST_CASE("greedy sampling picks the largest logit, the lowest id on ties") {
  std::vector<float> logits{0.5f, 2.0f, -1.0f, 2.0f, 1.9f};
  CHECK(argmax(logits) == 1);
  Sampler sampler({.temperature = 0.0f});
  CHECK(sampler.sample(logits) == 1);
  std::vector<float> negative{-3.0f, -2.0f, -2.0f};
  CHECK(sampler.sample(negative) == 1);
}

TEST_CASE("the same seed draws the same tokens and another seed other tokens") {
  const std::vector<float> logits{1.0f, 0.5f, 0.0f, -0.5f, 0.2f, 0.9f, 0.1f, 0.3f};
  const SamplingParams params{.temperature = 1.0f, .top_p = 0.9f, .seed = 42};
  const std::vector<std::uint32_t> first = draw(params, logits, 200);
  CHECK(draw(params, logits, 200) == first);
  CHECK(draw({.temperature = 1.0f, .top_p = 0.9f, .seed = 43}, logits, 200) != first);
}

TEST_CASE("a tiny top_p keeps only the most likely token") {
  const std::vector<float> logits{0.1f, 0.3f, 1.5f, 1.4f, -2.0f};
  for (std::uint32_t token : draw({.temperature = 1.5f, .top_p = 0.01f, .seed = 5}, logits, 500)) {
    REQUIRE(token == 2);
  }
}

TEST_CASE("top_p draws only from the smallest set of tokens that covers it") {
  // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two.
  const std::vector<float> logits{3.0f, 2.0f, 1.0f, 0.0f};
  std::array<int, 4> counts{};
  for (std::uint32_t token : draw({.temperature = 1.0f, .top_p = 0.8f, .seed = 9}, logits, 2000)) ++counts[token];
  CHECK(counts[2] == 0);
  CHECK(counts[3] == 0);
  CHECK(counts[0] > counts[1]);
  CHECK(counts[1] > 0);
}

TEST_CASE("at temperature 1 tokens are drawn about as often as their softmax probability") {
  const std::vector<float> logits{2.0f, 1.0f, 0.0f, -1.0f, 0.5f};
  double sum = 0.0;
  for (float logit : logits) sum += std::exp(logit);
  constexpr int kDraws = 20000;
  std::array<int, 5> counts{};
  for (std::uint32_t token : draw({.temperature = 1.0f, .top_p = 1.0f, .seed = 1234}, logits, kDraws)) ++counts[token];
  for (std::size_t i = 0; i < logits.size(); ++i) {
    const double expected = kDraws * std::exp(logits[i]) / sum;
    // Five standard deviations of a binomial count, at least: a fixed seed
    // makes it deterministic anyway; the bound only says "roughly".
    const double bound = 5.0 * std::sqrt(expected) + 10.0;
    CHECK_MESSAGE(std::abs(counts[i] - expected) < bound,
                  "token " << i << ": " << counts[i] << " draws, expected " << expected);
  }
}

TEST_CASE("a lower temperature makes the likeliest token likelier") {
  const std::vector<float> logits{1.0f, 0.5f, 0.0f};
  int hot = 0, cold = 0;
  for (std::uint32_t token : draw({.temperature = 2.0f, .seed = 3}, logits, 2000)) hot += token == 0;
  for (std::uint32_t token : draw({.temperature = 0.25f, .seed = 3}, logits, 2000)) cold += token == 0;
  CHECK(cold > hot);
}

TEST_CASE("the generator gives the same stream for the same seed and values in [0, 1)") {
  Random a(99), b(99), c(100);
  bool differs = false;
  for (int i = 0; i < 1000; ++i) {
    const std::uint64_t value = a.next();
    CHECK(value == b.next());
    differs = differs || value != c.next();
    const float unit = a.next_unit();
    b.next_unit();
    c.next_unit();
    CHECK(unit >= 0.0f);
    CHECK(unit < 1.0f);
  }
  CHECK(differs);
}

}  // namespace
}  // namespace fmwire::engine
