// examples/custom_engine: the Engine seam (engine/engine.h) end to end.
//
// A custom Engine, ReverseEngine, answers each prompt with the prompt's
// tokens in reverse order, one token per step. fmwire's WorkerService serves
// it on a Server at 127.0.0.1 (any free port), and fmwire::Client asks it for
// a completion from the same program, prints it, and everything shuts down.
// A real engine takes ReverseEngine's place; the rest stays as it is: the
// worker turns GenerateRequests into submit(), runs step() on a thread of its
// own, streams the tokens as text, pauses sequences whose reader is slow and
// cancels those whose client goes away.
//
// Run: build/examples/custom_engine ["a prompt"]
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <thread>

#include "engine/engine.h"
#include "engine/tokenizer.h"
#include "transport/client.h"
#include "transport/server.h"
#include "worker/worker_service.h"

using namespace fmwire;

namespace {

using engine::EngineError;
using engine::SequenceId;

// The prompt reversed (BOS left out), then end of sequence; max_tokens ends
// it sooner. Like every Engine, it is used from one thread at a time.
class ReverseEngine final : public engine::Engine {
 public:
  ReverseEngine() {
    info_.model_name = "reverse";
    info_.backend = "example";
    info_.vocab_size = engine::Tokenizer::byte_level().vocab_size();
    info_.max_context = 4096;
    info_.eos_token = engine::Tokenizer::kEos;
  }

  const engine::EngineInfo& info() const override { return info_; }

  engine::EngineResult<codec::Done> submit(SequenceId id, engine::SequenceRequest request) override {
    if (request.prompt.empty()) return EngineError{"the prompt is empty"};
    if (request.prompt.size() + request.max_tokens > info_.max_context) {
      return EngineError{"prompt + max_tokens is over the context of " + std::to_string(info_.max_context)};
    }
    for (std::uint32_t token : request.prompt) {
      if (token >= info_.vocab_size) return EngineError{"token " + std::to_string(token) + " is not in the vocabulary"};
    }
    if (sequences_.contains(id)) return EngineError{"sequence " + std::to_string(id) + " exists already"};
    Sequence& sequence = sequences_[id];
    sequence.answer.assign(request.prompt.rbegin(), request.prompt.rend());
    if (sequence.answer.back() == engine::Tokenizer::kBos) sequence.answer.pop_back();
    sequence.prompt_tokens = static_cast<std::uint32_t>(request.prompt.size());
    sequence.max_tokens = request.max_tokens;
    stats_.prompt_tokens += sequence.prompt_tokens;
    return codec::Done{};
  }

  engine::EngineResult<codec::Done> submit_with_kv(SequenceId, engine::SequenceRequest,
                                                   const engine::KvShard&) override {
    return EngineError{"the reverse engine keeps no KV cache: submit the whole prompt"};
  }

  // One token for every sequence that is not paused; Finished after the last.
  void step(engine::StepOutput& output) override {
    for (auto it = sequences_.begin(); it != sequences_.end();) {
      Sequence& sequence = it->second;
      if (sequence.paused) {
        ++it;
        continue;
      }
      if (sequence.sent < sequence.answer.size() && sequence.sent < sequence.max_tokens) {
        output.tokens.push_back({it->first, sequence.answer[sequence.sent], sequence.sent});
        ++sequence.sent;
        ++output.batch_tokens;
        ++stats_.generated_tokens;
      }
      const bool all_said = sequence.sent == sequence.answer.size();
      if (all_said || sequence.sent == sequence.max_tokens) {
        engine::StepOutput::Finished finished{};  // no timings kept: they stay 0
        finished.id = it->first;
        finished.cause = all_said ? engine::FinishCause::end_of_sequence : engine::FinishCause::max_tokens;
        finished.prompt_tokens = sequence.prompt_tokens;
        finished.completion_tokens = sequence.sent;
        output.finished.push_back(finished);
        it = sequences_.erase(it);
      } else {
        ++it;
      }
    }
    ++stats_.steps;
  }

  bool has_work() const override {
    for (const auto& [id, sequence] : sequences_) {
      if (!sequence.paused) return true;
    }
    return false;
  }

  void cancel(SequenceId id) override { sequences_.erase(id); }  // no Finished for it

  void set_paused(SequenceId id, bool paused) override {
    if (auto found = sequences_.find(id); found != sequences_.end()) found->second.paused = paused;
  }

