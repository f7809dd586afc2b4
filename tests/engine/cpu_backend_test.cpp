#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <span>
#include <stdexcept>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/half_float.h"
#include "engine/llama_weights.h"
#include "temp_file.h"

namespace fmwire::engine {
namespace {

// Small enough to check by hand, big enough for grouped-query attention
// (two query heads per KV head), several layers and a hidden width that is
// not a multiple of eight.
LlamaConfig small_config() {
  LlamaConfig config;
  config.dim = 8;
  config.hidden_dim = 12;
  config.layers = 2;
  config.heads = 4;
  config.kv_heads = 2;
  config.vocab_size = 7;
  config.max_context = 32;
  return config;
}

// Seeded weights with norms that are not all ones, so that a norm applied in
// the wrong place shows.
std::shared_ptr<const LlamaWeights> small_weights(std::uint64_t seed = 11) {
  LlamaWeights weights = make_seeded_weights(small_config(), seed);
  for (std::size_t i = 0; i < weights.attention_norm.size(); ++i) {
    weights.attention_norm[i] = 0.5f + 0.1f * static_cast<float>(i % 7);
    weights.ffn_norm[i] = 1.5f - 0.07f * static_cast<float>(i % 5);
  }
  for (std::size_t i = 0; i < weights.final_norm.size(); ++i) {
    weights.final_norm[i] = 0.8f + 0.05f * static_cast<float>(i);
  }
  return std::make_shared<const LlamaWeights>(std::move(weights));
}

// The decoder written out plainly, in double precision, with a contiguous
// KV cache per layer: what CpuBackend must compute, derived separately.
// Keys (after RoPE) and values go into its cache rounded to `kv_dtype`, as
// they would be stored, then read back as they are.
class ReferenceDecoder {
 public:
  explicit ReferenceDecoder(const LlamaWeights& weights, protocol::DType kv_dtype = protocol::DType::FLOAT32)
      : w_(weights), c_(weights.config), kv_dtype_(kv_dtype), keys_(c_.layers), values_(c_.layers) {}

