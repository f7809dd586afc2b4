// Makes the Engine a worker serves from its command line's words: the
// built-in model, a llama2.c checkpoint, or a synthetic model, on the CPU or
// on CUDA (where a GPU is; otherwise the CPU, with a log line saying so).
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "engine/batching_options.h"
#include "engine/engine.h"
#include "engine/tokenizer.h"

namespace fmwire::engine {

struct ModelSpec {
  std::string model = "builtin";   // builtin | PATH to a llama2.c .bin | synthetic:NAME
  std::string tokenizer;           // llama2.c tokenizer.bin; default: tokenizer.bin beside the checkpoint
  std::string device = "auto";     // auto | cpu | cuda
  std::string kv_dtype = "f16";    // f16 | bf16 | f32: the KV cache's element type, hence the KV bytes on the wire
  std::uint32_t kv_blocks = 0;     // 0: as many as kv_memory_mib holds
  std::uint64_t kv_memory_mib = 256;
  std::uint32_t block_tokens = 16;
  BatchingOptions batching;
  // Synthetic models' timing, instead of the named model's.
  std::optional<std::chrono::microseconds> step_time;
  std::optional<std::chrono::nanoseconds> prefill_time_per_token;
  // Synthetic models' context length, instead of the named model's (Llama-3.1
  // has Llama-3's KV geometry and 128K tokens of context).
  std::optional<std::uint32_t> max_context;
};

struct LoadedModel {
  std::unique_ptr<Tokenizer> tokenizer;  // declared first: the engine may refer to it
  std::unique_ptr<Engine> engine;
  std::vector<std::string> log_lines;    // what was chosen and why, for the start-up log
};

// Errors name what is wrong: an unknown synthetic model or KV dtype, an
// unreadable checkpoint, a missing tokenizer, CUDA asked for where there is none.
codec::Result<LoadedModel, std::string> load_model(const ModelSpec& spec);

}  // namespace fmwire::engine
