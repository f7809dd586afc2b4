// GenerateRequest's one home (protocol/fmwire.capnp): how every side reads
// it (a worker turning it into a sequence, a router routing it, the echo
// service) and builds it (the SDK from its GenerateParams, a router issuing
// it again with the prompt's token ids or after a migration). The Cap'n
// Proto reader is the data: nothing copies the fields into a struct of its
// own. Both classes convert from the generated Reader and Builder, so
// codec::read_body and Connection::send hand them over directly.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/fmwire.capnp.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

// What a receiver accepts beyond the schema; more is refused with
// BAD_REQUEST, naming the field and the limit.
struct GenerateRequestLimits {
  std::uint32_t max_stop_sequences = 16;
  std::uint32_t max_stop_sequence_bytes = 256;
};

class GenerateRequestReader {
 public:
  GenerateRequestReader(GenerateRequest::Reader body) : body_(body) {}

  // A prompt, as text or as token ids, that is not empty: what any side
  // that routes or serves the request needs.
  std::optional<MessageError> check_prompt() const;
  // check_prompt(), and the stop sequences within `limits`: what a side
  // that generates (a worker) checks before it starts.
  std::optional<MessageError> check(const GenerateRequestLimits& limits) const;

  std::string_view request_id() const;
  std::string_view model() const;             // empty: the endpoint's default
  bool has_text_prompt() const { return body_.getPrompt().isText(); }
  std::string_view prompt_text() const;       // empty when the prompt is token ids
  capnp::List<std::uint32_t>::Reader prompt_token_ids() const;  // empty when it is text
  // Appends the prompt's token ids to `ids` (none when it is text).
  void append_prompt_token_ids(std::vector<std::uint32_t>& ids) const;
  std::uint32_t max_tokens() const { return body_.getSampling().getMaxTokens(); }
  float temperature() const { return body_.getSampling().getTemperature(); }
  float top_p() const { return body_.getSampling().getTopP(); }
  std::optional<std::uint64_t> seed() const;  // none: the receiver picks one
  capnp::List<capnp::Text>::Reader stop_sequences() const { return body_.getSampling().getStopSequences(); }
  std::uint64_t timeout_us() const { return body_.getTimeoutUs(); }  // budget from receipt; 0: none
  std::int8_t priority() const { return body_.getPriority(); }
  bool include_usage() const { return body_.getStreamOptions().getIncludeUsage(); }
  bool include_text() const { return body_.getStreamOptions().getIncludeText(); }
  bool include_timings() const { return body_.getStreamOptions().getIncludeTimings(); }
  // Disaggregated serving (set by a router): the transfer's key, and where
  // this side's part is: none (serve it whole), prefill here and push the KV
  // to prefill_to(), or decode after the KV arrives.
  std::string_view transfer_key() const;
  bool prefill_only() const { return body_.getDisaggregation().isPrefillTo(); }
  std::string_view prefill_to() const;  // HOST:PORT of the decode worker; empty unless prefill_only()
  bool decode_only() const { return body_.getDisaggregation().isDecode(); }

  GenerateRequest::Reader body() const { return body_; }

 private:
  GenerateRequest::Reader body_;
};

class GenerateRequestBuilder {
 public:
  GenerateRequestBuilder(GenerateRequest::Builder body) : body_(body) {}

  GenerateRequestBuilder& request_id(std::string_view id);
  GenerateRequestBuilder& model(std::string_view model);
  GenerateRequestBuilder& prompt_text(std::string_view text);
  GenerateRequestBuilder& prompt_token_ids(std::span<const std::uint32_t> ids);
  GenerateRequestBuilder& max_tokens(std::uint32_t tokens);
  GenerateRequestBuilder& temperature(float temperature);  // 0: greedy
  GenerateRequestBuilder& top_p(float top_p);
  GenerateRequestBuilder& seed(std::optional<std::uint64_t> seed);  // none: the receiver picks one
  GenerateRequestBuilder& stop_sequences(std::span<const std::string> stops);
  GenerateRequestBuilder& timeout_us(std::uint64_t budget_us);
  GenerateRequestBuilder& priority(std::int8_t priority);
  GenerateRequestBuilder& stream_options(bool include_usage, bool include_text, bool include_timings);
  // This worker prefills and pushes the KV to `decode_endpoint` (HOST:PORT) under `key`.
  GenerateRequestBuilder& prefill_to(std::string_view key, std::string_view decode_endpoint);
  // This worker waits for the KV offered under `key`, then decodes.
  GenerateRequestBuilder& decode_after_transfer(std::string_view key);

  // Everything `from` says except its prompt, which a relay that issues a
  // request again (with the prompt's token ids, or continued after a
  // migration) sets itself, and then max_tokens and timeout_us where they
  // changed. Fields added by a newer minor version inside Sampling and
  // StreamOptions come along; new ones at the top level would not.
  GenerateRequestBuilder& copy_all_but_prompt(const GenerateRequestReader& from);

  GenerateRequest::Builder body() { return body_; }

 private:
  GenerateRequest::Builder body_;
};

}  // namespace fmwire::protocol
