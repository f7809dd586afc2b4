#include "engine/batching_engine.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace fmwire::engine {
namespace {

std::uint64_t micros(std::chrono::steady_clock::duration duration) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(duration).count());
}

EngineError error(std::string message) { return EngineError{std::move(message)}; }

}  // namespace

BatchingEngine::BatchingEngine(EngineInfo info, std::unique_ptr<ModelBackend> backend, BatchingOptions options)
    : info_(std::move(info)),
      backend_(std::move(backend)),
      options_(options),
      pool_(backend_->total_blocks(), backend_->kv_geometry().block_tokens) {
  if (options_.max_batch_tokens == 0 || options_.max_running == 0) {
    throw std::invalid_argument("BatchingEngine: max_batch_tokens and max_running must be at least 1");
  }
  info_.backend = backend_->name();
  info_.vocab_size = backend_->vocab_size();
  info_.max_context = backend_->max_context();
  info_.kv = backend_->kv_geometry();
  info_.total_blocks = backend_->total_blocks();
  // At most one row of logits per running sequence.
  logits_.resize(std::size_t{options_.max_running} * info_.vocab_size);
  entries_.reserve(options_.max_running);
  entry_sequences_.reserve(options_.max_running);
  order_.reserve(options_.max_running);
}

BatchingEngine::~BatchingEngine() = default;

std::uint32_t BatchingEngine::blocks_for(std::uint32_t tokens) const {
  return (tokens + info_.kv.block_tokens - 1) / info_.kv.block_tokens;
}

EngineResult<codec::Done> BatchingEngine::check(SequenceId id, const SequenceRequest& request) const {
  if (sequences_.contains(id)) return error("sequence id " + std::to_string(id) + " is in use");
  if (request.prompt.empty()) return error("the prompt is empty");
  for (std::size_t i = 0; i < request.prompt.size(); ++i) {
    if (request.prompt[i] >= info_.vocab_size) {
      return error("prompt token " + std::to_string(request.prompt[i]) + " at position " + std::to_string(i) +
                   " is outside the vocabulary of " + std::to_string(info_.vocab_size) + " tokens");
    }
  }
  if (request.max_tokens == 0) return error("max_tokens must be at least 1");
  const std::uint64_t total = request.prompt.size() + std::uint64_t{request.max_tokens};
  if (total > info_.max_context) {
    return error("a prompt of " + std::to_string(request.prompt.size()) + " tokens plus max_tokens " +
                 std::to_string(request.max_tokens) + " exceeds the context of " + std::to_string(info_.max_context) +
                 " tokens");
  }
  if (blocks_for(static_cast<std::uint32_t>(total)) > info_.total_blocks) {
    return error("the request needs " + std::to_string(blocks_for(static_cast<std::uint32_t>(total))) +
                 " KV blocks and the cache holds " + std::to_string(info_.total_blocks));
  }
  const float temperature = request.sampling.temperature;
  if (!std::isfinite(temperature) || temperature < 0.0f || temperature > 100.0f) {
    return error("temperature " + std::to_string(temperature) + " is outside [0, 100]");
  }
  const float top_p = request.sampling.top_p;
  if (!std::isfinite(top_p) || top_p <= 0.0f || top_p > 1.0f) {
    return error("top_p " + std::to_string(top_p) + " is outside (0, 1]");
  }
  return codec::Done{};
}

BatchingEngine::Sequence& BatchingEngine::add(SequenceId id, SequenceRequest request) {
  auto owned = std::make_unique<Sequence>(request.sampling);
  Sequence& sequence = *owned;
  sequence.id = id;
  sequence.tokens = request.prompt;
  sequence.tokens.reserve(request.prompt.size() + request.max_tokens);
  sequence.request = std::move(request);
  sequence.arrival = next_arrival_++;
  sequence.submitted = Clock::now();
  sequences_.emplace(id, std::move(owned));
  return sequence;
}

void BatchingEngine::enqueue(Sequence& sequence) {
  // Higher priority first, then first come; a preempted sequence keeps its
  // arrival, so it goes back ahead of those that came after it.
  const auto before = [](const Sequence* a, const Sequence* b) {
    if (a->request.priority != b->request.priority) return a->request.priority > b->request.priority;
    return a->arrival < b->arrival;
  };
  waiting_.insert(std::upper_bound(waiting_.begin(), waiting_.end(), &sequence, before), &sequence);
}

EngineResult<codec::Done> BatchingEngine::submit(SequenceId id, SequenceRequest request) {
  if (auto checked = check(id, request); !checked) return checked;
  enqueue(add(id, std::move(request)));
  return codec::Done{};
}

