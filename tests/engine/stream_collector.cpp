#include "tests/engine/stream_collector.h"

#include <doctest/doctest.h>

#include "codec/frame_decoder.h"
#include "codec/token_frame.h"
#include "protocol/finish.h"

namespace fmwire::engine::test {

void Collector::on_stream_frame(transport::Connection&, const codec::FrameView& frame) {
  StreamLog& log = streams[frame.header.stream_id];
  codec::Status read = codec::Done{};
  if (codec::is_token_frame(frame.kind())) {
    log.token_kinds.push_back(frame.kind());
    log.data_bytes += frame.wire_bytes;
    read = codec::read_tokens(frame, codec::FrameLimits{}, [&](const codec::TokensView& tokens) {
      for (std::uint32_t i = 0; i < tokens.size(); ++i) {
        log.indexes.push_back(tokens.first_index() + i);
        log.token_ids.push_back(tokens.id(i));
        if (i < tokens.piece_count()) log.text += tokens.piece(i);
      }
    });
  } else if (frame.kind() == codec::FrameKind::finish) {
    read = codec::read_body<protocol::Finish>(frame, codec::FrameLimits{}, [&](const protocol::FinishReader& finish) {
      log.finish = finish.reason();
      log.prompt_tokens = finish.prompt_tokens();
      log.completion_tokens = finish.completion_tokens();
      log.cached_prompt_tokens = finish.cached_prompt_tokens();
      log.text += finish.trailing_text();
      if (finish.has_kv_transfer()) {
        log.kv_bytes = finish.kv_transfer().getBytes();
        log.kv_wire_bytes = finish.kv_transfer().getWireBytes();
        log.kv_compressed = finish.kv_transfer().getCompression() == protocol::Compression::ZSTD;
      }
      const auto timings = finish.timings();
      if (timings.size() > 0) log.first_token_us = protocol::HopTimingReader(timings[0]).first_token_us();
      for (const protocol::HopTimingReader hop : timings) log.hops.emplace_back(hop.hop());
    });
  } else if (frame.kind() == codec::FrameKind::load_report) {
    read = codec::read_body<protocol::LoadReport>(frame, codec::FrameLimits{}, [&](const protocol::LoadReportReader& body) {
      Report report;
      report.stream_id = frame.header.stream_id;
      report.load = body.load();
      for (std::uint64_t hash : body.prefixes_added()) report.added.push_back(hash);
      for (std::uint64_t hash : body.prefixes_evicted()) report.evicted.push_back(hash);
      reports.push_back(std::move(report));
    });
  }
  CHECK(read.has_value());
}

}  // namespace fmwire::engine::test
