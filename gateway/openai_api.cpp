#include "gateway/openai_api.h"

#include <algorithm>
#include <boost/json.hpp>
#include <chrono>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <stdexcept>

namespace fmwire::gateway {
namespace json = boost::json;
using protocol::ErrorCode;
using protocol::FinishReason;

namespace {

json::value null_or(const std::string& text) {
  if (text.empty()) return nullptr;
  return json::value(text);
}

// A JSON number as a double (integers included); none for other kinds,
// and none for what is not finite: Boost.JSON reads 1e999 as infinity
// and 0e350 as NaN (0 times 10^350), which no range check would stop.
std::optional<double> number_of(const json::value& value) {
  if (value.is_double()) {
    if (!std::isfinite(value.get_double())) return std::nullopt;
    return value.get_double();
  }
  if (value.is_int64()) return static_cast<double>(value.get_int64());
  if (value.is_uint64()) return static_cast<double>(value.get_uint64());
  return std::nullopt;
}

// A JSON integer (a double with no fraction counts); none otherwise.
std::optional<std::int64_t> integer_of(const json::value& value) {
  if (value.is_int64()) return value.get_int64();
  if (value.is_uint64()) {
    if (value.get_uint64() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
    return static_cast<std::int64_t>(value.get_uint64());
  }
  if (value.is_double()) {
    const double number = value.get_double();
    if (std::trunc(number) == number && std::abs(number) < 9.0e15) return static_cast<std::int64_t>(number);
  }
  return std::nullopt;
}

const json::value* field(const json::object& object, std::string_view name) {
  const json::value* value = object.if_contains(name);
  if (value == nullptr || value->is_null()) return nullptr;
  return value;
}

// The request fields the gateway knows, by endpoint. Honoured ones are
// read in parse_api_request(); the others are accepted only at the value
// that changes nothing (client libraries send some with their defaults),
// so that no client ever gets plain text where it asked for tools, JSON
// mode, log probabilities or several choices. Any field not here is refused
// by name too. A null field counts as absent (field()).
enum Endpoints : unsigned { kCompletions = 1, kChat = 2, kBoth = 3 };

struct KnownField {
  std::string_view name;
  unsigned endpoints;
  // Null: honoured. Else whether a value is one that changes nothing, and
  // that value in words for the refusal.
  bool (*changes_nothing)(const json::value&);
  std::string_view accepted;
};

bool is_false(const json::value& value) { return value.is_bool() && !value.get_bool(); }
bool is_true(const json::value& value) { return value.is_bool() && value.get_bool(); }
bool is_zero(const json::value& value) { return number_of(value) == 0.0; }
bool is_one(const json::value& value) { return integer_of(value) == 1; }
bool is_string(const json::value& value) { return value.is_string(); }
bool is_empty_string(const json::value& value) { return value.is_string() && value.get_string().empty(); }
bool is_empty_object(const json::value& value) { return value.is_object() && value.get_object().empty(); }
bool is_text_format(const json::value& value) {
  const json::object* format = value.if_object();
  const json::value* type = format != nullptr && format->size() == 1 ? format->if_contains("type") : nullptr;
  return type != nullptr && type->is_string() && type->get_string() == "text";
}
bool is_text_modality(const json::value& value) {
  const json::array* modalities = value.if_array();
  return modalities != nullptr && modalities->size() == 1 && (*modalities)[0].is_string() &&
         (*modalities)[0].get_string() == "text";
}
bool is_default_tier(const json::value& value) {
  return value.is_string() && (value.get_string() == "auto" || value.get_string() == "default");
}

constexpr KnownField kKnownFields[] = {
    // Honoured.
    {"model", kBoth, nullptr, {}},
    {"prompt", kCompletions, nullptr, {}},
    {"messages", kChat, nullptr, {}},
    {"max_tokens", kBoth, nullptr, {}},
    {"max_completion_tokens", kChat, nullptr, {}},
    {"temperature", kBoth, nullptr, {}},
    {"top_p", kBoth, nullptr, {}},
    {"seed", kBoth, nullptr, {}},
    {"stop", kBoth, nullptr, {}},
    {"stream", kBoth, nullptr, {}},
    {"stream_options", kBoth, nullptr, {}},
    {"fmwire", kBoth, nullptr, {}},
    // One choice, no log probabilities, no penalties or biases.
    {"n", kBoth, is_one, "1"},
    {"logprobs", kBoth, is_false, "false"},
    {"presence_penalty", kBoth, is_zero, "0"},
    {"frequency_penalty", kBoth, is_zero, "0"},
    {"logit_bias", kBoth, is_empty_object, "{}"},
    {"echo", kCompletions, is_false, "false"},
    {"best_of", kCompletions, is_one, "1"},
    {"suffix", kCompletions, is_empty_string, "\"\""},
    // Plain text, no tools (so parallel tool calls change nothing), nothing stored.
    {"response_format", kChat, is_text_format, "{\"type\": \"text\"}"},
    {"modalities", kChat, is_text_modality, "[\"text\"]"},
    {"parallel_tool_calls", kChat, is_true, "true"},
    {"store", kChat, is_false, "false"},
    {"metadata", kChat, is_empty_object, "{}"},
    {"service_tier", kChat, is_default_tier, "\"auto\" or \"default\""},
    // Who asks, for the provider's abuse monitoring and caching: no effect on the text.
    {"user", kBoth, is_string, "a string"},
    {"safety_identifier", kChat, is_string, "a string"},
    {"prompt_cache_key", kChat, is_string, "a string"},
};

ApiError unsupported(std::string message, std::string param, std::string code) {
  ApiError error = bad_request(std::move(message), std::move(param));
  error.code = std::move(code);
  return error;
}

// The first field of `object` the gateway would otherwise ignore, refused.
std::optional<ApiError> refuse_ignored_field(ApiKind kind, const json::object& object) {
  const unsigned endpoint = kind == ApiKind::chat ? kChat : kCompletions;
  for (const json::key_value_pair& entry : object) {
    if (entry.value().is_null()) continue;
    const std::string name(entry.key());
    const KnownField* known = nullptr;
    for (const KnownField& each : kKnownFields) {
      if (each.name == name && (each.endpoints & endpoint) != 0) known = &each;
    }
    if (known == nullptr) {
      return unsupported("`" + name + "` is not supported by this gateway (" +
                             (kind == ApiKind::chat ? "/v1/chat/completions" : "/v1/completions") + ")",
                         name, "unsupported_parameter");
    }
    if (known->changes_nothing != nullptr && !known->changes_nothing(entry.value())) {
      return unsupported("`" + name + "` is not supported by this gateway other than as " +
                             std::string(known->accepted),
                         name, "unsupported_value");
    }
  }
  return std::nullopt;
}

// Fields of an object-valued parameter other than `known`, refused by
// their dotted name ("stream_options.continuous_usage_stats").
std::optional<ApiError> refuse_unknown_member(std::string_view parent, const json::object& object,
                                              std::initializer_list<std::string_view> known) {
  for (const json::key_value_pair& entry : object) {
    if (entry.value().is_null() || std::find(known.begin(), known.end(), entry.key()) != known.end()) continue;
    const std::string name = std::string(parent) + "." + std::string(entry.key());
    return unsupported("`" + name + "` is not supported by this gateway", name, "unsupported_parameter");
  }
  return std::nullopt;
}

json::object chunk_base(const StreamIdentity& stream) {
  return json::object{{"id", stream.id},
                      {"object", stream.kind == ApiKind::chat ? "chat.completion.chunk" : "text_completion"},
                      {"created", stream.created},
                      {"model", stream.model}};
}

json::object choice(const StreamIdentity& stream, json::value delta_or_text, json::value finish_reason) {
  json::object choice{{"index", 0}};
  if (stream.kind == ApiKind::chat) {
    choice["delta"] = std::move(delta_or_text);
    choice["logprobs"] = nullptr;
  } else {
    choice["text"] = std::move(delta_or_text);
    choice["logprobs"] = nullptr;
  }
  choice["finish_reason"] = std::move(finish_reason);
  return choice;
}

json::object usage_of(const Completion& completion) {
  return json::object{{"prompt_tokens", completion.prompt_tokens},
                      {"completion_tokens", completion.completion_tokens},
                      {"total_tokens", completion.prompt_tokens + completion.completion_tokens}};
}

}  // namespace

ApiError bad_request(std::string message, std::string param) {
  ApiError error;
  error.status = 400;
  error.message = std::move(message);
  error.param = std::move(param);
  return error;
}

ApiError api_error_of(const ClientError& client_error) {
  ApiError error;
  error.message = client_error.message;
  error.code = std::string(to_string(client_error.code));
  switch (client_error.code) {
    case ErrorCode::BAD_REQUEST: error.status = 400; break;
    case ErrorCode::UNAUTHORIZED:
      error.status = 401;
      error.code = "invalid_api_key";
      break;
    case ErrorCode::NOT_FOUND: error.status = 404; break;
    case ErrorCode::OVERLOADED:
    case ErrorCode::LIMIT_EXCEEDED:
      error.status = 429;
      error.type = "rate_limit_error";
      break;
    case ErrorCode::NO_WORKER:
    case ErrorCode::WORKER_LOST:
      error.status = 503;
      error.type = "server_error";
      break;
    case ErrorCode::DEADLINE_UNREACHABLE:
      error.status = 504;
      error.type = "server_error";
      break;
    default:
      error.status = 500;
      error.type = "server_error";
      break;
  }
  if (client_error.retryable || error.status == 429 || error.status == 503) {
    error.retry_after_s = std::max<std::uint32_t>(1, (client_error.retry_after_ms + 999) / 1000);
  }
  return error;
}

std::string error_json(const ApiError& error) {
  return json::serialize(json::object{{"error", json::object{{"message", error.message},
                                                            {"type", error.type},
                                                            {"param", null_or(error.param)},
                                                            {"code", null_or(error.code)}}}});
}

std::string chat_prompt(const std::vector<std::pair<std::string, std::string>>& messages) {
  std::string prompt;
  for (const auto& [role, content] : messages) {
    prompt += role;
    prompt += ": ";
    prompt += content;
    prompt += '\n';
  }
  prompt += "assistant:";
  return prompt;
}

codec::Result<ApiRequest, ApiError> parse_api_request(ApiKind kind, std::string_view body, const ApiDefaults& defaults) {
  boost::system::error_code parse_error;
  json::value document = json::parse(body, parse_error);
  if (parse_error) return bad_request("the request body is not valid JSON: " + parse_error.message());
  if (!document.is_object()) return bad_request("the request body must be a JSON object");
  const json::object& object = document.get_object();
  if (std::optional<ApiError> refused = refuse_ignored_field(kind, object)) return *refused;

  ApiRequest request;
  request.kind = kind;
  GenerateParams& params = request.params;

  if (const json::value* model = field(object, "model")) {
    if (!model->is_string()) return bad_request("model must be a string", "model");
    if (model->get_string() != defaults.model) {
      ApiError error;
      error.status = 404;
      error.message = "The model `" + std::string(model->get_string()) + "` does not exist (this gateway serves `" +
                      defaults.model + "`)";
      error.param = "model";
      error.code = "model_not_found";
      return error;
    }
  }

  if (kind == ApiKind::completions) {
    const json::value* prompt = field(object, "prompt");
    if (prompt == nullptr) return bad_request("prompt is required", "prompt");
    if (prompt->is_array() && prompt->get_array().size() == 1 && prompt->get_array()[0].is_string()) {
      prompt = &prompt->get_array()[0];
    }
    if (!prompt->is_string()) return bad_request("prompt must be a string", "prompt");
    params.prompt = std::string(prompt->get_string());
  } else {
    const json::value* messages = field(object, "messages");
    if (messages == nullptr) return bad_request("messages is required", "messages");
    if (!messages->is_array() || messages->get_array().empty()) {
      return bad_request("messages must be a non-empty array", "messages");
    }
    std::vector<std::pair<std::string, std::string>> turns;
    for (const json::value& message : messages->get_array()) {
      const json::object* fields = message.if_object();
      const json::value* role = fields != nullptr ? field(*fields, "role") : nullptr;
      const json::value* content = fields != nullptr ? field(*fields, "content") : nullptr;
      if (role == nullptr || !role->is_string()) {
        return bad_request("each message must have a string role", "messages");
      }
      if (content == nullptr || !content->is_string()) {
        return bad_request("each message must have a string content", "messages");
      }
      turns.emplace_back(std::string(role->get_string()), std::string(content->get_string()));
    }
    params.prompt = chat_prompt(turns);
  }

  params.max_tokens = defaults.max_tokens;
  const json::value* max_tokens = field(object, "max_tokens");
  if (max_tokens == nullptr && kind == ApiKind::chat) max_tokens = field(object, "max_completion_tokens");
  if (max_tokens != nullptr) {
    const std::optional<std::int64_t> value = integer_of(*max_tokens);
    if (!value || *value <= 0 || *value > std::numeric_limits<std::int32_t>::max()) {
      return bad_request("max_tokens must be a positive integer", "max_tokens");
    }
    params.max_tokens = static_cast<std::uint32_t>(*value);
  }
  if (const json::value* temperature = field(object, "temperature")) {
    const std::optional<double> value = number_of(*temperature);
    if (!value || *value < 0.0 || *value > 2.0) {
      return bad_request("temperature must be a number from 0 to 2", "temperature");
    }
    params.temperature = static_cast<float>(*value);
  }
  if (const json::value* top_p = field(object, "top_p")) {
    // Checked as the float it becomes: 1e-50 is above 0 but its float is not.
    const std::optional<double> value = number_of(*top_p);
    const float as_float = value ? static_cast<float>(*value) : 0.0f;
    if (!value || as_float <= 0.0f || *value > 1.0) return bad_request("top_p must be a number in (0, 1]", "top_p");
    params.top_p = as_float;
  }
  if (const json::value* seed = field(object, "seed")) {
    const std::optional<std::int64_t> value = integer_of(*seed);
    if (!value || *value < 0) return bad_request("seed must be a non-negative integer", "seed");
    params.seed = static_cast<std::uint64_t>(*value);
  }
  if (const json::value* stop = field(object, "stop")) {
    constexpr std::size_t kMaxStops = 16;
    if (stop->is_string()) {
      if (!stop->get_string().empty()) params.stop_sequences.emplace_back(stop->get_string());
    } else if (stop->is_array() && stop->get_array().size() <= kMaxStops) {
      for (const json::value& each : stop->get_array()) {
        if (!each.is_string()) return bad_request("stop must be a string or an array of strings", "stop");
        if (!each.get_string().empty()) params.stop_sequences.emplace_back(each.get_string());
      }
    } else {
      return bad_request("stop must be a string or an array of at most 16 strings", "stop");
    }
  }
  if (const json::value* stream = field(object, "stream")) {
    if (!stream->is_bool()) return bad_request("stream must be a boolean", "stream");
    request.stream = stream->get_bool();
  }
  if (const json::value* options = field(object, "stream_options")) {
    const json::object* fields = options->if_object();
    if (fields == nullptr) return bad_request("stream_options must be an object", "stream_options");
    // include_obfuscation: false asks for what the gateway does anyway (no padding field).
    const json::value* obfuscation = field(*fields, "include_obfuscation");
    if (obfuscation != nullptr && !is_false(*obfuscation)) {
      return unsupported("`stream_options.include_obfuscation` is not supported by this gateway other than as false",
                         "stream_options.include_obfuscation", "unsupported_value");
    }
    if (auto refused = refuse_unknown_member("stream_options", *fields, {"include_usage", "include_obfuscation"})) {
      return *refused;
    }
    if (const json::value* include_usage = field(*fields, "include_usage")) {
      if (!include_usage->is_bool()) {
        return bad_request("stream_options.include_usage must be a boolean", "stream_options");
      }
      request.include_usage = include_usage->get_bool();
    }
  }
  if (const json::value* extension = field(object, "fmwire")) {
    const json::object* fields = extension->if_object();
    if (fields == nullptr) return bad_request("fmwire must be an object", "fmwire");
    if (auto refused = refuse_unknown_member("fmwire", *fields, {"resumable"})) return *refused;
    if (const json::value* resumable = field(*fields, "resumable")) {
      if (!resumable->is_bool()) return bad_request("fmwire.resumable must be a boolean", "fmwire");
      request.resumable = resumable->get_bool();
    }
  }
  return request;
}

codec::Result<ApiRequest, ApiError> parse_any_api_request(std::string_view body, const ApiDefaults& defaults) {
  boost::system::error_code parse_error;
  json::value document = json::parse(body, parse_error);
  const bool chat = !parse_error && document.is_object() && document.get_object().contains("messages");
  return parse_api_request(chat ? ApiKind::chat : ApiKind::completions, body, defaults);
}

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::MAX_TOKENS:
    case FinishReason::DEADLINE_EXCEEDED: return "length";
    default: return "stop";
  }
}

