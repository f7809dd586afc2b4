#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "engine/llama_weights.h"
#include "temp_file.h"

namespace fmwire::engine {
namespace {

LlamaConfig small_config() {
  LlamaConfig config;
  config.dim = 8;
  config.hidden_dim = 12;
  config.layers = 2;
  config.heads = 2;
  config.kv_heads = 1;
  config.vocab_size = 10;
  config.max_context = 16;
  return config;
}

std::vector<char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A checkpoint file with this header followed by `floats` zeros.
void write_checkpoint(const std::string& path, const std::vector<std::int32_t>& header, std::size_t floats) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()), static_cast<std::streamsize>(header.size() * 4));
  const std::vector<float> zeros(floats);
  out.write(reinterpret_cast<const char*>(zeros.data()), static_cast<std::streamsize>(floats * 4));
}

// Floats after the header of a small_config() checkpoint with a shared classifier.
std::size_t small_checkpoint_floats() {
  const std::size_t dim = 8, hidden = 12, layers = 2, vocab = 10, kv_dim = 4, seq_len = 16, head = 4;
  return vocab * dim + layers * dim * 2 + layers * dim * dim * 2 + layers * kv_dim * dim * 2 +
         layers * hidden * dim * 3 + dim + seq_len * head / 2 * 2;
}

void check_same_weights(const LlamaWeights& a, const LlamaWeights& b) {
  CHECK(a.config.dim == b.config.dim);
  CHECK(a.config.hidden_dim == b.config.hidden_dim);
  CHECK(a.config.layers == b.config.layers);
  CHECK(a.config.heads == b.config.heads);
  CHECK(a.config.kv_heads == b.config.kv_heads);
  CHECK(a.config.vocab_size == b.config.vocab_size);
  CHECK(a.config.max_context == b.config.max_context);
  CHECK(a.shared_classifier == b.shared_classifier);
  CHECK(a.token_embedding == b.token_embedding);
  CHECK(a.attention_norm == b.attention_norm);
  CHECK(a.wq == b.wq);
  CHECK(a.wk == b.wk);
  CHECK(a.wv == b.wv);
  CHECK(a.wo == b.wo);
  CHECK(a.ffn_norm == b.ffn_norm);
  CHECK(a.w1 == b.w1);
  CHECK(a.w2 == b.w2);
  CHECK(a.w3 == b.w3);
  CHECK(a.final_norm == b.final_norm);
  CHECK(a.classifier == b.classifier);
  CHECK(a.fingerprint() == b.fingerprint());
}

TEST_CASE("a checkpoint with a shared classifier loads back with the same tensors and fingerprint") {
  LlamaWeights weights = make_seeded_weights(small_config(), 1);
  weights.shared_classifier = true;
  weights.classifier = weights.token_embedding;
  test::TempFile file("shared.bin"), again("shared-again.bin");
  REQUIRE(save_llama2c_checkpoint(weights, file.path()).has_value());
  CHECK(file_bytes(file.path()).size() == 28 + small_checkpoint_floats() * 4);

  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  check_same_weights(*loaded, weights);
  REQUIRE(save_llama2c_checkpoint(*loaded, again.path()).has_value());
  CHECK(file_bytes(again.path()) == file_bytes(file.path()));
}

TEST_CASE("a checkpoint with its own classifier loads back with the same tensors and fingerprint") {
  const LlamaWeights weights = make_seeded_weights(small_config(), 2);
  REQUIRE_FALSE(weights.shared_classifier);
  test::TempFile file("unshared.bin"), again("unshared-again.bin");
  REQUIRE(save_llama2c_checkpoint(weights, file.path()).has_value());
  const std::vector<char> bytes = file_bytes(file.path());
  REQUIRE(bytes.size() == 28 + (small_checkpoint_floats() + 10 * 8) * 4);
  std::int32_t vocab = 0;
  std::memcpy(&vocab, bytes.data() + 20, 4);
  CHECK(vocab == -10);  // llama2.c's mark of an unshared classifier

  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  check_same_weights(*loaded, weights);
  REQUIRE(save_llama2c_checkpoint(*loaded, again.path()).has_value());
  CHECK(file_bytes(again.path()) == bytes);
}

