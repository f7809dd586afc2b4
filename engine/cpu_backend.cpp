#include "engine/cpu_backend.h"

#include <cassert>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "engine/half_float.h"

namespace fmwire::engine {

namespace {

// `count` floats into the cache's element type at `out`.
void store_row(protocol::DType dtype, const float* in, std::byte* out, std::size_t count) {
  switch (dtype) {
    case protocol::DType::FLOAT16:
      for (std::size_t i = 0; i < count; ++i) {
        const std::uint16_t half = float_to_half(in[i]);
        std::memcpy(out + i * 2, &half, 2);
      }
      return;
    case protocol::DType::BFLOAT16:
      for (std::size_t i = 0; i < count; ++i) {
        const std::uint16_t bfloat16 = float_to_bfloat16(in[i]);
        std::memcpy(out + i * 2, &bfloat16, 2);
      }
      return;
    default:  // FLOAT32, the only other type the constructor accepts
      std::memcpy(out, in, count * sizeof(float));
  }
}

// `count` elements of the cache's type at `in`, widened to float.
void load_row(protocol::DType dtype, const std::byte* in, float* out, std::size_t count) {
  switch (dtype) {
    case protocol::DType::FLOAT16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t half;
        std::memcpy(&half, in + i * 2, 2);
        out[i] = half_to_float(half);
      }
      return;
    case protocol::DType::BFLOAT16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t bfloat16;
        std::memcpy(&bfloat16, in + i * 2, 2);
        out[i] = bfloat16_to_float(bfloat16);
      }
      return;
    default:
      std::memcpy(out, in, count * sizeof(float));
  }
}

// sum_j a[j] * b[j] with eight running sums combined in a fixed tree: the
// same order for every call (batch invariance), and independent chains the
// compiler can keep in vector registers.
float dot(const float* a, const float* b, std::size_t count) {
  float s[8] = {};
  std::size_t j = 0;
  for (; j + 8 <= count; j += 8) {
    for (std::size_t lane = 0; lane < 8; ++lane) s[lane] += a[j + lane] * b[j + lane];
  }
  float sum = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; j < count; ++j) sum += a[j] * b[j];
  return sum;
}

// out = W x, W row-major [rows][columns].
void matmul(float* out, const float* w, const float* x, std::size_t rows, std::size_t columns) {
  for (std::size_t row = 0; row < rows; ++row) out[row] = dot(w + row * columns, x, columns);
}

// run.c's rmsnorm: out = weight * x / sqrt(mean(x^2) + epsilon).
void rmsnorm(float* out, const float* x, const float* weight, std::size_t size, float epsilon) {
  float squares = 0.0f;
  for (std::size_t i = 0; i < size; ++i) squares += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(squares / static_cast<float>(size) + epsilon);
  for (std::size_t i = 0; i < size; ++i) out[i] = weight[i] * (scale * x[i]);
}

void softmax(float* x, std::size_t size) {
  float max = x[0];
  for (std::size_t i = 1; i < size; ++i) max = x[i] > max ? x[i] : max;
  float sum = 0.0f;
  for (std::size_t i = 0; i < size; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  for (std::size_t i = 0; i < size; ++i) x[i] /= sum;
}

// Rotates the pairs (i, i + 1) of every head_dim-sized head of `vector`.
void rotate(float* vector, std::size_t size, const float* cosines, const float* sines, std::size_t head_dim) {
  for (std::size_t i = 0; i < size; i += 2) {
    const std::size_t pair = (i % head_dim) / 2;
    const float v0 = vector[i], v1 = vector[i + 1];
    vector[i] = v0 * cosines[pair] - v1 * sines[pair];
    vector[i + 1] = v0 * sines[pair] + v1 * cosines[pair];
  }
}

void check_weights(const LlamaWeights* weights) {
  if (weights == nullptr) throw std::invalid_argument("cpu backend: no weights");
  const LlamaConfig& c = weights->config;
  if (c.dim == 0 || c.hidden_dim == 0 || c.layers == 0 || c.heads == 0 || c.kv_heads == 0 || c.vocab_size == 0 ||
      c.max_context == 0 || c.dim % c.heads != 0 || c.heads % c.kv_heads != 0 || c.head_dim() % 2 != 0) {
    throw std::invalid_argument("cpu backend: inconsistent model shape (dim " + std::to_string(c.dim) + ", heads " +
                                std::to_string(c.heads) + ", kv heads " + std::to_string(c.kv_heads) + ")");
  }
  const std::size_t dim = c.dim, hidden = c.hidden_dim, layers = c.layers, vocab = c.vocab_size,
                    kv_dim = c.kv_dim();
  const std::pair<const std::vector<float>*, std::size_t> tensors[] = {
      {&weights->token_embedding, vocab * dim}, {&weights->attention_norm, layers * dim},
      {&weights->wq, layers * dim * dim},       {&weights->wk, layers * kv_dim * dim},
      {&weights->wv, layers * kv_dim * dim},    {&weights->wo, layers * dim * dim},
      {&weights->ffn_norm, layers * dim},       {&weights->w1, layers * hidden * dim},
      {&weights->w2, layers * dim * hidden},    {&weights->w3, layers * hidden * dim},
      {&weights->final_norm, dim},              {&weights->classifier, vocab * dim}};
  for (const auto& [tensor, count] : tensors) {
    if (tensor->size() != count) {
      throw std::invalid_argument("cpu backend: a tensor has " + std::to_string(tensor->size()) +
                                  " elements, the model's shape implies " + std::to_string(count));
    }
  }
}

}  // namespace

