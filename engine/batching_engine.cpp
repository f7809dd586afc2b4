#include "engine/batching_engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fmwire::engine {
namespace {

std::uint64_t micros(std::chrono::steady_clock::duration duration) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(duration).count());
}

EngineError error(std::string message) { return EngineError{std::move(message)}; }
EngineError refused(KvRefusal refusal, std::string message) { return EngineError{std::move(message), refusal}; }

// Appended piece by piece: GCC 12 warns falsely (-Wrestrict) on "[" + std::string&&.
std::string block_range(std::uint64_t first, std::uint64_t count) {
  std::string range(1, '[');
  range += std::to_string(first);
  range += ", ";
  range += std::to_string(first + count);
  range += ')';
  return range;
}

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
  // An import whose chunks are all here: prepare, write, commit in one go.
  const KvImport import{shard.tokens, shard.geometry, shard.model_fingerprint};
  if (auto checked = check_import(id, request, import); !checked) return checked;
  const auto count = static_cast<std::uint32_t>(shard.tokens.size());
  const std::size_t expected = std::size_t{(count + shard.geometry.block_tokens - 1) / shard.geometry.block_tokens} *
                               shard.geometry.bytes_per_block();
  if (shard.bytes.size() != expected) {
    return error("the KV shard holds " + std::to_string(shard.bytes.size()) + " bytes, " + std::to_string(expected) +
                 " expected for " + std::to_string(count) + " tokens");
  }
  auto started = reserve_import(id, std::move(request), import);
  if (!started) return started.error();
  Sequence& sequence = **started;
  if (auto written = write_sender_blocks(sequence, 0, shard.bytes); !written) {
    remove(sequence);
    return written;
  }
  if (auto committed = finish_import(sequence, {}); !committed) {
    remove(sequence);
    return committed;
  }
  // Not computed here: served from elsewhere, as a prefix-cache hit is.
  sequence.cached_prompt_tokens = count;
  return codec::Done{};
}

EngineResult<codec::Done> BatchingEngine::check_import(SequenceId id, const SequenceRequest& request,
                                                       const KvImport& import) const {
  if (auto checked = check(id, request); !checked) return checked;
  if (import.model_fingerprint != info_.model_fingerprint) {
    return refused(KvRefusal::model_mismatch,
                   "the KV comes from another model (fingerprint " + std::to_string(import.model_fingerprint) +
                       ", this engine runs " + std::to_string(info_.model_fingerprint) + ")");
  }
  const KvGeometry& ours = info_.kv;
  const KvGeometry& theirs = import.geometry;
  if (theirs.layers != ours.layers || theirs.kv_heads != ours.kv_heads || theirs.head_dim != ours.head_dim ||
      theirs.dtype != ours.dtype || theirs.element_bytes != ours.element_bytes || theirs.block_tokens == 0) {
    return refused(KvRefusal::layout_mismatch,
                   "the KV's geometry (" + std::to_string(theirs.layers) + " layers, " +
                       std::to_string(theirs.kv_heads) + " KV heads of " + std::to_string(theirs.head_dim) + ", " +
                       std::to_string(theirs.element_bytes) + "-byte elements, blocks of " +
                       std::to_string(theirs.block_tokens) + ") differs from this engine's (" +
                       std::to_string(ours.layers) + ", " + std::to_string(ours.kv_heads) + " of " +
                       std::to_string(ours.head_dim) + ", " + std::to_string(ours.element_bytes) + "-byte)");
  }
  const std::size_t count = import.tokens.size();
  if (count == 0 || count > request.prompt.size() ||
      !std::equal(import.tokens.begin(), import.tokens.end(), request.prompt.begin())) {
    return error("the KV's " + std::to_string(count) + " tokens must be a non-empty prefix of the prompt of " +
                 std::to_string(request.prompt.size()));
  }
  return codec::Done{};
}