EngineResult<codec::Done> BatchingEngine::submit_with_kv(SequenceId id, SequenceRequest request,
                                                         const KvShard& shard) {
  if (auto checked = check(id, request); !checked) return checked;
  if (shard.model_fingerprint != info_.model_fingerprint) {
    return error("the KV shard comes from another model (fingerprint " + std::to_string(shard.model_fingerprint) +
                 ", this engine runs " + std::to_string(info_.model_fingerprint) + ")");
  }
  const KvGeometry& ours = info_.kv;
  const KvGeometry& theirs = shard.geometry;
  if (theirs.layers != ours.layers || theirs.kv_heads != ours.kv_heads || theirs.head_dim != ours.head_dim ||
      theirs.block_tokens != ours.block_tokens || theirs.dtype != ours.dtype ||
      theirs.element_bytes != ours.element_bytes) {
    return error("the KV shard's geometry differs from this engine's cache");
  }
  const auto count = static_cast<std::uint32_t>(shard.tokens.size());
  if (count == 0 || count >= request.prompt.size() ||
      !std::equal(shard.tokens.begin(), shard.tokens.end(), request.prompt.begin())) {
    return error("the KV shard's tokens must be a prefix of the prompt, shorter than it");
  }
  const std::uint32_t block_count = blocks_for(count);
  if (shard.bytes.size() != std::size_t{block_count} * ours.bytes_per_block()) {
    return error("the KV shard holds " + std::to_string(shard.bytes.size()) + " bytes, " +
                 std::to_string(std::size_t{block_count} * ours.bytes_per_block()) + " expected for " +
                 std::to_string(count) + " tokens");
  }
  std::vector<std::uint32_t> blocks;
  for (std::uint32_t i = 0; i < block_count; ++i) {
    auto block = pool_.allocate();
    if (!block) {
      for (std::uint32_t taken : blocks) pool_.release(taken);
      return error("no free KV blocks for a shard of " + std::to_string(block_count) + " blocks");
    }
    blocks.push_back(*block);
  }
  backend_->write_blocks(blocks, shard.bytes);
  Sequence& sequence = add(id, std::move(request));
  sequence.blocks = std::move(blocks);
  sequence.computed = count;
  sequence.cached_prompt_tokens = count;
  publish_full_blocks(sequence);
  enqueue(sequence);
  return codec::Done{};
}

bool BatchingEngine::admittable(const Sequence& sequence) const {
  if (running_.size() >= options_.max_running) return false;
  std::uint32_t have = static_cast<std::uint32_t>(sequence.blocks.size());
  if (have == 0 && options_.prefix_cache) {
    const auto limit = static_cast<std::uint32_t>((sequence.tokens.size() - 1) / info_.kv.block_tokens);
    have = pool_.count_prefix(sequence.tokens, limit);
  }
  // Blocks for every token so far and the next one; paused sequences'
  // blocks count as available: admission may preempt them.
  const std::uint32_t need = blocks_for(static_cast<std::uint32_t>(sequence.tokens.size() + 1));
  std::size_t available = pool_.available_blocks();
  for (const Sequence* other : running_) {
    if (other->paused) available += other->blocks.size();
  }
  return need <= have || need - have <= available;
}

void BatchingEngine::admit(Sequence& sequence) {
  waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &sequence));
  sequence.running = true;
  sequence.admission = next_admission_++;
  running_.push_back(&sequence);
  const bool first = !sequence.was_admitted;
  if (first) {
    sequence.was_admitted = true;
    sequence.admitted = Clock::now();
    prompt_tokens_ += sequence.request.prompt.size();
  }
  if (!sequence.blocks.empty() || !options_.prefix_cache) return;
  // At least the last token is computed again: its logits pick the next one.
  const auto limit = static_cast<std::uint32_t>((sequence.tokens.size() - 1) / info_.kv.block_tokens);
  sequence.blocks = pool_.match_prefix(sequence.tokens, limit);
  const auto matched = static_cast<std::uint32_t>(sequence.blocks.size());
  sequence.computed = matched * info_.kv.block_tokens;
  sequence.published_blocks = matched;
  sequence.published_hash = 0;
  for (std::uint32_t block = 0; block < matched; ++block) {
    sequence.published_hash = KvBlockPool::chain_hash(
        sequence.published_hash,
        std::span(sequence.tokens).subspan(std::size_t{block} * info_.kv.block_tokens, info_.kv.block_tokens));
  }
  if (first) {
    sequence.cached_prompt_tokens = sequence.computed;
    cached_prompt_tokens_ += sequence.computed;
  }
}

void BatchingEngine::release_blocks(Sequence& sequence) {
  for (std::uint32_t block : sequence.blocks) pool_.release(block);
  sequence.blocks.clear();
  sequence.computed = 0;
  sequence.published_blocks = 0;
  sequence.published_hash = 0;
}

