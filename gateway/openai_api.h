// The OpenAI-compatible surface of the HTTP gateway as plain functions:
// request bodies of /v1/completions and /v1/chat/completions checked and
// turned into GenerateParams, and the JSON the gateway answers with (stream
// chunks, whole responses, /v1/models, error objects). No I/O here.
// Shapes: https://platform.openai.com/docs/api-reference/completions and
// .../chat/streaming ("text_completion", "chat.completion.chunk").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "codec/codec_error.h"
#include "transport/client.h"

namespace fmwire::gateway {

enum class ApiKind { completions, chat };

// An error as OpenAI reports it: the HTTP status and
// {"error": {"message", "type", "param", "code"}}; empty param or code are null.
struct ApiError {
  unsigned status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;
  std::uint32_t retry_after_s = 0;  // 0: no Retry-After header
};

ApiError bad_request(std::string message, std::string param = {});
// A native error as an HTTP one: overloaded -> 429, no_worker and
// worker_lost -> 503, deadline_unreachable -> 504, bad_request -> 400, ...;
// Retry-After is the peer's hint rounded up to seconds (at least 1) for
// retryable codes.
ApiError api_error_of(const ClientError& error);
std::string error_json(const ApiError& error);

struct ApiDefaults {
  std::string model;              // the one model served; a request may name it or nothing
  std::uint32_t max_tokens = 256; // when a request gives none
};

struct ApiRequest {
  ApiKind kind = ApiKind::completions;
  GenerateParams params;   // prompt (chat: the messages through the template), sampling, stops
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool resumable = false;      // "fmwire": {"resumable": true}
};

// Checks a request body. Errors name the field: 400 for bad JSON or
// parameters, 404 for a model other than defaults.model. A field the
// gateway does not honour (tools, response_format other than text,
// logprobs, n > 1, any field it does not know) is a 400 naming it, code
// "unsupported_parameter", or "unsupported_value" for one accepted only at
// the value that changes nothing (n: 1, logprobs: false, presence_penalty:
// 0, ...); a null field counts as absent.
codec::Result<ApiRequest, ApiError> parse_api_request(ApiKind kind, std::string_view body,
                                                      const ApiDefaults& defaults);
// A WebSocket message: a chat request when it has "messages", else a completion.
codec::Result<ApiRequest, ApiError> parse_any_api_request(std::string_view body, const ApiDefaults& defaults);

// Chat messages as one prompt: "<role>: <content>\n" per message, then "assistant:".
std::string chat_prompt(const std::vector<std::pair<std::string, std::string>>& messages);

// "stop" for end of sequence and stop sequences, "length" for max tokens.
std::string_view finish_reason_name(protocol::FinishReason reason);

// What every chunk and response of one stream repeats.
struct StreamIdentity {
  ApiKind kind = ApiKind::completions;
  std::string id;           // "cmpl-<hex>" or "chatcmpl-<hex>"
  std::int64_t created = 0; // Unix seconds
  std::string model;
};

// Stream chunks (the JSON of one SSE event or WebSocket message).
std::string role_chunk_json(const StreamIdentity& stream);  // chat's first: delta {"role": "assistant"}
std::string text_chunk_json(const StreamIdentity& stream, std::string_view text);
// text_chunk_json() for one stream's every chunk, without a JSON tree per
// chunk: the fixed parts are serialised once, and each text is escaped into
// the gap as Boost.JSON would (the same bytes). The per-token path's encoder.
class TextChunkEncoder {
 public:
  explicit TextChunkEncoder(const StreamIdentity& stream);
  std::string operator()(std::string_view text) const;
  // The same into `out` (replacing what it held), reusing its capacity.
  void encode_into(std::string& out, std::string_view text) const;

 private:
  std::string prefix_;  // up to the text's opening quote
  std::string suffix_;  // from its closing quote
};
std::string finish_chunk_json(const StreamIdentity& stream, protocol::FinishReason reason);
std::string usage_chunk_json(const StreamIdentity& stream, const Completion& completion);
// A whole response (stream: false).
std::string response_json(const StreamIdentity& stream, std::string_view text, const Completion& completion);
std::string models_json(std::string_view model, std::int64_t created);
// Now, in Unix seconds: the "created" fields.
std::int64_t unix_seconds();

}  // namespace fmwire::gateway
