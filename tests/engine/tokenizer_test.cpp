#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "engine/tokenizer.h"
#include "llama2c_tokenizer_file.h"
#include "temp_file.h"

namespace fmwire::engine {
namespace {

using namespace std::string_literals;

using test::Piece;

// Ids 259 and up, in this order.
const std::vector<Piece> kMergePieces = {
    {" ", -1.0f},          // 259
    {"h", -2.0f},          // 260
    {"e", -2.0f},          // 261
    {"l", -2.0f},          // 262
    {"o", -2.0f},          // 263
    {"he", 5.0f},          // 264
    {"ll", 4.0f},          // 265
    {"llo", 3.0f},         // 266
    {"hello", 2.0f},       // 267
    {" hello", 1.0f},      // 268
    {" h", 0.5f},          // 269
    {"\xC3\xA9", -3.0f},   // 270: é
};

Tokenizer load_merge_tokenizer() {
  test::TempFile file("tokenizer.bin");
  const std::vector<Piece> pieces = test::llama2c_vocabulary(kMergePieces);
  test::write_llama2c_tokenizer(file.path(), pieces);
  auto tokenizer = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE_MESSAGE(tokenizer.has_value(), tokenizer.error());
  return std::move(tokenizer).value();
}

std::string decode(const Tokenizer& tokenizer, const std::vector<std::uint32_t>& tokens) {
  std::string text;
  std::uint32_t previous = Tokenizer::kBos;
  for (std::uint32_t token : tokens) {
    text += tokenizer.bytes(token, previous);
    previous = token;
  }
  return text;
}

TEST_CASE("the byte-level tokenizer encodes BOS and one token per byte and decodes back") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  CHECK(tokenizer.vocab_size() == 259);
  const std::string text = " h\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x8E\x89\n\x00\xFF"s;
  const std::vector<std::uint32_t> tokens = tokenizer.encode(text);
  REQUIRE(tokens.size() == text.size() + 1);
  CHECK(tokens[0] == Tokenizer::kBos);
  CHECK(tokens[1] == 3 + ' ');
  CHECK(tokens[3] == 3 + 0xC3);
  CHECK(decode(tokenizer, tokens) == text);  // the leading space survives: it is a byte
  CHECK(tokenizer.encode(text, false).size() == text.size());
}

TEST_CASE("the byte-level tokenizer decodes BOS, EOS and ids outside the vocabulary to nothing") {
  const Tokenizer tokenizer = Tokenizer::byte_level();
  CHECK(tokenizer.bytes(Tokenizer::kBos, 0).empty());
  CHECK(tokenizer.bytes(Tokenizer::kEos, 3).empty());
  CHECK(tokenizer.bytes(0, 3).empty());
  CHECK(tokenizer.bytes(259, 3).empty());
  CHECK(tokenizer.bytes(3 + 'A', Tokenizer::kBos) == "A");
}

TEST_CASE("a llama2.c tokenizer merges the best-scoring pair first until none is a piece") {
  const Tokenizer tokenizer = load_merge_tokenizer();
  // " hello": he (5), then ll (4), llo (3), hello (2), " hello" (1); " h"
  // (0.5) never gets its chance.
  CHECK(tokenizer.encode("hello") == std::vector<std::uint32_t>{Tokenizer::kBos, 268});
  // " he": " h" scores less than "he", and " he" is no piece.
  CHECK(tokenizer.encode("he") == std::vector<std::uint32_t>{Tokenizer::kBos, 259, 264});
  CHECK(tokenizer.encode("he", false) == std::vector<std::uint32_t>{259, 264});
  CHECK(tokenizer.encode("").size() == 1);  // no dummy prefix for empty text
}

TEST_CASE("a llama2.c tokenizer falls back to bytes for characters with no piece") {
  const Tokenizer tokenizer = load_merge_tokenizer();
  // é has a piece; € (E2 82 AC) and ! do not.
  const std::vector<std::uint32_t> expected{Tokenizer::kBos, 269, 270, 3 + 0xE2, 3 + 0x82, 3 + 0xAC, 3 + '!'};
  CHECK(tokenizer.encode("h\xC3\xA9\xE2\x82\xAC!") == expected);
}

TEST_CASE("a llama2.c tokenizer decodes what it encoded, dropping the dummy space after BOS") {
  const Tokenizer tokenizer = load_merge_tokenizer();
  for (const std::string text : {"hello", "he hello  llo", "h\xC3\xA9\xE2\x82\xAC!", "\n\x01 x"}) {
    CHECK(decode(tokenizer, tokenizer.encode(text)) == text);
  }
  CHECK(tokenizer.bytes(268, 264) == " hello");  // only right after BOS
  CHECK(tokenizer.bytes(Tokenizer::kBos, 0).empty());
  CHECK(tokenizer.bytes(Tokenizer::kEos, 268).empty());
}

TEST_CASE("a truncated tokenizer file is refused with the file's name and the token it ends in") {
  test::TempFile file("truncated-tokenizer.bin");
  const std::vector<Piece> pieces = test::llama2c_vocabulary(kMergePieces);
  test::write_llama2c_tokenizer(file.path(), pieces);
  std::filesystem::resize_file(file.path(), std::filesystem::file_size(file.path()) - 1);
  const auto tokenizer = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE_FALSE(tokenizer.has_value());
  CHECK(tokenizer.error().find(file.path()) != std::string::npos);
  CHECK(tokenizer.error().find("truncated in token 270") != std::string::npos);
}

TEST_CASE("a tokenizer file with more tokens than the model's vocabulary is refused") {
  test::TempFile file("long-tokenizer.bin");
  const std::vector<Piece> pieces = test::llama2c_vocabulary(kMergePieces);
  test::write_llama2c_tokenizer(file.path(), pieces);
  const auto tokenizer = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size() - 1));
  REQUIRE_FALSE(tokenizer.has_value());
  CHECK(tokenizer.error().find("bytes after") != std::string::npos);
}

TEST_CASE("a tokenizer without byte fallback pieces is refused") {
  test::TempFile file("no-bytes-tokenizer.bin");
  test::write_llama2c_tokenizer(file.path(), {{"<unk>", 0.0f}, {"<s>", 0.0f}, {"</s>", 0.0f}, {"a", 0.0f}});
  const auto tokenizer = Tokenizer::load_llama2c(file.path(), 4);
  REQUIRE_FALSE(tokenizer.has_value());
  CHECK(tokenizer.error().find("<0x00>") != std::string::npos);
}

TEST_CASE("a tokenizer's fingerprint is the same for the same vocabulary and differs for another") {
  const Tokenizer bytes = Tokenizer::byte_level();
  CHECK(bytes.fingerprint() != 0);
  CHECK(Tokenizer::byte_level().fingerprint() == bytes.fingerprint());
  const Tokenizer merges = load_merge_tokenizer();
  CHECK(load_merge_tokenizer().fingerprint() == merges.fingerprint());
  CHECK(merges.fingerprint() != bytes.fingerprint());

  // Another score alone changes how text merges, so it changes the fingerprint.
  std::vector<Piece> rescored = kMergePieces;
  rescored[5].score = 0.0f;
  test::TempFile file("tokenizer.bin");
  const std::vector<Piece> pieces = test::llama2c_vocabulary(rescored);
  test::write_llama2c_tokenizer(file.path(), pieces);
  auto loaded = Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE(loaded.has_value());
  CHECK(loaded->fingerprint() != merges.fingerprint());
}

}  // namespace
}  // namespace fmwire::engine
