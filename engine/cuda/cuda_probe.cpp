#include "engine/cuda/cuda_probe.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>

namespace fmwire::engine {
namespace {

// The kernels are built for sm_80 and sm_90 (and compute_90 PTX for newer
// devices): older devices have no image to run.
constexpr int kOldestComputeMajor = 8;

}  // namespace

CudaProbe probe_cuda() {
  int devices = 0;
  if (cudaError_t error = cudaGetDeviceCount(&devices); error != cudaSuccess || devices == 0) {
    // Clear the error so that a later runtime call does not report it again.
    (void)cudaGetLastError();
    const std::string why = error != cudaSuccess ? std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error)
                                                 : std::string("no devices");
    return {false, "CUDA: no device (cudaGetDeviceCount: " + why + "), CUDA backend skipped"};
  }
  cudaDeviceProp properties{};
  if (cudaError_t error = cudaGetDeviceProperties(&properties, 0); error != cudaSuccess) {
    (void)cudaGetLastError();
    return {false, std::string("CUDA: device 0 unreadable (cudaGetDeviceProperties: ") + cudaGetErrorString(error) +
                       "), CUDA backend skipped"};
  }
  char memory[32];
  std::snprintf(memory, sizeof memory, "%.1f GiB",
                static_cast<double>(properties.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  const std::string summary = std::string("CUDA: ") + properties.name + ", compute " + std::to_string(properties.major) +
                              "." + std::to_string(properties.minor) + ", " +
                              std::to_string(properties.multiProcessorCount) + " SMs, " + memory;
  if (properties.major < kOldestComputeMajor) {
    return {false, summary + ", older than the compute 8.0 the kernels are built for, CUDA backend skipped"};
  }
  return {true, summary + ", CUDA backend available"};
}

}  // namespace fmwire::engine