EngineResult<BatchingEngine::Sequence*> BatchingEngine::reserve_import(SequenceId id, SequenceRequest request,
                                                                       const KvImport& import) {
  const auto count = static_cast<std::uint32_t>(import.tokens.size());
  const std::uint32_t need = blocks_for(count);
  // Counted first: allocating and giving back would evict cached prefixes for nothing.
  if (need > pool_.available_blocks()) {
    return refused(KvRefusal::no_capacity, "the KV of " + std::to_string(count) + " tokens needs " +
                                               std::to_string(need) + " blocks and " +
                                               std::to_string(pool_.available_blocks()) + " are free");
  }
  std::vector<std::uint32_t> blocks;
  blocks.reserve(need);
  for (std::uint32_t i = 0; i < need; ++i) blocks.push_back(*pool_.allocate());

  auto state = std::make_unique<Import>();
  state->tokens = count;
  state->sender = import.geometry;
  state->arrived.assign((count + import.geometry.block_tokens - 1) / import.geometry.block_tokens, 0);
  if (import.geometry.block_tokens != info_.kv.block_tokens) {
    state->filled.assign(need, 0);
    state->partial.resize(need);
  }
  Sequence& sequence = add(id, std::move(request));
  sequence.blocks = std::move(blocks);
  sequence.import = std::move(state);
  importing_.push_back(&sequence);
  return &sequence;
}

EngineResult<codec::Done> BatchingEngine::prepare_import(SequenceId id, SequenceRequest request,
                                                         const KvImport& import) {
  if (auto checked = check_import(id, request, import); !checked) return checked;
  auto started = reserve_import(id, std::move(request), import);
  if (!started) return started.error();
  return codec::Done{};
}

EngineResult<BatchingEngine::Sequence*> BatchingEngine::find_importing(SequenceId id) const {
  Sequence* sequence = find(id);
  if (sequence == nullptr || !sequence->import) return error("no importing sequence " + std::to_string(id));
  return sequence;
}

EngineResult<codec::Done> BatchingEngine::write_import(SequenceId id, std::uint32_t first_block,
                                                       std::span<const std::byte> bytes) {
  auto found = find_importing(id);
  if (!found) return found.error();
  return write_sender_blocks(**found, first_block, bytes);
}

EngineResult<codec::Done> BatchingEngine::write_sender_blocks(Sequence& sequence, std::uint32_t first,
                                                              std::span<const std::byte> bytes) {
  Import& import = *sequence.import;
  const std::size_t block_bytes = import.sender.bytes_per_block();
  if (bytes.empty() || bytes.size() % block_bytes != 0) {
    return error("a KV chunk of " + std::to_string(bytes.size()) + " bytes for sequence " +
                 std::to_string(sequence.id) + " is not whole blocks of " + std::to_string(block_bytes) + " bytes");
  }
  const std::uint64_t count = bytes.size() / block_bytes;
  if (auto fresh = check_arrival(sequence, first, count); !fresh) return fresh;
  if (import.filled.empty()) {
    // Same block size: the sender's blocks are ours, written where they lie.
    backend_->write_blocks(std::span(sequence.blocks).subspan(first, count), bytes);
  } else {
    for (std::uint64_t i = 0; i < count; ++i) {
      reblock(sequence, static_cast<std::uint32_t>(first + i), bytes.subspan(i * block_bytes, block_bytes));
    }
  }
  for (std::uint64_t block = first; block < first + count; ++block) import.arrived[block] = 1;
  import.arrived_count += static_cast<std::uint32_t>(count);
  return codec::Done{};
}

EngineResult<std::vector<std::uint32_t>> BatchingEngine::import_blocks(SequenceId id) const {
  auto found = find_importing(id);
  if (!found) return found.error();
  const Sequence& sequence = **found;
  if (backend_->host_kv().empty()) return error("the " + backend_->name() + " backend keeps no KV in host memory");
  if (!sequence.import->filled.empty()) {
    return error("sequence " + std::to_string(id) + " imports blocks of " +
                 std::to_string(sequence.import->sender.block_tokens) + " tokens into blocks of " +
                 std::to_string(info_.kv.block_tokens) + ": they are re-blocked, not written in place");
  }
  return std::vector<std::uint32_t>(sequence.blocks.begin(), sequence.blocks.begin() + sequence.import->sender_blocks());
}

EngineResult<codec::Done> BatchingEngine::import_written(SequenceId id, std::uint32_t first_block,
                                                         std::uint32_t block_count) {
  auto found = find_importing(id);
  if (!found) return found.error();
  Sequence& sequence = **found;
  Import& import = *sequence.import;
  if (!import.filled.empty()) return error("sequence " + std::to_string(id) + " re-blocks its import: none is in place");
  if (block_count == 0) return error("KV blocks written in place for sequence " + std::to_string(id) + ": none");
  if (auto fresh = check_arrival(sequence, first_block, block_count); !fresh) return fresh;
  for (std::uint64_t block = first_block; block < std::uint64_t{first_block} + block_count; ++block) import.arrived[block] = 1;
  import.arrived_count += block_count;
  return codec::Done{};
}

