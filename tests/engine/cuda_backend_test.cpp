// The CUDA backend against the CPU reference (DESIGN.md, "Engine": CPU and
// CUDA agree on logits within a stated tolerance). Where no device is, the
// cases that need one are skipped (doctest counts them as skipped) after the
// probe's line is printed once; where CUDA is not built at all, one case says
// so.
#include <doctest/doctest.h>

#ifdef FMWIRE_HAVE_CUDA

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <stdexcept>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_probe.h"
#include "engine/cuda_module.h"
#include "engine/half_float.h"
#include "engine/llama_weights.h"

namespace fmwire::engine {
namespace {

// Logits may differ by this fraction of the row's largest magnitude (at
// least 1): both sides compute in float32, but cuBLAS and the attention
// kernel sum in another order than the CPU, so they differ by rounding,
// which grows slowly through the layers; 1e-3 leaves a wide margin over it
// while any indexing error shows up at the scale of the logits themselves.
constexpr float kLogitTolerance = 1e-3f;
// KV values (keys after RoPE, values) likewise, as a fraction of the largest.
constexpr float kKvTolerance = 1e-3f;
// With the KV cache in f16 or bf16 both sides round the same way (to
// nearest even), but a key that differs in its last float bit may round to
// the neighbouring 16-bit value: one f16 step is 2^-11 of the value, one
// bf16 step 2^-8; twice that, over the float32 tolerances, for the logits
// and the KV values alike.
constexpr float kLogitTolerance16[] = {kLogitTolerance + 0x1p-10f, kLogitTolerance + 0x1p-7f};  // f16, bf16
constexpr float kKvTolerance16[] = {kKvTolerance + 0x1p-10f, kKvTolerance + 0x1p-7f};

constexpr std::uint32_t kBlockTokens = 16;
constexpr std::uint32_t kTotalBlocks = 64;
constexpr std::uint32_t kSequences = 3;
constexpr std::uint32_t kPrefillChunk = 16;
constexpr std::uint32_t kDecodeSteps = 32;

// The probe, taken once when the cases register (their skip decorators read
// it); says on stderr why the cases that need a device are skipped.
const CudaProbe& registration_probe() {
  static const CudaProbe probe = [] {
    CudaProbe result = probe_cuda();
    if (!result.available) std::fprintf(stderr, "skipped, the cases that need a device: %s\n", result.log_line.c_str());
    return result;
  }();
  return probe;
}

bool no_device() { return !registration_probe().available; }

std::shared_ptr<const LlamaWeights> builtin_weights() {
  return std::make_shared<const LlamaWeights>(make_seeded_weights(builtin_llama_config(), 1));
}

struct Sequence {
  std::vector<std::uint32_t> tokens;  // the prompt, then each greedy token
  std::uint32_t prompt_length = 0;
  std::uint32_t fed = 0;              // tokens whose KV is in the cache
  std::vector<std::uint32_t> block_table;
};

// Prompts of 37, 40 and 43 tokens; block tables that interleave the
// sequences and run downwards with gaps (63, 57, 51... for the first), so
// that an indexing error cannot hide behind contiguous blocks.
std::vector<Sequence> make_sequences() {
  std::vector<Sequence> sequences(kSequences);
  for (std::uint32_t s = 0; s < kSequences; ++s) {
    Sequence& sequence = sequences[s];
    sequence.prompt_length = 37 + 3 * s;
    for (std::uint32_t i = 0; i < sequence.prompt_length; ++i) {
      sequence.tokens.push_back(3 + (s * 131 + i * 29 + i * i * 7) % 256);  // byte tokens of the builtin vocabulary
    }
    const std::uint32_t blocks = (sequence.prompt_length + kDecodeSteps + kBlockTokens - 1) / kBlockTokens;
    for (std::uint32_t j = 0; j < blocks; ++j) sequence.block_table.push_back(kTotalBlocks - 1 - 2 * (j * kSequences + s));
  }
  return sequences;
}

std::uint32_t argmax(std::span<const float> row) {
  return static_cast<std::uint32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// KV blocks as read out, widened to float.
std::vector<float> widen(const std::vector<std::byte>& bytes, protocol::DType dtype) {
  std::vector<float> out;
  if (dtype == protocol::DType::FLOAT32) {
    out.resize(bytes.size() / 4);
    std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }
  out.resize(bytes.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, bytes.data() + 2 * i, 2);
    out[i] = dtype == protocol::DType::FLOAT16 ? half_to_float(bits) : bfloat16_to_float(bits);
  }
  return out;
}

// Largest |cpu - cuda| over the row, as a fraction of max(1, max |cpu|).
float relative_difference(std::span<const float> cpu, std::span<const float> cuda) {
  float scale = 1.0f;
  float difference = 0.0f;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    scale = std::max(scale, std::abs(cpu[i]));
    difference = std::max(difference, std::abs(cpu[i] - cuda[i]));
  }
  return difference / scale;
}

// One step's entries: the next prompt chunk of each sequence still in its
// prompt, or else its last token (decode). Every entry wants logits when it
// ends the prompt or decodes.
std::vector<BatchEntry> next_step(std::vector<Sequence>& sequences) {
  std::vector<BatchEntry> batch;
  for (Sequence& sequence : sequences) {
    BatchEntry entry;
    const std::uint32_t end = sequence.fed < sequence.prompt_length
                                  ? std::min(sequence.fed + kPrefillChunk, sequence.prompt_length)
                                  : sequence.fed + 1;
    entry.tokens = std::span<const std::uint32_t>(sequence.tokens).subspan(sequence.fed, end - sequence.fed);
    entry.position = sequence.fed;
    entry.block_table = sequence.block_table;
    entry.wants_logits = end >= sequence.prompt_length;
    batch.push_back(entry);
  }
  return batch;
}

// Runs the same steps on both backends, prefill in chunks and then
// kDecodeSteps greedy tokens (chosen from the CPU's logits and fed to both),
// checking every row of logits. Returns the worst relative difference seen.
float run_both(CpuBackend& cpu, CudaBackend& cuda, std::vector<Sequence>& sequences, float tolerance) {
  const std::uint32_t vocab = cpu.vocab_size();
  std::vector<float> cpu_logits(kSequences * vocab), cuda_logits(kSequences * vocab);
  float worst = 0.0f;
  std::uint32_t decode_steps = 0;
  while (decode_steps < kDecodeSteps) {
    std::vector<BatchEntry> batch = next_step(sequences);
    cpu.forward(batch, cpu_logits);
    cuda.forward(batch, cuda_logits);
    std::size_t row = 0;
    bool decoding = true;
    for (std::size_t e = 0; e < batch.size(); ++e) {
      Sequence& sequence = sequences[e];
      decoding = decoding && sequence.fed >= sequence.prompt_length;
      sequence.fed += static_cast<std::uint32_t>(batch[e].tokens.size());
      if (!batch[e].wants_logits) continue;
      const std::span<const float> cpu_row = std::span<const float>(cpu_logits).subspan(row * vocab, vocab);
      const std::span<const float> cuda_row = std::span<const float>(cuda_logits).subspan(row * vocab, vocab);
      const float difference = relative_difference(cpu_row, cuda_row);
      worst = std::max(worst, difference);
      CHECK_MESSAGE(difference <= tolerance, "sequence ", e, " at position ", sequence.fed - 1);
      const std::uint32_t greedy = argmax(cpu_row);
      CHECK_MESSAGE(argmax(cuda_row) == greedy, "sequence ", e, " at position ", sequence.fed - 1);
      sequence.tokens.push_back(greedy);
      ++row;
    }
    if (decoding) ++decode_steps;
  }
  return worst;
}

TEST_CASE("the probe gives one log line, with or without a device") {
  const CudaProbe probe = probe_cuda();
  MESSAGE(probe.log_line);
  CHECK(probe.log_line.starts_with("CUDA: "));
  CHECK(probe.log_line.find('\n') == std::string::npos);
}

TEST_CASE("the engine opens the CUDA backend's library at run time, and it is the backend linked here") {
  const CudaModuleLoad& load = cuda_module();
  INFO(load.problem);
  REQUIRE(load.module != nullptr);
  CHECK(&load == &cuda_module());  // opened once
  CHECK(load.module->probe().log_line == probe_cuda().log_line);
  const CudaChoice choice = choose_cuda();
  MESSAGE(choice.log_line);
  CHECK(choice.log_line.starts_with("CUDA: "));
  CHECK((choice.module != nullptr) == probe_cuda().available);
  if (choice.module == nullptr) return;
  const std::unique_ptr<ModelBackend> backend =
      choice.module->make_backend(builtin_weights(), kTotalBlocks, kBlockTokens, protocol::DType::FLOAT16);
  CHECK(backend->name() == "cuda");
  CHECK(backend->kv_geometry().dtype == protocol::DType::FLOAT16);
}

TEST_CASE("without a device, constructing the CUDA backend throws the probe's line" * doctest::skip(!no_device())) {
  const CudaProbe probe = probe_cuda();
  const auto construct = [] { CudaBackend backend(builtin_weights(), kTotalBlocks, kBlockTokens); };
  CHECK_THROWS_WITH_AS(construct(), probe.log_line.c_str(), std::runtime_error);
}

TEST_CASE("the CPU backend's f16 and bf16 rounding is CUDA's, bit for bit") {
  // CUDA's conversions as the host compiler sees them (cuda_fp16.hpp,
  // cuda_bf16.hpp), which implement the device's cvt.rn: a prime stride
  // over every float bit pattern, NaNs and infinities included.
  std::size_t half_wrong = 0, bfloat16_wrong = 0;
  for (std::uint64_t bits = 0; bits <= 0xffffffffu; bits += 4093) {
    const float value = std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    half_wrong += float_to_half(value) != __half_as_ushort(__float2half_rn(value));
    bfloat16_wrong += float_to_bfloat16(value) != __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
  CHECK(half_wrong == 0);
  CHECK(bfloat16_wrong == 0);
  for (float value : {65520.0f, 0x1p-25f, 1.5f * 0x1p-24f, 1023.5f * 0x1p-24f, -0.0f}) {
    CHECK(float_to_half(value) == __half_as_ushort(__float2half_rn(value)));
  }
}

TEST_CASE("CUDA logits match the CPU reference through chunked prefill and 32 greedy decode steps" * doctest::skip(no_device())) {
  const auto weights = builtin_weights();
  CpuBackend cpu(weights, kTotalBlocks, kBlockTokens, protocol::DType::FLOAT32);
  CudaBackend cuda(weights, kTotalBlocks, kBlockTokens, protocol::DType::FLOAT32);
  std::vector<Sequence> sequences = make_sequences();
  const float worst = run_both(cpu, cuda, sequences, kLogitTolerance);
  MESSAGE("worst logit difference: ", worst, " of the row's scale (tolerance ", kLogitTolerance, ")");
}

TEST_CASE("with the KV cache in f16 and in bf16, CUDA logits match the CPU's within a rounding step" * doctest::skip(no_device())) {
  const auto weights = builtin_weights();
  const protocol::DType dtypes[] = {protocol::DType::FLOAT16, protocol::DType::BFLOAT16};
  for (std::size_t i = 0; i < 2; ++i) {
    CAPTURE(i);
    CpuBackend cpu(weights, kTotalBlocks, kBlockTokens, dtypes[i]);
    CudaBackend cuda(weights, kTotalBlocks, kBlockTokens, dtypes[i]);
    std::vector<Sequence> sequences = make_sequences();
    const float worst = run_both(cpu, cuda, sequences, kLogitTolerance16[i]);
    MESSAGE(kv_dtype_name(dtypes[i]), ": worst logit difference: ", worst, " (tolerance ", kLogitTolerance16[i], ")");
  }
}

TEST_CASE("KV blocks read from the CUDA backend match the CPU's after the same steps, in f32, f16 and bf16" * doctest::skip(no_device())) {
  const auto weights = builtin_weights();
  const protocol::DType dtypes[] = {protocol::DType::FLOAT32, protocol::DType::FLOAT16, protocol::DType::BFLOAT16};
  const float tolerances[] = {kKvTolerance, kKvTolerance16[0], kKvTolerance16[1]};
  const float logit_tolerances[] = {kLogitTolerance, kLogitTolerance16[0], kLogitTolerance16[1]};
  for (std::size_t i = 0; i < 3; ++i) {
    CAPTURE(i);
    CpuBackend cpu(weights, kTotalBlocks, kBlockTokens, dtypes[i]);
    CudaBackend cuda(weights, kTotalBlocks, kBlockTokens, dtypes[i]);
    REQUIRE(cuda.kv_geometry().bytes_per_block() == cpu.kv_geometry().bytes_per_block());
    std::vector<Sequence> sequences = make_sequences();
    (void)run_both(cpu, cuda, sequences, logit_tolerances[i]);

    std::vector<std::uint32_t> blocks;
    for (const Sequence& sequence : sequences) blocks.insert(blocks.end(), sequence.block_table.begin(), sequence.block_table.end());
    std::vector<std::byte> from_cpu(blocks.size() * cpu.kv_geometry().bytes_per_block()), from_cuda(from_cpu.size());
    cpu.read_blocks(blocks, from_cpu);
    cuda.read_blocks(blocks, from_cuda);
    const float difference = relative_difference(widen(from_cpu, dtypes[i]), widen(from_cuda, dtypes[i]));
    MESSAGE(kv_dtype_name(dtypes[i]), ": worst KV difference: ", difference, " of the largest value (tolerance ",
            tolerances[i], ")");
    CHECK(difference <= tolerances[i]);
  }
}

TEST_CASE("blocks written to the CUDA backend read back byte for byte, and other blocks are untouched" * doctest::skip(no_device())) {
  CudaBackend cuda(builtin_weights(), kTotalBlocks, kBlockTokens);
  const std::size_t block_bytes = cuda.kv_geometry().bytes_per_block();
  const std::vector<std::uint32_t> blocks = {5, 0, 63, 17};
  std::vector<std::byte> written(blocks.size() * block_bytes);
  for (std::size_t i = 0; i < written.size(); ++i) written[i] = static_cast<std::byte>((i * 2654435761u) >> 13);
  cuda.write_blocks(blocks, written);

  std::vector<std::byte> read(written.size());
  cuda.read_blocks(blocks, read);
  CHECK(read == written);

  // In another order, one at a time.
  std::vector<std::byte> one(block_bytes);
  cuda.read_blocks(std::vector<std::uint32_t>{63}, one);
  CHECK(std::memcmp(one.data(), written.data() + 2 * block_bytes, block_bytes) == 0);
  cuda.read_blocks(std::vector<std::uint32_t>{6}, one);
  CHECK(std::all_of(one.begin(), one.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("blocks read into the transfer arena and written from it are the copying path's bytes" * doctest::skip(no_device())) {
  const auto weights = builtin_weights();
  CudaBackend cuda(weights, kTotalBlocks, kBlockTokens, protocol::DType::FLOAT16);
  const std::size_t block_bytes = cuda.kv_geometry().bytes_per_block();
  const std::vector<std::uint32_t> blocks = {5, 2, 40};
  std::vector<std::byte> written(blocks.size() * block_bytes);
  for (std::size_t i = 0; i < written.size(); ++i) written[i] = static_cast<std::byte>((i * 131 + 7) % 251);
  cuda.write_blocks(blocks, written);

  const std::span<std::byte> arena = cuda.transfer_arena();
  REQUIRE(arena.size() >= 2 * written.size());
  // Read through the arena (one DMA), from an offset as a slot would be.
  const std::span<std::byte> slot = arena.subspan(written.size(), written.size());
  cuda.read_blocks(blocks, slot);
  CHECK(std::memcmp(slot.data(), written.data(), written.size()) == 0);

  // Written from the arena into other blocks, read back by the copying path.
  const std::vector<std::uint32_t> others = {60, 61, 7};
  cuda.write_blocks(others, slot);
  std::vector<std::byte> back(written.size());
  cuda.read_blocks(others, back);
  CHECK(std::memcmp(back.data(), written.data(), written.size()) == 0);
}

TEST_CASE("f16 KV blocks moved from the CPU backend let the CUDA backend continue the sequence" * doctest::skip(no_device())) {
  const auto weights = builtin_weights();
  CpuBackend cpu(weights, kTotalBlocks, kBlockTokens, protocol::DType::FLOAT16);
  CudaBackend cuda(weights, kTotalBlocks, kBlockTokens, protocol::DType::FLOAT16);
  const std::uint32_t vocab = cpu.vocab_size();

  // Prefill 40 tokens on the CPU alone.
  std::vector<std::uint32_t> tokens;
  for (std::uint32_t i = 0; i < 41; ++i) tokens.push_back(3 + (i * 37) % 256);
  const std::vector<std::uint32_t> cpu_table = {2, 3, 4};
  const std::vector<std::uint32_t> cuda_table = {40, 9, 31};
  std::vector<float> cpu_logits(vocab), cuda_logits(vocab);
  BatchEntry prefill{std::span<const std::uint32_t>(tokens).first(40), 0, cpu_table, true};
  cpu.forward(std::span<const BatchEntry>(&prefill, 1), cpu_logits);

  // Move its blocks into other blocks of the CUDA backend, then decode one
  // token on both.
  std::vector<std::byte> moved(cpu_table.size() * cpu.kv_geometry().bytes_per_block());
  cpu.read_blocks(cpu_table, moved);
  cuda.write_blocks(cuda_table, moved);
  BatchEntry cpu_decode{std::span<const std::uint32_t>(tokens).subspan(40, 1), 40, cpu_table, true};
  BatchEntry cuda_decode{std::span<const std::uint32_t>(tokens).subspan(40, 1), 40, cuda_table, true};
  cpu.forward(std::span<const BatchEntry>(&cpu_decode, 1), cpu_logits);
  cuda.forward(std::span<const BatchEntry>(&cuda_decode, 1), cuda_logits);
  CHECK(relative_difference(cpu_logits, cuda_logits) <= kLogitTolerance16[0]);
  CHECK(argmax(cuda_logits) == argmax(cpu_logits));
}

}  // namespace
}  // namespace fmwire::engine

#else  // !FMWIRE_HAVE_CUDA

#include "engine/cuda_module.h"

TEST_CASE("the CUDA backend is not built") {
  MESSAGE("CUDA backend not built (no CUDA toolkit when the build was configured): its tests are left out");
  const fmwire::engine::CudaChoice choice = fmwire::engine::choose_cuda();
  CHECK(choice.module == nullptr);
  CHECK(choice.log_line == "CUDA: backend not built (no CUDA toolkit when this build was configured), CUDA backend skipped");
}

#endif
