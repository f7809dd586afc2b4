#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "engine/kv_block_pool.h"

using fmwire::engine::KvBlockPool;

namespace {

std::vector<std::uint32_t> tokens_from(std::uint32_t first, std::size_t count) {
  std::vector<std::uint32_t> tokens(count);
  std::iota(tokens.begin(), tokens.end(), first);
  return tokens;
}

// Publishes `tokens` (whole blocks) as a sequence would, holding the blocks.
std::vector<std::uint32_t> publish_all(KvBlockPool& pool, const std::vector<std::uint32_t>& tokens) {
  std::vector<std::uint32_t> blocks;
  std::uint64_t hash = 0;
  for (std::size_t begin = 0; begin + pool.block_tokens() <= tokens.size(); begin += pool.block_tokens()) {
    const auto block = pool.allocate();
    REQUIRE(block.has_value());
    const auto part = std::span(tokens).subspan(begin, pool.block_tokens());
    hash = KvBlockPool::chain_hash(hash, part);
    pool.publish(*block, hash, part);
    blocks.push_back(*block);
  }
  return blocks;
}

}  // namespace

TEST_CASE("a pool hands out every block once and takes them back") {
  KvBlockPool pool(4, 16);
  std::vector<std::uint32_t> blocks;
  while (auto block = pool.allocate()) blocks.push_back(*block);
  CHECK(blocks.size() == 4);
  CHECK(pool.available_blocks() == 0);
  std::sort(blocks.begin(), blocks.end());
  CHECK(std::unique(blocks.begin(), blocks.end()) == blocks.end());
  for (std::uint32_t block : blocks) pool.release(block);
  CHECK(pool.available_blocks() == 4);
  CHECK(pool.referenced_blocks() == 0);
}

TEST_CASE("a shared prefix is found block by block and referenced for the caller") {
  KvBlockPool pool(8, 4);
  const auto prompt = tokens_from(100, 12);
  const auto blocks = publish_all(pool, prompt);
  CHECK(pool.cached_blocks() == 3);

  auto other = tokens_from(100, 8);  // the first two blocks, then something else
  other.push_back(7);
  other.push_back(7);
  other.push_back(7);
  other.push_back(7);
  const auto found = pool.match_prefix(other, 100);
  REQUIRE(found.size() == 2);
  CHECK(found[0] == blocks[0]);
  CHECK(found[1] == blocks[1]);
  CHECK(pool.references(blocks[0]) == 2);
  CHECK(pool.count_prefix(other, 100).blocks == 2);
  CHECK(pool.count_prefix(other, 100).unreferenced == 0);  // the caller holds them now
  CHECK(pool.count_prefix(other, 1).blocks == 1);
}

TEST_CASE("a prefix count says which of its blocks nobody holds: those are also available ones") {
  KvBlockPool pool(8, 4);
  const auto prompt = tokens_from(100, 12);
  const auto blocks = publish_all(pool, prompt);
  pool.release(blocks[1]);
  pool.release(blocks[2]);
  CHECK(pool.available_blocks() == 7);  // 5 free, 2 cached with no reference
  const KvBlockPool::PrefixCount count = pool.count_prefix(prompt, 100);
  CHECK(count.blocks == 3);
  CHECK(count.unreferenced == 2);
  const auto found = pool.match_prefix(prompt, 100);
  CHECK(found.size() == 3);
  CHECK(pool.available_blocks() == 5);
}

TEST_CASE("a prefix differing in its first block matches nothing") {
  KvBlockPool pool(8, 4);
  publish_all(pool, tokens_from(100, 8));
  auto other = tokens_from(100, 8);
  other[0] = 99;
  CHECK(pool.match_prefix(other, 100).empty());
}

TEST_CASE("a hash that matches with other tokens is never handed out") {
  KvBlockPool pool(4, 4);
  const auto held = tokens_from(1, 4);
  const auto asked = tokens_from(50, 4);
  const auto block = pool.allocate();
  REQUIRE(block.has_value());
  // As if two token runs had the same hash: the stored tokens decide.
  pool.publish(*block, KvBlockPool::chain_hash(0, asked), held);
  CHECK(pool.match_prefix(asked, 10).empty());
}

TEST_CASE("unreferenced cached blocks stay until needed, least recently used first") {
  KvBlockPool pool(3, 2);
  const auto first = publish_all(pool, {1, 2});
  const auto second = publish_all(pool, {3, 4});
  pool.release(first[0]);
  pool.release(second[0]);
  CHECK(pool.cached_blocks() == 2);
  CHECK(pool.available_blocks() == 3);
  std::vector<std::uint64_t> added, evicted;
  pool.take_events(added, evicted);
  CHECK(added.size() == 2);
  CHECK(evicted.empty());

  // The free block goes first, then the least recently used cached one.
  const auto free_block = pool.allocate();
  REQUIRE(free_block.has_value());
  CHECK(*free_block != first[0]);
  CHECK(*free_block != second[0]);
  const auto reused = pool.allocate();
  REQUIRE(reused.has_value());
  CHECK(*reused == first[0]);
  pool.take_events(added, evicted);
  CHECK(evicted.size() == 1);
  CHECK(pool.cached_blocks() == 1);
  const std::vector<std::uint32_t> gone{1, 2};
  CHECK(pool.match_prefix(gone, 10).empty());
  const std::vector<std::uint32_t> kept{3, 4};
  CHECK(pool.match_prefix(kept, 10).size() == 1);
}

TEST_CASE("a block cached and evicted between two reports is reported evicted only") {
  KvBlockPool pool(1, 2);
  const auto blocks = publish_all(pool, {1, 2});
  pool.release(blocks[0]);
  REQUIRE(pool.allocate().has_value());  // evicts it
  std::vector<std::uint64_t> added, evicted;
  pool.take_events(added, evicted);
  CHECK(added.empty());
  CHECK(evicted.size() == 1);
  CHECK(pool.cached_hashes().empty());
}

TEST_CASE("a referenced block is never evicted") {
  KvBlockPool pool(1, 2);
  publish_all(pool, {1, 2});
  CHECK_FALSE(pool.allocate().has_value());
}
