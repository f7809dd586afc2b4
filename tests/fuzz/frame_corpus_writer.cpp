// Writes a seed corpus for the frame decoder fuzzer: one file per frame kind
// the encoder produces, and a few with attachments, so the fuzzer starts from
// well-formed frames and mutates inward.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"

using namespace fmwire;
using namespace fmwire::codec;

namespace {

void write(const std::string& directory, const std::string& name, const ByteBuffer& bytes) {
  std::ofstream file(directory + "/" + name, std::ios::binary);
  file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

template <typename Body, typename Fill>
void seed(const std::string& directory, const std::string& name, Fill&& fill, const PreparedAttachment* attachment = nullptr) {
  FrameEncoder encoder;
  ByteBuffer out;
  auto encoded = encoder.encode<Body>(out, 7, fill,
                                      {.attachment = attachment, .placement = AttachmentPlacement::copy_into_buffer});
  if (!encoded) throw std::runtime_error(encoded.error().message);
  write(directory, name, out);
}

// A CompactTokens frame: `pieces` one per id (or none), logprobs optional.
void seed_compact(const std::string& directory, const std::string& name, std::vector<std::uint32_t> ids,
                  std::vector<std::string_view> pieces, std::vector<float> logprobs) {
  FrameEncoder encoder;
  ByteBuffer out;
  const auto piece = [&](std::uint32_t i) { return pieces[i]; };
  auto encoded = encode_tokens(encoder, out, 7,
                               TokenBatch<decltype(piece)>{3, ids, !pieces.empty(), piece, logprobs},
                               /*compact=*/true);
  if (!encoded) throw std::runtime_error(encoded.error().message);
  write(directory, name, out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: frame_corpus_writer DIRECTORY\n");
    return 2;
  }
  const std::string directory = argv[1];
  seed<protocol::Tokens>(directory, "tokens-1", [](auto tokens) {
    tokens.setFirstIndex(3);
    tokens.initTokenIds(1).set(0, 42);
    tokens.initTextPieces(1).set(0, " hello");
  });
  seed<protocol::Tokens>(directory, "tokens-4", [](auto tokens) {
    auto ids = tokens.initTokenIds(4);
    auto pieces = tokens.initTextPieces(4);
    for (unsigned i = 0; i < 4; ++i) {
      ids.set(i, i);
      pieces.set(i, "ab");
    }
    tokens.initLogprobs(4).set(1, -0.5f);
  });
  seed_compact(directory, "compact-tokens-1", {42}, {" hello"}, {});
  seed_compact(directory, "compact-tokens-4", {0, 1, 2, 3}, {"ab", "", "c", "def"}, {-0.5f, -1, 0, -2});
  seed_compact(directory, "compact-tokens-no-text", {5, 6}, {}, {});
  seed<protocol::GenerateRequest>(directory, "generate-text", [](auto request) {
    request.setRequestId("r1");
    request.initPrompt().setText("Once upon a time");
    request.initSampling().initStopSequences(2).set(1, "\n");
  });
  seed<protocol::GenerateRequest>(directory, "generate-ids", [](auto request) {
    request.initPrompt().initTokenIds(8).set(7, 9);
  });
  seed<protocol::Finish>(directory, "finish", [](auto finish) {
    finish.initUsage().setPromptTokens(5);
    finish.initTimings(2)[1].setHop("router");
  });
  seed<protocol::Hello>(directory, "hello", [](auto hello) {
    hello.setPeerName("fuzz");
    hello.getLimits().setMaxStreams(100);
  });
  seed<protocol::Error>(directory, "error", [](auto error) { error.setMessage("overloaded"); });
  seed<protocol::LoadReport>(directory, "load-report", [](auto report) { report.initPrefixesAdded(3).set(0, 1); });
  seed<protocol::KvOffer>(directory, "kv-offer", [](auto offer) { offer.initPrefixHashes(2).set(1, 5); });

  AttachmentCodec codec;
  std::vector<std::byte> data(3000);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>((i * i) >> 5);
  const PreparedAttachment raw = codec.prepare(data, {});
  seed<protocol::KvChunk>(directory, "kv-chunk-raw", [](auto chunk) { chunk.setOffset(0); }, &raw);
  const PreparedAttachment compressed = codec.prepare(data, {.compress = true, .element_bytes = 2});
  seed<protocol::KvChunk>(directory, "kv-chunk-zstd", [](auto chunk) { chunk.setOffset(64); }, &compressed);
  return 0;
}
