#include "engine/tokenizer.h"

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <system_error>

#include <xxhash.h>

namespace fmwire::engine {

namespace {

// A piece longer than this is a corrupt file, not a vocabulary (llama2.c's
// own tokenizers have max_token_length 27).
constexpr std::int32_t kMaxPieceBytes = 1 << 16;

std::string byte_piece(unsigned byte) {
  char text[8];
  std::snprintf(text, sizeof text, "<0x%02X>", byte);
  return text;
}

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};

}  // namespace

Tokenizer Tokenizer::byte_level() {
  Tokenizer tokenizer;
  tokenizer.pieces_ = {"<unk>", "<s>", "</s>"};
  for (unsigned byte = 0; byte < 256; ++byte) tokenizer.pieces_.push_back(byte_piece(byte));
  tokenizer.raw_bytes_.resize(tokenizer.pieces_.size());
  for (unsigned byte = 0; byte < 256; ++byte) tokenizer.raw_bytes_[3 + byte] = std::string(1, static_cast<char>(byte));
  tokenizer.scores_.assign(tokenizer.pieces_.size(), 0.0f);
  for (std::uint32_t id = 0; id < tokenizer.pieces_.size(); ++id) tokenizer.lookup_.emplace(tokenizer.pieces_[id], id);
  tokenizer.byte_fallback_base_ = 3;
  tokenizer.byte_level_ = true;
  tokenizer.take_fingerprint();
  return tokenizer;
}

codec::Result<Tokenizer, std::string> Tokenizer::load_llama2c(const std::string& path, std::uint32_t vocab_size) {
  auto fail = [&](const std::string& problem) { return "tokenizer " + path + ": " + problem; };
  if (vocab_size < 3) return fail("vocabulary of " + std::to_string(vocab_size) + " tokens; <unk>, <s>, </s> need 3");

  std::error_code error;
  const std::uintmax_t file_bytes = std::filesystem::file_size(path, error);
  if (error) return fail(error.message());
  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) return fail(std::system_category().message(errno));
  std::uintmax_t offset = 0;
  // False when the file ends first.
  auto read = [&](void* into, std::size_t bytes) {
    if (file_bytes - offset < bytes || std::fread(into, 1, bytes, file.get()) != bytes) return false;
    offset += bytes;
    return true;
  };

  std::int32_t max_piece_bytes = 0;
  if (!read(&max_piece_bytes, sizeof max_piece_bytes)) return fail("shorter than its 4-byte header");
  if (max_piece_bytes <= 0 || max_piece_bytes > kMaxPieceBytes) {
    return fail("max_token_length " + std::to_string(max_piece_bytes) + " outside 1.." +
                std::to_string(kMaxPieceBytes));
  }

  // Every token takes at least its score and length: refuse a file that
  // cannot hold the vocabulary before allocating for it.
  if ((file_bytes - offset) / 8 < vocab_size) {
    return fail("file of " + std::to_string(file_bytes) + " bytes is too short for " + std::to_string(vocab_size) +
                " tokens: truncated, or a smaller vocabulary than the model's?");
  }

  Tokenizer tokenizer;
  tokenizer.pieces_.resize(vocab_size);
  tokenizer.scores_.resize(vocab_size);
  for (std::uint32_t id = 0; id < vocab_size; ++id) {
    std::int32_t length = 0;
    if (!read(&tokenizer.scores_[id], sizeof(float)) || !read(&length, sizeof length)) {
      return fail("truncated at token " + std::to_string(id) + " of " + std::to_string(vocab_size));
    }
    if (length < 0 || length > max_piece_bytes) {
      return fail("token " + std::to_string(id) + " has length " + std::to_string(length) + ", outside 0.." +
                  std::to_string(max_piece_bytes));
    }
    std::string& piece = tokenizer.pieces_[id];
    piece.resize(static_cast<std::size_t>(length));
    if (!read(piece.data(), piece.size())) {
      return fail("truncated in token " + std::to_string(id) + " of " + std::to_string(vocab_size));
    }
  }
  if (offset != file_bytes) {
    return fail(std::to_string(file_bytes - offset) + " bytes after the " + std::to_string(vocab_size) +
                " tokens: a larger vocabulary than the model's?");
  }

  // The first piece wins on duplicates, as llama2.c's sorted lookup does
  // not promise anything better.
  tokenizer.lookup_.reserve(vocab_size);
  for (std::uint32_t id = 0; id < vocab_size; ++id) tokenizer.lookup_.emplace(tokenizer.pieces_[id], id);

  const auto base = tokenizer.lookup_.find("<0x00>");
  if (base == tokenizer.lookup_.end()) return fail("no <0x00> piece: byte fallback needs <0x00> .. <0xFF>");
  tokenizer.byte_fallback_base_ = base->second;
  for (unsigned byte = 0; byte < 256; ++byte) {
    const std::uint64_t id = std::uint64_t{tokenizer.byte_fallback_base_} + byte;
    if (id >= vocab_size || tokenizer.pieces_[id] != byte_piece(byte)) {
      return fail("byte fallback pieces are not <0x00> .. <0xFF> in order from token " +
                  std::to_string(tokenizer.byte_fallback_base_));
    }
  }

  tokenizer.raw_bytes_ = tokenizer.pieces_;
  tokenizer.raw_bytes_[0].clear();
  tokenizer.raw_bytes_[kBos].clear();
  tokenizer.raw_bytes_[kEos].clear();
  for (unsigned byte = 0; byte < 256; ++byte) {
    tokenizer.raw_bytes_[tokenizer.byte_fallback_base_ + byte] = std::string(1, static_cast<char>(byte));
  }
  tokenizer.take_fingerprint();
  return tokenizer;
}

