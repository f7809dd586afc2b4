// Text to token ids and back. Two vocabularies: llama2.c's tokenizer.bin
// (sentencepiece BPE pieces with scores, byte fallback <0xXX> pieces) and
// the built-in byte-level one (ids 0 <unk>, 1 <s>, 2 </s>, then the 256
// bytes as 3..258, laid out as llama2.c's byte fallback is).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "codec/codec_error.h"

namespace fmwire::engine {

class Tokenizer {
 public:
  static constexpr std::uint32_t kBos = 1;
  static constexpr std::uint32_t kEos = 2;

  // The built-in byte-level vocabulary (259 tokens).
  static Tokenizer byte_level();
  // llama2.c's tokenizer.bin: int32 max_token_length, then per token a
  // float32 score, an int32 length and that many bytes. Errors name the file
  // and what is wrong (short file, lengths out of range).
  static codec::Result<Tokenizer, std::string> load_llama2c(const std::string& path, std::uint32_t vocab_size);

  std::uint32_t vocab_size() const { return static_cast<std::uint32_t>(pieces_.size()); }

  // A stable hash (xxh3-64) of everything encode() depends on: the pieces,
  // their scores, the byte-fallback base and byte-level mode. Equal
  // fingerprints give equal ids for equal text; a worker advertises its
  // tokenizer's in the Hello exchange so that a router that tokenizes for
  // it can check it uses the same one. Never 0 (the protocol's "none").
  std::uint64_t fingerprint() const { return fingerprint_; }

  // BOS first when asked, then BPE merges by score (llama2.c's encode: a
  // leading space is added as sentencepiece does when the vocabulary has " "
  // pieces; characters with no piece fall back to their bytes).
  std::vector<std::uint32_t> encode(std::string_view text, bool bos = true) const;

  // The raw bytes a token stands for: a <0xXX> piece is its byte; a piece
  // right after BOS loses its leading space (as llama2.c decodes); BOS and
  // EOS are empty. The result may be part of a UTF-8 character.
  std::string_view bytes(std::uint32_t token, std::uint32_t previous_token) const;

 private:
  std::vector<std::string> pieces_;     // as stored
  std::vector<std::string> raw_bytes_;  // what each token decodes to
  std::vector<float> scores_;
  std::unordered_map<std::string, std::uint32_t> lookup_;
  std::uint32_t byte_fallback_base_ = 3;  // id of <0x00>
  bool byte_level_ = false;               // byte_level(): no merges, no dummy prefix
  std::uint64_t fingerprint_ = 0;

  void take_fingerprint();
};

}  // namespace fmwire::engine
