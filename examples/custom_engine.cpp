// examples/custom_engine: serve your own Engine (engine/engine.h). ReverseEngine
// answers a prompt with its tokens reversed, one per step; an EngineServer serves
// it on 127.0.0.1 and a Client in the same program asks it. A real engine takes
// its place; the worker does the rest (text, a thread for step(), pausing slow
// readers). Run: custom_engine ["an ASCII prompt"]
#include <algorithm>
#include <cstdio>
#include <map>
#include <chrono>
#include <string>

#include "engine/engine_without_kv.h"
#include "engine/tokenizer.h"
#include "transport/client.h"
#include "worker/engine_server.h"
using namespace fmwire;
using engine::SequenceId;

// Used from one thread at a time, as every Engine. No KV: the base refuses KV transfers.
class ReverseEngine final : public engine::EngineWithoutKv {
 public:
  ReverseEngine() {
    info_.model_name = info_.backend = "reverse";
    info_.vocab_size = engine::Tokenizer::byte_level().vocab_size();
    info_.max_context = 4096;
  }
  const engine::EngineInfo& info() const override { return info_; }
  engine::EngineResult<codec::Done> submit(SequenceId id, engine::SequenceRequest request) override {
    if (request.prompt.empty() || request.prompt.size() + request.max_tokens > info_.max_context) {
      return engine::EngineError{"the prompt is empty, or prompt + max_tokens is over the context of 4096"};
    }
    const bool bos = request.prompt.front() == engine::Tokenizer::kBos;  // left out of the answer
    std::vector<std::uint32_t> answer(request.prompt.rbegin(), request.prompt.rend() - (bos ? 1 : 0));
    sequences_[id] = {answer, 0, static_cast<std::uint32_t>(request.prompt.size()), request.max_tokens};
    return codec::Done{};
  }
  // One token for every sequence that is not paused; Finished after the last.
  void step(engine::StepOutput& output) override {
    using enum engine::FinishCause;
    for (auto& [id, s] : sequences_) {
      if (!s.paused && !s.done()) {
        output.tokens.push_back({id, s.answer[s.sent], s.sent});
        ++s.sent;
        ++output.batch_tokens;  // the worker's runner steps on while steps make tokens
      }
      if (s.done()) {  // no cached tokens, no timings
        output.finished.push_back({id, s.sent == s.answer.size() ? end_of_sequence : max_tokens, s.prompt_tokens,
                                   s.sent, 0, 0, 0, 0});
      }
    }
    std::erase_if(sequences_, [](const auto& entry) { return entry.second.done(); });
  }
  bool has_work() const override {
    return std::any_of(sequences_.begin(), sequences_.end(), [](const auto& entry) { return !entry.second.paused; });
  }
  void cancel(SequenceId id) override { sequences_.erase(id); }  // no Finished for it
  void set_paused(SequenceId id, bool paused) override {
    if (auto found = sequences_.find(id); found != sequences_.end()) found->second.paused = paused;
  }
  engine::EngineStats stats() const override { return {.running = static_cast<std::uint32_t>(sequences_.size())}; }
 private:
  struct Sequence {
    std::vector<std::uint32_t> answer;
    std::uint32_t sent = 0, prompt_tokens = 0, max_tokens = 0;
    bool paused = false;
    bool done() const { return sent == answer.size() || sent == max_tokens; }
  };
  engine::EngineInfo info_;
  std::map<SequenceId, Sequence> sequences_;
};

int main(int argc, char** argv) {
  const std::string prompt = argc > 1 ? argv[1] : "Hello, fmwire!";
  // The worker: engine and tokenizer, served from a thread of the server's own.
  ReverseEngine reverse;
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  worker::EngineServerOptions options;
  options.name = "reverse";
  auto server = worker::EngineServer::start(reverse, tokenizer, options);
  if (!server) {
    std::fprintf(stderr, "custom_engine: %s\n", server.error().c_str());
    return 1;
  }
  // The client: connect, ask, check the answer is the prompt reversed.
  int exit_code = 1;
  if (auto client = Client::connect((*server)->endpoint())) {
    GenerateParams params;
    params.prompt = prompt;
    params.max_tokens = 256;
    auto completion = (*client)->complete(params);
    std::printf("%s -> %s\n", prompt.c_str(), (completion ? completion->text : completion.error().message).c_str());
    if (completion && completion->text == std::string(prompt.rbegin(), prompt.rend())) exit_code = 0;
  } else {
    std::fprintf(stderr, "custom_engine: %s\n", client.error().message.c_str());
  }  // the client is closed here, before the server stops
  (*server)->drain(std::chrono::seconds(5));  // then the server, before the engine it drives
  return exit_code;
}
