#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/text_stream.h"
#include "engine/tokenizer.h"
#include "llama2c_tokenizer_file.h"
#include "temp_file.h"

namespace fmwire::engine {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

std::uint32_t byte_token(unsigned char byte) { return 3 + byte; }

// Pushes each byte as a byte-level token and returns what each push gave.
std::vector<std::string> push_bytes(TextStream& stream, std::string_view bytes) {
  std::vector<std::string> outputs;
  for (char byte : bytes) outputs.emplace_back(stream.push(byte_token(static_cast<unsigned char>(byte))));
  return outputs;
}

TEST_CASE("a four-byte emoji split over four tokens appears whole once its last byte comes") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer);
  const std::vector<std::string> outputs = push_bytes(stream, "a\xF0\x9F\x8E\x89");
  CHECK(outputs == std::vector<std::string>{"a", "", "", "", "\xF0\x9F\x8E\x89"});
  CHECK(stream.finish().empty());
}

TEST_CASE("a stray continuation byte becomes U+FFFD at once") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer);
  CHECK(stream.push(byte_token(0x80)) == kReplacement);
  CHECK(stream.push(byte_token('x')) == "x");
}

TEST_CASE("bytes that never begin a character become U+FFFD at once") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  for (unsigned char byte : {0xC0, 0xC1, 0xF5, 0xFF}) {
    TextStream stream(tokenizer);
    CHECK_MESSAGE(stream.push(byte_token(byte)) == kReplacement, "byte " << int{byte});
  }
}

TEST_CASE("a lead byte followed by a byte that cannot continue it becomes U+FFFD, and that byte stays") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer);
  CHECK(push_bytes(stream, "\xC3z") == std::vector<std::string>{"", std::string(kReplacement) + "z"});
  const std::string two_replacements = std::string(kReplacement) + std::string(kReplacement);
  // E0 80 would be an overlong form: E0 needs A0 .. BF next.
  CHECK(push_bytes(stream, "\xE0\x80") == std::vector<std::string>{"", two_replacements});
  // ED A0 would be a surrogate.
  CHECK(push_bytes(stream, "\xED\xA0") == std::vector<std::string>{"", two_replacements});
}

TEST_CASE("an unfinished character at the end of the stream becomes U+FFFD") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer);
  CHECK(push_bytes(stream, "ok\xE2\x82") == std::vector<std::string>{"o", "k", "", ""});
  CHECK(stream.finish() == kReplacement);
}

TEST_CASE("a stop sequence split across tokens stops the stream with the text before it") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer, {"STOP"});
  const std::vector<std::string> outputs = push_bytes(stream, "ab STOP");
  CHECK(outputs == std::vector<std::string>{"a", "b", " ", "", "", "", ""});
  CHECK(stream.stopped());
  CHECK(stream.push(byte_token('z')).empty());
  CHECK(stream.finish().empty());
}

TEST_CASE("text that only looked like the start of a stop sequence is released") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  TextStream stream(tokenizer, {"STOP", "\n\n"});
  CHECK(push_bytes(stream, "STx") == std::vector<std::string>{"", "", "STx"});
  CHECK(push_bytes(stream, "\nS") == std::vector<std::string>{"", "\n"});
  CHECK_FALSE(stream.stopped());
  CHECK(stream.finish() == "S");  // the end of the stream: nothing can follow
}

TEST_CASE("a token that holds a whole stop sequence gives the text before it, whichever stop comes first") {
  test::TempFile file("stop-tokenizer.bin");
  const std::vector<test::Piece> pieces =
      test::llama2c_vocabulary({{" Hello", 0.0f}, {"wor", 0.0f}, {"ld!END more", 0.0f}});
  test::write_llama2c_tokenizer(file.path(), pieces);
  auto loaded = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  const Tokenizer tokenizer = std::move(loaded).value();

  TextStream stream(tokenizer, {"END", "!E"});
  CHECK(stream.push(259) == "Hello");  // the dummy space after BOS goes
  CHECK(stream.push(260) == "wor");
  CHECK(stream.push(261) == "ld");
  CHECK(stream.stopped());
}

TEST_CASE("a stop sequence that begins in held text and ends in a later token stops there") {
  test::TempFile file("held-stop-tokenizer.bin");
  const std::vector<test::Piece> pieces = test::llama2c_vocabulary({{"ab<E", 0.0f}, {"ND>cd", 0.0f}});
  test::write_llama2c_tokenizer(file.path(), pieces);
  auto loaded = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  const Tokenizer tokenizer = std::move(loaded).value();

  TextStream stream(tokenizer, {"<END>"});
  CHECK(stream.push(259) == "ab");
  CHECK(stream.push(260).empty());
  CHECK(stream.stopped());
}

}  // namespace
}  // namespace fmwire::engine
