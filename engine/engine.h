// The seam a real inference engine plugs into (DESIGN.md, "Engine"): take
// sequences, run scheduling steps that produce tokens, cancel, pause, and
// move a sequence's KV blocks out and in. The worker server drives an Engine
// from one thread; nothing here is thread-safe.
//
// KV transfer between workers (disaggregated prefill/decode) follows NIXL's
// prepare / post / check: the sender submits with hold_kv, reads each block
// as soon as kv_progress says it is computed (read_kv), and releases the
// sequence when the transfer ends (release_kv); the receiver reserves blocks
// (prepare_import), writes chunks into them in any order (write_import), and
// turns the import into an ordinary sequence (commit_import). cancel() ends
// either side in any phase and frees every block.
//
// A step is the unit of progress: every call to step() advances each running
// sequence by at most one generated token (and prefills some prompt tokens),
// and reports what it produced. Commands (submit, cancel, pause) take effect
// at the next step at the latest, so a cancel is honoured within one step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "engine/kv_geometry.h"
#include "engine/sampler.h"

namespace fmwire::engine {

// Chosen by the caller, unique among the engine's live sequences.
using SequenceId = std::uint64_t;

// Why a KV import was refused, for the errors a KV transfer session maps to
// the wire's typed reasons (none: any other error).
enum class KvRefusal {
  none,
  no_capacity,      // not enough free KV blocks to reserve now
  layout_mismatch,  // the sender's KV geometry differs (block size aside)
  model_mismatch,   // the sender runs another model
};

struct EngineError {
  std::string message;
  KvRefusal refusal = KvRefusal::none;
};
template <typename T>
using EngineResult = codec::Result<T, EngineError>;

struct SequenceRequest {
  std::vector<std::uint32_t> prompt;  // token ids, BOS included when wanted
  std::uint32_t max_tokens = 16;
  SamplingParams sampling;
  bool stop_at_eos = true;
  std::int8_t priority = 0;           // higher is admitted first
  // When the sequence finishes (EOS, max_tokens, context full), keep its KV
  // blocks: it is reported Finished as usual, then stays held (neither
  // waiting nor running) until release_kv() or cancel(), so that a KV
  // transfer can read blocks after the last one is computed.
  bool hold_kv = false;
};

enum class FinishCause {
  end_of_sequence,  // the model produced EOS
  max_tokens,
  cancelled,        // cancel(): no Finished event is reported for it
  context_full,     // the context window is used up
};

// What one step produced, filled by step(): cleared by the caller.
struct StepOutput {
  struct Token {
    SequenceId id;
    std::uint32_t token;
    std::uint32_t index;  // in the completion, from 0
  };
  struct Finished {
    SequenceId id;
    FinishCause cause;
    std::uint32_t prompt_tokens;
    std::uint32_t completion_tokens;
    std::uint32_t cached_prompt_tokens;  // served from the prefix cache
    std::uint64_t queue_us;              // submit to first scheduled
    std::uint64_t prefill_us;            // first scheduled to first token
    std::uint64_t decode_us;             // first token to the last
  };
  // A hold_kv sequence's computed-token count after this step: what lets a
  // sender read each block as soon as it is complete, while prefill goes on.
  // A preempted sequence's count can go back; blocks read before stay valid
  // (recomputing the same tokens gives the same KV).
  struct KvProgress {
    SequenceId id;
    std::uint32_t computed;
  };
  std::vector<Token> tokens;      // in order per sequence
  std::vector<Finished> finished; // after that sequence's last token
  // Hashes of full KV blocks that entered or left the prefix cache this step.
  std::vector<std::uint64_t> prefixes_added;
  std::vector<std::uint64_t> prefixes_evicted;
  // One entry per hold_kv sequence whose count advanced (prefill chunk or
  // decode step); none for other sequences.
  std::vector<KvProgress> kv_progress;
  std::uint32_t batch_tokens = 0;  // tokens the model ran this step
  std::uint64_t step_us = 0;

