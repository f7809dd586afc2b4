#include "engine/llama_weights.h"

#include <xxhash.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace fmwire::engine {

LlamaConfig builtin_llama_config() {
  LlamaConfig config;
  config.dim = 128;
  config.hidden_dim = 384;
  config.layers = 4;
  config.heads = 8;
  config.kv_heads = 4;
  config.vocab_size = 259;  // Tokenizer::byte_level()
  config.max_context = 1024;
  return config;
}

namespace {

// No real checkpoint this code is meant for comes near it (Llama-2-7B in
// float32 is about 27 GB and llama2.c's legacy export is for small models);
// it keeps a corrupt header from asking for an absurd allocation.
constexpr std::uint64_t kMaxCheckpointBytes = std::uint64_t{16} << 30;
constexpr std::size_t kHeaderBytes = 7 * sizeof(std::int32_t);

// Saturating arithmetic: sizes computed from an untrusted header never wrap,
// they only become too large.
std::uint64_t saturating_multiply(std::uint64_t a, std::uint64_t b) {
  std::uint64_t product = 0;
  return __builtin_mul_overflow(a, b, &product) ? std::numeric_limits<std::uint64_t>::max() : product;
}

std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) {
  std::uint64_t sum = 0;
  return __builtin_add_overflow(a, b, &sum) ? std::numeric_limits<std::uint64_t>::max() : sum;
}

// The tensors from the token embedding to the final norm, in file order, with
// their element counts for `config` (which must have passed check_config).
template <typename Weights>  // LlamaWeights or const LlamaWeights
auto body_tensors(Weights& weights) {
  const LlamaConfig& c = weights.config;
  const std::uint64_t dim = c.dim, hidden = c.hidden_dim, layers = c.layers, vocab = c.vocab_size,
                      kv_dim = c.kv_dim();
  struct Tensor {
    const char* name;
    decltype(&weights.wq) data;
    std::uint64_t count;
  };
  return std::array<Tensor, 11>{{
      {"token_embedding", &weights.token_embedding, vocab * dim},
      {"attention_norm", &weights.attention_norm, layers * dim},
      {"wq", &weights.wq, layers * dim * dim},
      {"wk", &weights.wk, layers * kv_dim * dim},
      {"wv", &weights.wv, layers * kv_dim * dim},
      {"wo", &weights.wo, layers * dim * dim},
      {"ffn_norm", &weights.ffn_norm, layers * dim},
      {"w1", &weights.w1, layers * hidden * dim},
      {"w2", &weights.w2, layers * dim * hidden},
      {"w3", &weights.w3, layers * hidden * dim},
      {"final_norm", &weights.final_norm, dim},
  }};
}

// llama2.c's freq_cis_real/imag tables: [max_context][head_dim / 2] each.
std::uint64_t rope_table_floats(const LlamaConfig& config) {
  return saturating_multiply(config.max_context, config.head_dim() / 2);
}

// Float32 elements a checkpoint of `config` holds after its header, or
// uint64 max when that does not fit in 64 bits.
std::uint64_t checkpoint_floats(const LlamaConfig& config, bool shared_classifier) {
  const std::uint64_t dim = config.dim, hidden = config.hidden_dim, layers = config.layers,
                      vocab = config.vocab_size, kv_dim = config.kv_dim();
  auto product = [](std::initializer_list<std::uint64_t> factors) {
    std::uint64_t result = 1;
    for (std::uint64_t factor : factors) result = saturating_multiply(result, factor);
    return result;
  };
  std::uint64_t total = 0;
  for (std::uint64_t part : {
           product({vocab, dim}),              // token_embedding
           product({layers, dim, 2}),          // attention_norm, ffn_norm
           product({layers, dim, dim, 2}),     // wq, wo
           product({layers, kv_dim, dim, 2}),  // wk, wv
           product({layers, hidden, dim, 3}),  // w1, w2, w3
           dim,                                // final_norm
           product({rope_table_floats(config), 2}),
           shared_classifier ? 0 : product({vocab, dim}),
       }) {
    total = saturating_add(total, part);
  }
  return total;
}

