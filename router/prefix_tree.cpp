#include "router/prefix_tree.h"

#include "engine/kv_block_pool.h"

namespace fmwire::router {

void prompt_block_hashes(std::span<const std::uint32_t> prompt_tokens, std::uint32_t block_tokens,
                         std::uint32_t max_blocks, std::vector<std::uint64_t>& hashes) {
  hashes.clear();
  if (block_tokens == 0) return;
  std::uint64_t hash = 0;
  for (std::size_t begin = 0; begin + block_tokens <= prompt_tokens.size() && hashes.size() < max_blocks;
       begin += block_tokens) {
    hash = engine::KvBlockPool::chain_hash(hash, prompt_tokens.subspan(begin, block_tokens));
    hashes.push_back(hash);
  }
}

std::uint32_t reusable_blocks(std::size_t prompt_tokens, std::uint32_t block_tokens) {
  if (block_tokens == 0 || prompt_tokens == 0) return 0;
  return static_cast<std::uint32_t>((prompt_tokens - 1) / block_tokens);
}

void ApproximatePrefixTree::remember(std::span<const std::uint64_t> block_hashes, std::string_view worker) {
  if (block_hashes.empty() || max_prompts_ == 0) return;
  const std::uint64_t last = block_hashes.back();
  if (auto known = by_last_block_.find(last); known != by_last_block_.end()) {
    prompts_.splice(prompts_.begin(), prompts_, known->second);  // most recent again
  } else {
    while (prompts_.size() >= max_prompts_) forget_oldest();
    prompts_.push_front(Prompt{std::vector<std::uint64_t>(block_hashes.begin(), block_hashes.end())});
    by_last_block_.emplace(last, prompts_.begin());
    for (std::uint64_t hash : block_hashes) ++blocks_[hash].prompts;
  }
  for (std::uint64_t hash : block_hashes) blocks_[hash].worker.assign(worker);
}

const std::string* ApproximatePrefixTree::worker_of(std::uint64_t block_hash) const {
  const auto found = blocks_.find(block_hash);
  return found == blocks_.end() ? nullptr : &found->second.worker;
}

void ApproximatePrefixTree::forget_oldest() {
  const Prompt& oldest = prompts_.back();
  for (std::uint64_t hash : oldest.block_hashes) {
    const auto block = blocks_.find(hash);
    if (block != blocks_.end() && --block->second.prompts == 0) blocks_.erase(block);
  }
  by_last_block_.erase(oldest.block_hashes.back());
  prompts_.pop_back();
}

}  // namespace fmwire::router
