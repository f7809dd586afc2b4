// The entry point engine/cuda_module.cpp looks up with dlsym.
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_probe.h"
#include "engine/cuda_module.h"

namespace {

std::unique_ptr<fmwire::engine::ModelBackend> make_backend(std::shared_ptr<const fmwire::engine::LlamaWeights> weights,
                                                           std::uint32_t kv_blocks, std::uint32_t block_tokens,
                                                           fmwire::protocol::DType kv_dtype) {
  return std::make_unique<fmwire::engine::CudaBackend>(std::move(weights), kv_blocks, block_tokens, kv_dtype);
}

constexpr fmwire::engine::CudaModule kModule{&fmwire::engine::probe_cuda, &make_backend};

}  // namespace

extern "C" __attribute__((visibility("default"))) const fmwire::engine::CudaModule* fmwire_cuda_module() {
  return &kModule;
}
