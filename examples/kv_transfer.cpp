// examples/kv_transfer: move a prompt's KV cache from one engine to another
// (engine/engine.h), as a prefill worker hands a request to a decode worker.
// The sender prefills with hold_kv and reads its blocks (read_kv); the
// receiver prepares blocks (prepare_import), takes the bytes (write_import)
// and goes on from the sender's first token (commit_import). Greedy output
// must equal one engine's, token for token. `fmwire worker --role prefill /
// decode` does the same across a network, with the KV session's messages.
//
// Run: kv_transfer ["a prompt"]
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/model_loader.h"

using namespace fmwire::engine;

namespace {

// Steps `engine` until it has nothing to do; each sequence's tokens.
std::map<SequenceId, std::vector<std::uint32_t>> run(Engine& engine) {
  std::map<SequenceId, std::vector<std::uint32_t>> tokens;
  StepOutput output;
  while (engine.has_work()) {
    output.clear();
    engine.step(output);
    for (const StepOutput::Token& token : output.tokens) tokens[token.id].push_back(token.token);
  }
  return tokens;
}

LoadedModel builtin() {
  ModelSpec spec;  // the built-in model: same seed, same weights, on the CPU
  spec.device = "cpu";
  auto model = load_model(spec);
  if (!model) throw std::runtime_error(model.error());
  return std::move(*model);
}

std::string text_of(const Tokenizer& tokenizer, const std::vector<std::uint32_t>& tokens, std::uint32_t previous) {
  std::string text;
  for (std::uint32_t token : tokens) text += tokenizer.bytes(token, std::exchange(previous, token));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  LoadedModel sender = builtin(), receiver = builtin(), alone = builtin();
  SequenceRequest request;
  request.prompt = sender.tokenizer->encode(argc > 1 ? argv[1] : "The KV cache of this prompt moves");
  request.max_tokens = 24;
  request.stop_at_eos = false;

  // The reference: one engine does it all.
  if (!alone.engine->submit(1, request)) return 1;
  const std::vector<std::uint32_t> expected = run(*alone.engine)[1];

  // Sender: prefill and one token, then hold the KV (hold_kv) and read it.
  SequenceRequest prefill = request;
  prefill.max_tokens = 1;
  prefill.hold_kv = true;
  if (!sender.engine->submit(1, prefill)) return 1;
  const std::uint32_t first = run(*sender.engine)[1].at(0);
  const KvGeometry& geometry = sender.engine->info().kv;
  const auto computed = static_cast<std::uint32_t>(request.prompt.size());  // as computed_tokens(1) says
  const std::uint32_t blocks = (computed + geometry.block_tokens - 1) / geometry.block_tokens;
  std::vector<std::byte> bytes(blocks * geometry.bytes_per_block());
  if (auto read = sender.engine->read_kv(1, 0, blocks, bytes); !read) {
    std::fprintf(stderr, "kv_transfer: read_kv: %s\n", read.error().message.c_str());
    return 1;
  }
  sender.engine->release_kv(1);  // the sender's blocks are free again

  // Receiver: reserve blocks for the prompt's KV, write it, go on after `first`.
  const KvImport import{request.prompt, geometry, sender.engine->info().model_fingerprint};
  Engine& engine = *receiver.engine;
  auto step = engine.prepare_import(1, request, import);
  if (step) step = engine.write_import(1, 0, bytes);  // any chunks, any order; here one
  if (step) step = engine.commit_import(1, std::vector<std::uint32_t>{first});
  if (!step) {
    std::fprintf(stderr, "kv_transfer: %s\n", step.error().message.c_str());
    return 1;
  }
  std::vector<std::uint32_t> moved = run(engine)[1];
  moved.insert(moved.begin(), first);

  const Tokenizer& tokenizer = *sender.tokenizer;
  std::printf("%u prompt tokens, %zu KV bytes moved\none engine:  %s\ntwo engines: %s\n", computed, bytes.size(),
              text_of(tokenizer, expected, request.prompt.back()).c_str(),
              text_of(tokenizer, moved, request.prompt.back()).c_str());
  return moved == expected ? 0 : 1;
}