void BatchingEngine::preempt(Sequence& sequence) {
  release_blocks(sequence);
  running_.erase(std::find(running_.begin(), running_.end(), &sequence));
  sequence.running = false;
  enqueue(sequence);
  ++preemptions_;
}

bool BatchingEngine::reserve(Sequence& sequence, std::uint32_t tokens) {
  const std::uint32_t need = blocks_for(tokens);
  while (sequence.blocks.size() < need) {
    if (auto block = pool_.allocate()) {
      sequence.blocks.push_back(*block);
      continue;
    }
    // Preempt a younger sequence that is not in this step's batch; else a
    // paused one; else this one gives way.
    Sequence* victim = nullptr;
    for (auto it = running_.rbegin(); it != running_.rend() && victim == nullptr; ++it) {
      if (*it != &sequence && !(*it)->in_batch && (*it)->admission > sequence.admission) victim = *it;
    }
    for (auto it = running_.rbegin(); it != running_.rend() && victim == nullptr; ++it) {
      if (*it != &sequence && !(*it)->in_batch && (*it)->paused) victim = *it;
    }
    if (victim == nullptr) {
      if (!sequence.in_batch) preempt(sequence);
      return false;
    }
    preempt(*victim);
  }
  return true;
}

void BatchingEngine::schedule(Sequence& sequence, std::uint32_t tokens) {
  const bool completes = sequence.computed + tokens == sequence.tokens.size();
  entries_.push_back(BatchEntry{
      .tokens = std::span(sequence.tokens).subspan(sequence.computed, tokens),
      .position = sequence.computed,
      .block_table = sequence.blocks,
      .wants_logits = completes,
  });
  entry_sequences_.push_back(&sequence);
  sequence.in_batch = true;
}

void BatchingEngine::publish_full_blocks(Sequence& sequence) {
  if (!options_.prefix_cache) return;
  const std::uint32_t block_tokens = info_.kv.block_tokens;
  const std::uint32_t full = sequence.computed / block_tokens;
  for (; sequence.published_blocks < full; ++sequence.published_blocks) {
    const auto tokens =
        std::span(sequence.tokens).subspan(std::size_t{sequence.published_blocks} * block_tokens, block_tokens);
    sequence.published_hash = KvBlockPool::chain_hash(sequence.published_hash, tokens);
    pool_.publish(sequence.blocks[sequence.published_blocks], sequence.published_hash, tokens);
  }
}

void BatchingEngine::step(StepOutput& output) {
  const auto start = Clock::now();
  entries_.clear();
  entry_sequences_.clear();
  std::uint32_t budget = options_.max_batch_tokens;
  order_.assign(running_.begin(), running_.end());

  // Decodes first (one token each, oldest first), then prompt chunks of
  // sequences admitted earlier, then new admissions, while the budget lasts.
  for (Sequence* sequence : order_) {
    if (budget == 0) break;
    if (!sequence->running || sequence->paused || sequence->tokens.size() - sequence->computed != 1) continue;
    if (!reserve(*sequence, sequence->computed + 1)) continue;
    schedule(*sequence, 1);
    budget -= 1;
  }
  for (Sequence* sequence : order_) {
    if (budget == 0) break;
    if (!sequence->running || sequence->paused || sequence->in_batch) continue;
    const auto tokens = std::min(budget, static_cast<std::uint32_t>(sequence->tokens.size() - sequence->computed));
    if (!reserve(*sequence, sequence->computed + tokens)) continue;
    schedule(*sequence, tokens);
    budget -= tokens;
  }
  while (budget > 0) {
    const auto next = std::find_if(waiting_.begin(), waiting_.end(), [](const Sequence* s) { return !s->paused; });
    if (next == waiting_.end() || !admittable(**next)) break;  // in priority order: no overtaking
    Sequence& sequence = **next;
    admit(sequence);
    const auto tokens = std::min(budget, static_cast<std::uint32_t>(sequence.tokens.size() - sequence.computed));
    if (!reserve(sequence, sequence.computed + tokens)) break;
    schedule(sequence, tokens);
    budget -= tokens;
  }
  if (entries_.empty()) return;

  backend_->forward(entries_, logits_);

  const auto now = Clock::now();
  const std::uint32_t vocab = info_.vocab_size;
  std::size_t row = 0;
  done_.clear();
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    Sequence& sequence = *entry_sequences_[i];
    sequence.in_batch = false;
    sequence.computed += static_cast<std::uint32_t>(entries_[i].tokens.size());
    output.batch_tokens += static_cast<std::uint32_t>(entries_[i].tokens.size());
    publish_full_blocks(sequence);
    if (!entries_[i].wants_logits) continue;
    const std::uint32_t token = sequence.sampler.sample(std::span(logits_).subspan(row++ * vocab, vocab));
    if (!sequence.has_first_token) {
      sequence.has_first_token = true;
      sequence.first_token = now;
    }
    sequence.last_token = now;
    if (token == info_.eos_token && sequence.request.stop_at_eos) {
      finish(sequence, FinishCause::end_of_sequence, output);
      continue;
    }
    sequence.tokens.push_back(token);
    ++sequence.generated;
    ++generated_tokens_;
    output.tokens.push_back({sequence.id, token, sequence.generated - 1});
    if (sequence.generated >= sequence.request.max_tokens) {
      finish(sequence, FinishCause::max_tokens, output);
    } else if (sequence.tokens.size() >= info_.max_context) {
      finish(sequence, FinishCause::context_full, output);
    }
  }
  for (Sequence* sequence : done_) remove(*sequence);

  pool_.take_events(output.prefixes_added, output.prefixes_evicted);
  const std::uint64_t step_us = micros(Clock::now() - start);
  output.step_us += step_us;
  recent_step_us_ = steps_ == 0 ? static_cast<double>(step_us) : 0.8 * recent_step_us_ + 0.2 * static_cast<double>(step_us);
  ++steps_;
}