void Tokenizer::take_fingerprint() {
  // Fixed-width little-endian fields in a fixed order, so the value is the
  // same on every machine and build (x86 and ARM are little-endian; the
  // wire format assumes it too).
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  auto add = [&](const void* bytes, std::size_t size) { XXH3_64bits_update(state.get(), bytes, size); };
  constexpr std::string_view kFormat = "fmwire tokenizer 1";
  add(kFormat.data(), kFormat.size());
  const std::uint32_t settings[] = {vocab_size(), byte_fallback_base_, byte_level_ ? 1u : 0u};
  add(settings, sizeof settings);
  for (std::uint32_t id = 0; id < pieces_.size(); ++id) {
    const auto length = static_cast<std::uint32_t>(pieces_[id].size());
    add(&length, sizeof length);
    add(pieces_[id].data(), pieces_[id].size());
    add(&scores_[id], sizeof(float));
  }
  fingerprint_ = XXH3_64bits_digest(state.get());
  if (fingerprint_ == 0) fingerprint_ = 1;
}

std::vector<std::uint32_t> Tokenizer::encode(std::string_view text, bool bos) const {
  std::vector<std::uint32_t> tokens;
  tokens.reserve(text.size() + 2);
  if (bos) tokens.push_back(kBos);
  if (byte_level_) {
    for (char c : text) tokens.push_back(byte_fallback_base_ + static_cast<unsigned char>(c));
    return tokens;
  }

  // llama2.c's encode (run.c): sentencepiece's add_dummy_prefix, then one
  // token per UTF-8 character that has a piece, its bytes otherwise.
  std::string buffer;  // reused for every lookup: no allocation per merge
  buffer.reserve(64);
  const std::size_t first = tokens.size();  // merges never take BOS in
  if (!text.empty()) {
    if (const auto space = lookup_.find(" "); space != lookup_.end()) tokens.push_back(space->second);
  }
  for (std::size_t i = 0; i < text.size();) {
    // A lead byte and up to three continuation bytes (10xxxxxx), as run.c
    // groups them; invalid UTF-8 simply ends up as bytes.
    std::size_t end = i + 1;
    while (end < text.size() && end - i < 4 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
    buffer.assign(text.substr(i, end - i));
    if (const auto piece = lookup_.find(buffer); piece != lookup_.end()) {
      tokens.push_back(piece->second);
    } else {
      for (std::size_t b = i; b < end; ++b) tokens.push_back(byte_fallback_base_ + static_cast<unsigned char>(text[b]));
    }
    i = end;
  }

  // Merge the adjacent pair whose concatenation is the best-scoring piece,
  // the leftmost on ties, until no pair is a piece. Each pair's candidate is
  // looked up once and again only when a merge changes one of its tokens.
  constexpr std::uint32_t kNoPiece = std::numeric_limits<std::uint32_t>::max();
  auto pair_piece = [&](std::size_t left) {
    buffer.assign(pieces_[tokens[left]]);
    buffer.append(pieces_[tokens[left + 1]]);
    const auto piece = lookup_.find(buffer);
    return piece == lookup_.end() ? kNoPiece : piece->second;
  };
  std::vector<std::uint32_t> merged;  // merged[i]: the piece for tokens[i], tokens[i + 1]
  for (std::size_t i = first; i + 1 < tokens.size(); ++i) merged.push_back(pair_piece(i));
  while (true) {
    std::size_t best = merged.size();
    float best_score = -1e10f;
    for (std::size_t i = 0; i < merged.size(); ++i) {
      if (merged[i] != kNoPiece && scores_[merged[i]] > best_score) {
        best_score = scores_[merged[i]];
        best = i;
      }
    }
    if (best == merged.size()) break;
    const std::size_t at = first + best;
    tokens[at] = merged[best];
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    merged.erase(merged.begin() + static_cast<std::ptrdiff_t>(best));
    if (best > 0) merged[best - 1] = pair_piece(at - 1);
    if (best < merged.size()) merged[best] = pair_piece(at);
  }
  return tokens;
}

std::string_view Tokenizer::bytes(std::uint32_t token, std::uint32_t previous_token) const {
  if (token >= raw_bytes_.size()) return {};
  std::string_view bytes = raw_bytes_[token];
  // sentencepiece's dummy prefix: the first word after BOS shows no space
  // (a <0x20> byte piece keeps its space, as in run.c's decode).
  const bool byte_piece = token >= byte_fallback_base_ && token - byte_fallback_base_ < 256;
  if (previous_token == kBos && !byte_piece && !bytes.empty() && bytes.front() == ' ') bytes.remove_prefix(1);
  return bytes;
}

}  // namespace fmwire::engine