TEST_CASE("a truncated checkpoint is refused with the file's name and sizes") {
  test::TempFile file("truncated.bin");
  write_checkpoint(file.path(), {8, 12, 2, 2, 1, 10, 16}, small_checkpoint_floats() - 1);
  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find(file.path()) != std::string::npos);
  CHECK(loaded.error().find("truncated") != std::string::npos);
}

TEST_CASE("a checkpoint with bytes after its last tensor is refused") {
  test::TempFile file("long.bin");
  write_checkpoint(file.path(), {8, 12, 2, 2, 1, 10, 16}, small_checkpoint_floats() + 1);
  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("trailing bytes") != std::string::npos);
}

TEST_CASE("a file shorter than the header is refused") {
  test::TempFile file("header.bin");
  write_checkpoint(file.path(), {8, 12, 2}, 0);
  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("header") != std::string::npos);
}

TEST_CASE("a header with a zero or negative size is refused, naming the field") {
  test::TempFile file("zero.bin");
  write_checkpoint(file.path(), {8, 0, 2, 2, 1, 10, 16}, small_checkpoint_floats());
  auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("hidden_dim is 0") != std::string::npos);

  write_checkpoint(file.path(), {8, 12, -2, 2, 1, 10, 16}, small_checkpoint_floats());
  loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("n_layers -2") != std::string::npos);
}

TEST_CASE("a header whose heads do not divide dim or whose kv heads do not divide heads is refused") {
  test::TempFile file("heads.bin");
  write_checkpoint(file.path(), {8, 12, 2, 3, 1, 10, 16}, small_checkpoint_floats());
  auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("not a multiple of n_heads") != std::string::npos);

  write_checkpoint(file.path(), {8, 12, 2, 4, 3, 10, 16}, small_checkpoint_floats());
  loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("not a multiple of n_kv_heads") != std::string::npos);
}

TEST_CASE("a header that describes an enormous model is refused without reading on") {
  test::TempFile file("huge.bin");
  write_checkpoint(file.path(), {1 << 30, 1 << 30, 1 << 30, 1 << 20, 1 << 20, -(1 << 30), 1 << 30}, 4);
  const auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("GiB") != std::string::npos);
}

TEST_CASE("a missing checkpoint is an error naming the file") {
  const auto loaded = load_llama2c_checkpoint("/nonexistent/fmwire-model.bin");
  REQUIRE_FALSE(loaded.has_value());
  CHECK(loaded.error().find("/nonexistent/fmwire-model.bin") != std::string::npos);
}

TEST_CASE("seeded weights are the same for a seed and differ for another") {
  const LlamaWeights a = make_seeded_weights(small_config(), 7);
  const LlamaWeights b = make_seeded_weights(small_config(), 7);
  const LlamaWeights c = make_seeded_weights(small_config(), 8);
  CHECK(a.wq == b.wq);
  CHECK(a.fingerprint() == b.fingerprint());
  CHECK(a.wq != c.wq);
  CHECK(a.fingerprint() != c.fingerprint());
}

TEST_CASE("the fingerprint changes when one weight changes") {
  const LlamaWeights a = make_seeded_weights(small_config(), 7);
  LlamaWeights b = a;
  b.w2[5] += 1e-3f;
  CHECK(a.fingerprint() != b.fingerprint());
}

TEST_CASE("the built-in model has the byte-level vocabulary and grouped-query attention") {
  const LlamaConfig config = builtin_llama_config();
  CHECK(config.vocab_size == 259);
  CHECK(config.head_dim() == 16);
  CHECK(config.kv_dim() == 64);
  const LlamaWeights weights = make_seeded_weights(config, 0);
  CHECK(weights.wk.size() == std::size_t{4} * 64 * 128);
  CHECK(weights.classifier.size() == std::size_t{259} * 128);
}

}  // namespace
}  // namespace fmwire::engine