EngineResult<codec::Done> BatchingEngine::check_arrival(const Sequence& sequence, std::uint64_t first,
                                                        std::uint64_t count) const {
  const Import& import = *sequence.import;
  if (first + count > import.sender_blocks()) {
    return error("KV blocks " + block_range(first, count) + " for sequence " + std::to_string(sequence.id) +
                 " are beyond the import's " + std::to_string(import.sender_blocks()) + " blocks");
  }
  for (std::uint64_t block = first; block < first + count; ++block) {
    if (import.arrived[block] != 0) {
      return error("KV block " + std::to_string(block) + " for sequence " + std::to_string(sequence.id) +
                   " arrived already");
    }
  }
  return codec::Done{};
}

void BatchingEngine::reblock(Sequence& sequence, std::uint32_t block, std::span<const std::byte> bytes) {
  Import& import = *sequence.import;
  const KvGeometry& ours = info_.kv;
  const std::uint32_t theirs_tokens = import.sender.block_tokens;
  const std::uint32_t our_tokens = ours.block_tokens;
  // Each (layer, k|v, kv head) is one run of block_tokens slots in both
  // layouts: copy the overlap of this sender block with each block of ours.
  const std::uint32_t rows = ours.layers * 2 * ours.kv_heads;
  const std::size_t slot_bytes = std::size_t{ours.head_dim} * ours.element_bytes;
  const std::uint32_t begin = block * theirs_tokens;
  const std::uint32_t end = std::min(begin + theirs_tokens, import.tokens);
  for (std::uint32_t ours_index = begin / our_tokens; ours_index * our_tokens < end; ++ours_index) {
    const std::uint32_t low = std::max(begin, ours_index * our_tokens);
    const std::uint32_t high = std::min(end, (ours_index + 1) * our_tokens);
    auto& partial = import.partial[ours_index];
    if (partial.empty()) partial.resize(ours.bytes_per_block());  // zeroed: slots no chunk covers stay 0
    for (std::uint32_t row = 0; row < rows; ++row) {
      std::memcpy(partial.data() + (std::size_t{row} * our_tokens + (low - ours_index * our_tokens)) * slot_bytes,
                  bytes.data() + (std::size_t{row} * theirs_tokens + (low - begin)) * slot_bytes,
                  (high - low) * slot_bytes);
    }
    import.filled[ours_index] += high - low;
    const std::uint32_t positions = std::min(our_tokens, import.tokens - ours_index * our_tokens);
    if (import.filled[ours_index] == positions) {
      backend_->write_blocks(std::span(sequence.blocks).subspan(ours_index, 1), partial);
      std::vector<std::byte>().swap(partial);
    }
  }
}

EngineResult<codec::Done> BatchingEngine::commit_import(SequenceId id, std::span<const std::uint32_t> generated) {
  auto found = find_importing(id);
  if (!found) return found.error();
  return finish_import(**found, generated);
}

EngineResult<codec::Done> BatchingEngine::finish_import(Sequence& sequence, std::span<const std::uint32_t> generated) {
  const Import& import = *sequence.import;
  if (import.arrived_count != import.sender_blocks()) {
    return error("sequence " + std::to_string(sequence.id) + " cannot commit: " +
                 std::to_string(import.arrived_count) + " of its " + std::to_string(import.sender_blocks()) +
                 " KV blocks arrived");
  }
  if (sequence.tokens.size() + generated.size() <= import.tokens) {
    return error("sequence " + std::to_string(sequence.id) + " cannot commit: its KV covers all of its " +
                 std::to_string(sequence.tokens.size() + generated.size()) + " tokens, nothing is left to compute");
  }
  if (generated.size() >= sequence.request.max_tokens) {
    return error("sequence " + std::to_string(sequence.id) + " cannot commit: " + std::to_string(generated.size()) +
                 " tokens generated elsewhere leave nothing of its max_tokens " +
                 std::to_string(sequence.request.max_tokens));
  }
  for (std::uint32_t token : generated) {
    if (token >= info_.vocab_size) {
      return error("sequence " + std::to_string(sequence.id) + " cannot commit: generated token " +
                   std::to_string(token) + " is outside the vocabulary of " + std::to_string(info_.vocab_size));
    }
  }
  sequence.tokens.insert(sequence.tokens.end(), generated.begin(), generated.end());
  sequence.request.prompt.insert(sequence.request.prompt.end(), generated.begin(), generated.end());
  sequence.request.max_tokens -= static_cast<std::uint32_t>(generated.size());
  sequence.computed = import.tokens;
  sequence.import.reset();
  importing_.erase(std::find(importing_.begin(), importing_.end(), &sequence));
  publish_full_blocks(sequence);
  // It enters the queue now: transfer time is not queueing time.
  sequence.arrival = next_arrival_++;
  sequence.submitted = Clock::now();
  enqueue(sequence);
  return codec::Done{};
}