// Empty when `config` describes a model this code can run.
std::string check_config(const LlamaConfig& config) {
  const std::pair<const char*, std::uint32_t> sizes[] = {
      {"dim", config.dim},       {"hidden_dim", config.hidden_dim}, {"n_layers", config.layers},
      {"n_heads", config.heads}, {"n_kv_heads", config.kv_heads},   {"vocab_size", config.vocab_size},
      {"seq_len", config.max_context}};
  for (const auto& [name, value] : sizes) {
    if (value == 0) return std::string(name) + " is 0; every size must be positive";
  }
  if (config.dim % config.heads != 0) {
    return "dim " + std::to_string(config.dim) + " is not a multiple of n_heads " + std::to_string(config.heads);
  }
  if (config.heads % config.kv_heads != 0) {
    return "n_heads " + std::to_string(config.heads) + " is not a multiple of n_kv_heads " +
           std::to_string(config.kv_heads);
  }
  if (config.head_dim() % 2 != 0) {
    return "head size " + std::to_string(config.head_dim()) + " is odd; RoPE rotates pairs";
  }
  return {};
}

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// splitmix64 (Steele, Lea, Flood 2014): one 64-bit state, a fixed sequence
// on every platform.
class SeededStream {
 public:
  explicit SeededStream(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // Approximately standard normal: the sum of four uniforms on [0, 1) has
  // mean 2 and variance 1/3 (Irwin-Hall), so it is centred and scaled by
  // sqrt(3). Only additions and multiplications of exactly representable
  // values: bit-identical everywhere, unlike std::normal_distribution.
  float normal() {
    float sum = 0.0f;
    for (int i = 0; i < 4; ++i) sum += static_cast<float>(next() >> 40) * 0x1.0p-24f;
    return (sum - 2.0f) * 1.7320508f;
  }

 private:
  std::uint64_t state_;
};

void fill_normal(std::vector<float>& tensor, std::uint64_t count, float scale, SeededStream& stream) {
  tensor.resize(count);
  for (float& value : tensor) value = stream.normal() * scale;
}

}  // namespace

std::uint64_t LlamaWeights::fingerprint() const {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  if (state == nullptr) throw std::bad_alloc();
  XXH3_64bits_reset(state.get());
  const std::uint32_t header[] = {config.dim,
                                  config.hidden_dim,
                                  config.layers,
                                  config.heads,
                                  config.kv_heads,
                                  config.vocab_size,
                                  config.max_context,
                                  std::bit_cast<std::uint32_t>(config.rope_theta),
                                  std::bit_cast<std::uint32_t>(config.norm_epsilon),
                                  shared_classifier ? 1u : 0u};
  XXH3_64bits_update(state.get(), header, sizeof header);
  auto add_tensor = [&](const std::vector<float>& tensor) {
    const std::uint64_t count = tensor.size();  // so that moving a float between tensors changes it
    XXH3_64bits_update(state.get(), &count, sizeof count);
    if (!tensor.empty()) XXH3_64bits_update(state.get(), tensor.data(), tensor.size() * sizeof(float));
  };
  for (const auto& tensor : body_tensors(*this)) add_tensor(*tensor.data);
  add_tensor(classifier);
  return XXH3_64bits_digest(state.get());
}

codec::Result<LlamaWeights, std::string> load_llama2c_checkpoint(const std::string& path) {
  auto fail = [&](const std::string& problem) { return "checkpoint " + path + ": " + problem; };

  std::error_code error;
  const std::uintmax_t file_bytes = std::filesystem::file_size(path, error);
  if (error) return fail(error.message());
  File file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) return fail(std::system_category().message(errno));
  if (file_bytes < kHeaderBytes) {
    return fail("file of " + std::to_string(file_bytes) + " bytes is shorter than the " +
                std::to_string(kHeaderBytes) + "-byte header");
  }
  std::int32_t header[7];
  if (std::fread(header, sizeof header, 1, file.get()) != 1) return fail("cannot read the header");
  const char* const names[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    // vocab_size alone may be negative (an unshared classifier follows).
    if (header[i] < 0 && !(i == 5 && header[i] != std::numeric_limits<std::int32_t>::min())) {
      return fail(std::string("header says ") + names[i] + " " + std::to_string(header[i]) +
                  "; sizes must be positive");
    }
  }

  LlamaWeights weights;
  LlamaConfig& config = weights.config;
  config.dim = static_cast<std::uint32_t>(header[0]);
  config.hidden_dim = static_cast<std::uint32_t>(header[1]);
  config.layers = static_cast<std::uint32_t>(header[2]);
  config.heads = static_cast<std::uint32_t>(header[3]);
  config.kv_heads = static_cast<std::uint32_t>(header[4]);
  config.vocab_size = static_cast<std::uint32_t>(header[5] < 0 ? -header[5] : header[5]);
  config.max_context = static_cast<std::uint32_t>(header[6]);
  weights.shared_classifier = header[5] > 0;
  if (std::string problem = check_config(config); !problem.empty()) return fail(problem);

  const std::uint64_t floats = checkpoint_floats(config, weights.shared_classifier);
  const std::uint64_t expected_bytes = saturating_add(kHeaderBytes, saturating_multiply(floats, sizeof(float)));
  if (expected_bytes > kMaxCheckpointBytes) {
    return fail("header describes a model of more than " + std::to_string(kMaxCheckpointBytes >> 30) +
                " GiB; refused");
  }
  if (file_bytes != expected_bytes) {
    return fail("file has " + std::to_string(file_bytes) + " bytes, the header (dim " + std::to_string(config.dim) +
                ", " + std::to_string(config.layers) + " layers, vocab " + std::to_string(config.vocab_size) +
                (weights.shared_classifier ? ", shared" : ", unshared") + " classifier) implies " +
                std::to_string(expected_bytes) + (file_bytes < expected_bytes ? ": truncated" : ": trailing bytes"));
  }

  auto read_floats = [&](std::vector<float>& tensor, std::uint64_t count) {
    tensor.resize(count);
    return count == 0 || std::fread(tensor.data(), sizeof(float), count, file.get()) == count;
  };
  for (const auto& tensor : body_tensors(weights)) {
    if (!read_floats(*tensor.data, tensor.count)) return fail(std::string("cannot read ") + tensor.name);
  }
  // The RoPE tables: run.c computes the rotation itself, and so do we.
  if (std::fseek(file.get(), static_cast<long>(rope_table_floats(config) * 2 * sizeof(float)), SEEK_CUR) != 0) {
    return fail("cannot skip the freq_cis tables");
  }
  if (weights.shared_classifier) {
    weights.classifier = weights.token_embedding;
  } else if (!read_floats(weights.classifier, std::uint64_t{config.vocab_size} * config.dim)) {
    return fail("cannot read the classifier");
  }
  return weights;
}

