// fmwire::TokenStream: one generation stream of a Client read by pulling
// (`while (auto tokens = stream->next())`, or a range-for) instead of through
// callbacks. The stream runs under manual flow control and acknowledges each
// chunk as next() hands it over, so what waits here is bounded by the
// stream's credit window: a caller that stops pulling stops the peer.
//
// Threading: next() from one thread at a time; cancel() from any. A
// TokenStream must end (or be destroyed) before its Client is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transport/client.h"

namespace fmwire {

// One Tokens frame, owned: what next() hands over.
struct PulledTokens {
  std::uint32_t first_index = 0;          // index of token_ids[0] in the completion
  std::vector<std::uint32_t> token_ids;
  std::string text;                       // the tokens' text pieces, joined
};

class TokenStream {
 public:
  // Opens the stream (Client::generate). Errors come at the end, as error().
  static std::unique_ptr<TokenStream> open(Client& client, GenerateParams params);
  // Cancels the stream if it has not ended.
  ~TokenStream();
  TokenStream(const TokenStream&) = delete;
  TokenStream& operator=(const TokenStream&) = delete;

  // The next chunk, waiting for it; none once the stream has ended: then
  // exactly one of completion() and error() is set.
  std::optional<PulledTokens> next();

  // Ends the stream: next() returns what had arrived, then none, and
  // error() says cancelled (unless the stream had ended first). Any thread.
  void cancel();

  // Set once next() has returned none.
  const std::optional<Completion>& completion() const { return completion_; }
  const std::optional<ClientError>& error() const { return error_; }

  // for (const PulledTokens& tokens : *stream): next() until none.
  class iterator {
   public:
    using value_type = PulledTokens;
    using difference_type = std::ptrdiff_t;
    iterator() = default;
    explicit iterator(TokenStream* stream) : stream_(stream) { ++*this; }
    const PulledTokens& operator*() const { return *current_; }
    const PulledTokens* operator->() const { return &*current_; }
    iterator& operator++() {
      current_ = stream_->next();
      if (!current_) stream_ = nullptr;
      return *this;
    }
    void operator++(int) { ++*this; }
    bool operator==(const iterator& other) const { return stream_ == other.stream_; }

   private:
    TokenStream* stream_ = nullptr;
    std::optional<PulledTokens> current_;
  };
  iterator begin() { return iterator(this); }
  iterator end() { return iterator(); }

 private:
  struct Shared;
  TokenStream() = default;

  std::shared_ptr<Shared> shared_;  // also held by the stream's callbacks
  GenerationHandle handle_;
  std::optional<Completion> completion_;
  std::optional<ClientError> error_;
};

}  // namespace fmwire
