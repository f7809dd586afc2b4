// The compute half of an engine: runs the model over one step's batch and
// owns the KV cache's storage (host memory, device memory, or none worth
// computing for the synthetic model). Which block holds what is decided by
// the scheduler (BatchingEngine with KvBlockPool); a backend only reads and
// writes the blocks it is told to.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "engine/kv_geometry.h"

namespace fmwire::engine {

// One sequence's part of a step: the tokens at positions
// [position, position + tokens.size()) of the sequence.
struct BatchEntry {
  std::span<const std::uint32_t> tokens;
  std::uint32_t position = 0;
  // The sequence's blocks, in order, covering positions [0, position + tokens.size()):
  // position p lives in block_table[p / block_tokens], slot p % block_tokens.
  std::span<const std::uint32_t> block_table;
  // One row of logits for the last of `tokens` (a decode step, or the chunk
  // that completes a prompt).
  bool wants_logits = false;
};

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;

  // "cpu", "cuda", "synthetic".
  virtual std::string name() const = 0;
  virtual const KvGeometry& kv_geometry() const = 0;
  virtual std::uint32_t vocab_size() const = 0;
  virtual std::uint32_t max_context() const = 0;
  // Blocks of KV storage the backend holds; ids are 0 .. total_blocks() - 1.
  virtual std::uint32_t total_blocks() const = 0;

  // Runs one step: writes the keys and values of every token of every entry
  // into its slot, and writes vocab_size() logits per entry that wants them,
  // in entry order, into `logits` (sized by the caller). The result for an
  // entry must not depend on the other entries of the batch (batch
  // invariance: the same tokens give the same logits alone or in a batch).
  virtual void forward(std::span<const BatchEntry> batch, std::span<float> logits) = 0;

  // Packs the given blocks, in order, into `out` (blocks.size() *
  // bytes_per_block() bytes, the wire layout of KvGeometry), and unpacks
  // them back: the KV export/import path.
  virtual void read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) = 0;
  virtual void write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) = 0;

  // The KV storage where it lies in host memory (block b at b *
  // bytes_per_block()), for sending and receiving blocks in place; empty
  // where the backend keeps it elsewhere (device memory).
  virtual std::span<std::byte> host_kv() { return {}; }

  // Pinned host memory the backend moves KV through where the cache is on a
  // device: read_blocks into it and write_blocks from it skip the host copy
  // through the backend's own staging (one DMA each way). Empty where there
  // is none (a cache in host memory has host_kv instead).
  virtual std::span<std::byte> transfer_arena() { return {}; }
};

}  // namespace fmwire::engine