  void clear() {
    tokens.clear();
    finished.clear();
    prefixes_added.clear();
    prefixes_evicted.clear();
    kv_progress.clear();
    batch_tokens = 0;
    step_us = 0;
  }
};

struct EngineInfo {
  std::string model_name;          // "builtin", a checkpoint's file name, "synthetic:llama-3-8b"
  std::string backend;             // "cpu", "cuda", "synthetic"
  std::uint32_t vocab_size = 0;
  std::uint32_t max_context = 0;   // prompt + completion tokens, at most
  std::uint32_t eos_token = 2;
  KvGeometry kv;
  std::uint32_t total_blocks = 0;
  std::uint64_t model_fingerprint = 0;
};

// Counters and gauges, for LoadReports, metrics and tests.
struct EngineStats {
  std::uint32_t waiting = 0;        // submitted, not admitted yet
  std::uint32_t running = 0;        // admitted (paused ones included)
  std::uint32_t max_running = 0;    // admitted at once, at most; 0: no such limit said
  std::uint32_t paused = 0;
  std::uint32_t importing = 0;      // prepare_import()ed, not committed yet
  std::uint32_t reserved_blocks = 0;  // the blocks those importing sequences hold
  std::uint32_t held = 0;           // hold_kv sequences that finished, not released yet
  std::uint32_t held_blocks = 0;    // the blocks they hold
  std::uint32_t free_blocks = 0;    // allocatable: free or cached with no reference
  std::uint32_t total_blocks = 0;
  std::uint32_t cached_blocks = 0;  // in the prefix cache
  std::uint64_t recent_step_us = 0; // moving average of steps that ran the model
  std::uint64_t steps = 0;
  std::uint64_t prompt_tokens = 0;      // admitted prompt tokens
  std::uint64_t cached_prompt_tokens = 0;  // of those, served from the prefix cache
  std::uint64_t generated_tokens = 0;
  std::uint64_t preemptions = 0;
};

// A sequence's computed KV: the tokens it covers and their blocks' bytes in
// the wire layout (KvGeometry), for the KV transfer session.
struct KvShard {
  std::vector<std::uint32_t> tokens;  // positions 0 .. tokens.size() - 1
  KvGeometry geometry;
  std::uint64_t model_fingerprint = 0;
  std::vector<std::byte> bytes;       // ceil(tokens / block_tokens) blocks
};

// What a receiver is told about the KV it is about to import: the sender's
// tokens, geometry and model. Only the block size may differ from the
// receiver's (the chunks are then re-laid into its blocks).
struct KvImport {
  std::vector<std::uint32_t> tokens;  // positions 0 .. tokens.size() - 1 whose KV arrives
  KvGeometry geometry;                // the sender's
  std::uint64_t model_fingerprint = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;

  virtual const EngineInfo& info() const = 0;

  // Queues a sequence. Refused at once (with a message that names the
  // parameter and the limit) when it can never run: empty prompt, a token id
  // outside the vocabulary, prompt + max_tokens over the context, more
  // blocks than the cache holds.
  virtual EngineResult<codec::Done> submit(SequenceId id, SequenceRequest request) = 0;

  // Like submit, with the KV of the prompt's first shard.tokens.size()
  // tokens taken from `shard` instead of computed: prepare_import,
  // write_import of every block and commit_import in one call, with their
  // checks and refusals. Those tokens count as cached_prompt_tokens.
  virtual EngineResult<codec::Done> submit_with_kv(SequenceId id, SequenceRequest request, const KvShard& shard) = 0;

  // One scheduling step. Appends to `output`; does nothing when no sequence
  // can run.
  virtual void step(StepOutput& output) = 0;

  // True when a step would do something: a sequence waiting or running and
  // not paused.
  virtual bool has_work() const = 0;

  // Ends a sequence now and frees its KV blocks, in any phase (waiting,
  // running, held, importing); unknown ids are ignored.
  virtual void cancel(SequenceId id) = 0;

  // A paused sequence keeps its blocks but takes no part in steps (its
  // consumer has no room for more tokens: flow control).
  virtual void set_paused(SequenceId id, bool paused) = 0;

  // The KV computed so far for a running sequence.
  virtual EngineResult<KvShard> export_kv(SequenceId id) = 0;

  // --- KV transfer, sender side ---

  // Leading positions of a sequence whose KV is computed (0 while importing).
  virtual EngineResult<std::uint32_t> computed_tokens(SequenceId id) const = 0;

  // Packs blocks [first_block, first_block + block_count) of a running,
  // paused or held sequence into `out` (block_count * bytes_per_block(), the
  // wire layout of KvGeometry). A block may be read once all its positions
  // are computed, or when it is the last block of a held sequence (no more
  // positions will come); any other is refused.
  virtual EngineResult<codec::Done> read_kv(SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                            std::span<std::byte> out) = 0;

