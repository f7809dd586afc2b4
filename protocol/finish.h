// Finish's one home (protocol/fmwire.capnp), the last frame of a generation
// stream: how the side that ends a stream builds it (a worker, the echo
// service, a router that ends a migrated stream itself), how a router
// passes a worker's on with its own hop added, and how a client reads it.
// Timings grow on the way back: each hop appends its own entry after those
// of the hops below it, worker first. The classes convert from the
// generated Reader and Builder, so codec::read_body and Connection::send
// hand them over directly.
#pragma once

#include <cstdint>
#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::protocol {

// One hop's entry in a Finish's timings.
class HopTimingReader {
 public:
  HopTimingReader(HopTiming::Reader body) : body_(body) {}

  std::string_view hop() const;  // "worker w1", "router r1"
  Role role() const { return body_.getRole(); }
  std::uint64_t queue_us() const { return body_.getQueueUs(); }
  std::uint64_t prefill_us() const { return body_.getPrefillUs(); }
  std::uint64_t decode_us() const { return body_.getDecodeUs(); }
  std::uint64_t first_token_us() const { return body_.getFirstTokenUs(); }  // receipt to the first token leaving
  std::uint64_t total_us() const { return body_.getTotalUs(); }             // receipt to Finish leaving
  std::uint64_t kv_transfer_us() const { return body_.getKvTransferUs(); }  // Offer to Committed, at the KV's sender

 private:
  HopTiming::Reader body_;
};

class HopTimingBuilder {
 public:
  HopTimingBuilder(HopTiming::Builder body) : body_(body) {}

  HopTimingBuilder& queue_us(std::uint64_t us);
  HopTimingBuilder& prefill_us(std::uint64_t us);
  HopTimingBuilder& decode_us(std::uint64_t us);
  HopTimingBuilder& first_token_us(std::uint64_t us);
  HopTimingBuilder& total_us(std::uint64_t us);
  HopTimingBuilder& kv_transfer_us(std::uint64_t us);

 private:
  HopTiming::Builder body_;
};

class FinishReader {
 public:
  FinishReader(Finish::Reader body) : body_(body) {}

  FinishReason reason() const { return body_.getReason(); }
  // Text with no token of its own, released at the end.
  std::string_view trailing_text() const;
  bool has_usage() const { return body_.hasUsage(); }  // the request asked for it
  std::uint32_t prompt_tokens() const { return body_.getUsage().getPromptTokens(); }
  std::uint32_t completion_tokens() const { return body_.getUsage().getCompletionTokens(); }
  std::uint32_t cached_prompt_tokens() const { return body_.getUsage().getCachedPromptTokens(); }
  // One entry per hop, worker first (read them as HopTimingReader).
  capnp::List<HopTiming>::Reader timings() const { return body_.getTimings(); }
  // Where the KV came by transfer (disaggregated serving): how many bytes,
  // how many on the wire, the compression the sender chose, how long.
  bool has_kv_transfer() const { return body_.hasKvTransfer(); }
  KvTransferSummary::Reader kv_transfer() const { return body_.getKvTransfer(); }

 private:
  Finish::Reader body_;
};

class FinishBuilder {
 public:
  FinishBuilder(Finish::Builder body) : body_(body) {}

  FinishBuilder& reason(FinishReason reason);
  FinishBuilder& trailing_text(std::string_view text);  // nothing set when empty
  FinishBuilder& usage(std::uint32_t prompt_tokens, std::uint32_t completion_tokens,
                       std::uint32_t cached_prompt_tokens);
  // The timings: `below` (the entries of the Finish that came from the hops
  // below, as they were; none at the hop that generated) and then this
  // hop's own, named `hop`, returned for its times. Called once.
  HopTimingBuilder timings(capnp::List<HopTiming>::Reader below, std::string_view hop, Role role);
  HopTimingBuilder timings(std::string_view hop, Role role) { return timings({}, hop, role); }
  FinishBuilder& kv_transfer(std::uint64_t bytes, std::uint64_t wire_bytes, Compression compression,
                             std::uint64_t transfer_us);
  // A Finish passed on keeps the transfer summary of the one below.
  FinishBuilder& kv_transfer(KvTransferSummary::Reader summary);

 private:
  Finish::Builder body_;
};

}  // namespace fmwire::protocol