std::string role_chunk_json(const StreamIdentity& stream) {
  json::object chunk = chunk_base(stream);
  chunk["choices"] = json::array{choice(stream, json::object{{"role", "assistant"}, {"content", ""}}, nullptr)};
  return json::serialize(chunk);
}

std::string text_chunk_json(const StreamIdentity& stream, std::string_view text) {
  json::object chunk = chunk_base(stream);
  json::value content = stream.kind == ApiKind::chat ? json::value(json::object{{"content", text}}) : json::value(text);
  chunk["choices"] = json::array{choice(stream, std::move(content), nullptr)};
  return json::serialize(chunk);
}

TextChunkEncoder::TextChunkEncoder(const StreamIdentity& stream) {
  // A text no other field serialises to after the model: the last match is
  // the slot (the choices come after id, object, created and model).
  constexpr std::string_view kSlot = "\"\\u0001\"";
  const std::string whole = text_chunk_json(stream, "\x01");
  const std::size_t at = whole.rfind(kSlot);
  if (at == std::string::npos) throw std::logic_error("TextChunkEncoder: no text slot in " + whole);
  prefix_ = whole.substr(0, at + 1);
  suffix_ = whole.substr(at + kSlot.size() - 1);
}

std::string TextChunkEncoder::operator()(std::string_view text) const {
  std::string out;
  encode_into(out, text);
  return out;
}