CpuBackend::CpuBackend(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks,
                       std::uint32_t block_tokens, protocol::DType kv_dtype)
    : weights_(std::move(weights)), total_blocks_(kv_blocks) {
  check_weights(weights_.get());
  if (kv_blocks == 0 || block_tokens == 0) {
    throw std::invalid_argument("cpu backend: " + std::to_string(kv_blocks) + " KV blocks of " +
                                std::to_string(block_tokens) + " tokens; both must be positive");
  }
  if (kv_dtype != protocol::DType::FLOAT16 && kv_dtype != protocol::DType::BFLOAT16 &&
      kv_dtype != protocol::DType::FLOAT32) {
    throw std::invalid_argument("cpu backend: KV dtype " + std::string(kv_dtype_name(kv_dtype)) +
                                ": f16, bf16 or f32 only");
  }
  const LlamaConfig& config = weights_->config;
  geometry_.layers = config.layers;
  geometry_.kv_heads = config.kv_heads;
  geometry_.head_dim = config.head_dim();
  geometry_.block_tokens = block_tokens;
  geometry_.set_dtype(kv_dtype);
  block_bytes_ = geometry_.bytes_per_block();
  kv_ = ZeroedArray<std::byte>(block_bytes_ * kv_blocks);

  // run.c: freq = 1 / theta^(i / head_size) for the pair starting at even i.
  const std::uint32_t head_dim = config.head_dim();
  for (std::uint32_t i = 0; i < head_dim; i += 2) {
    rope_frequencies_.push_back(
        1.0f / std::pow(config.rope_theta, static_cast<float>(i) / static_cast<float>(head_dim)));
  }
  x_.resize(config.dim);
  xb_.resize(config.dim);
  xb2_.resize(config.dim);
  hb_.resize(config.hidden_dim);
  hb2_.resize(config.hidden_dim);
  q_.resize(config.dim);
  k_.resize(config.kv_dim());
  v_.resize(config.kv_dim());
  att_.resize(config.max_context);
  rope_cos_.resize(head_dim / 2);
  rope_sin_.resize(head_dim / 2);
  keys_.resize(std::size_t{config.max_context} * head_dim);
  values_.resize(std::size_t{config.max_context} * head_dim);
}

std::uint32_t CpuBackend::vocab_size() const { return weights_->config.vocab_size; }

std::uint32_t CpuBackend::max_context() const { return weights_->config.max_context; }

void CpuBackend::forward(std::span<const BatchEntry> batch, std::span<float> logits) {
  const std::size_t vocab = weights_->config.vocab_size;
  std::size_t row = 0;
  for (const BatchEntry& entry : batch) {
    assert(!entry.wants_logits || !entry.tokens.empty());
    for (std::size_t i = 0; i < entry.tokens.size(); ++i) {
      const bool last = i + 1 == entry.tokens.size();
      float* out = nullptr;
      if (last && entry.wants_logits) {
        assert(logits.size() >= (row + 1) * vocab);
        out = logits.data() + row * vocab;
      }
      forward_token(entry.tokens[i], entry.position + static_cast<std::uint32_t>(i), entry.block_table, out);
    }
    if (entry.wants_logits) ++row;
  }
}

std::byte* CpuBackend::kv_at(std::span<const std::uint32_t> block_table, std::uint32_t position,
                             std::uint32_t layer, std::uint32_t kv, std::uint32_t kv_head) {
  const std::uint32_t block = block_table[position / geometry_.block_tokens];
  assert(block < total_blocks_);
  return kv_.data() + block * block_bytes_ +
         geometry_.element_offset(layer, kv, kv_head, position % geometry_.block_tokens) * geometry_.element_bytes;
}

