// Errors the codec reports for input a peer controls, as values: a code for
// programs to branch on and a message for people that names the limit broken.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace fmwire::codec {

enum class CodecErrc : std::uint8_t {
  bad_magic = 1,
  unsupported_version,
  body_too_large,
  attachment_too_large,
  truncated_frame,
  malformed_segment_table,
  malformed_body,            // out-of-bounds pointer or type mismatch
  traversal_limit_exceeded,  // Cap'n Proto amplification guard
  nesting_limit_exceeded,
  bad_attachment_encoding,   // unknown compression or shuffle, or bad descriptor
  digest_mismatch,
  decompressed_size_exceeded,  // zstd output larger than declared: a bomb
  decompression_failed,
  wrong_body_kind,           // caller asked for a body type the kind is not
};

// The stable name of a code, for logs and Error frames ("digest_mismatch").
std::string_view to_string(CodecErrc code);

struct CodecError {
  CodecErrc code;
  std::string message;
};

// A value or an error (a CodecError unless said otherwise: the client SDK
// uses it with its own error type). The success path never allocates.
template <typename T, typename E = CodecError>
class [[nodiscard]] Result {
 public:
  Result(T value) : state_(std::in_place_index<0>, std::move(value)) {}
  // A value-initialised T built in place, for a caller that fills it in
  // where it lies (a large T returned by NRVO, never copied).
  explicit Result(std::in_place_t) : state_(std::in_place_index<0>) {}
  Result(E error) : state_(std::in_place_index<1>, std::move(error)) {}

  bool has_value() const { return state_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & { return std::get<0>(state_); }
  const T& value() const& { return std::get<0>(state_); }
  T&& value() && { return std::get<0>(std::move(state_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const E& error() const { return std::get<1>(state_); }

 private:
  std::variant<T, E> state_;
};

// For operations that produce nothing but may fail.
struct Done {};
using Status = Result<Done>;

}  // namespace fmwire::codec