void TextChunkEncoder::encode_into(std::string& out, std::string_view text) const {
  static constexpr char kHex[] = "0123456789abcdef";
  out.clear();
  out.reserve(prefix_.size() + text.size() + suffix_.size() + 8);
  out += prefix_;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    switch (byte) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (byte < 0x20) {
          out += "\\u00";
          out += kHex[byte >> 4];
          out += kHex[byte & 0xf];
        } else {
          out += c;
        }
    }
  }
  out += suffix_;
}

std::string finish_chunk_json(const StreamIdentity& stream, FinishReason reason) {
  json::object chunk = chunk_base(stream);
  json::value empty = stream.kind == ApiKind::chat ? json::value(json::object{}) : json::value("");
  chunk["choices"] = json::array{choice(stream, std::move(empty), json::value(finish_reason_name(reason)))};
  return json::serialize(chunk);
}

std::string usage_chunk_json(const StreamIdentity& stream, const Completion& completion) {
  json::object chunk = chunk_base(stream);
  chunk["choices"] = json::array{};
  chunk["usage"] = usage_of(completion);
  return json::serialize(chunk);
}

std::string response_json(const StreamIdentity& stream, std::string_view text, const Completion& completion) {
  json::object response{{"id", stream.id},
                        {"object", stream.kind == ApiKind::chat ? "chat.completion" : "text_completion"},
                        {"created", stream.created},
                        {"model", stream.model}};
  json::object only{{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason_name(completion.reason)}};
  if (stream.kind == ApiKind::chat) {
    only["message"] = json::object{{"role", "assistant"}, {"content", text}};
  } else {
    only["text"] = text;
  }
  response["choices"] = json::array{std::move(only)};
  response["usage"] = usage_of(completion);
  return json::serialize(response);
}

std::string models_json(std::string_view model, std::int64_t created) {
  return json::serialize(json::object{
      {"object", "list"},
      {"data", json::array{json::object{{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "fmwire"}}}}});
}

std::int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace fmwire::gateway