// run.c's forward() for one token at `position`.
void CpuBackend::forward_token(std::uint32_t token, std::uint32_t position,
                               std::span<const std::uint32_t> block_table, float* logits) {
  const LlamaWeights& w = *weights_;
  const LlamaConfig& c = w.config;
  const std::size_t dim = c.dim, hidden = c.hidden_dim, kv_dim = c.kv_dim(), head_dim = c.head_dim();
  const std::uint32_t group = c.heads / c.kv_heads;  // query heads per KV head
  const float attention_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  assert(token < c.vocab_size);
  assert(position < c.max_context);
  assert(position / geometry_.block_tokens < block_table.size());

  std::memcpy(x_.data(), w.token_embedding.data() + token * dim, dim * sizeof(float));
  for (std::size_t pair = 0; pair < rope_frequencies_.size(); ++pair) {
    const float angle = static_cast<float>(position) * rope_frequencies_[pair];
    rope_cos_[pair] = std::cos(angle);
    rope_sin_[pair] = std::sin(angle);
  }

  for (std::uint32_t layer = 0; layer < c.layers; ++layer) {
    // Attention: this token's query, key and value; its key and value into
    // the cache, then attend over positions 0 .. position.
    rmsnorm(xb_.data(), x_.data(), w.attention_norm.data() + layer * dim, dim, c.norm_epsilon);
    matmul(q_.data(), w.wq.data() + layer * dim * dim, xb_.data(), dim, dim);
    matmul(k_.data(), w.wk.data() + layer * kv_dim * dim, xb_.data(), kv_dim, dim);
    matmul(v_.data(), w.wv.data() + layer * kv_dim * dim, xb_.data(), kv_dim, dim);
    rotate(q_.data(), dim, rope_cos_.data(), rope_sin_.data(), head_dim);
    rotate(k_.data(), kv_dim, rope_cos_.data(), rope_sin_.data(), head_dim);
    const protocol::DType dtype = geometry_.dtype;
    for (std::uint32_t kv_head = 0; kv_head < c.kv_heads; ++kv_head) {
      store_row(dtype, k_.data() + kv_head * head_dim, kv_at(block_table, position, layer, 0, kv_head), head_dim);
      store_row(dtype, v_.data() + kv_head * head_dim, kv_at(block_table, position, layer, 1, kv_head), head_dim);
    }

    for (std::uint32_t kv_head = 0; kv_head < c.kv_heads; ++kv_head) {
      for (std::uint32_t t = 0; t <= position; ++t) {
        load_row(dtype, kv_at(block_table, t, layer, 0, kv_head), keys_.data() + t * head_dim, head_dim);
        load_row(dtype, kv_at(block_table, t, layer, 1, kv_head), values_.data() + t * head_dim, head_dim);
      }
      for (std::uint32_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
        const float* query = q_.data() + head * head_dim;
        for (std::uint32_t t = 0; t <= position; ++t) {
          att_[t] = dot(query, keys_.data() + t * head_dim, head_dim) * attention_scale;
        }
        softmax(att_.data(), position + 1);
        float* out = xb_.data() + head * head_dim;
        std::memset(out, 0, head_dim * sizeof(float));
        for (std::uint32_t t = 0; t <= position; ++t) {
          const float* value = values_.data() + t * head_dim;
          for (std::size_t i = 0; i < head_dim; ++i) out[i] += att_[t] * value[i];
        }
      }
    }
    matmul(xb2_.data(), w.wo.data() + layer * dim * dim, xb_.data(), dim, dim);
    for (std::size_t i = 0; i < dim; ++i) x_[i] += xb2_[i];

    // SwiGLU feed-forward: w2 (silu(w1 x) * w3 x).
    rmsnorm(xb_.data(), x_.data(), w.ffn_norm.data() + layer * dim, dim, c.norm_epsilon);
    matmul(hb_.data(), w.w1.data() + layer * hidden * dim, xb_.data(), hidden, dim);
    matmul(hb2_.data(), w.w3.data() + layer * hidden * dim, xb_.data(), hidden, dim);
    for (std::size_t i = 0; i < hidden; ++i) {
      const float gate = hb_[i];
      hb_[i] = gate * (1.0f / (1.0f + std::exp(-gate))) * hb2_[i];
    }
    matmul(xb_.data(), w.w2.data() + layer * dim * hidden, hb_.data(), dim, hidden);
    for (std::size_t i = 0; i < dim; ++i) x_[i] += xb_[i];
  }

  if (logits == nullptr) return;
  rmsnorm(xb_.data(), x_.data(), w.final_norm.data(), dim, c.norm_epsilon);
  matmul(logits, w.classifier.data(), xb_.data(), c.vocab_size, dim);
}

void CpuBackend::read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) {
  const std::size_t block_bytes = geometry_.bytes_per_block();
  assert(out.size() == blocks.size() * block_bytes);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    assert(blocks[i] < total_blocks_);
    std::memcpy(out.data() + i * block_bytes, kv_.data() + blocks[i] * block_bytes_, block_bytes);
  }
}

void CpuBackend::write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) {
  const std::size_t block_bytes = geometry_.bytes_per_block();
  assert(in.size() == blocks.size() * block_bytes);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    assert(blocks[i] < total_blocks_);
    std::memcpy(kv_.data() + blocks[i] * block_bytes_, in.data() + i * block_bytes, block_bytes);
  }
}

}  // namespace fmwire::engine