bool BatchingEngine::admittable(const Sequence& sequence) const {
  if (running_.size() >= options_.max_running) return false;
  std::uint32_t have = static_cast<std::uint32_t>(sequence.blocks.size());
  std::size_t available = pool_.available_blocks();
  if (have == 0 && options_.prefix_cache) {
    const auto limit = static_cast<std::uint32_t>((sequence.tokens.size() - 1) / info_.kv.block_tokens);
    const KvBlockPool::PrefixCount prefix = pool_.count_prefix(sequence.tokens, limit);
    have = prefix.blocks;
    // Cached prefix blocks nobody holds (a preempted sequence's own) are
    // counted once: as the sequence's, not also as available. Counted
    // twice, it would be admitted, fail to reserve and give way, step
    // after step, while holding up the queue behind it.
    available -= prefix.unreferenced;
  }
  // Blocks for every token so far and the next one; paused sequences'
  // blocks count as available: admission may preempt them.
  const std::uint32_t need = blocks_for(static_cast<std::uint32_t>(sequence.tokens.size() + 1));
  for (const Sequence* other : running_) {
    if (other->paused) available += other->blocks.size();
  }
  return need <= have || need - have <= available;
}

bool BatchingEngine::stuck_on_waiting_blocks(const Sequence& head) const {
  for (const Sequence* sequence : running_) {
    if (!sequence->paused) return false;  // it frees its blocks when it finishes or gives way
  }
  return std::any_of(waiting_.begin(), waiting_.end(),
                     [&](const Sequence* other) { return other != &head && !other->blocks.empty(); });
}