codec::Result<codec::Done, std::string> save_llama2c_checkpoint(const LlamaWeights& weights, const std::string& path) {
  auto fail = [&](const std::string& problem) { return "checkpoint " + path + ": " + problem; };
  const LlamaConfig& config = weights.config;
  if (std::string problem = check_config(config); !problem.empty()) return fail(problem);
  for (std::uint32_t size : {config.dim, config.hidden_dim, config.layers, config.heads, config.kv_heads,
                             config.vocab_size, config.max_context}) {
    if (size > static_cast<std::uint32_t>(std::numeric_limits<std::int32_t>::max())) {
      return fail("size " + std::to_string(size) + " does not fit the int32 header");
    }
  }
  if (saturating_multiply(checkpoint_floats(config, weights.shared_classifier), sizeof(float)) >
      kMaxCheckpointBytes) {
    return fail("model of more than " + std::to_string(kMaxCheckpointBytes >> 30) + " GiB; refused");
  }
  for (const auto& tensor : body_tensors(weights)) {
    if (tensor.data->size() != tensor.count) {
      return fail(std::string(tensor.name) + " has " + std::to_string(tensor.data->size()) +
                  " elements, the config implies " + std::to_string(tensor.count));
    }
  }
  const std::uint64_t classifier_count = std::uint64_t{config.vocab_size} * config.dim;
  if (!weights.shared_classifier && weights.classifier.size() != classifier_count) {
    return fail("classifier has " + std::to_string(weights.classifier.size()) + " elements, the config implies " +
                std::to_string(classifier_count));
  }

  File file(std::fopen(path.c_str(), "wb"));
  if (file == nullptr) return fail(std::system_category().message(errno));
  auto write = [&](const void* data, std::size_t element_bytes, std::size_t count) {
    return count == 0 || std::fwrite(data, element_bytes, count, file.get()) == count;
  };
  const std::int32_t vocab = static_cast<std::int32_t>(config.vocab_size);
  const std::int32_t header[7] = {static_cast<std::int32_t>(config.dim),
                                  static_cast<std::int32_t>(config.hidden_dim),
                                  static_cast<std::int32_t>(config.layers),
                                  static_cast<std::int32_t>(config.heads),
                                  static_cast<std::int32_t>(config.kv_heads),
                                  weights.shared_classifier ? vocab : -vocab,
                                  static_cast<std::int32_t>(config.max_context)};
  bool ok = write(header, sizeof header, 1);
  for (const auto& tensor : body_tensors(weights)) {
    ok = ok && write(tensor.data->data(), sizeof(float), tensor.data->size());
  }
  // freq_cis_real then freq_cis_imag, as llama2.c's export computes them
  // (run.c ignores them; other readers may not).
  const std::uint32_t half = config.head_dim() / 2;
  for (int imaginary = 0; imaginary < 2 && ok; ++imaginary) {
    for (std::uint32_t position = 0; position < config.max_context && ok; ++position) {
      for (std::uint32_t i = 0; i < half && ok; ++i) {
        const float frequency =
            1.0f / std::pow(config.rope_theta, static_cast<float>(2 * i) / static_cast<float>(config.head_dim()));
        const float angle = static_cast<float>(position) * frequency;
        const float value = imaginary ? std::sin(angle) : std::cos(angle);
        ok = write(&value, sizeof value, 1);
      }
    }
  }
  if (!weights.shared_classifier) ok = ok && write(weights.classifier.data(), sizeof(float), classifier_count);
  if (!ok) return fail("write failed: " + std::system_category().message(errno));
  if (std::fclose(file.release()) != 0) return fail("close failed: " + std::system_category().message(errno));
  return codec::Done{};
}

