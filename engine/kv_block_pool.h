// Bookkeeping of the paged KV cache's blocks (the storage is the backend's):
// a free list, reference counts, and the prefix cache. A full block is keyed
// by a hash chained over every token up to its end, so a prompt that shares
// a prefix with an earlier one finds that prefix's blocks and reuses them
// instead of computing them again. A cached block nobody references stays
// until a new allocation needs it; the least recently used goes first.
// Every block that enters or leaves the cache is reported (added/evicted
// events), so a router can know which prefixes a worker holds.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace fmwire::engine {

class KvBlockPool {
 public:
  KvBlockPool(std::uint32_t total_blocks, std::uint32_t block_tokens);

  std::uint32_t total_blocks() const { return static_cast<std::uint32_t>(blocks_.size()); }
  std::uint32_t block_tokens() const { return block_tokens_; }
  // Blocks allocate() can hand out now: free, or cached with no reference.
  std::uint32_t available_blocks() const { return static_cast<std::uint32_t>(free_.size() + lru_.size()); }
  std::uint32_t referenced_blocks() const { return total_blocks() - available_blocks(); }
  std::uint32_t cached_blocks() const { return static_cast<std::uint32_t>(by_hash_.size()); }

  // A block to write (one reference): a free one, else the least recently
  // used cached block with no reference (evicted from the cache). None when
  // every block is referenced.
  std::optional<std::uint32_t> allocate();
  void add_reference(std::uint32_t block);
  // Drops one reference. At zero a cached block stays cached (most recently
  // used), any other block is free again.
  void release(std::uint32_t block);
  std::uint32_t references(std::uint32_t block) const { return blocks_[block].references; }

  // The hash of a full block: chained over the previous block's hash and
  // this block's tokens (xxh3-64). The first block chains from 0.
  static std::uint64_t chain_hash(std::uint64_t previous, std::span<const std::uint32_t> tokens);

  // The cached blocks holding the longest prefix of `tokens` made of whole
  // blocks, at most `max_blocks` of them, each with a reference added for
  // the caller. Tokens are compared, not only hashes, so a hash collision
  // can never hand out another prompt's KV.
  std::vector<std::uint32_t> match_prefix(std::span<const std::uint32_t> tokens, std::uint32_t max_blocks);
  // How many blocks match_prefix would find, without taking them, and how
  // many of those nobody references: those are among available_blocks()
  // until match_prefix takes them, so they cannot also be allocated.
  struct PrefixCount {
    std::uint32_t blocks = 0;
    std::uint32_t unreferenced = 0;
  };
  PrefixCount count_prefix(std::span<const std::uint32_t> tokens, std::uint32_t max_blocks) const;

  // `block` (referenced) is full and holds `tokens`, ending a prefix whose
  // chained hash is `hash`: cache it under that hash. When another block
  // holds that hash already, nothing changes.
  void publish(std::uint32_t block, std::uint64_t hash, std::span<const std::uint32_t> tokens);

  // Moves the events since the last call into the given vectors (appended).
  void take_events(std::vector<std::uint64_t>& added, std::vector<std::uint64_t>& evicted);
  std::vector<std::uint64_t> cached_hashes() const;

 private:
  static constexpr std::uint64_t kNoHash = 0;  // chain_hash never returns 0

  struct Block {
    std::uint32_t references = 0;
    std::uint64_t hash = kNoHash;           // cached under this hash when not kNoHash
    std::list<std::uint32_t>::iterator lru; // valid when cached and unreferenced
    bool in_lru = false;
  };

  void evict(std::uint32_t block);
  // The cached block holding `tokens` under `hash`, if any.
  std::optional<std::uint32_t> find_cached(std::uint64_t hash, std::span<const std::uint32_t> tokens) const;

  std::uint32_t block_tokens_;
  std::vector<Block> blocks_;
  std::vector<std::uint32_t> free_;
  std::list<std::uint32_t> lru_;  // cached, unreferenced; front = least recently used
  std::unordered_map<std::uint64_t, std::uint32_t> by_hash_;
  std::vector<std::uint32_t> block_token_ids_;  // total * block_tokens: what each cached block holds
  std::vector<std::uint64_t> added_;
  std::vector<std::uint64_t> evicted_;
};

}  // namespace fmwire::engine