  std::vector<double> step(std::uint32_t token, std::uint32_t position) {
    const std::size_t dim = c_.dim, hidden = c_.hidden_dim, kv_dim = c_.kv_dim(), head_dim = c_.head_dim();
    std::vector<double> x(w_.token_embedding.begin() + token * dim, w_.token_embedding.begin() + (token + 1) * dim);
    for (std::size_t layer = 0; layer < c_.layers; ++layer) {
      std::vector<double> xb = rmsnorm(x, w_.attention_norm, layer * dim);
      std::vector<double> q = matvec(w_.wq, layer * dim * dim, dim, dim, xb);
      std::vector<double> k = matvec(w_.wk, layer * kv_dim * dim, kv_dim, dim, xb);
      std::vector<double> v = matvec(w_.wv, layer * kv_dim * dim, kv_dim, dim, xb);
      rope(q, position);
      rope(k, position);
      for (double& value : k) value = stored(value);
      for (double& value : v) value = stored(value);
      keys_[layer].insert(keys_[layer].end(), k.begin(), k.end());
      values_[layer].insert(values_[layer].end(), v.begin(), v.end());
      REQUIRE(keys_[layer].size() == (position + 1) * kv_dim);

      std::vector<double> attended(dim, 0.0);
      for (std::size_t head = 0; head < c_.heads; ++head) {
        const std::size_t kv_head = head / (c_.heads / c_.kv_heads);
        std::vector<double> scores(position + 1);
        for (std::size_t t = 0; t <= position; ++t) {
          double score = 0.0;
          for (std::size_t i = 0; i < head_dim; ++i) {
            score += q[head * head_dim + i] * keys_[layer][t * kv_dim + kv_head * head_dim + i];
          }
          scores[t] = score / std::sqrt(static_cast<double>(head_dim));
        }
        double max = scores[0], sum = 0.0;
        for (double score : scores) max = std::max(max, score);
        for (double& score : scores) sum += (score = std::exp(score - max));
        for (std::size_t t = 0; t <= position; ++t) {
          for (std::size_t i = 0; i < head_dim; ++i) {
            attended[head * head_dim + i] += scores[t] / sum * values_[layer][t * kv_dim + kv_head * head_dim + i];
          }
        }
      }
      const std::vector<double> projected = matvec(w_.wo, layer * dim * dim, dim, dim, attended);
      for (std::size_t i = 0; i < dim; ++i) x[i] += projected[i];

      xb = rmsnorm(x, w_.ffn_norm, layer * dim);
      const std::vector<double> gate = matvec(w_.w1, layer * hidden * dim, hidden, dim, xb);
      const std::vector<double> up = matvec(w_.w3, layer * hidden * dim, hidden, dim, xb);
      std::vector<double> inner(hidden);
      for (std::size_t i = 0; i < hidden; ++i) inner[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
      const std::vector<double> down = matvec(w_.w2, layer * dim * hidden, dim, hidden, inner);
      for (std::size_t i = 0; i < dim; ++i) x[i] += down[i];
    }
    return matvec(w_.classifier, 0, c_.vocab_size, dim, rmsnorm(x, w_.final_norm, 0));
  }

 private:
  double stored(double value) const {
    const auto single = static_cast<float>(value);
    switch (kv_dtype_) {
      case protocol::DType::FLOAT16: return half_to_float(float_to_half(single));
      case protocol::DType::BFLOAT16: return bfloat16_to_float(float_to_bfloat16(single));
      default: return value;
    }
  }

  std::vector<double> rmsnorm(const std::vector<double>& x, const std::vector<float>& weight, std::size_t offset) {
    double squares = 0.0;
    for (double value : x) squares += value * value;
    const double scale = 1.0 / std::sqrt(squares / static_cast<double>(x.size()) + c_.norm_epsilon);
    std::vector<double> out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] * scale * weight[offset + i];
    return out;
  }

  static std::vector<double> matvec(const std::vector<float>& matrix, std::size_t offset, std::size_t rows,
                                    std::size_t columns, const std::vector<double>& x) {
    std::vector<double> out(rows, 0.0);
    for (std::size_t row = 0; row < rows; ++row) {
      for (std::size_t column = 0; column < columns; ++column) {
        out[row] += matrix[offset + row * columns + column] * x[column];
      }
    }
    return out;
  }

  // Rotates each head's pairs (2j, 2j + 1) by position * theta^(-2j / head_dim).
  void rope(std::vector<double>& vector, std::uint32_t position) {
    const std::size_t head_dim = c_.head_dim();
    for (std::size_t head = 0; head < vector.size() / head_dim; ++head) {
      for (std::size_t j = 0; j < head_dim / 2; ++j) {
        const double angle =
            position * std::pow(static_cast<double>(c_.rope_theta), -2.0 * static_cast<double>(j) / head_dim);
        double& a = vector[head * head_dim + 2 * j];
        double& b = vector[head * head_dim + 2 * j + 1];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(angle) - b0 * std::sin(angle);
        b = a0 * std::sin(angle) + b0 * std::cos(angle);
      }
    }
  }

