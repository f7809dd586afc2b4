// Whether this process can use a CUDA device, and one line for the log
// saying which device, or why the CUDA backend is skipped. Safe to call on a
// machine with no GPU and no driver: the CUDA runtime is linked, and its
// failure to find a driver is the answer, not an error.
#pragma once

#include "engine/cuda_module.h"  // CudaProbe

namespace fmwire::engine {

// Looks at device 0, the one CudaBackend uses.
CudaProbe probe_cuda();

}  // namespace fmwire::engine
