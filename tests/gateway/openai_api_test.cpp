// The OpenAI surface's encoders: the per-token chunk encoder gives the bytes
// the JSON-tree encoder gives, for every kind of text.
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include <string>
#include <vector>

#include "gateway/openai_api.h"

namespace fmwire::gateway {
namespace {

StreamIdentity identity_of(ApiKind kind, std::string model) {
  StreamIdentity identity;
  identity.kind = kind;
  identity.id = kind == ApiKind::chat ? "chatcmpl-0123456789abcdef01234567" : "cmpl-0123456789abcdef01234567";
  identity.created = 1764633600;
  identity.model = std::move(model);
  return identity;
}

TEST_CASE("openai_api: TextChunkEncoder writes the bytes text_chunk_json writes") {
  std::string every_control;
  for (int c = 0; c < 0x20; ++c) every_control += static_cast<char>(c);
  const std::vector<std::string> texts = {"",
                                          "a",
                                          " hello world",
                                          "quote \" backslash \\ slash /",
                                          every_control,
                                          "\x7f del",
                                          "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82",
                                          "\x01",
                                          "\\u0001"};
  // A model name that holds the encoder's own slot must not confuse it.
  for (const std::string& model : {std::string("builtin"), std::string("odd\x01model \"x\"")}) {
    for (ApiKind kind : {ApiKind::completions, ApiKind::chat}) {
      const StreamIdentity identity = identity_of(kind, model);
      const TextChunkEncoder encode(identity);
      for (const std::string& text : texts) {
        CAPTURE(text);
        const std::string fast = encode(text);
        CHECK(fast == text_chunk_json(identity, text));
        // And it is JSON whose text is the text.
        const boost::json::value parsed = boost::json::parse(fast);
        const boost::json::value& choice = parsed.at("choices").at(0);
        const boost::json::value& got = kind == ApiKind::chat ? choice.at("delta").at("content") : choice.at("text");
        CHECK(std::string(got.as_string()) == text);
      }
    }
  }
}

TEST_CASE("openai_api: a top_p above 0 whose float is 0 is refused, not taken as greedy") {
  const ApiDefaults defaults{.model = "builtin", .max_tokens = 16};
  auto tiny = parse_api_request(ApiKind::completions, R"({"prompt": "x", "top_p": 1e-50})", defaults);
  REQUIRE_FALSE(tiny);
  CHECK(tiny.error().param == "top_p");
  auto small = parse_api_request(ApiKind::completions, R"({"prompt": "x", "top_p": 1e-30})", defaults);
  REQUIRE(small);
  CHECK(small->params.top_p > 0.0f);
}

TEST_CASE("openai_api: a number Boost.JSON reads as NaN or infinity is refused, not taken") {
  const ApiDefaults defaults{.model = "builtin", .max_tokens = 16};
  // 0e350 is 0 times 10^350: NaN, which passed every range check.
  for (const std::string number : {"0e350", "1e999", "-1e999"}) {
    for (const std::string name : {"temperature", "top_p", "presence_penalty"}) {
      CAPTURE(number);
      CAPTURE(name);
      auto parsed = parse_api_request(ApiKind::completions,
                                      R"({"prompt": "x", ")" + name + R"(": )" + number + "}", defaults);
      REQUIRE_FALSE(parsed);
      CHECK(parsed.error().param == name);
    }
  }
}

}  // namespace
}  // namespace fmwire::gateway
