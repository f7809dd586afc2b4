// The OpenAI surface refuses, by name, every request field it would
// otherwise ignore, and accepts the fields client libraries send at values
// that change nothing (parse_api_request; issue 17, "clear refusals").
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include <string>
#include <vector>

#include "gateway/openai_api.h"

namespace fmwire::gateway {
namespace {

namespace json = boost::json;

const ApiDefaults kDefaults{.model = "builtin", .max_tokens = 16};

// A minimal valid body of `kind` with `name` set to the JSON `value`.
std::string body_with(ApiKind kind, const std::string& name, const std::string& value) {
  const std::string base = kind == ApiKind::chat ? R"({"messages": [{"role": "user", "content": "Hi"}])"
                                                 : R"({"prompt": "Hi")";
  return base + ", \"" + name + "\": " + value + "}";
}

struct Field {
  std::string name;
  std::string value;  // JSON
};

const char* endpoint_of(ApiKind kind) { return kind == ApiKind::chat ? "chat" : "completions"; }

// The refusal: a 400 invalid_request_error naming `param`, with `code`.
void check_refused(ApiKind kind, const Field& field, const std::string& param, const std::string& code) {
  CAPTURE(endpoint_of(kind));
  CAPTURE(field.name);
  CAPTURE(field.value);
  auto parsed = parse_api_request(kind, body_with(kind, field.name, field.value), kDefaults);
  REQUIRE_FALSE(parsed);
  const ApiError& error = parsed.error();
  CHECK(error.status == 400);
  CHECK(error.type == "invalid_request_error");
  CHECK(error.param == param);
  CHECK(error.code == code);
  CHECK(error.message.find("`" + param + "` is not supported") == 0);
}

void check_accepted(ApiKind kind, const Field& field) {
  CAPTURE(endpoint_of(kind));
  CAPTURE(field.name);
  CAPTURE(field.value);
  auto parsed = parse_api_request(kind, body_with(kind, field.name, field.value), kDefaults);
  CHECK(parsed);
}

constexpr ApiKind kBoth[] = {ApiKind::completions, ApiKind::chat};

TEST_CASE("openai_refusals: tools, tool_choice, functions and function_call are refused by name on both endpoints") {
  const std::vector<Field> fields = {
      {"tools", R"([{"type": "function", "function": {"name": "f", "parameters": {}}}])"},
      {"tools", "[]"},
      {"tool_choice", R"("auto")"},
      {"tool_choice", R"("none")"},
      {"functions", R"([{"name": "f", "parameters": {}}])"},
      {"function_call", R"("auto")"},
  };
  for (ApiKind kind : kBoth) {
    for (const Field& field : fields) check_refused(kind, field, field.name, "unsupported_parameter");
  }
}

TEST_CASE("openai_refusals: log probabilities are refused: logprobs true or a count, top_logprobs, echo") {
  for (ApiKind kind : kBoth) {
    check_refused(kind, {"logprobs", "true"}, "logprobs", "unsupported_value");
    check_refused(kind, {"top_logprobs", "0"}, "top_logprobs", "unsupported_parameter");
    check_refused(kind, {"top_logprobs", "5"}, "top_logprobs", "unsupported_parameter");
  }
  // /v1/completions' logprobs is a count: even 0 asks for the chosen tokens'.
  check_refused(ApiKind::completions, {"logprobs", "0"}, "logprobs", "unsupported_value");
  check_refused(ApiKind::completions, {"logprobs", "5"}, "logprobs", "unsupported_value");
  check_refused(ApiKind::completions, {"echo", "true"}, "echo", "unsupported_value");
}

TEST_CASE("openai_refusals: response_format other than text is refused, text is accepted") {
  check_refused(ApiKind::chat, {"response_format", R"({"type": "json_object"})"}, "response_format",
                "unsupported_value");
  check_refused(ApiKind::chat, {"response_format", R"({"type": "json_schema", "json_schema": {"name": "x"}})"},
                "response_format", "unsupported_value");
  check_refused(ApiKind::chat, {"response_format", R"("text")"}, "response_format", "unsupported_value");
  check_accepted(ApiKind::chat, {"response_format", R"({"type": "text"})"});
  // Not a field of /v1/completions at all.
  check_refused(ApiKind::completions, {"response_format", R"({"type": "text"})"}, "response_format",
                "unsupported_parameter");
}

TEST_CASE("openai_refusals: n and best_of other than 1 are refused, 1 is accepted") {
  for (ApiKind kind : kBoth) {
    check_refused(kind, {"n", "2"}, "n", "unsupported_value");
    check_refused(kind, {"n", "0"}, "n", "unsupported_value");
    check_refused(kind, {"n", R"("1")"}, "n", "unsupported_value");
    check_accepted(kind, {"n", "1"});
    check_accepted(kind, {"n", "1.0"});
  }
  check_refused(ApiKind::completions, {"best_of", "3"}, "best_of", "unsupported_value");
  check_accepted(ApiKind::completions, {"best_of", "1"});
}

TEST_CASE("openai_refusals: penalties and logit_bias are refused away from their defaults and accepted at them") {
  for (ApiKind kind : kBoth) {
    for (const std::string name : {"presence_penalty", "frequency_penalty"}) {
      check_refused(kind, {name, "0.5"}, name, "unsupported_value");
      check_refused(kind, {name, "-1"}, name, "unsupported_value");
      check_accepted(kind, {name, "0"});
      check_accepted(kind, {name, "0.0"});
    }
    check_refused(kind, {"logit_bias", R"({"50256": -100})"}, "logit_bias", "unsupported_value");
    check_accepted(kind, {"logit_bias", "{}"});
  }
}

TEST_CASE("openai_refusals: the defaults client libraries send are accepted") {
  const std::vector<Field> both = {{"n", "1"},
                                   {"logprobs", "false"},
                                   {"presence_penalty", "0"},
                                   {"frequency_penalty", "0"},
                                   {"logit_bias", "{}"},
                                   {"user", R"("user-1234")"},
                                   {"seed", "7"},
                                   {"stop", R"(["\n"])"},
                                   {"temperature", "1"},
                                   {"top_p", "1"},
                                   {"stream", "false"},
                                   {"stream_options", R"({"include_usage": true})"},
                                   {"stream_options", R"({"include_usage": false, "include_obfuscation": false})"}};
  for (ApiKind kind : kBoth) {
    for (const Field& field : both) check_accepted(kind, field);
  }
  const std::vector<Field> chat = {{"max_completion_tokens", "8"},     {"response_format", R"({"type": "text"})"},
                                   {"modalities", R"(["text"])"},     {"parallel_tool_calls", "true"},
                                   {"store", "false"},                {"metadata", "{}"},
                                   {"service_tier", R"("auto")"},     {"service_tier", R"("default")"},
                                   {"safety_identifier", R"("h-1")"}, {"prompt_cache_key", R"("k")"}};
  for (const Field& field : chat) check_accepted(ApiKind::chat, field);
  const std::vector<Field> completions = {{"echo", "false"}, {"best_of", "1"}, {"suffix", R"("")"}};
  for (const Field& field : completions) check_accepted(ApiKind::completions, field);
}

TEST_CASE("openai_refusals: a null field counts as absent, whatever the field") {
  for (ApiKind kind : kBoth) {
    for (const std::string name : {"tools", "tool_choice", "functions", "function_call", "response_format",
                                   "logprobs", "top_logprobs", "n", "best_of", "echo", "suffix", "user",
                                   "presence_penalty", "logit_bias", "stream_options", "no_such_field"}) {
      check_accepted(kind, {name, "null"});
    }
    check_accepted(kind, {"stream_options", R"({"include_usage": null, "no_such_option": null})"});
  }
}

TEST_CASE("openai_refusals: any other top-level field is refused by name, including another endpoint's") {
  for (ApiKind kind : kBoth) {
    for (const std::string name : {"no_such_field", "audio", "prediction", "reasoning_effort", "web_search_options",
                                   "top_k", "repetition_penalty", "Tools"}) {
      check_refused(kind, {name, "1"}, name, "unsupported_parameter");
    }
  }
  check_refused(ApiKind::completions, {"max_completion_tokens", "8"}, "max_completion_tokens", "unsupported_parameter");
  check_refused(ApiKind::completions, {"messages", "[]"}, "messages", "unsupported_parameter");
  check_refused(ApiKind::chat, {"prompt", R"("x")"}, "prompt", "unsupported_parameter");
  check_refused(ApiKind::chat, {"echo", "false"}, "echo", "unsupported_parameter");
}

TEST_CASE("openai_refusals: harmless fields away from their defaults are refused by name") {
  check_refused(ApiKind::chat, {"parallel_tool_calls", "false"}, "parallel_tool_calls", "unsupported_value");
  check_refused(ApiKind::chat, {"store", "true"}, "store", "unsupported_value");
  check_refused(ApiKind::chat, {"metadata", R"({"k": "v"})"}, "metadata", "unsupported_value");
  check_refused(ApiKind::chat, {"modalities", R"(["text", "audio"])"}, "modalities", "unsupported_value");
  check_refused(ApiKind::chat, {"service_tier", R"("flex")"}, "service_tier", "unsupported_value");
  check_refused(ApiKind::completions, {"suffix", R"(" the end")"}, "suffix", "unsupported_value");
  check_refused(ApiKind::chat, {"user", "42"}, "user", "unsupported_value");
}

TEST_CASE("openai_refusals: unknown members of stream_options and fmwire are refused by their dotted name") {
  for (ApiKind kind : kBoth) {
    check_refused(kind, {"stream_options", R"({"include_usage": true, "continuous_usage_stats": true})"},
                  "stream_options.continuous_usage_stats", "unsupported_parameter");
    check_refused(kind, {"stream_options", R"({"include_obfuscation": true})"}, "stream_options.include_obfuscation",
                  "unsupported_value");
    check_refused(kind, {"fmwire", R"({"resumable": true, "priority": 1})"}, "fmwire.priority",
                  "unsupported_parameter");
    check_accepted(kind, {"fmwire", R"({"resumable": true})"});
  }
}

TEST_CASE("openai_refusals: the refusal is OpenAI's error object with the param and code") {
  auto parsed = parse_api_request(ApiKind::chat, body_with(ApiKind::chat, "tools", "[]"), kDefaults);
  REQUIRE_FALSE(parsed);
  const json::value error = json::parse(error_json(parsed.error())).at("error");
  CHECK(error.at("type").as_string() == "invalid_request_error");
  CHECK(error.at("param").as_string() == "tools");
  CHECK(error.at("code").as_string() == "unsupported_parameter");
  CHECK(error.at("message").as_string() == "`tools` is not supported by this gateway (/v1/chat/completions)");
}

}  // namespace
}  // namespace fmwire::gateway