  // The KV cache where it lies in this process's memory: block b at
  // b * bytes_per_block(), in KvGeometry's layout (the CPU and synthetic
  // backends). A transfer then sends blocks from there and lands chunks
  // there, with no packing copy (locate_kv, import_blocks). Empty where the
  // cache is elsewhere (CUDA): read_kv and write_import copy instead.
  virtual std::span<std::byte> host_kv() { return {}; }
  // Pinned host memory where the cache is on a device (ModelBackend::
  // transfer_arena): read_kv into it and write_import from it take one DMA,
  // no host copy. Empty where there is none.
  virtual std::span<std::byte> transfer_arena() { return {}; }

  // read_kv's checks, but the blocks' places in host_kv() instead of their
  // bytes, for a sender that sends them from there: they stay where they
  // are, unchanged, until release_kv() or cancel().
  virtual EngineResult<std::vector<std::uint32_t>> locate_kv(SequenceId id, std::uint32_t first_block,
                                                             std::uint32_t block_count) {
    (void)id, (void)first_block, (void)block_count;
    return EngineError{"this engine keeps no KV in host memory"};
  }

  // Frees a held (hold_kv, finished) sequence: cancel() by another name, for
  // the end of a transfer. A hold_kv sequence that has not finished yet goes
  // on and is freed when it finishes. Unknown ids are ignored.
  virtual void release_kv(SequenceId id) = 0;

  // Stops a running sequence where it is and holds its KV, as a finished
  // hold_kv sequence is held (live migration: its KV goes to another worker,
  // which continues it). No Finished event. Refused for a sequence that is
  // not running (waiting, importing, preempted: no KV to move).
  struct Held {
    std::vector<std::uint32_t> tokens;  // prompt, then what was generated
    std::uint32_t prompt_tokens = 0;
    std::uint32_t computed = 0;         // leading tokens whose KV is held
  };
  virtual EngineResult<Held> hold(SequenceId id) = 0;

  // --- KV transfer, receiver side ---

  // Checks `request` as submit() does and `import` against this engine
  // (refusal model_mismatch, layout_mismatch), and reserves blocks for
  // import.tokens (a non-empty prefix of the prompt, the whole prompt at
  // most: commit_import may append the sender's generated tokens) at
  // once, or keeps nothing (no_capacity). The id is taken from now on, but
  // the sequence neither waits nor runs until commit_import().
  virtual EngineResult<codec::Done> prepare_import(SequenceId id, SequenceRequest request, const KvImport& import) = 0;

  // Writes whole blocks in the sender's block size, from sender block
  // `first_block` on, into the blocks prepare_import() reserved. Chunks may
  // come in any order, each block once.
  virtual EngineResult<codec::Done> write_import(SequenceId id, std::uint32_t first_block,
                                                 std::span<const std::byte> bytes) = 0;

  // Where an import's blocks lie in host_kv(), one per sender block, when
  // the sender's block size is ours (nothing to re-block): a receiver may
  // write each chunk there itself, then say so with import_written().
  // Refused otherwise; write_import() works either way.
  virtual EngineResult<std::vector<std::uint32_t>> import_blocks(SequenceId id) const {
    (void)id;
    return EngineError{"this engine keeps no KV in host memory"};
  }
  // Sender blocks [first_block, first_block + block_count) were written
  // where import_blocks() said: they count as arrived, as write_import()'s
  // would (each block once).
  virtual EngineResult<codec::Done> import_written(SequenceId id, std::uint32_t first_block,
                                                   std::uint32_t block_count) {
    (void)id, (void)first_block, (void)block_count;
    return EngineError{"this engine keeps no KV in host memory"};
  }

  // Once every block of the import has been written: the sequence waits like
  // a submitted one, with its first import.tokens.size() positions computed.
  // `generated`: tokens the sender generated after the imported ones (a
  // prefill worker's first token), appended to the prompt and counted
  // against max_tokens, so the sequence goes on after them; refused when
  // nothing would be left to compute or to generate.
  virtual EngineResult<codec::Done> commit_import(SequenceId id, std::span<const std::uint32_t> generated = {}) = 0;

  virtual EngineStats stats() const = 0;

  // Every prefix hash held now (for a subscriber that joins late).
  virtual std::vector<std::uint64_t> cached_prefixes() const = 0;
};

}  // namespace fmwire::engine
