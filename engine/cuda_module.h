// Finds the CUDA backend at run time. The backend lives in its own shared
// library (libfmwire_engine_cuda.so, engine/cuda/) that the engine opens with
// dlopen only when a model asks for a device: the CUDA runtime and cuBLAS
// map ~220 MB and cost ~0.5 CPU-s of relocation at every process start, which
// clients, gateways and routers linking the engine should not pay.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/llama_weights.h"
#include "engine/model_backend.h"

namespace fmwire::engine {

struct CudaProbe {
  bool available = false;
  // "CUDA: NVIDIA H100 80GB HBM3, compute 9.0, 132 SMs, 79.1 GiB, CUDA backend available"
  // or "CUDA: no device (cudaGetDeviceCount: ...), CUDA backend skipped".
  std::string log_line;
};

// The module's entry points (engine/cuda/cuda_module_entry.cpp).
struct CudaModule {
  CudaProbe (*probe)();
  // CudaBackend's constructor: throws as it does.
  std::unique_ptr<ModelBackend> (*make_backend)(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks,
                                                std::uint32_t block_tokens, protocol::DType kv_dtype);
};

// The symbol the module exports: `const CudaModule* fmwire_cuda_module()`.
inline constexpr const char* kCudaModuleEntry = "fmwire_cuda_module";

struct CudaModuleLoad {
  const CudaModule* module = nullptr;  // null: `problem` says why
  std::string problem;                  // "not built ...", or dlopen's error
};

// Where the module is, without opening it: $FMWIRE_CUDA_MODULE when set;
// else the first that exists of <libdir>/fmwire/ as installed (beside the
// shared libfmwire holding this code, or from the executable's bin/),
// beside the executable, and where the build put it (uninstalled runs).
// Empty with `problem` saying where it looked when none is there.
struct CudaModuleFile {
  std::string path;
  std::string problem;
};
CudaModuleFile find_cuda_module();

// Opens the module found by find_cuda_module() once per process (later
// calls return the first answer).
const CudaModuleLoad& cuda_module();

struct CudaChoice {
  const CudaModule* module = nullptr;  // set when a device is usable
  std::string log_line;                // one line for the log, "CUDA: ..."
};

// Whether this process can run the CUDA backend. Without the NVIDIA driver
// (libcuda.so.1) the answer is no without opening the module at all.
CudaChoice choose_cuda();

}  // namespace fmwire::engine
