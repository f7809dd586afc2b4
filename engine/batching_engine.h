// The built-in Engine: continuous batching over a ModelBackend and a paged
// KV cache (KvBlockPool). Each step runs one token of every running sequence
// together with chunks of newly admitted prompts, within a token budget
// (chunked prefill); sequences are admitted by free blocks, highest priority
// first; a finished or cancelled sequence frees its blocks at once. When a
// running sequence needs a block and none is free, the most recently
// admitted other sequence is preempted: its blocks are freed and it is
// recomputed later from its prompt and the tokens it had generated.
//
// KV transfer (engine.h): a hold_kv sequence that finishes is moved to the
// held list with its blocks; an import reserves its blocks at prepare and
// sits on the importing list until commit, when it joins the waiting queue
// with those blocks as its computed prefix. Neither list is ever scheduled
// or preempted; a committed import waiting with its blocks gives them up
// only when nothing runs and the sequence ahead of it needs them. When the
// sender's block size differs from ours, a chunk is re-laid into our
// blocks; a block of ours that a chunk covers only in part waits in host
// memory until the rest of its positions arrive, so no block is written
// from bytes that never came.
#pragma once

#include <chrono>
#include <memory>
#include <unordered_map>
#include <vector>

#include "engine/batching_options.h"
#include "engine/engine.h"
#include "engine/kv_block_pool.h"
#include "engine/model_backend.h"

namespace fmwire::engine {

class BatchingEngine final : public Engine {
 public:
  // `info` gives the model's name, EOS token and fingerprint; the rest of it
  // (vocabulary, context, KV geometry, blocks) is taken from the backend.
  BatchingEngine(EngineInfo info, std::unique_ptr<ModelBackend> backend, BatchingOptions options = {});
  ~BatchingEngine() override;

  const EngineInfo& info() const override { return info_; }
  EngineResult<codec::Done> submit(SequenceId id, SequenceRequest request) override;
  EngineResult<codec::Done> submit_with_kv(SequenceId id, SequenceRequest request, const KvShard& shard) override;
  void step(StepOutput& output) override;
  bool has_work() const override;
  void cancel(SequenceId id) override;
  void set_paused(SequenceId id, bool paused) override;
  EngineResult<KvShard> export_kv(SequenceId id) override;
  EngineResult<std::uint32_t> computed_tokens(SequenceId id) const override;
  EngineResult<codec::Done> read_kv(SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                    std::span<std::byte> out) override;
  std::span<std::byte> host_kv() override { return backend_->host_kv(); }
  std::span<std::byte> transfer_arena() override { return backend_->transfer_arena(); }
  EngineResult<std::vector<std::uint32_t>> locate_kv(SequenceId id, std::uint32_t first_block,
                                                     std::uint32_t block_count) override;
  void release_kv(SequenceId id) override;
  EngineResult<Held> hold(SequenceId id) override;
  EngineResult<codec::Done> prepare_import(SequenceId id, SequenceRequest request, const KvImport& import) override;
  EngineResult<codec::Done> write_import(SequenceId id, std::uint32_t first_block,
                                         std::span<const std::byte> bytes) override;
  EngineResult<std::vector<std::uint32_t>> import_blocks(SequenceId id) const override;
  EngineResult<codec::Done> import_written(SequenceId id, std::uint32_t first_block, std::uint32_t block_count) override;
  EngineResult<codec::Done> commit_import(SequenceId id, std::span<const std::uint32_t> generated = {}) override;
  EngineStats stats() const override;
  std::vector<std::uint64_t> cached_prefixes() const override { return pool_.cached_hashes(); }

  ModelBackend& backend() { return *backend_; }

 private:
  using Clock = std::chrono::steady_clock;

  // An import between prepare and commit: which sender blocks arrived and,
  // when block sizes differ, our blocks that are filled only in part.
  struct Import {
    std::uint32_t tokens = 0;               // positions whose KV arrives
    KvGeometry sender;                      // the sender's geometry
    std::vector<std::uint8_t> arrived;      // per sender block: 1 once written
    std::uint32_t arrived_count = 0;
    std::vector<std::uint32_t> filled;      // re-blocking: per block of ours, positions written
    std::vector<std::vector<std::byte>> partial;  // re-blocking: a block of ours until it is whole

    std::uint32_t sender_blocks() const { return static_cast<std::uint32_t>(arrived.size()); }
  };

  struct Sequence {
    SequenceId id;
    SequenceRequest request;
    std::vector<std::uint32_t> tokens;  // prompt, then what was generated
    std::uint32_t computed = 0;         // leading tokens whose KV is in `blocks`
    std::vector<std::uint32_t> blocks;
    std::uint32_t published_blocks = 0; // leading full blocks offered to the prefix cache
    std::uint64_t published_hash = 0;   // chain hash of those blocks
    std::uint32_t cached_prompt_tokens = 0;
    std::uint32_t generated = 0;
    std::uint64_t arrival = 0;          // submission order
    std::uint64_t admission = 0;        // order of the latest admission
    bool running = false;
    bool in_batch = false;              // has an entry in the step being built
    bool paused = false;
    bool held = false;                  // hold_kv and finished: only its blocks remain
    std::unique_ptr<Import> import;     // set between prepare_import and commit_import
    Sampler sampler;
    Clock::time_point submitted, admitted, first_token, last_token;
    bool was_admitted = false;
    bool has_first_token = false;

