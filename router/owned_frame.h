// A copy of a received frame that outlives its receive buffer: what the
// router keeps for a client that has no credit left, until it has, and a
// client's GenerateRequest, to issue it again at another worker after a
// migration. The bytes are copied once, as they were on the wire, and read
// in place again.
#pragma once

#include <cstring>

#include "codec/byte_buffer.h"
#include "codec/frame_decoder.h"

namespace fmwire::router {

class OwnedFrame {
 public:
  explicit OwnedFrame(const codec::FrameView& frame) : header_(frame.header), descriptor_(frame.descriptor) {
    const std::size_t body_bytes = frame.body.size_bytes();
    bytes_.resize(body_bytes + frame.attachment.size());
    std::memcpy(bytes_.data(), frame.body.data(), body_bytes);
    if (!frame.attachment.empty()) std::memcpy(bytes_.data() + body_bytes, frame.attachment.data(), frame.attachment.size());
    wire_bytes_ = frame.wire_bytes;
  }

  codec::FrameView view() const {
    codec::FrameView frame;
    frame.header = header_;
    const std::size_t body_bytes = std::size_t{header_.body_words} * 8;
    frame.body = {reinterpret_cast<const capnp::word*>(bytes_.data()), header_.body_words};
    frame.descriptor = descriptor_;
    frame.attachment = {bytes_.data() + body_bytes, bytes_.size() - body_bytes};
    frame.wire_bytes = wire_bytes_;
    return frame;
  }
  std::uint64_t wire_bytes() const { return wire_bytes_; }

 private:
  codec::FrameHeader header_;
  codec::AttachmentDescriptor descriptor_;
  codec::ByteBuffer bytes_;  // body (word-aligned: ByteBuffer holds words), then the attachment
  std::uint64_t wire_bytes_ = 0;
};

}  // namespace fmwire::router
