// Writes small llama2.c tokenizer.bin files for tests: <unk>, <s>, </s>,
// the 256 byte-fallback pieces <0x00> .. <0xFF> as ids 3 .. 258, then the
// test's own pieces from id 259.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace fmwire::engine::test {

struct Piece {
  std::string text;
  float score;
};

inline std::vector<Piece> llama2c_vocabulary(const std::vector<Piece>& extra) {
  std::vector<Piece> pieces{{"<unk>", 0.0f}, {"\n<s>\n", 0.0f}, {"\n</s>\n", 0.0f}};
  for (int byte = 0; byte < 256; ++byte) {
    char text[8];
    std::snprintf(text, sizeof text, "<0x%02X>", byte);
    pieces.push_back({text, 0.0f});
  }
  pieces.insert(pieces.end(), extra.begin(), extra.end());
  return pieces;
}

// int32 max_token_length, then per piece float32 score, int32 length, bytes.
inline void write_llama2c_tokenizer(const std::string& path, const std::vector<Piece>& pieces) {
  std::ofstream out(path, std::ios::binary);
  std::int32_t max_length = 0;
  for (const Piece& piece : pieces) max_length = std::max(max_length, static_cast<std::int32_t>(piece.text.size()));
  out.write(reinterpret_cast<const char*>(&max_length), 4);
  for (const Piece& piece : pieces) {
    const std::int32_t length = static_cast<std::int32_t>(piece.text.size());
    out.write(reinterpret_cast<const char*>(&piece.score), 4);
    out.write(reinterpret_cast<const char*>(&length), 4);
    out.write(piece.text.data(), length);
  }
}

}  // namespace fmwire::engine::test
