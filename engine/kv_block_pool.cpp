#include "engine/kv_block_pool.h"

#include <xxhash.h>

#include <algorithm>
#include <cassert>
#include <stdexcept>

namespace fmwire::engine {

KvBlockPool::KvBlockPool(std::uint32_t total_blocks, std::uint32_t block_tokens)
    : block_tokens_(block_tokens), blocks_(total_blocks) {
  if (total_blocks == 0 || block_tokens == 0) throw std::invalid_argument("KvBlockPool: zero blocks or block size");
  block_token_ids_.resize(std::size_t{total_blocks} * block_tokens);
  free_.reserve(total_blocks);
  // Handed out from the back: block 0 first.
  for (std::uint32_t block = total_blocks; block > 0; --block) free_.push_back(block - 1);
}

std::uint64_t KvBlockPool::chain_hash(std::uint64_t previous, std::span<const std::uint32_t> tokens) {
  std::uint64_t hash = XXH3_64bits_withSeed(tokens.data(), tokens.size_bytes(), previous);
  return hash == kNoHash ? 1 : hash;
}

std::optional<std::uint32_t> KvBlockPool::allocate() {
  std::uint32_t block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    block = lru_.front();
    evict(block);
  } else {
    return std::nullopt;
  }
  blocks_[block].references = 1;
  return block;
}

void KvBlockPool::evict(std::uint32_t block) {
  Block& entry = blocks_[block];
  assert(entry.references == 0 && entry.in_lru);
  lru_.erase(entry.lru);
  entry.in_lru = false;
  by_hash_.erase(entry.hash);
  evicted_.push_back(entry.hash);
  entry.hash = kNoHash;
}

void KvBlockPool::add_reference(std::uint32_t block) {
  Block& entry = blocks_[block];
  if (entry.references++ == 0 && entry.in_lru) {
    lru_.erase(entry.lru);
    entry.in_lru = false;
  }
}

void KvBlockPool::release(std::uint32_t block) {
  Block& entry = blocks_[block];
  assert(entry.references > 0);
  if (--entry.references > 0) return;
  if (entry.hash != kNoHash) {
    entry.lru = lru_.insert(lru_.end(), block);
    entry.in_lru = true;
  } else {
    free_.push_back(block);
  }
}

std::optional<std::uint32_t> KvBlockPool::find_cached(std::uint64_t hash, std::span<const std::uint32_t> tokens) const {
  const auto cached = by_hash_.find(hash);
  if (cached == by_hash_.end()) return std::nullopt;
  const std::uint32_t block = cached->second;
  const auto held = std::span(block_token_ids_).subspan(std::size_t{block} * block_tokens_, block_tokens_);
  if (!std::equal(held.begin(), held.end(), tokens.begin())) return std::nullopt;  // a collision
  return block;
}

std::vector<std::uint32_t> KvBlockPool::match_prefix(std::span<const std::uint32_t> tokens, std::uint32_t max_blocks) {
  std::vector<std::uint32_t> found;
  std::uint64_t hash = 0;
  for (std::size_t begin = 0; begin + block_tokens_ <= tokens.size() && found.size() < max_blocks;
       begin += block_tokens_) {
    const auto block_tokens = tokens.subspan(begin, block_tokens_);
    hash = chain_hash(hash, block_tokens);
    const auto block = find_cached(hash, block_tokens);
    if (!block) break;
    add_reference(*block);
    found.push_back(*block);
  }
  return found;
}

KvBlockPool::PrefixCount KvBlockPool::count_prefix(std::span<const std::uint32_t> tokens,
                                                   std::uint32_t max_blocks) const {
  PrefixCount count;
  std::uint64_t hash = 0;
  for (std::size_t begin = 0; begin + block_tokens_ <= tokens.size() && count.blocks < max_blocks;
       begin += block_tokens_) {
    const auto block_tokens = tokens.subspan(begin, block_tokens_);
    hash = chain_hash(hash, block_tokens);
    const auto block = find_cached(hash, block_tokens);
    if (!block) break;
    ++count.blocks;
    if (blocks_[*block].references == 0) ++count.unreferenced;
  }
  return count;
}

void KvBlockPool::publish(std::uint32_t block, std::uint64_t hash, std::span<const std::uint32_t> tokens) {
  assert(tokens.size() == block_tokens_);
  Block& entry = blocks_[block];
  if (entry.hash != kNoHash || by_hash_.contains(hash)) return;
  entry.hash = hash;
  by_hash_.emplace(hash, block);
  std::copy(tokens.begin(), tokens.end(), block_token_ids_.begin() + std::size_t{block} * block_tokens_);
  added_.push_back(hash);
}

void KvBlockPool::take_events(std::vector<std::uint64_t>& added, std::vector<std::uint64_t>& evicted) {
  // Net of what happened since the last call: a hash added then evicted (or
  // the reverse) is reported by its state now, so applying the added list
  // and then the evicted list gives the right set whatever the order was.
  auto net = [&](std::vector<std::uint64_t>& events, bool cached_now, std::vector<std::uint64_t>& out) {
    std::sort(events.begin(), events.end());
    events.erase(std::unique(events.begin(), events.end()), events.end());
    for (std::uint64_t hash : events) {
      if (by_hash_.contains(hash) == cached_now) out.push_back(hash);
    }
    events.clear();
  };
  net(added_, true, added);
  net(evicted_, false, evicted);
}

std::vector<std::uint64_t> KvBlockPool::cached_hashes() const {
  std::vector<std::uint64_t> hashes;
  hashes.reserve(by_hash_.size());
  for (const auto& [hash, block] : by_hash_) hashes.push_back(hash);
  return hashes;
}

}  // namespace fmwire::engine
