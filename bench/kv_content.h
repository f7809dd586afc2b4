// The KV bytes bench_kv moves: fp16 values shaped like a real model's KV
// cache (not random bytes, which no compressor can shrink), in the wire
// layout of engine/kv_geometry.h, in shared memory that the bench's sender
// processes map rather than generate again.
//
// What is generated: every channel (layer, K|V, KV head, dim) has its own
// standard deviation, one of 8 log-spaced steps from 0.05 to 1.0 picked by
// a hash of the channel, and every value is drawn from N(0, that std) and
// rounded to fp16 (draws from 65,536 pre-drawn samples per step, indexed by
// 16 random bits: as fine-grained as fp16 itself at these scales).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "engine/kv_geometry.h"

namespace fmwire::bench {

// Fills `kv` (a whole number of blocks of `geometry`, fp16) as described
// above, the same bytes for the same seed.
void fill_fp16_kv(std::span<std::byte> kv, const engine::KvGeometry& geometry, std::uint64_t seed);

// An anonymous shared-memory file (memfd) of `bytes`, mapped here. Other
// processes of the same user open it by path() (/proc/PID/fd/N) for as long
// as this object lives; it is gone with it.
class SharedKv {
 public:
  explicit SharedKv(std::size_t bytes);
  ~SharedKv();
  SharedKv(const SharedKv&) = delete;
  SharedKv& operator=(const SharedKv&) = delete;

  std::span<std::byte> bytes() { return {data_, size_}; }
  std::string path() const;

 private:
  int fd_ = -1;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A SharedKv opened by path in another process: read-write (the kernel
// registers only writable pages with io_uring), its pages mapped at once.
class MappedKv {
 public:
  MappedKv(const std::string& path, std::size_t bytes);
  ~MappedKv();
  MappedKv(const MappedKv&) = delete;
  MappedKv& operator=(const MappedKv&) = delete;

  std::span<std::byte> bytes() { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A receiver's blocks buffer: anonymous memory whose pages are all mapped
// (and zeroed) before a transfer starts, as an engine's KV pool is warm.
class KvBlocks {
 public:
  explicit KvBlocks(std::size_t bytes);
  ~KvBlocks();
  KvBlocks(const KvBlocks&) = delete;
  KvBlocks& operator=(const KvBlocks&) = delete;

  std::span<std::byte> bytes() { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace fmwire::bench
