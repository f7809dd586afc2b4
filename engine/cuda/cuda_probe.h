// Whether this process can use a CUDA device, and one line for the log
// saying which device, or why the CUDA backend is skipped. Safe to call on a
// machine with no GPU and no driver: the CUDA runtime is linked, and its
// failure to find a driver is the answer, not an error.
#pragma once

#include <string>

namespace fmwire::engine {

struct CudaProbe {
  bool available = false;
  // "CUDA: NVIDIA H100 80GB HBM3, compute 9.0, 132 SMs, 79.1 GiB, CUDA backend available"
  // or "CUDA: no device (cudaGetDeviceCount: ...), CUDA backend skipped".
  std::string log_line;
};

// Looks at device 0, the one CudaBackend uses.
CudaProbe probe_cuda();

}  // namespace fmwire::engine
