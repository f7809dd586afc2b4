// What prefix-affinity routing knows of prompts: their block hashes, computed
// exactly as a worker keys its prefix cache (engine::KvBlockPool::chain_hash),
// and, for workers that publish no cache events, an approximate memory of
// which worker recently got which prompt prefix.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace fmwire::router {

// Replaces `hashes` with the chained hashes of the prompt's first full
// blocks of `block_tokens` tokens, at most `max_blocks` of them.
void prompt_block_hashes(std::span<const std::uint32_t> prompt_tokens, std::uint32_t block_tokens,
                         std::uint32_t max_blocks, std::vector<std::uint64_t>& hashes);

// Blocks of the prompt a worker can take from its prefix cache: full blocks
// before the last token, which it always computes again for its logits
// (engine::BatchingEngine::admit).
std::uint32_t reusable_blocks(std::size_t prompt_tokens, std::uint32_t block_tokens);

// An approximate prefix tree of recently routed prompts. The chained hash of
// block i names the whole prefix up to block i, so a map from block hash to
// the worker that last got a prompt through that block is a radix tree in
// all but layout. At most `max_prompts` prompts are remembered; the least
// recently routed is forgotten first, and with it every block no remembered
// prompt still passes through.
class ApproximatePrefixTree {
 public:
  explicit ApproximatePrefixTree(std::uint32_t max_prompts) : max_prompts_(max_prompts) {}

  // A prompt with these block hashes went to `worker` (its name).
  void remember(std::span<const std::uint64_t> block_hashes, std::string_view worker);
  // The worker that last got a prompt through this block; nullptr when no
  // remembered prompt passes through it.
  const std::string* worker_of(std::uint64_t block_hash) const;

  std::size_t prompts() const { return prompts_.size(); }
  std::size_t blocks() const { return blocks_.size(); }

 private:
  struct Prompt {
    std::vector<std::uint64_t> block_hashes;
  };
  struct Block {
    std::string worker;
    std::uint32_t prompts = 0;  // remembered prompts passing through it
  };

  void forget_oldest();

  std::uint32_t max_prompts_;
  std::list<Prompt> prompts_;  // front: most recently routed
  // A prompt by its last block's hash (which names its whole chain).
  std::unordered_map<std::uint64_t, std::list<Prompt>::iterator> by_last_block_;
  std::unordered_map<std::uint64_t, Block> blocks_;
};

}  // namespace fmwire::router