  const LlamaWeights& w_;
  const LlamaConfig& c_;
  protocol::DType kv_dtype_;
  std::vector<std::vector<double>> keys_, values_;  // [layer][position][kv_dim]
};

// One forward pass of one entry; its logits.
std::vector<float> run(CpuBackend& backend, std::span<const std::uint32_t> tokens, std::uint32_t position,
                       std::span<const std::uint32_t> block_table) {
  std::vector<float> logits(backend.vocab_size());
  const BatchEntry entry{tokens, position, block_table, true};
  backend.forward({&entry, 1}, logits);
  return logits;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const std::vector<std::uint32_t> kPrompt{1, 4, 2, 6, 0, 3, 5, 5, 2};
const std::vector<std::uint32_t> kContiguous{0, 1, 2, 3};

// Token by token, logits against the plain implementation with the same KV dtype.
void check_against_reference(protocol::DType kv_dtype) {
  const auto weights = small_weights();
  CpuBackend backend(weights, 4, 4, kv_dtype);  // nine tokens span three blocks
  ReferenceDecoder reference(*weights, kv_dtype);
  for (std::uint32_t position = 0; position < kPrompt.size(); ++position) {
    const std::vector<float> logits = run(backend, {&kPrompt[position], 1}, position, kContiguous);
    const std::vector<double> expected = reference.step(kPrompt[position], position);
    for (std::size_t i = 0; i < logits.size(); ++i) {
      CHECK_MESSAGE(std::abs(logits[i] - expected[i]) < 1e-5,
                    "position " << position << " logit " << i << ": " << logits[i] << " vs " << expected[i]);
    }
  }
}

TEST_CASE("token by token, the logits match a plain contiguous implementation within 1e-5") {
  check_against_reference(protocol::DType::FLOAT32);
}

TEST_CASE("with the KV cache in f16, the logits match the plain implementation rounding keys and values to f16") {
  check_against_reference(protocol::DType::FLOAT16);
}

TEST_CASE("with the KV cache in bf16, the logits match the plain implementation rounding keys and values to bf16") {
  check_against_reference(protocol::DType::BFLOAT16);
}

TEST_CASE("a whole prompt in one pass gives the last token's logits of the plain implementation") {
  const auto weights = small_weights();
  CpuBackend backend(weights, 4, 4, protocol::DType::FLOAT32);
  ReferenceDecoder reference(*weights);
  std::vector<double> expected;
  for (std::uint32_t position = 0; position < kPrompt.size(); ++position) {
    expected = reference.step(kPrompt[position], position);
  }
  const std::vector<float> logits = run(backend, kPrompt, 0, kContiguous);
  for (std::size_t i = 0; i < logits.size(); ++i) CHECK(std::abs(logits[i] - expected[i]) < 1e-5);
}

TEST_CASE("a scattered block table gives the same logits as contiguous blocks") {
  const auto weights = small_weights();
  CpuBackend contiguous(weights, 8, 4);
  CpuBackend scattered(weights, 8, 4);
  const std::vector<std::uint32_t> table{6, 1, 4};
  CHECK(bitwise_equal(run(scattered, kPrompt, 0, table), run(contiguous, kPrompt, 0, kContiguous)));
  const std::uint32_t next = 3;
  CHECK(bitwise_equal(run(scattered, {&next, 1}, 9, table), run(contiguous, {&next, 1}, 9, kContiguous)));
}

TEST_CASE("a sequence's logits are bitwise the same alone, in a batch, and with its prompt in chunks") {
  const auto weights = small_weights();
  const std::vector<std::uint32_t> decode_tokens{2, 6, 1, 0, 4};

  // Alone: the prompt in one pass, then one token per pass.
  CpuBackend alone(weights, 4, 4);
  std::vector<std::vector<float>> expected{run(alone, kPrompt, 0, kContiguous)};
  for (std::uint32_t i = 0; i < decode_tokens.size(); ++i) {
    expected.push_back(run(alone, {&decode_tokens[i], 1}, 9 + i, kContiguous));
  }

  // In a batch with two other sequences, its prompt in chunks of 4, 3 and 2
  // over three steps, one of them giving no logits.
  CpuBackend batched(weights, 12, 4);
  const std::vector<std::uint32_t> ours{7, 2, 9, 0}, before{1, 3, 5, 10}, after{4, 6, 8, 11};
  const std::vector<std::uint32_t> before_prompt{1, 6, 6, 2, 5}, after_prompt{1, 1, 3};
  const std::uint32_t vocab = batched.vocab_size();
  std::vector<float> logits(3 * vocab);
  auto row = [&](std::size_t index) {
    return std::vector<float>(logits.begin() + index * vocab, logits.begin() + (index + 1) * vocab);
  };
  const std::span<const std::uint32_t> prompt(kPrompt);

  std::vector<BatchEntry> step{{before_prompt, 0, before, true}, {prompt.subspan(0, 4), 0, ours, false}};
  batched.forward(step, logits);
  step = {{after_prompt, 0, after, true},
          {prompt.subspan(4, 3), 4, ours, false},
          {{&decode_tokens[0], 1}, 5, before, true}};
  batched.forward(step, logits);
  step = {{{&decode_tokens[1], 1}, 3, after, true},
          {{&decode_tokens[2], 1}, 6, before, true},
          {prompt.subspan(7, 2), 7, ours, true}};
  batched.forward(step, logits);
  CHECK(bitwise_equal(row(2), expected[0]));

  for (std::uint32_t i = 0; i < decode_tokens.size(); ++i) {
    const std::uint32_t other = decode_tokens[(i + 1) % decode_tokens.size()];
    step = {{{&other, 1}, 7 + i, before, true},
            {{&decode_tokens[i], 1}, 9 + i, ours, true},
            {{&other, 1}, 4 + i, after, true}};
    batched.forward(step, logits);
    CHECK_MESSAGE(bitwise_equal(row(1), expected[i + 1]), "decode step " << i);
  }
}

TEST_CASE("blocks read out and written into other block ids give the same next logits") {
  const auto weights = small_weights();
  CpuBackend source(weights, 4, 4);
  run(source, kPrompt, 0, kContiguous);
  const std::vector<std::uint32_t> used{0, 1, 2};
  std::vector<std::byte> bytes(used.size() * source.kv_geometry().bytes_per_block());
  source.read_blocks(used, bytes);

  CpuBackend target(weights, 8, 4);
  const std::vector<std::uint32_t> moved{5, 3, 7};
  target.write_blocks(moved, bytes);
  std::vector<std::byte> again(bytes.size());
  target.read_blocks(moved, again);
  CHECK(again == bytes);

  const std::uint32_t next = 4;
  CHECK(bitwise_equal(run(target, {&next, 1}, 9, moved), run(source, {&next, 1}, 9, kContiguous)));
}

TEST_CASE("a checkpoint written and loaded gives the same logits as the weights in memory") {
  const auto weights = small_weights();
  test::TempFile file("cpu-backend-model.bin");
  REQUIRE(save_llama2c_checkpoint(*weights, file.path()).has_value());
  auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  CpuBackend from_memory(weights, 4, 4);
  CpuBackend from_file(std::make_shared<const LlamaWeights>(std::move(loaded).value()), 4, 4);
  CHECK(bitwise_equal(run(from_file, kPrompt, 0, kContiguous), run(from_memory, kPrompt, 0, kContiguous)));
}

TEST_CASE("the KV geometry is the wire layout of the model's shape, in f16 unless asked otherwise") {
  CpuBackend backend(small_weights(), 3, 4);
  const KvGeometry& geometry = backend.kv_geometry();
  CHECK(geometry.layers == 2);
  CHECK(geometry.kv_heads == 2);
  CHECK(geometry.head_dim == 2);
  CHECK(geometry.block_tokens == 4);
  CHECK(geometry.dtype == protocol::DType::FLOAT16);
  CHECK(geometry.element_bytes == 2);
  CHECK(geometry.bytes_per_block() == 2 * 2 * 2 * 2 * 4 * 2);
  CHECK(backend.total_blocks() == 3);
  CHECK(backend.vocab_size() == 7);
  CHECK(backend.max_context() == 32);
  CHECK(backend.name() == "cpu");
}

TEST_CASE("KV bytes per token halve in f16 and bf16 against f32") {
  const auto weights = small_weights();
  const std::size_t f32 = CpuBackend(weights, 1, 4, protocol::DType::FLOAT32).kv_geometry().bytes_per_token();
  const KvGeometry f16 = CpuBackend(weights, 1, 4, protocol::DType::FLOAT16).kv_geometry();
  const KvGeometry bf16 = CpuBackend(weights, 1, 4, protocol::DType::BFLOAT16).kv_geometry();
  CHECK(f32 == 2 * 2 * 2 * 2 * 4);
  CHECK(f16.bytes_per_token() * 2 == f32);
  CHECK(bf16.bytes_per_token() * 2 == f32);
  CHECK(bf16.dtype == protocol::DType::BFLOAT16);
  CHECK(bf16.element_bytes == 2);
}

TEST_CASE("the first layer's keys and values in an f16 cache are the f16 roundings of the f32 cache's") {
  // One token into both: the first layer's keys and values come from the
  // embedding alone, so only their storage differs (later layers read the
  // rounded values back and differ by more).
  const auto weights = small_weights();
  CpuBackend f32(weights, 4, 4, protocol::DType::FLOAT32);
  CpuBackend f16(weights, 4, 4, protocol::DType::FLOAT16);
  const std::uint32_t first = kPrompt[0];
  run(f32, {&first, 1}, 0, kContiguous);
  run(f16, {&first, 1}, 0, kContiguous);
  std::vector<float> wide(f32.kv_geometry().bytes_per_block() / 4);
  std::vector<std::uint16_t> narrow(f16.kv_geometry().bytes_per_block() / 2);
  const std::vector<std::uint32_t> block{0};
  f32.read_blocks(block, std::as_writable_bytes(std::span<float>(wide)));
  f16.read_blocks(block, std::as_writable_bytes(std::span<std::uint16_t>(narrow)));
  bool any_nonzero = false;
  const std::size_t first_layer = f32.kv_geometry().element_offset(1, 0, 0, 0);
  for (std::size_t i = 0; i < first_layer; ++i) {
    CHECK(narrow[i] == float_to_half(wide[i]));
    any_nonzero = any_nonzero || wide[i] != 0.0f;
  }
  CHECK(any_nonzero);
}

TEST_CASE("a backend with no blocks, empty blocks, no weights or a KV dtype it cannot store is refused") {
  CHECK_THROWS_AS(CpuBackend(small_weights(), 0, 4), std::invalid_argument);
  CHECK_THROWS_AS(CpuBackend(small_weights(), 4, 0), std::invalid_argument);
  CHECK_THROWS_AS(CpuBackend(nullptr, 4, 4), std::invalid_argument);
  CHECK_THROWS_AS(CpuBackend(small_weights(), 4, 4, protocol::DType::FLOAT8E4M3), std::invalid_argument);
  LlamaWeights short_tensor = *small_weights();
  short_tensor.w2.pop_back();
  CHECK_THROWS_AS(CpuBackend(std::make_shared<const LlamaWeights>(short_tensor), 4, 4), std::invalid_argument);
}

TEST_CASE("the built-in model's greedy text is printable and varied") {
  auto weights = std::make_shared<const LlamaWeights>(make_seeded_weights(builtin_llama_config(), 0));
  CpuBackend backend(weights, 8, 16);
  const std::vector<std::uint32_t> table{0, 1, 2, 3, 4, 5, 6, 7};
  const std::vector<std::uint32_t> hello{1, 3 + 'H', 3 + 'e', 3 + 'l', 3 + 'l', 3 + 'o'};
  std::vector<float> logits = run(backend, hello, 0, table);
  std::set<std::uint32_t> distinct;
  for (std::uint32_t position = 6; position < 70; ++position) {
    std::uint32_t next = 0;
    for (std::uint32_t i = 1; i < logits.size(); ++i) next = logits[i] > logits[next] ? i : next;
    REQUIRE(next >= 3 + 0x0a);
    REQUIRE(next <= 3 + 0x7e);
    distinct.insert(next);
    logits = run(backend, {&next, 1}, position, table);
  }
  CHECK(distinct.size() >= 16);
}

}  // namespace
}  // namespace fmwire::engine
