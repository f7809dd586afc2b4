#include "engine/model_loader.h"

#include <algorithm>
#include <filesystem>

#include "engine/batching_engine.h"
#include "engine/cpu_backend.h"
#include "engine/cuda_module.h"
#include "engine/llama_weights.h"
#include "engine/synthetic_backend.h"

namespace fmwire::engine {
namespace {

using Loaded = codec::Result<LoadedModel, std::string>;

std::uint32_t blocks_in(std::uint64_t memory_mib, std::size_t bytes_per_block) {
  const std::uint64_t blocks = (memory_mib << 20) / bytes_per_block;
  return static_cast<std::uint32_t>(std::clamp<std::uint64_t>(blocks, 1, 1u << 24));
}

Loaded load_synthetic(const ModelSpec& spec, std::string_view name, protocol::DType kv_dtype) {
  auto model = synthetic_model(name);
  if (!model) {
    std::string known;
    for (const std::string& each : synthetic_model_names()) known += (known.empty() ? "" : ", ") + each;
    return std::string("unknown synthetic model '") + std::string(name) + "'; known: " + known;
  }
  model->kv.block_tokens = spec.block_tokens;
  model->kv.set_dtype(kv_dtype);
  if (spec.step_time) model->step_time = *spec.step_time;
  if (spec.prefill_time_per_token) model->prefill_time_per_token = *spec.prefill_time_per_token;
  if (spec.max_context) model->max_context = *spec.max_context;
  const std::uint32_t blocks = spec.kv_blocks != 0 ? spec.kv_blocks : blocks_in(spec.kv_memory_mib, model->kv.bytes_per_block());
  LoadedModel loaded;
  loaded.tokenizer = std::make_unique<Tokenizer>(Tokenizer::byte_level());
  loaded.log_lines.push_back("model synthetic:" + model->name + ": " + std::to_string(model->kv.bytes_per_token()) +
                             " bytes of KV per token (" + std::string(kv_dtype_name(kv_dtype)) + "), step " + std::to_string(model->step_time.count()) + " us + " +
                             std::to_string(model->prefill_time_per_token.count()) + " ns per prompt token, " +
                             std::to_string(blocks) + " KV blocks of " + std::to_string(spec.block_tokens) + " tokens, context " +
                             std::to_string(model->max_context) + " tokens");
  EngineInfo info;
  info.model_name = "synthetic:" + model->name;
  info.eos_token = Tokenizer::kEos;
  info.model_fingerprint = std::hash<std::string>{}(info.model_name);
  loaded.engine = std::make_unique<BatchingEngine>(
      std::move(info), std::make_unique<SyntheticBackend>(std::move(*model), blocks), spec.batching);
  return loaded;
}

}  // namespace

Loaded load_model(const ModelSpec& spec) {
  if (spec.block_tokens == 0 || spec.block_tokens > 1024) {
    return std::string("block size of ") + std::to_string(spec.block_tokens) + " tokens: it must be 1 to 1024";
  }
  if (spec.device != "auto" && spec.device != "cpu" && spec.device != "cuda") {
    return "unknown device '" + spec.device + "': auto, cpu or cuda";
  }
  const std::optional<protocol::DType> kv_dtype = parse_kv_dtype(spec.kv_dtype);
  if (!kv_dtype) return "unknown KV dtype '" + spec.kv_dtype + "' (--kv-dtype): f16, bf16 or f32";
  if (spec.model.starts_with("synthetic:")) {
    return load_synthetic(spec, std::string_view(spec.model).substr(10), *kv_dtype);
  }

  LoadedModel loaded;
  std::shared_ptr<LlamaWeights> weights;
  std::string model_name;
  if (spec.model == "builtin") {
    weights = std::make_shared<LlamaWeights>(make_seeded_weights(builtin_llama_config(), 1));
    loaded.tokenizer = std::make_unique<Tokenizer>(Tokenizer::byte_level());
    model_name = "builtin";
  } else {
    auto read = load_llama2c_checkpoint(spec.model);
    if (!read) return read.error();
    weights = std::make_shared<LlamaWeights>(std::move(*read));
    std::string tokenizer_path = spec.tokenizer;
    if (tokenizer_path.empty()) {
      tokenizer_path = (std::filesystem::path(spec.model).parent_path() / "tokenizer.bin").string();
      if (!std::filesystem::exists(tokenizer_path) && weights->config.vocab_size == 259) tokenizer_path.clear();
    }
    if (tokenizer_path.empty()) {
      loaded.tokenizer = std::make_unique<Tokenizer>(Tokenizer::byte_level());
    } else {
      auto tokenizer = Tokenizer::load_llama2c(tokenizer_path, weights->config.vocab_size);
      if (!tokenizer) return tokenizer.error() + " (give the checkpoint's tokenizer with --tokenizer)";
      loaded.tokenizer = std::make_unique<Tokenizer>(std::move(*tokenizer));
    }
    model_name = std::filesystem::path(spec.model).filename().string();
  }
  const LlamaConfig& config = weights->config;
  loaded.log_lines.push_back("model " + model_name + ": dim " + std::to_string(config.dim) + ", " +
                             std::to_string(config.layers) + " layers, " + std::to_string(config.heads) + " heads (" +
                             std::to_string(config.kv_heads) + " KV), vocabulary " + std::to_string(config.vocab_size) +
                             ", context " + std::to_string(config.max_context));
  EngineInfo info;
  info.model_name = model_name;
  info.eos_token = Tokenizer::kEos;
  info.model_fingerprint = weights->fingerprint();

  std::unique_ptr<ModelBackend> backend;
  KvGeometry geometry;  // to size the cache; the backend makes its own
  geometry.layers = config.layers;
  geometry.kv_heads = config.kv_heads;
  geometry.head_dim = config.head_dim();
  geometry.block_tokens = spec.block_tokens;
  geometry.set_dtype(*kv_dtype);
  const std::uint32_t blocks =
      spec.kv_blocks != 0 ? spec.kv_blocks : blocks_in(spec.kv_memory_mib, geometry.bytes_per_block());
  if (spec.device != "cpu") {
    const CudaChoice cuda = choose_cuda();
    loaded.log_lines.push_back(cuda.log_line);
    if (cuda.module != nullptr) {
      backend = cuda.module->make_backend(weights, blocks, spec.block_tokens, *kv_dtype);
    } else if (spec.device == "cuda") {
      return "--device cuda: " + cuda.log_line;
    }
  }
  if (!backend) backend = std::make_unique<CpuBackend>(weights, blocks, spec.block_tokens, *kv_dtype);
  loaded.log_lines.push_back(backend->name() + " backend, " + std::to_string(blocks) + " KV blocks of " +
                             std::to_string(spec.block_tokens) + " tokens, KV in " +
                             std::string(kv_dtype_name(*kv_dtype)) + " (" +
                             std::to_string(backend->kv_geometry().bytes_per_token()) + " bytes per token)");
  loaded.engine = std::make_unique<BatchingEngine>(std::move(info), std::move(backend), spec.batching);
  return loaded;
}

}  // namespace fmwire::engine
