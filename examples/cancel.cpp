// examples/cancel: end a stream early, two ways. cancel() once the caller
// has seen enough (the worker stops that sequence and frees its KV blocks at
// its next step), and a deadline (GenerateParams::timeout) that ends a
// request which runs too long: it finishes with reason deadline_exceeded.
//
// Run: fmwire worker --listen 127.0.0.1:7000 &
//      cancel 127.0.0.1:7000
#include <chrono>
#include <cstdio>
#include <string>

#include "transport/client.h"
#include "transport/token_stream.h"

using namespace std::chrono_literals;

int main(int argc, char** argv) {
  std::string error;
  auto endpoint = argc > 1 ? fmwire::transport::parse_endpoint(argv[1], &error) : std::nullopt;
  if (!endpoint) {
    std::fprintf(stderr, "usage: cancel HOST:PORT (%s)\n", error.c_str());
    return 2;
  }
  auto client = fmwire::Client::connect(*endpoint);
  if (!client) {
    std::fprintf(stderr, "cancel: %s\n", client.error().message.c_str());
    return 1;
  }

  // 1. Cancel after the first chunk of a long completion.
  fmwire::GenerateParams params;
  params.prompt = "Tell me a long story";
  params.max_tokens = 1000;
  auto stream = fmwire::TokenStream::open(**client, params);
  std::uint32_t tokens = 0;
  for (const fmwire::PulledTokens& chunk : *stream) {
    tokens += static_cast<std::uint32_t>(chunk.token_ids.size());
    stream->cancel();  // what had arrived still comes out, then the loop ends
  }
  const bool cancelled = stream->error() && stream->error()->code == fmwire::protocol::ErrorCode::CANCELLED;
  std::printf("cancelled after %u of 1000 tokens: %s\n", tokens,
              stream->error() ? std::string(fmwire::to_string(stream->error()->code)).c_str() : "finished");

  // 2. A deadline: the request's whole budget, far too short for 1000 tokens
  // (the built-in model makes them in about 0.5 s). What came in time is kept.
  params.timeout = 20ms;
  auto late = (*client)->complete(params);
  if (!late) {
    std::fprintf(stderr, "cancel: %s\n", late.error().message.c_str());
    return 1;
  }
  const bool expired = late->finish.reason == fmwire::protocol::FinishReason::DEADLINE_EXCEEDED;
  std::printf("with a 20 ms deadline: %s after %zu tokens\n",
              std::string(fmwire::to_string(late->finish.reason)).c_str(), late->token_ids.size());
  return cancelled && tokens < 1000 && expired ? 0 : 1;
}