    explicit Sequence(const SamplingParams& sampling) : sampler(sampling) {}
  };

  EngineResult<codec::Done> check(SequenceId id, const SequenceRequest& request) const;
  Sequence& add(SequenceId id, SequenceRequest request);
  void enqueue(Sequence& sequence);
  std::uint32_t blocks_for(std::uint32_t tokens) const;
  // Makes `sequence` hold blocks for its first `tokens` positions, preempting
  // younger sequences if it must; false when it cannot (it was preempted).
  bool reserve(Sequence& sequence, std::uint32_t tokens);
  bool admittable(const Sequence& sequence) const;
  // Nothing runs that will free a block, and other waiting sequences hold
  // some: committed imports wait with their KV, and when they fill the
  // cache, each waits for a block the others hold, for ever.
  bool stuck_on_waiting_blocks(const Sequence& head) const;
  // The way out: the youngest of those give their blocks up (to be
  // recomputed when admitted, as a preempted sequence is) until `head`,
  // first in the queue, is admittable.
  void preempt_waiting_for(const Sequence& head);
  void admit(Sequence& sequence);
  void preempt(Sequence& sequence);
  void release_blocks(Sequence& sequence);
  void publish_full_blocks(Sequence& sequence);
  void schedule(Sequence& sequence, std::uint32_t tokens);
  void finish(Sequence& sequence, FinishCause cause, StepOutput& output);
  // After its Finished event: freed, or held when it asked for hold_kv.
  void retire(Sequence& sequence);
  void remove(Sequence& sequence);
  Sequence* find(SequenceId id) const;
  // Packs the sequence's blocks [first, first + count) into `out`, unchecked.
  void pack_blocks(const Sequence& sequence, std::uint32_t first, std::uint32_t count, std::span<std::byte> out);
  // prepare_import's checks (check() included), then its reservation: the
  // new sequence is importing, or nothing is kept (no_capacity).
  EngineResult<codec::Done> check_import(SequenceId id, const SequenceRequest& request, const KvImport& import) const;
  EngineResult<Sequence*> reserve_import(SequenceId id, SequenceRequest request, const KvImport& import);
  EngineResult<Sequence*> find_importing(SequenceId id) const;
  // Sender blocks [first, first + count) are within the import and none has arrived yet.
  EngineResult<codec::Done> check_arrival(const Sequence& sequence, std::uint64_t first, std::uint64_t count) const;
  // read_kv's checks: a sequence whose blocks [first_block, +block_count) are computed.
  EngineResult<const Sequence*> find_readable(SequenceId id, std::uint32_t first_block, std::uint32_t block_count) const;
  // Writes sender blocks [first, ...) of `bytes` into the reserved blocks.
  EngineResult<codec::Done> write_sender_blocks(Sequence& sequence, std::uint32_t first,
                                                std::span<const std::byte> bytes);
  // Re-lays sender block `block` into our blocks (block sizes differ).
  void reblock(Sequence& sequence, std::uint32_t block, std::span<const std::byte> bytes);
  EngineResult<codec::Done> finish_import(Sequence& sequence, std::span<const std::uint32_t> generated);

  EngineInfo info_;
  std::unique_ptr<ModelBackend> backend_;
  BatchingOptions options_;
  KvBlockPool pool_;
  std::unordered_map<SequenceId, std::unique_ptr<Sequence>> sequences_;
  std::vector<Sequence*> waiting_;  // by priority, then arrival
  std::vector<Sequence*> running_;  // by admission
  std::vector<Sequence*> importing_;  // prepared, not committed
  std::vector<Sequence*> held_;       // hold_kv, finished, not released
  std::uint64_t next_arrival_ = 0;
  std::uint64_t next_admission_ = 0;

  // Reused by every step: no allocation once they have grown.
  std::vector<BatchEntry> entries_;
  std::vector<Sequence*> entry_sequences_;
  std::vector<Sequence*> order_;  // running_ as the step began
  std::vector<float> logits_;
  std::vector<Sequence*> done_;

  std::uint32_t paused_count_ = 0;
  std::uint64_t steps_ = 0;
  double recent_step_us_ = 0;
  std::uint64_t prompt_tokens_ = 0;
  std::uint64_t cached_prompt_tokens_ = 0;
  std::uint64_t generated_tokens_ = 0;
  std::uint64_t preemptions_ = 0;
};

}  // namespace fmwire::engine
