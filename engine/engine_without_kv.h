// A base for Engines that keep no KV cache to move (a model behind another
// API, a test double): every KV transfer call is refused with a message
// naming the engine, so a subclass writes only submit, step, cancel,
// set_paused, has_work, stats and info. See examples/custom_engine.cpp.
#pragma once

#include <string>

#include "engine/engine.h"

namespace fmwire::engine {

class EngineWithoutKv : public Engine {
 public:
  EngineResult<codec::Done> submit_with_kv(SequenceId, SequenceRequest, const KvShard&) override { return refused(); }
  EngineResult<KvShard> export_kv(SequenceId) override { return refused(); }
  EngineResult<std::uint32_t> computed_tokens(SequenceId) const override { return refused(); }
  EngineResult<codec::Done> read_kv(SequenceId, std::uint32_t, std::uint32_t, std::span<std::byte>) override {
    return refused();
  }
  void release_kv(SequenceId) override {}  // never a held sequence
  EngineResult<Held> hold(SequenceId) override { return refused(); }
  EngineResult<codec::Done> prepare_import(SequenceId, SequenceRequest, const KvImport&) override { return refused(); }
  EngineResult<codec::Done> write_import(SequenceId, std::uint32_t, std::span<const std::byte>) override {
    return refused();
  }
  EngineResult<codec::Done> commit_import(SequenceId, std::span<const std::uint32_t>) override { return refused(); }
  std::vector<std::uint64_t> cached_prefixes() const override { return {}; }

 private:
  EngineError refused() const {
    return EngineError{"engine '" + info().model_name + "' keeps no KV cache to transfer"};
  }
};

}  // namespace fmwire::engine
