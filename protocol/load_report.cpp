#include "protocol/load_report.h"

#include "protocol/text_field.h"

namespace fmwire::protocol {

std::string_view to_string(WorkerRole role) {
  switch (role) {
    case WorkerRole::PREFILL: return "prefill";
    case WorkerRole::DECODE: return "decode";
    case WorkerRole::BOTH: return "both";
  }
  return "both";
}

WorkerLoad LoadReportReader::load() const {
  WorkerLoad load;
  load.name = text_view(body_.getWorkerName());
  load.queue_depth = body_.getQueueDepth();
  load.running = body_.getRunningSequences();
  load.paused = body_.getPausedSequences();
  load.free_kv_blocks = body_.getFreeKvBlocks();
  load.total_kv_blocks = body_.getTotalKvBlocks();
  load.cached_kv_blocks = body_.getCachedKvBlocks();
  load.recent_step_time_us = body_.getRecentStepTimeUs();
  load.draining = body_.getDraining();
  load.prompt_tokens = body_.getPromptTokens();
  load.cached_prompt_tokens = body_.getCachedPromptTokens();
  load.generated_tokens = body_.getGeneratedTokens();
  load.role = body_.getWorkerRole();
  load.kv_transfers_active = body_.getKvTransfersActive();
  load.kv_reserved_blocks = body_.getKvReservedBlocks();
  load.max_running = body_.getMaxRunning();
  return load;
}

LoadReportBuilder& LoadReportBuilder::load(const WorkerLoad& load, std::string_view name, bool draining) {
  fill_text(body_.initWorkerName(text_size(name)), name);
  body_.setQueueDepth(load.queue_depth);
  body_.setRunningSequences(load.running);
  body_.setPausedSequences(load.paused);
  body_.setFreeKvBlocks(load.free_kv_blocks);
  body_.setTotalKvBlocks(load.total_kv_blocks);
  body_.setCachedKvBlocks(load.cached_kv_blocks);
  body_.setRecentStepTimeUs(load.recent_step_time_us);
  body_.setDraining(draining);
  body_.setPromptTokens(load.prompt_tokens);
  body_.setCachedPromptTokens(load.cached_prompt_tokens);
  body_.setGeneratedTokens(load.generated_tokens);
  body_.setWorkerRole(load.role);
  body_.setKvTransfersActive(load.kv_transfers_active);
  body_.setKvReservedBlocks(load.kv_reserved_blocks);
  body_.setMaxRunning(load.max_running);
  return *this;
}

LoadReportBuilder& LoadReportBuilder::prefixes(std::span<const std::uint64_t> added,
                                               std::span<const std::uint64_t> evicted) {
  auto added_list = body_.initPrefixesAdded(static_cast<unsigned>(added.size()));
  for (unsigned i = 0; i < added.size(); ++i) added_list.set(i, added[i]);
  auto evicted_list = body_.initPrefixesEvicted(static_cast<unsigned>(evicted.size()));
  for (unsigned i = 0; i < evicted.size(); ++i) evicted_list.set(i, evicted[i]);
  return *this;
}

}  // namespace fmwire::protocol
