// Gather and scatter of whole KV blocks between the paged cache and a dense
// staging buffer, both in device memory: the kernels behind CudaBackend's
// read_blocks and write_blocks (the DMA to and from pinned host memory is
// the caller's). A block is block_bytes contiguous bytes in either place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fmwire::engine::cuda {

// staging[i] = cache block blocks[i], for i < count. `blocks` is device memory.
cudaError_t launch_gather_blocks(std::byte* staging, const std::byte* cache, const std::uint32_t* blocks,
                                 std::uint32_t count, std::size_t block_bytes, cudaStream_t stream);

// cache block blocks[i] = staging[i], for i < count. A block id listed twice
// gets one of its two sources, unspecified which.
cudaError_t launch_scatter_blocks(std::byte* cache, const std::byte* staging, const std::uint32_t* blocks,
                                  std::uint32_t count, std::size_t block_bytes, cudaStream_t stream);

}  // namespace fmwire::engine::cuda