LlamaWeights make_seeded_weights(const LlamaConfig& config, std::uint64_t seed) {
  if (std::string problem = check_config(config); !problem.empty()) {
    throw std::invalid_argument("seeded weights: " + problem);
  }
  LlamaWeights weights;
  weights.config = config;
  SeededStream stream(seed);
  const float dim = static_cast<float>(config.dim);
  const float hidden = static_cast<float>(config.hidden_dim);
  const std::uint64_t layers = config.layers;

  // Matrices have standard deviation 1/sqrt(inputs), so every product keeps
  // its input's scale; the embedding is unit-scale, and the norms are 1.
  // Queries and keys are three times that: attention scores nine times as
  // spread, so each head looks at a few positions rather than averaging them
  // all. With evenly spread attention the decoder soon settles into a cycle
  // and greedy text repeats two or three bytes for ever.
  constexpr float kQueryKeyGain = 3.0f;
  fill_normal(weights.token_embedding, std::uint64_t{config.vocab_size} * config.dim, 1.0f, stream);
  weights.attention_norm.assign(layers * config.dim, 1.0f);
  fill_normal(weights.wq, layers * config.dim * config.dim, kQueryKeyGain / std::sqrt(dim), stream);
  fill_normal(weights.wk, layers * config.kv_dim() * config.dim, kQueryKeyGain / std::sqrt(dim), stream);
  fill_normal(weights.wv, layers * config.kv_dim() * config.dim, 1.0f / std::sqrt(dim), stream);
  fill_normal(weights.wo, layers * config.dim * config.dim, 1.0f / std::sqrt(dim), stream);
  weights.ffn_norm.assign(layers * config.dim, 1.0f);
  fill_normal(weights.w1, layers * config.hidden_dim * config.dim, 1.0f / std::sqrt(dim), stream);
  fill_normal(weights.w2, layers * config.dim * config.hidden_dim, 1.0f / std::sqrt(hidden), stream);
  fill_normal(weights.w3, layers * config.hidden_dim * config.dim, 1.0f / std::sqrt(dim), stream);
  weights.final_norm.assign(config.dim, 1.0f);

  // An unshared classifier: a tied one scores the current token's own
  // embedding highest, and greedy decoding repeats one byte forever.
  fill_normal(weights.classifier, std::uint64_t{config.vocab_size} * config.dim, 1.0f / std::sqrt(dim), stream);
  weights.shared_classifier = false;

  // With the byte-level vocabulary (Tokenizer::byte_level: 0 <unk>, 1 <s>,
  // 2 </s>, byte b as 3 + b), make the text look like text. A classifier
  // row's scale is the spread of its logits: lowercase letters and space get
  // the widest, so they win most often; other printable ASCII and newline
  // less; EOS less again (a sampled sequence ends now and then, greedy
  // rarely); bytes outside printable ASCII a tenth (at temperature 1 they
  // are drawn about once in a hundred tokens: seldom a broken UTF-8
  // character); <unk> and <s> none.
  if (config.vocab_size == 259) {
    for (std::uint32_t token = 0; token < config.vocab_size; ++token) {
      float scale = 0.1f;
      if (token < 2) {
        scale = 0.0f;
      } else if (token == 2) {
        scale = 2.0f;
      } else if (const std::uint32_t byte = token - 3; byte == ' ' || (byte >= 'a' && byte <= 'z')) {
        scale = 4.0f;
      } else if ((byte > 0x20 && byte < 0x7f) || byte == '\n') {
        scale = 3.0f;
      }
      float* row = weights.classifier.data() + std::size_t{token} * config.dim;
      for (std::uint32_t i = 0; i < config.dim; ++i) row[i] *= scale;
    }
  }
  return weights;
}

}  // namespace fmwire::engine
