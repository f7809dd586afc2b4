// A Llama-architecture decoder's shape and weights, as llama2.c lays them
// out (its export script's legacy .bin: a 7-int header, then float32
// tensors), loaded from such a checkpoint or built from a fixed seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "codec/codec_error.h"

namespace fmwire::engine {

struct LlamaConfig {
  std::uint32_t dim = 0;          // model width
  std::uint32_t hidden_dim = 0;   // SwiGLU inner width
  std::uint32_t layers = 0;
  std::uint32_t heads = 0;        // query heads
  std::uint32_t kv_heads = 0;     // key/value heads (grouped-query when < heads)
  std::uint32_t vocab_size = 0;
  std::uint32_t max_context = 0;  // llama2.c's seq_len
  float rope_theta = 10000.0f;
  float norm_epsilon = 1e-5f;

  std::uint32_t head_dim() const { return dim / heads; }
  std::uint32_t kv_dim() const { return kv_heads * head_dim(); }
};

// The built-in model's shape: small enough to run anywhere, big enough to
// exercise grouped-query attention, several layers and paged KV.
LlamaConfig builtin_llama_config();

// Row-major float32 matrices [out][in], as llama2.c stores them: y = W x is
// y[i] = sum_j W[i * in + j] * x[j]. Per-layer tensors are stacked by layer.
struct LlamaWeights {
  LlamaConfig config;
  std::vector<float> token_embedding;  // [vocab][dim]
  std::vector<float> attention_norm;   // [layers][dim]
  std::vector<float> wq;               // [layers][dim][dim]            (out = heads * head_dim)
  std::vector<float> wk;               // [layers][kv_dim][dim]
  std::vector<float> wv;               // [layers][kv_dim][dim]
  std::vector<float> wo;               // [layers][dim][dim]
  std::vector<float> ffn_norm;         // [layers][dim]
  std::vector<float> w1;               // [layers][hidden][dim]         gate
  std::vector<float> w2;               // [layers][dim][hidden]         down
  std::vector<float> w3;               // [layers][hidden][dim]         up
  std::vector<float> final_norm;       // [dim]
  std::vector<float> classifier;       // [vocab][dim]; equal to token_embedding when shared
  bool shared_classifier = true;

  // xxh3-64 of the config and every tensor: both ends of a KV transfer must
  // run the same weights (KvOffer.modelFingerprint).
  std::uint64_t fingerprint() const;
};

// Reads a llama2.c checkpoint (legacy export: header dim, hidden_dim,
// n_layers, n_heads, n_kv_heads, vocab_size (negative: unshared classifier),
// seq_len as int32, then the float32 tensors in the order above, with
// freq_cis_real/imag between final_norm and the classifier). Errors name the
// file and what is wrong with it (short file, zero or inconsistent sizes).
codec::Result<LlamaWeights, std::string> load_llama2c_checkpoint(const std::string& path);

// Writes `weights` in the same layout (tests, and tools that make small models).
codec::Result<codec::Done, std::string> save_llama2c_checkpoint(const LlamaWeights& weights, const std::string& path);

// Weights drawn from a fixed seed: the same bytes on every machine (own
// generator, no std::normal_distribution, whose output varies by library).
// With the byte-level vocabulary's 259 tokens the classifier is shaped so
// that the text comes out as printable ASCII (see the .cpp). Throws
// std::invalid_argument for a config no model can have (zero sizes, heads
// that do not divide dim, kv heads that do not divide heads, odd head size).
LlamaWeights make_seeded_weights(const LlamaConfig& config, std::uint64_t seed);

}  // namespace fmwire::engine
