// examples/pull_tokens: the same stream read by pulling (transport/token_stream.h):
// a loop instead of callbacks. The stream holds back at the source while the
// loop does not pull, so a slow consumer never grows memory.
//
// Run: fmwire worker --listen 127.0.0.1:7000 &
//      pull_tokens 127.0.0.1:7000 ["a prompt"]
#include <cstdio>
#include <string>

#include "transport/client.h"
#include "transport/token_stream.h"

int main(int argc, char** argv) {
  std::string error;
  auto endpoint = argc > 1 ? fmwire::transport::parse_endpoint(argv[1], &error) : std::nullopt;
  if (!endpoint) {
    std::fprintf(stderr, "usage: pull_tokens HOST:PORT [PROMPT] (%s)\n", error.c_str());
    return 2;
  }
  auto client = fmwire::Client::connect(*endpoint);
  if (!client) {
    std::fprintf(stderr, "pull_tokens: %s\n", client.error().message.c_str());
    return 1;
  }

  fmwire::GenerateParams params;
  params.prompt = argc > 2 ? argv[2] : "Once upon a time";
  params.max_tokens = 32;
  auto stream = fmwire::TokenStream::open(**client, params);

  std::uint32_t tokens = 0;
  for (const fmwire::PulledTokens& chunk : *stream) {
    std::printf("%s", chunk.text.c_str());
    std::fflush(stdout);
    tokens += static_cast<std::uint32_t>(chunk.token_ids.size());
  }
  // The loop ended: exactly one of completion() and error() says how.
  if (const auto& error = stream->error()) {
    std::fprintf(stderr, "\npull_tokens: %s\n", error->message.c_str());
    return 1;
  }
  const fmwire::Completion& completion = *stream->completion();
  std::printf("%s\n[%s: %u tokens pulled]\n", completion.trailing_text.c_str(),
              std::string(fmwire::to_string(completion.reason)).c_str(), tokens);
  return tokens == completion.completion_tokens ? 0 : 1;
}
