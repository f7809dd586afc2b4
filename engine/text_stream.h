// One sequence's tokens turned into text as they come: never a broken UTF-8
// sequence (bytes of an unfinished character wait for the next token;
// bytes that can never form a character become U+FFFD), and text that might
// be the start of a stop sequence is held back until it is known not to be.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"

namespace fmwire::engine {

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_sequences = {},
             std::uint32_t previous_token = Tokenizer::kBos);

  // Adds one token; returns the text that may be shown now (possibly empty).
  // Once a stop sequence is complete, stopped() is true, the returned text
  // ends just before it, and later pushes return nothing.
  std::string_view push(std::uint32_t token);
  // The end of the stream: whatever is held back, with an unfinished
  // character as U+FFFD (unless stopped).
  std::string_view finish();
  bool stopped() const { return stopped_; }

 private:
  void decode(unsigned char byte);
  void release(bool end_of_stream);

  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_sequences_;
  std::uint32_t previous_token_;
  std::string pending_bytes_;  // an unfinished UTF-8 character
  std::string held_;           // complete text that may begin a stop sequence
  std::string out_;            // what the last call returned
  bool stopped_ = false;
};

}  // namespace fmwire::engine