void BatchingEngine::finish(Sequence& sequence, FinishCause cause, StepOutput& output) {
  output.finished.push_back(StepOutput::Finished{
      .id = sequence.id,
      .cause = cause,
      .prompt_tokens = static_cast<std::uint32_t>(sequence.request.prompt.size()),
      .completion_tokens = sequence.generated,
      .cached_prompt_tokens = sequence.cached_prompt_tokens,
      .queue_us = micros(sequence.admitted - sequence.submitted),
      .prefill_us = micros(sequence.first_token - sequence.admitted),
      .decode_us = micros(sequence.last_token - sequence.first_token),
  });
  done_.push_back(&sequence);
}

void BatchingEngine::remove(Sequence& sequence) {
  for (std::uint32_t block : sequence.blocks) pool_.release(block);
  sequence.blocks.clear();
  if (sequence.running) {
    running_.erase(std::find(running_.begin(), running_.end(), &sequence));
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &sequence));
  }
  if (sequence.paused) --paused_count_;
  sequences_.erase(sequence.id);
}

bool BatchingEngine::has_work() const {
  for (const Sequence* sequence : running_) {
    if (!sequence->paused) return true;
  }
  for (const Sequence* sequence : waiting_) {
    if (!sequence->paused) return admittable(*sequence);
  }
  return false;
}

void BatchingEngine::cancel(SequenceId id) {
  auto found = sequences_.find(id);
  if (found != sequences_.end()) remove(*found->second);
}

void BatchingEngine::set_paused(SequenceId id, bool paused) {
  auto found = sequences_.find(id);
  if (found == sequences_.end() || found->second->paused == paused) return;
  found->second->paused = paused;
  if (paused) {
    ++paused_count_;
  } else {
    --paused_count_;
  }
}

EngineResult<KvShard> BatchingEngine::export_kv(SequenceId id) {
  auto found = sequences_.find(id);
  if (found == sequences_.end()) return error("no sequence " + std::to_string(id));
  const Sequence& sequence = *found->second;
  if (sequence.computed == 0) return error("sequence " + std::to_string(id) + " has no KV computed yet");
  KvShard shard;
  shard.tokens.assign(sequence.tokens.begin(), sequence.tokens.begin() + sequence.computed);
  shard.geometry = info_.kv;
  shard.model_fingerprint = info_.model_fingerprint;
  const std::uint32_t block_count = blocks_for(sequence.computed);
  shard.bytes.resize(std::size_t{block_count} * info_.kv.bytes_per_block());
  backend_->read_blocks(std::span(sequence.blocks).first(block_count), shard.bytes);
  return shard;
}

EngineStats BatchingEngine::stats() const {
  EngineStats stats;
  stats.waiting = static_cast<std::uint32_t>(waiting_.size());
  stats.running = static_cast<std::uint32_t>(running_.size());
  stats.paused = paused_count_;
  stats.free_blocks = pool_.available_blocks();
  stats.total_blocks = pool_.total_blocks();
  stats.cached_blocks = pool_.cached_blocks();
  stats.recent_step_us = static_cast<std::uint64_t>(recent_step_us_);
  stats.steps = steps_;
  stats.prompt_tokens = prompt_tokens_;
  stats.cached_prompt_tokens = cached_prompt_tokens_;
  stats.generated_tokens = generated_tokens_;
  stats.preemptions = preemptions_;
  return stats;
}

}  // namespace fmwire::engine
