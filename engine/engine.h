// The seam a real inference engine plugs into (DESIGN.md, "Engine"): take
// sequences, run scheduling steps that produce tokens, cancel, pause, and
// move a sequence's KV blocks out and in. The worker server drives an Engine
// from one thread; nothing here is thread-safe.
//
// A step is the unit of progress: every call to step() advances each running
// sequence by at most one generated token (and prefills some prompt tokens),
// and reports what it produced. Commands (submit, cancel, pause) take effect
// at the next step at the latest, so a cancel is honoured within one step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "engine/kv_geometry.h"
#include "engine/sampler.h"

namespace fmwire::engine {

// Chosen by the caller, unique among the engine's live sequences.
using SequenceId = std::uint64_t;

struct EngineError {
  std::string message;
};
template <typename T>
using EngineResult = codec::Result<T, EngineError>;

struct SequenceRequest {
  std::vector<std::uint32_t> prompt;  // token ids, BOS included when wanted
  std::uint32_t max_tokens = 16;
  SamplingParams sampling;
  bool stop_at_eos = true;
  std::int8_t priority = 0;           // higher is admitted first
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
  std::vector<Token> tokens;      // in order per sequence
  std::vector<Finished> finished; // after that sequence's last token
  // Hashes of full KV blocks that entered or left the prefix cache this step.
  std::vector<std::uint64_t> prefixes_added;
  std::vector<std::uint64_t> prefixes_evicted;
  std::uint32_t batch_tokens = 0;  // tokens the model ran this step
  std::uint64_t step_us = 0;

  void clear() {
    tokens.clear();
    finished.clear();
    prefixes_added.clear();
    prefixes_evicted.clear();
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
  std::uint32_t paused = 0;
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
  // tokens taken from `shard` instead of computed (the shard's tokens must
  // be a prefix of the prompt, shorter than it, from the same model).
  virtual EngineResult<codec::Done> submit_with_kv(SequenceId id, SequenceRequest request, const KvShard& shard) = 0;

  // One scheduling step. Appends to `output`; does nothing when no sequence
  // can run.
  virtual void step(StepOutput& output) = 0;

  // True when a step would do something: a sequence waiting or running and
  // not paused.
  virtual bool has_work() const = 0;

  // Ends a sequence now and frees its KV blocks; unknown ids are ignored.
  virtual void cancel(SequenceId id) = 0;

  // A paused sequence keeps its blocks but takes no part in steps (its
  // consumer has no room for more tokens: flow control).
  virtual void set_paused(SequenceId id, bool paused) = 0;

  // The KV computed so far for a running sequence.
  virtual EngineResult<KvShard> export_kv(SequenceId id) = 0;

  virtual EngineStats stats() const = 0;

  // Every prefix hash held now (for a subscriber that joins late).
  virtual std::vector<std::uint64_t> cached_prefixes() const = 0;
};

}  // namespace fmwire::engine
