// examples/stream_tokens: stream a completion's tokens as they are made,
// through callbacks (transport/client.h), from a worker or a router.
//
// Run: fmwire worker --listen 127.0.0.1:7000 &
//      stream_tokens 127.0.0.1:7000 ["a prompt"]
#include <cstdio>
#include <future>
#include <string>
#include <string_view>

#include "transport/client.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: stream_tokens HOST:PORT [PROMPT]\n");
    return 2;
  }
  std::string error;
  auto endpoint = fmwire::transport::parse_endpoint(argv[1], &error);
  if (!endpoint) {
    std::fprintf(stderr, "stream_tokens: %s\n", error.c_str());
    return 2;
  }
  std::promise<int> done;  // before the client: it outlives the client's callbacks
  auto client = fmwire::Client::connect(*endpoint);
  if (!client) {
    std::fprintf(stderr, "stream_tokens: %s\n", client.error().message.c_str());
    return 1;
  }

  fmwire::GenerateParams params;
  params.prompt = argc > 2 ? argv[2] : "Once upon a time";
  params.max_tokens = 32;

  // The callbacks run on the client's loop thread, in order; exactly one of
  // on_finish and on_error ends the stream.
  fmwire::StreamCallbacks callbacks;
  callbacks.on_tokens = [](const fmwire::TokenChunk& chunk) {
    for (std::string_view piece : chunk.text_pieces) std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  };
  callbacks.on_finish = [&done](const fmwire::Completion& completion) {
    std::printf("%s\n[%s: %u prompt tokens, %u completion tokens]\n", completion.trailing_text.c_str(),
                std::string(fmwire::to_string(completion.reason)).c_str(), completion.prompt_tokens,
                completion.completion_tokens);
    done.set_value(completion.completion_tokens > 0 ? 0 : 1);
  };
  callbacks.on_error = [&done](const fmwire::ClientError& error) {
    std::fprintf(stderr, "\nstream_tokens: %s: %s\n", std::string(fmwire::to_string(error.code)).c_str(),
                 error.message.c_str());
    done.set_value(1);
  };
  (*client)->generate(params, callbacks);
  return done.get_future().get();
}
