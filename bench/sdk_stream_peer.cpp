// bench/sdk_stream_peer: the C++ SDK's side of bench/python_sdk_bench.py.
// N concurrent streams of one request shape through fmwire::Client, their
// tokens received by callback (each chunk's text appended to its stream's
// string, as `fmwire generate` does), timed from the first request to the
// last Finish; one line per repetition: "TOKENS SECONDS CPU_SECONDS" (the
// process's user + system time over the round, its loop thread included).
//
//   bench_sdk_stream_peer ENDPOINT STREAMS MAX_TOKENS REPETITIONS PROMPT
//
// The connection is made before the first repetition and is not timed, as
// the Python side's is not.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "transport/client.h"

using namespace fmwire;

namespace {

double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

struct Round {
  std::uint64_t tokens = 0;
  double seconds = 0;
  double cpu_seconds = 0;
  std::string error;
};

Round run_round(Client& client, unsigned streams, std::uint32_t max_tokens, const std::string& prompt) {
  struct Shared {
    std::vector<std::string> texts;
    std::uint64_t tokens = 0;  // loop thread only
    unsigned open = 0;
    std::string error;
    std::promise<void> done;
  };
  auto shared = std::make_shared<Shared>();
  shared->texts.resize(streams);
  shared->open = streams;
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = cpu_seconds();
  for (unsigned i = 0; i < streams; ++i) {
    GenerateParams params;
    params.prompt = prompt;
    params.max_tokens = max_tokens;
    params.seed = i;
    StreamCallbacks callbacks;
    callbacks.on_tokens = [shared, i](const TokenChunk& chunk) {
      shared->tokens += chunk.token_ids.size();
      for (std::string_view piece : chunk.text_pieces) shared->texts[i] += piece;
    };
    const auto end_one = [shared] {
      if (--shared->open == 0) shared->done.set_value();
    };
    callbacks.on_finish = [end_one](const Completion&) { end_one(); };
    callbacks.on_error = [shared, end_one](const ClientError& error) {
      if (shared->error.empty()) shared->error = std::string(to_string(error.code)) + ": " + error.message;
      end_one();
    };
    client.generate(std::move(params), std::move(callbacks));
  }
  shared->done.get_future().wait();
  Round round;
  round.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  round.cpu_seconds = cpu_seconds() - cpu_start;
  round.tokens = shared->tokens;
  round.error = shared->error;
  return round;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s ENDPOINT STREAMS MAX_TOKENS REPETITIONS PROMPT\n", argv[0]);
    return 2;
  }
  std::string problem;
  auto endpoint = transport::parse_endpoint(argv[1], &problem);
  const unsigned long streams = std::strtoul(argv[2], nullptr, 10);
  const unsigned long max_tokens = std::strtoul(argv[3], nullptr, 10);
  const unsigned long repetitions = std::strtoul(argv[4], nullptr, 10);
  if (!endpoint || streams == 0 || max_tokens == 0 || repetitions == 0) {
    std::fprintf(stderr, "%s: bad arguments%s%s\n", argv[0], problem.empty() ? "" : ": ", problem.c_str());
    return 2;
  }
  auto client = Client::connect(*endpoint);
  if (!client) {
    std::fprintf(stderr, "%s: %s\n", argv[0], client.error().message.c_str());
    return 1;
  }
  for (unsigned long i = 0; i < repetitions; ++i) {
    Round round = run_round(**client, static_cast<unsigned>(streams), static_cast<std::uint32_t>(max_tokens), argv[5]);
    if (!round.error.empty()) {
      std::fprintf(stderr, "%s: %s\n", argv[0], round.error.c_str());
      return 1;
    }
    std::printf("%llu %.6f %.6f\n", static_cast<unsigned long long>(round.tokens), round.seconds, round.cpu_seconds);
    std::fflush(stdout);
  }
  return 0;
}