void BatchingEngine::preempt_waiting_for(const Sequence& head) {
  for (auto it = waiting_.rbegin(); it != waiting_.rend() && !admittable(head); ++it) {
    if (*it == &head || (*it)->blocks.empty()) continue;
    release_blocks(**it);
    ++preemptions_;
  }
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
    if (next == waiting_.end()) break;
    if (!admittable(**next) && stuck_on_waiting_blocks(**next)) preempt_waiting_for(**next);
    if (!admittable(**next)) break;  // in priority order: no overtaking
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
    if (sequence.request.hold_kv) output.kv_progress.push_back({sequence.id, sequence.computed});
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
  for (Sequence* sequence : done_) retire(*sequence);

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

void BatchingEngine::retire(Sequence& sequence) {
  if (!sequence.request.hold_kv) {
    remove(sequence);
    return;
  }
  // Only a running, unpaused sequence finishes: it was in the batch.
  running_.erase(std::find(running_.begin(), running_.end(), &sequence));
  sequence.running = false;
  sequence.held = true;
  held_.push_back(&sequence);
}

void BatchingEngine::remove(Sequence& sequence) {
  for (std::uint32_t block : sequence.blocks) pool_.release(block);
  sequence.blocks.clear();
  const auto erase = [&](std::vector<Sequence*>& list) { list.erase(std::find(list.begin(), list.end(), &sequence)); };
  if (sequence.running) {
    erase(running_);
  } else if (sequence.held) {
    erase(held_);
  } else if (sequence.import) {
    erase(importing_);
  } else {
    erase(waiting_);
  }
  if (sequence.paused) --paused_count_;
  sequences_.erase(sequence.id);
}

bool BatchingEngine::has_work() const {
  for (const Sequence* sequence : running_) {
    if (!sequence->paused) return true;
  }
  for (const Sequence* sequence : waiting_) {
    if (!sequence->paused) return admittable(*sequence) || stuck_on_waiting_blocks(*sequence);
  }
  return false;
}

BatchingEngine::Sequence* BatchingEngine::find(SequenceId id) const {
  auto found = sequences_.find(id);
  return found == sequences_.end() ? nullptr : found->second.get();
}

void BatchingEngine::cancel(SequenceId id) {
  if (Sequence* sequence = find(id)) remove(*sequence);
}

void BatchingEngine::release_kv(SequenceId id) {
  Sequence* sequence = find(id);
  if (sequence == nullptr) return;
  if (sequence->held) {
    remove(*sequence);
  } else {
    // Not finished yet: it no longer needs holding, so it is freed when it finishes.
    sequence->request.hold_kv = false;
  }
}

EngineResult<Engine::Held> BatchingEngine::hold(SequenceId id) {
  Sequence* sequence = find(id);
  if (sequence == nullptr) return error("no sequence " + std::to_string(id));
  if (!sequence->held) {
    if (!sequence->running || sequence->computed == 0) {
      return error("sequence " + std::to_string(id) + " is not running: it has no KV to hold");
    }
    running_.erase(std::find(running_.begin(), running_.end(), sequence));
    if (sequence->paused) --paused_count_;
    sequence->paused = false;
    sequence->running = false;
    sequence->held = true;
    sequence->request.hold_kv = true;
    held_.push_back(sequence);
  }
  return Held{sequence->tokens, static_cast<std::uint32_t>(sequence->request.prompt.size()), sequence->computed};
}

void BatchingEngine::set_paused(SequenceId id, bool paused) {
  auto found = sequences_.find(id);
  // A held sequence never runs again: nothing to pause.
  if (found == sequences_.end() || found->second->held || found->second->paused == paused) return;
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
  pack_blocks(sequence, 0, block_count, shard.bytes);
  return shard;
}

void BatchingEngine::pack_blocks(const Sequence& sequence, std::uint32_t first, std::uint32_t count,
                                 std::span<std::byte> out) {
  backend_->read_blocks(std::span(sequence.blocks).subspan(first, count), out);
}

EngineResult<std::uint32_t> BatchingEngine::computed_tokens(SequenceId id) const {
  const Sequence* sequence = find(id);
  if (sequence == nullptr) return error("no sequence " + std::to_string(id));
  return sequence->computed;
}

EngineResult<codec::Done> BatchingEngine::read_kv(SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                                  std::span<std::byte> out) {
  auto readable = find_readable(id, first_block, block_count);
  if (!readable) return readable.error();
  const std::size_t expected = std::size_t{block_count} * info_.kv.bytes_per_block();
  if (out.size() != expected) {
    return error("a KV read of " + std::to_string(block_count) + " blocks needs " + std::to_string(expected) +
                 " bytes, the buffer holds " + std::to_string(out.size()));
  }
  pack_blocks(**readable, first_block, block_count, out);
  return codec::Done{};
}

EngineResult<std::vector<std::uint32_t>> BatchingEngine::locate_kv(SequenceId id, std::uint32_t first_block,
                                                                   std::uint32_t block_count) {
  if (backend_->host_kv().empty()) return error("the " + backend_->name() + " backend keeps no KV in host memory");
  auto readable = find_readable(id, first_block, block_count);
  if (!readable) return readable.error();
  const auto blocks = std::span((*readable)->blocks).subspan(first_block, block_count);
  return std::vector<std::uint32_t>(blocks.begin(), blocks.end());
}

EngineResult<const BatchingEngine::Sequence*> BatchingEngine::find_readable(SequenceId id, std::uint32_t first_block,
                                                                           std::uint32_t block_count) const {
  const Sequence* sequence = find(id);
  if (sequence == nullptr) return error("no sequence " + std::to_string(id));
  if (sequence->import) return error("sequence " + std::to_string(id) + " is importing its KV: nothing to read");
  if (block_count == 0) return error("a KV read of sequence " + std::to_string(id) + " asks for no blocks");
  // Whole blocks only, except the last one of a held sequence: its last
  // positions are computed and no more will come.
  const std::uint32_t readable =
      sequence->held ? blocks_for(sequence->computed) : sequence->computed / info_.kv.block_tokens;
  if (std::uint64_t{first_block} + block_count > readable) {
    return error("KV blocks " + block_range(first_block, block_count) + " of sequence " + std::to_string(id) +
                 " are not all computed: " + std::to_string(sequence->computed) + " tokens are, " +
                 std::to_string(readable) + " blocks can be read");
  }
  return sequence;
}

EngineStats BatchingEngine::stats() const {
  EngineStats stats;
  stats.waiting = static_cast<std::uint32_t>(waiting_.size());
  stats.running = static_cast<std::uint32_t>(running_.size());
  stats.max_running = options_.max_running;
  stats.paused = paused_count_;
  stats.importing = static_cast<std::uint32_t>(importing_.size());
  for (const Sequence* sequence : importing_) {
    stats.reserved_blocks += static_cast<std::uint32_t>(sequence->blocks.size());
  }
  stats.held = static_cast<std::uint32_t>(held_.size());
  for (const Sequence* sequence : held_) {
    stats.held_blocks += static_cast<std::uint32_t>(sequence->blocks.size());
  }
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
