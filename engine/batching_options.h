// How the built-in BatchingEngine (batching_engine.h) batches: tokens a
// step, sequences at once, the prefix cache. Apart from the engine so that
// model_loader.h, in the SDK, can take it without the engine's internals.
#pragma once

#include <cstdint>

namespace fmwire::engine {

struct BatchingOptions {
  std::uint32_t max_batch_tokens = 256;  // tokens the model runs per step, at most
  std::uint32_t max_running = 64;        // sequences admitted at once
  bool prefix_cache = true;
};

}  // namespace fmwire::engine
