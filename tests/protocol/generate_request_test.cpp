// GenerateRequest's home (protocol/generate_request.h): what it builds
// reads back the same, its checks name the field and the limit, and a
// relay's copy keeps everything but the prompt.
#include <doctest/doctest.h>

#include <capnp/message.h>

#include <string>
#include <vector>

#include "protocol/generate_request.h"

namespace fmwire::protocol {
namespace {

TEST_CASE("a GenerateRequest built through its home reads back through its home") {
  capnp::MallocMessageBuilder message;
  const std::vector<std::string> stops{"\n\n", "END"};
  GenerateRequestBuilder(message.initRoot<GenerateRequest>())
      .request_id("r-1")
      .model("builtin")
      .prompt_text("Once upon a time")
      .max_tokens(32)
      .temperature(0.5f)
      .top_p(0.9f)
      .seed(7)
      .stop_sequences(stops)
      .timeout_us(250000)
      .priority(-2)
      .stream_options(false, true, false);
  const GenerateRequestReader request = message.getRoot<GenerateRequest>().asReader();
  CHECK(request.request_id() == "r-1");
  CHECK(request.model() == "builtin");
  CHECK(request.has_text_prompt());
  CHECK(request.prompt_text() == "Once upon a time");
  CHECK(request.prompt_token_ids().size() == 0);
  CHECK(request.max_tokens() == 32);
  CHECK(request.temperature() == 0.5f);
  CHECK(request.top_p() == 0.9f);
  CHECK(request.seed() == 7u);
  REQUIRE(request.stop_sequences().size() == 2);
  CHECK(std::string(request.stop_sequences()[1].cStr()) == "END");
  CHECK(request.timeout_us() == 250000);
  CHECK(request.priority() == -2);
  CHECK_FALSE(request.include_usage());
  CHECK(request.include_text());
  CHECK_FALSE(request.include_timings());
  CHECK_FALSE(request.check({}).has_value());
}

TEST_CASE("a GenerateRequest with no seed leaves the seed to the receiver, and stream options default on") {
  capnp::MallocMessageBuilder message;
  const std::vector<std::uint32_t> ids{1, 5, 9};
  GenerateRequestBuilder(message.initRoot<GenerateRequest>()).prompt_token_ids(ids).seed(std::nullopt);
  const GenerateRequestReader request = message.getRoot<GenerateRequest>().asReader();
  CHECK_FALSE(request.has_text_prompt());
  CHECK(request.prompt_text().empty());
  std::vector<std::uint32_t> read{0};
  request.append_prompt_token_ids(read);
  CHECK(read == std::vector<std::uint32_t>{0, 1, 5, 9});
  CHECK_FALSE(request.seed().has_value());
  CHECK(request.include_usage());
  CHECK(request.include_text());
  CHECK(request.include_timings());
}

TEST_CASE("a GenerateRequest's checks refuse an empty prompt and stop sequences past the limits, naming them") {
  capnp::MallocMessageBuilder empty_text;
  GenerateRequestBuilder(empty_text.initRoot<GenerateRequest>()).prompt_text("");
  auto problem = GenerateRequestReader(empty_text.getRoot<GenerateRequest>().asReader()).check_prompt();
  REQUIRE(problem.has_value());
  CHECK(problem->code == ErrorCode::BAD_REQUEST);
  CHECK(problem->message == "the prompt is empty");

  capnp::MallocMessageBuilder no_ids;
  GenerateRequestBuilder(no_ids.initRoot<GenerateRequest>()).prompt_token_ids({});
  CHECK(GenerateRequestReader(no_ids.getRoot<GenerateRequest>().asReader()).check_prompt().has_value());

  capnp::MallocMessageBuilder many;
  const std::vector<std::string> three{"a", "b", "c"};
  GenerateRequestBuilder(many.initRoot<GenerateRequest>()).prompt_text("hi").stop_sequences(three);
  problem = GenerateRequestReader(many.getRoot<GenerateRequest>().asReader()).check({.max_stop_sequences = 2});
  REQUIRE(problem.has_value());
  CHECK(problem->message == "3 stop sequences, at most 2 are allowed");

  capnp::MallocMessageBuilder long_stop;
  const std::vector<std::string> stop{"0123456789"};
  GenerateRequestBuilder(long_stop.initRoot<GenerateRequest>()).prompt_text("hi").stop_sequences(stop);
  problem = GenerateRequestReader(long_stop.getRoot<GenerateRequest>().asReader()).check({.max_stop_sequence_bytes = 4});
  REQUIRE(problem.has_value());
  CHECK(problem->message == "a stop sequence of 10 bytes; each must have 1 to 4");
}

TEST_CASE("a relay's copy of a GenerateRequest keeps every field but the prompt, which it sets itself") {
  capnp::MallocMessageBuilder original;
  const std::vector<std::string> stops{"END"};
  GenerateRequestBuilder(original.initRoot<GenerateRequest>())
      .request_id("r-2")
      .model("m")
      .prompt_text("text the router tokenized")
      .max_tokens(9)
      .temperature(0.25f)
      .seed(3)
      .stop_sequences(stops)
      .timeout_us(1000)
      .priority(4)
      .stream_options(true, false, true);
  capnp::MallocMessageBuilder copy;
  const std::vector<std::uint32_t> ids{1, 2, 3};
  GenerateRequestBuilder(copy.initRoot<GenerateRequest>())
      .copy_all_but_prompt(original.getRoot<GenerateRequest>().asReader())
      .prompt_token_ids(ids);
  const GenerateRequestReader request = copy.getRoot<GenerateRequest>().asReader();
  CHECK(request.request_id() == "r-2");
  CHECK(request.model() == "m");
  CHECK_FALSE(request.has_text_prompt());
  CHECK(request.prompt_token_ids().size() == 3);
  CHECK(request.max_tokens() == 9);
  CHECK(request.temperature() == 0.25f);
  CHECK(request.seed() == 3u);
  CHECK(request.stop_sequences().size() == 1);
  CHECK(request.timeout_us() == 1000);
  CHECK(request.priority() == 4);
  CHECK_FALSE(request.include_text());
}

}  // namespace
}  // namespace fmwire::protocol
