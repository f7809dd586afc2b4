#include "protocol/finish.h"

#include "protocol/text_field.h"

namespace fmwire::protocol {

std::string_view HopTimingReader::hop() const { return text_view(body_.getHop()); }

HopTimingBuilder& HopTimingBuilder::queue_us(std::uint64_t us) {
  body_.setQueueUs(us);
  return *this;
}

HopTimingBuilder& HopTimingBuilder::prefill_us(std::uint64_t us) {
  body_.setPrefillUs(us);
  return *this;
}

HopTimingBuilder& HopTimingBuilder::decode_us(std::uint64_t us) {
  body_.setDecodeUs(us);
  return *this;
}

HopTimingBuilder& HopTimingBuilder::first_token_us(std::uint64_t us) {
  body_.setFirstTokenUs(us);
  return *this;
}

HopTimingBuilder& HopTimingBuilder::total_us(std::uint64_t us) {
  body_.setTotalUs(us);
  return *this;
}

HopTimingBuilder& HopTimingBuilder::kv_transfer_us(std::uint64_t us) {
  body_.setKvTransferUs(us);
  return *this;
}

std::string_view FinishReader::trailing_text() const { return text_view(body_.getTrailingText()); }

FinishBuilder& FinishBuilder::reason(FinishReason reason) {
  body_.setReason(reason);
  return *this;
}

FinishBuilder& FinishBuilder::trailing_text(std::string_view text) {
  if (!text.empty()) fill_text(body_.initTrailingText(text_size(text)), text);
  return *this;
}

FinishBuilder& FinishBuilder::usage(std::uint32_t prompt_tokens, std::uint32_t completion_tokens,
                                    std::uint32_t cached_prompt_tokens) {
  auto usage = body_.initUsage();
  usage.setPromptTokens(prompt_tokens);
  usage.setCompletionTokens(completion_tokens);
  usage.setCachedPromptTokens(cached_prompt_tokens);
  return *this;
}

FinishBuilder& FinishBuilder::kv_transfer(std::uint64_t bytes, std::uint64_t wire_bytes, Compression compression,
                                         std::uint64_t transfer_us) {
  auto summary = body_.initKvTransfer();
  summary.setBytes(bytes);
  summary.setWireBytes(wire_bytes);
  summary.setCompression(compression);
  summary.setTransferUs(transfer_us);
  return *this;
}

FinishBuilder& FinishBuilder::kv_transfer(KvTransferSummary::Reader summary) {
  body_.setKvTransfer(summary);
  return *this;
}

HopTimingBuilder FinishBuilder::timings(capnp::List<HopTiming>::Reader below, std::string_view hop, Role role) {
  auto timings = body_.initTimings(below.size() + 1);
  for (unsigned i = 0; i < below.size(); ++i) timings.setWithCaveats(i, below[i]);
  auto own = timings[below.size()];
  fill_text(own.initHop(text_size(hop)), hop);
  own.setRole(role);
  return own;
}

}  // namespace fmwire::protocol
