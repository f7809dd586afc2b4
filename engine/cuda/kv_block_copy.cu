// One grid-stride loop over every word of every listed block: consecutive
// threads copy consecutive words of a block, so both sides are coalesced.
// 16-byte words when the block size allows it (it does for any head_dim and
// block_tokens that are multiples of 4), 4-byte words otherwise.
#include "engine/cuda/kv_block_copy.h"

namespace fmwire::engine::cuda {
namespace {

constexpr unsigned kThreads = 256;

unsigned grid_for(std::size_t count) {
  const std::size_t blocks = (count + kThreads - 1) / kThreads;
  constexpr std::size_t kMaxBlocks = 1u << 16;
  return static_cast<unsigned>(blocks == 0 ? 1 : (blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

// kGather: to[i] = from[blocks[i]]; otherwise to[blocks[i]] = from[i].
template <bool kGather, typename Word>
__global__ void copy_blocks_kernel(Word* to, const Word* from, const std::uint32_t* blocks, std::uint32_t count,
                                   std::size_t words_per_block) {
  const std::size_t total = std::size_t{count} * words_per_block;
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t listed = i / words_per_block;
    const std::size_t word = i % words_per_block;
    const std::size_t cached = std::size_t{blocks[listed]} * words_per_block + word;
    if constexpr (kGather) {
      to[i] = from[cached];
    } else {
      to[cached] = from[i];
    }
  }
}

template <bool kGather>
cudaError_t launch_copy_blocks(std::byte* to, const std::byte* from, const std::uint32_t* blocks,
                               std::uint32_t count, std::size_t block_bytes, cudaStream_t stream) {
  if (count == 0 || block_bytes == 0) return cudaSuccess;
  if (block_bytes % sizeof(uint4) == 0) {
    const std::size_t words = block_bytes / sizeof(uint4);
    copy_blocks_kernel<kGather><<<grid_for(count * words), kThreads, 0, stream>>>(
        reinterpret_cast<uint4*>(to), reinterpret_cast<const uint4*>(from), blocks, count, words);
  } else if (block_bytes % sizeof(std::uint32_t) == 0) {
    const std::size_t words = block_bytes / sizeof(std::uint32_t);
    copy_blocks_kernel<kGather><<<grid_for(count * words), kThreads, 0, stream>>>(
        reinterpret_cast<std::uint32_t*>(to), reinterpret_cast<const std::uint32_t*>(from), blocks, count, words);
  } else {
    return cudaErrorInvalidValue;  // float32 blocks are always whole 4-byte words
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_blocks(std::byte* staging, const std::byte* cache, const std::uint32_t* blocks,
                                 std::uint32_t count, std::size_t block_bytes, cudaStream_t stream) {
  return launch_copy_blocks<true>(staging, cache, blocks, count, block_bytes, stream);
}

cudaError_t launch_scatter_blocks(std::byte* cache, const std::byte* staging, const std::uint32_t* blocks,
                                  std::uint32_t count, std::size_t block_bytes, cudaStream_t stream) {
  return launch_copy_blocks<false>(cache, staging, blocks, count, block_bytes, stream);
}

}  // namespace fmwire::engine::cuda
