// The header's kind byte: which protocol/fmwire.capnp struct a frame's body
// is. A relay routes on it without reading the body.
#pragma once

#include <cstdint>
#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::codec {

// Values are wire format: append, never renumber.
enum class FrameKind : std::uint8_t {
  hello = 1,
  hello_ack = 2,
  ping = 3,
  pong = 4,
  credit = 5,
  error = 6,
  generate_request = 7,
  tokens = 8,
  finish = 9,
  cancel = 10,
  load_report = 11,
  kv_offer = 12,
  kv_accept = 13,
  kv_reject = 14,
  kv_chunk = 15,
  kv_commit = 16,
  kv_committed = 17,
  kv_abort = 18,
  go_away = 19,
  kv_handoff = 20,
  hello_proof = 21,
  // Tokens in a fixed little-endian body instead of Cap'n Proto
  // (codec/token_frame.h), sent only to a peer that offered compactTokens.
  compact_tokens = 22,
};

inline constexpr std::uint8_t kLastFrameKind = 22;

// True for the kinds this version knows; a receiver answers others with an
// Error frame rather than guessing at their body.
constexpr bool is_known_kind(std::uint8_t kind) { return kind >= 1 && kind <= kLastFrameKind; }

std::string_view to_string(FrameKind kind);

// Either form of a token frame: what credit counts and readers of tokens take
// (through codec::read_tokens, never one form alone).
constexpr bool is_token_frame(FrameKind kind) { return kind == FrameKind::tokens || kind == FrameKind::compact_tokens; }

// BodyOf<FrameKind::tokens> is protocol::Tokens, and KindOf<protocol::Tokens>
// is FrameKind::tokens: the one place the mapping is written.
template <typename Body> struct KindOfBody;
#define FMWIRE_FRAME_KIND(Body, kind_value)                                   \
  template <> struct KindOfBody<protocol::Body> {                             \
    static constexpr FrameKind value = FrameKind::kind_value;                 \
  };
FMWIRE_FRAME_KIND(Hello, hello)
FMWIRE_FRAME_KIND(HelloAck, hello_ack)
FMWIRE_FRAME_KIND(Ping, ping)
FMWIRE_FRAME_KIND(Pong, pong)
FMWIRE_FRAME_KIND(Credit, credit)
FMWIRE_FRAME_KIND(Error, error)
FMWIRE_FRAME_KIND(GenerateRequest, generate_request)
FMWIRE_FRAME_KIND(Tokens, tokens)
FMWIRE_FRAME_KIND(Finish, finish)
FMWIRE_FRAME_KIND(Cancel, cancel)
FMWIRE_FRAME_KIND(LoadReport, load_report)
FMWIRE_FRAME_KIND(KvOffer, kv_offer)
FMWIRE_FRAME_KIND(KvAccept, kv_accept)
FMWIRE_FRAME_KIND(KvReject, kv_reject)
FMWIRE_FRAME_KIND(KvChunk, kv_chunk)
FMWIRE_FRAME_KIND(KvCommit, kv_commit)
FMWIRE_FRAME_KIND(KvCommitted, kv_committed)
FMWIRE_FRAME_KIND(KvAbort, kv_abort)
FMWIRE_FRAME_KIND(GoAway, go_away)
FMWIRE_FRAME_KIND(KvHandoff, kv_handoff)
FMWIRE_FRAME_KIND(HelloProof, hello_proof)
#undef FMWIRE_FRAME_KIND

template <typename Body>
inline constexpr FrameKind kKindOf = KindOfBody<Body>::value;

}  // namespace fmwire::codec
