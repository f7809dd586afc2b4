#include "protocol/generate_request.h"

#include "protocol/text_field.h"

namespace fmwire::protocol {

std::optional<MessageError> GenerateRequestReader::check_prompt() const {
  const auto prompt = body_.getPrompt();
  const bool empty = prompt.isText() ? prompt.getText().size() == 0 : prompt.getTokenIds().size() == 0;
  if (empty) return MessageError{ErrorCode::BAD_REQUEST, "the prompt is empty"};
  return std::nullopt;
}

std::optional<MessageError> GenerateRequestReader::check(const GenerateRequestLimits& limits) const {
  if (auto problem = check_prompt()) return problem;
  const auto stops = stop_sequences();
  if (stops.size() > limits.max_stop_sequences) {
    return MessageError{ErrorCode::BAD_REQUEST, std::to_string(stops.size()) + " stop sequences, at most " +
                                                    std::to_string(limits.max_stop_sequences) + " are allowed"};
  }
  for (capnp::Text::Reader stop : stops) {
    if (stop.size() == 0 || stop.size() > limits.max_stop_sequence_bytes) {
      return MessageError{ErrorCode::BAD_REQUEST, "a stop sequence of " + std::to_string(stop.size()) +
                                                      " bytes; each must have 1 to " +
                                                      std::to_string(limits.max_stop_sequence_bytes)};
    }
  }
  return std::nullopt;
}

std::string_view GenerateRequestReader::request_id() const { return text_view(body_.getRequestId()); }

std::string_view GenerateRequestReader::model() const { return text_view(body_.getModel()); }

std::string_view GenerateRequestReader::prompt_text() const {
  const auto prompt = body_.getPrompt();
  return prompt.isText() ? text_view(prompt.getText()) : std::string_view();
}

capnp::List<std::uint32_t>::Reader GenerateRequestReader::prompt_token_ids() const {
  const auto prompt = body_.getPrompt();
  return prompt.isTokenIds() ? prompt.getTokenIds() : capnp::List<std::uint32_t>::Reader();
}

void GenerateRequestReader::append_prompt_token_ids(std::vector<std::uint32_t>& ids) const {
  const auto list = prompt_token_ids();
  ids.reserve(ids.size() + list.size());
  for (std::uint32_t id : list) ids.push_back(id);
}

std::optional<std::uint64_t> GenerateRequestReader::seed() const {
  const auto seed = body_.getSampling().getSeed();
  if (seed.isFixed()) return seed.getFixed();
  return std::nullopt;
}

GenerateRequestBuilder& GenerateRequestBuilder::request_id(std::string_view id) {
  fill_text(body_.initRequestId(text_size(id)), id);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::model(std::string_view model) {
  fill_text(body_.initModel(text_size(model)), model);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::prompt_text(std::string_view text) {
  fill_text(body_.getPrompt().initText(text_size(text)), text);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::prompt_token_ids(std::span<const std::uint32_t> ids) {
  auto list = body_.getPrompt().initTokenIds(static_cast<unsigned>(ids.size()));
  for (unsigned i = 0; i < ids.size(); ++i) list.set(i, ids[i]);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::max_tokens(std::uint32_t tokens) {
  body_.getSampling().setMaxTokens(tokens);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::temperature(float temperature) {
  body_.getSampling().setTemperature(temperature);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::top_p(float top_p) {
  body_.getSampling().setTopP(top_p);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::seed(std::optional<std::uint64_t> seed) {
  if (seed) {
    body_.getSampling().getSeed().setFixed(*seed);
  } else {
    body_.getSampling().getSeed().setRandom();
  }
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::stop_sequences(std::span<const std::string> stops) {
  auto list = body_.getSampling().initStopSequences(static_cast<unsigned>(stops.size()));
  for (unsigned i = 0; i < stops.size(); ++i) fill_text(list.init(i, text_size(stops[i])), stops[i]);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::timeout_us(std::uint64_t budget_us) {
  body_.setTimeoutUs(budget_us);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::priority(std::int8_t priority) {
  body_.setPriority(priority);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::stream_options(bool include_usage, bool include_text,
                                                               bool include_timings) {
  auto options = body_.initStreamOptions();
  options.setIncludeUsage(include_usage);
  options.setIncludeText(include_text);
  options.setIncludeTimings(include_timings);
  return *this;
}

std::string_view GenerateRequestReader::transfer_key() const {
  return text_view(body_.getDisaggregation().getTransferKey());
}

std::string_view GenerateRequestReader::prefill_to() const {
  return prefill_only() ? text_view(body_.getDisaggregation().getPrefillTo()) : std::string_view();
}

GenerateRequestBuilder& GenerateRequestBuilder::prefill_to(std::string_view key, std::string_view decode_endpoint) {
  auto disaggregation = body_.initDisaggregation();
  fill_text(disaggregation.initTransferKey(text_size(key)), key);
  fill_text(disaggregation.initPrefillTo(text_size(decode_endpoint)), decode_endpoint);
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::decode_after_transfer(std::string_view key) {
  auto disaggregation = body_.initDisaggregation();
  fill_text(disaggregation.initTransferKey(text_size(key)), key);
  disaggregation.setDecode();
  return *this;
}

GenerateRequestBuilder& GenerateRequestBuilder::copy_all_but_prompt(const GenerateRequestReader& from) {
  const GenerateRequest::Reader in = from.body();
  body_.setRequestId(in.getRequestId());
  body_.setModel(in.getModel());
  if (in.hasSampling()) body_.setSampling(in.getSampling());
  body_.setTimeoutUs(in.getTimeoutUs());
  body_.setPriority(in.getPriority());
  if (in.hasStreamOptions()) body_.setStreamOptions(in.getStreamOptions());
  return *this;
}

}  // namespace fmwire::protocol
