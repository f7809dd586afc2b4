#include "transport/token_stream.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <utility>

namespace fmwire {

// What the loop thread's callbacks hand over to next(): the chunks (with the
// wire bytes to acknowledge for each) and how the stream ended.
struct TokenStream::Shared {
  std::mutex mutex;
  std::condition_variable arrived;
  std::deque<std::pair<PulledTokens, std::uint64_t>> chunks;  // guarded by mutex
  std::optional<Completion> completion;                       // guarded by mutex
  std::optional<ClientError> error;                           // guarded by mutex
};

std::unique_ptr<TokenStream> TokenStream::open(Client& client, GenerateParams params) {
  std::unique_ptr<TokenStream> stream(new TokenStream());
  auto shared = std::make_shared<Shared>();
  stream->shared_ = shared;
  params.manual_flow = true;  // acknowledged by next(), as the caller takes each chunk
  StreamCallbacks callbacks;
  callbacks.on_tokens = [shared](const TokenChunk& chunk) {
    PulledTokens tokens;
    tokens.first_index = chunk.first_index;
    tokens.token_ids.assign(chunk.token_ids.begin(), chunk.token_ids.end());
    for (std::string_view piece : chunk.text_pieces) tokens.text += piece;
    {
      std::lock_guard lock(shared->mutex);
      shared->chunks.emplace_back(std::move(tokens), chunk.wire_bytes);
    }
    shared->arrived.notify_one();
  };
  callbacks.on_finish = [shared](const Completion& completion) {
    {
      std::lock_guard lock(shared->mutex);
      shared->completion = completion;
    }
    shared->arrived.notify_one();
  };
  callbacks.on_error = [shared](const ClientError& error) {
    {
      std::lock_guard lock(shared->mutex);
      shared->error = error;
    }
    shared->arrived.notify_one();
  };
  stream->handle_ = client.generate(std::move(params), std::move(callbacks));
  return stream;
}

TokenStream::~TokenStream() {
  bool ended;
  {
    std::lock_guard lock(shared_->mutex);
    ended = shared_->completion || shared_->error;
  }
  if (!ended) handle_.cancel();
}

std::optional<PulledTokens> TokenStream::next() {
  std::unique_lock lock(shared_->mutex);
  shared_->arrived.wait(lock, [&] { return !shared_->chunks.empty() || shared_->completion || shared_->error; });
  if (shared_->chunks.empty()) {
    completion_ = shared_->completion;
    error_ = shared_->error;
    return std::nullopt;
  }
  auto [tokens, wire_bytes] = std::move(shared_->chunks.front());
  shared_->chunks.pop_front();
  const bool ended = shared_->completion || shared_->error;
  lock.unlock();
  if (!ended) handle_.consumed(wire_bytes);
  return std::move(tokens);
}

void TokenStream::cancel() { handle_.cancel(); }

}  // namespace fmwire
