// libFuzzer target: arbitrary bytes as a receive buffer. Decodes every frame
// at its front, reads each body by its kind's schema, and decodes every
// attachment, as a receiver would. Any crash, sanitizer report or exception
// escaping the codec is a bug. Run by scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"

namespace {

using namespace fmwire::codec;
using namespace fmwire;

std::uint64_t sink = 0;

void read_text(capnp::Text::Reader text) { sink += text.size() ? static_cast<unsigned char>(text[0]) : 0; }

// Reads every field a receiver of this kind would read.
Status read_by_kind(const FrameView& frame, const FrameLimits& limits) {
  switch (frame.kind()) {
    case FrameKind::tokens:
    case FrameKind::compact_tokens:
      // Both forms through the one view every consumer uses.
      return read_tokens(frame, limits, [](const TokensView& tokens) {
        sink += tokens.first_index();
        for (std::uint32_t i = 0; i < tokens.size(); ++i) sink += tokens.id(i);
        for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) {
          const std::string_view piece = tokens.piece(i);
          sink += piece.empty() ? 0 : static_cast<unsigned char>(piece.back());
        }
        for (std::uint32_t i = 0; i < tokens.logprob_count(); ++i) sink += tokens.logprob(i) > 0;
      });
    case FrameKind::generate_request:
      return read_body<protocol::GenerateRequest>(frame, limits, [](protocol::GenerateRequest::Reader request) {
        read_text(request.getRequestId());
        read_text(request.getModel());
        auto prompt = request.getPrompt();
        if (prompt.isText()) read_text(prompt.getText());
        if (prompt.isTokenIds()) for (auto id : prompt.getTokenIds()) sink += id;
        auto sampling = request.getSampling();
        sink += sampling.getMaxTokens() + (sampling.getSeed().isFixed() ? sampling.getSeed().getFixed() : 0);
        for (auto stop : sampling.getStopSequences()) read_text(stop);
        sink += request.getStreamOptions().getIncludeUsage();
      });
    case FrameKind::finish:
      return read_body<protocol::Finish>(frame, limits, [](protocol::Finish::Reader finish) {
        sink += static_cast<std::uint64_t>(finish.getReason()) + finish.getUsage().getCompletionTokens();
        for (auto timing : finish.getTimings()) {
          read_text(timing.getHop());
          sink += timing.getTotalUs();
        }
      });
    case FrameKind::hello:
      return read_body<protocol::Hello>(frame, limits, [](protocol::Hello::Reader hello) {
        sink += hello.getProtocolMajor() + hello.getLimits().getMaxBodyBytes() +
                hello.getCapabilities().getZstdAttachments();
        read_text(hello.getPeerName());
      });
    case FrameKind::error:
      return read_body<protocol::Error>(frame, limits, [](protocol::Error::Reader error) {
        read_text(error.getMessage());
        sink += error.getRetryAfterMs();
      });
    case FrameKind::load_report:
      return read_body<protocol::LoadReport>(frame, limits, [](protocol::LoadReport::Reader report) {
        read_text(report.getWorkerName());
        for (auto hash : report.getPrefixesAdded()) sink += hash;
        for (auto hash : report.getPrefixesEvicted()) sink += hash;
      });
    case FrameKind::kv_offer:
      return read_body<protocol::KvOffer>(frame, limits, [](protocol::KvOffer::Reader offer) {
        read_text(offer.getRequestId());
        sink += offer.getTotalBytes();
        for (auto hash : offer.getPrefixHashes()) sink += hash;
      });
    case FrameKind::kv_chunk:
      return read_body<protocol::KvChunk>(frame, limits, [](protocol::KvChunk::Reader chunk) {
        sink += chunk.getOffset() + chunk.getGeneration();
      });
    default:
      return Done{};
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // The decoder's precondition: the buffer starts 8-byte aligned.
  static std::vector<std::uint64_t> storage;
  storage.assign((size + 7) / 8, 0);
  if (size > 0) std::memcpy(storage.data(), data, size);
  std::span<const std::byte> rest(reinterpret_cast<const std::byte*>(storage.data()), size);

  // Small limits so the fuzzer spends its time on structure, not size.
  const FrameLimits limits{.max_body_bytes = 64 * 1024, .max_attachment_bytes = 1 << 20};
  static AttachmentCodec attachments;
  const FrameDecoder decoder(limits);

  // Both checks: the full walk of the first frame, then the receive path.
  (void)decoder.decode_whole(rest, BodyCheck::full);
  while (!rest.empty()) {
    auto progress = decoder.next(rest);
    if (!progress) {
      sink += to_string(progress.error().code).size() + progress.error().message.size();
      break;
    }
    if (!progress->frame) break;
    const FrameView& frame = *progress->frame;
    (void)read_by_kind(frame, limits);
    if (frame.has_attachment()) {
      std::vector<std::byte> decoded(frame.descriptor.decoded_bytes);
      Status status = attachments.decode(frame.attachment, frame.header.encoding, frame.descriptor, decoded);
      sink += status.has_value();
    }
    rest = rest.subspan(frame.wire_bytes);
  }
  return 0;
}