  engine::EngineResult<engine::KvShard> export_kv(SequenceId) override {
    return EngineError{"the reverse engine keeps no KV cache to export"};
  }

  // No KV cache, so no KV transfer: every part of it is refused, and there
  // is never a held sequence to release.
  engine::EngineResult<std::uint32_t> computed_tokens(SequenceId) const override {
    return EngineError{"the reverse engine keeps no KV cache"};
  }
  engine::EngineResult<codec::Done> read_kv(SequenceId, std::uint32_t, std::uint32_t, std::span<std::byte>) override {
    return EngineError{"the reverse engine keeps no KV cache to read"};
  }
  void release_kv(SequenceId) override {}
  engine::EngineResult<Held> hold(SequenceId) override {
    return engine::EngineError{"this engine keeps no KV cache to hand over"};
  }
  engine::EngineResult<codec::Done> prepare_import(SequenceId, engine::SequenceRequest,
                                                   const engine::KvImport&) override {
    return EngineError{"the reverse engine keeps no KV cache: submit the whole prompt"};
  }
  engine::EngineResult<codec::Done> write_import(SequenceId, std::uint32_t, std::span<const std::byte>) override {
    return EngineError{"the reverse engine has no KV import"};
  }
  engine::EngineResult<codec::Done> commit_import(SequenceId, std::span<const std::uint32_t>) override {
    return EngineError{"the reverse engine has no KV import"};
  }

  engine::EngineStats stats() const override {
    engine::EngineStats stats = stats_;
    stats.running = static_cast<std::uint32_t>(sequences_.size());
    for (const auto& [id, sequence] : sequences_) stats.paused += sequence.paused ? 1 : 0;
    return stats;
  }

  std::vector<std::uint64_t> cached_prefixes() const override { return {}; }

 private:
  struct Sequence {
    std::vector<std::uint32_t> answer;
    std::uint32_t sent = 0;
    std::uint32_t prompt_tokens = 0;
    std::uint32_t max_tokens = 0;
    bool paused = false;
  };

  engine::EngineInfo info_;
  std::map<SequenceId, Sequence> sequences_;
  engine::EngineStats stats_;
};

}  // namespace

int main(int argc, char** argv) {
  const std::string prompt = argc > 1 ? argv[1] : "Hello, fmwire!";

  // The worker: engine, tokenizer, service and server on one loop, on a thread.
  ReverseEngine reverse;
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  transport::EventLoop loop;
  auto service = std::make_unique<worker::WorkerService>(loop, reverse, tokenizer);
  transport::ConnectionOptions worker_options;
  worker_options.role = protocol::Role::WORKER;
  auto server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0}, worker_options, *service);
  const transport::Endpoint endpoint{"127.0.0.1", server->port()};
  std::thread worker_thread([&] { loop.run(); });
  std::printf("worker serving '%s' on %s\n", reverse.info().model_name.c_str(), endpoint.to_string().c_str());

  // The client: connect, ask, print.
  int exit_code = 0;
  if (auto client = Client::connect(endpoint)) {
    GenerateParams params;
    params.prompt = prompt;
    params.max_tokens = 256;
    auto completion = (*client)->complete(params);
    if (completion) {
      std::printf("prompt:     %s\ncompletion: %s\nfinish:     %s, %u prompt tokens, %u completion tokens\n",
                  prompt.c_str(), completion->text.c_str(), std::string(to_string(completion->finish.reason)).c_str(),
                  completion->finish.prompt_tokens, completion->finish.completion_tokens);
      // Bytes reversed: only an ASCII prompt reads back as itself reversed.
      const bool ascii = std::all_of(prompt.begin(), prompt.end(), [](char c) { return c > 0; });
      if (ascii && completion->text != std::string(prompt.rbegin(), prompt.rend())) {
        std::fprintf(stderr, "custom_engine: the completion is not the prompt reversed\n");
        exit_code = 1;
      }
    } else {
      std::fprintf(stderr, "custom_engine: %s\n", completion.error().message.c_str());
      exit_code = 1;
    }
  } else {
    std::fprintf(stderr, "custom_engine: cannot connect: %s\n", client.error().message.c_str());
    exit_code = 1;
  }  // the client is closed here, before the worker stops

  // Shut down: drain the server (the client is gone), stop the loop, join it;
  // then the server, and the service, whose engine thread stops before the engine.
  loop.post([&] { server->drain("example finished", [&] { loop.stop(); }); });
  worker_thread.join();
  server.reset();
  service.reset();
  return exit_code;
}
