# fmwire native protocol: the Cap'n Proto body of every frame.
#
# A frame is a fixed 24-byte header (codec/frame_header.h), one of the structs
# below as its body, and optionally a raw attachment. The header's kind byte
# says which struct the body is (codec/frame_kind.h keeps the mapping), so no
# body carries a type tag of its own and a relay can route by header alone.
#
# Evolution follows Cap'n Proto's rules: a minor version may add fields at the
# end of a struct and enumerants at the end of an enum; old readers ignore
# them. Anything else is a new major version, refused in the Hello exchange.

@0x943b03fd7bc4fb4c;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("fmwire::protocol");

const protocolMajor :UInt16 = 1;
const protocolMinor :UInt16 = 3;   # 1: Hello/HelloAck tokenizerFingerprint
                                   # 2: disaggregation, worker roles, typed KV refusals
                                   # 3: shared-secret authentication (authNonce,
                                   #    authProof, HelloProof); Capabilities.compactTokens
                                   #    (the CompactTokens frame)

# ---------------------------------------------------------------- connection

enum Role {
  client @0;
  router @1;
  gateway @2;
  worker @3;
}

# Features a peer can use; the agreed set is the intersection of both sides'.
struct Capabilities {
  zstdAttachments @0 :Bool;   # may receive zstd-compressed attachments
  byteShuffle @1 :Bool;       # may receive byte-shuffled attachments
  kvTransfer @2 :Bool;        # serves the KV transfer session
  loadReports @3 :Bool;       # sends LoadReport frames when subscribed
  # Minor version 3: may receive CompactTokens frames (frame kind 22), the
  # fixed little-endian form of Tokens for small frames (codec/token_frame.h).
  # An older peer leaves it false and gets Tokens only.
  compactTokens @4 :Bool;
}

# What a receiver enforces on read; a peer that exceeds them is disconnected.
struct Limits {
  maxBodyBytes @0 :UInt32;
  maxAttachmentBytes @1 :UInt64;
  maxStreams @2 :UInt32;
  initialStreamCreditBytes @3 :UInt32;
  initialConnectionCreditBytes @4 :UInt64;
}

# First frame on a connection, from the side that connected.
struct Hello {
  protocolMajor @0 :UInt16;
  protocolMinor @1 :UInt16;
  role @2 :Role;
  peerName @3 :Text;
  capabilities @4 :Capabilities;
  limits @5 :Limits;
  # Minor version 1: the fingerprint of the tokenizer whose token ids this
  # side reads (a worker's), so that a peer that sends prompts as token ids
  # (a router) can check it tokenizes with the same one; 0: none said.
  # In the handshake rather than in LoadReport: it is known the moment the
  # connection is ready, before any request could be routed there, and it
  # cannot change while the connection lasts.
  tokenizerFingerprint @6 :UInt64;
  # Minor version 3: the client's challenge when it holds a shared secret
  # (--auth-token-file): 32 random bytes; empty when it holds none. A server
  # with a secret refuses a Hello without one, and one without a secret
  # refuses a Hello with one (transport/auth_token.h).
  authNonce @7 :Data;
}

# The answer to Hello: the version both speak and what this side offers.
struct HelloAck {
  protocolMajor @0 :UInt16;
  protocolMinor @1 :UInt16;    # min of both sides' minor versions
  role @2 :Role;
  peerName @3 :Text;
  capabilities @4 :Capabilities;
  limits @5 :Limits;
  tokenizerFingerprint @6 :UInt64;  # minor version 1: as in Hello
  # Minor version 3, when Hello carried an authNonce: the server's own 32
  # random bytes, and HMAC-SHA256(secret, "fmwire auth v1 server" 0 ||
  # client nonce || server nonce): proof that it holds the secret, bound to
  # both nonces so that no recorded answer fits another connection.
  authNonce @7 :Data;
  authProof @8 :Data;
}

# Minor version 3: the third step of the authenticated Hello exchange, from
# the client once it has checked the server's proof: HMAC-SHA256(secret,
# "fmwire auth v1 client" 0 || client nonce || server nonce). The server
# takes no other frame before it. A third message because the client's proof
# must cover the server's fresh nonce, or a recorded Hello could be replayed.
struct HelloProof {
  authProof @0 :Data;
}

# Keepalive; Pong echoes the sequence so a round trip can be timed.
struct Ping {
  sequence @0 :UInt64;
  sentMonotonicNs @1 :UInt64;  # the sender's clock, only meaningful to it
}

struct Pong {
  sequence @0 :UInt64;
  sentMonotonicNs @1 :UInt64;  # copied from the Ping
}

# The sender is draining: it will take no stream with an id above
# lastStreamId; streams up to it finish, then the connection closes.
struct GoAway {
  lastStreamId @0 :UInt32;
  reason @1 :Text;
}

# Grants more bytes to the stream in the frame header; stream 0 is the
# connection as a whole.
struct Credit {
  bytes @0 :UInt64;
}

enum ErrorCode {
  internal @0;
  badFrame @1;                 # malformed or over a limit; connection closes
  unsupportedVersion @2;
  limitExceeded @3;
  badRequest @4;               # a parameter out of range; message says which
  unauthorized @5;
  notFound @6;
  overloaded @7;               # retryable; see retryAfterMs
  noWorker @8;
  deadlineUnreachable @9;      # refused early: no worker can meet it
  workerLost @10;              # the worker serving the stream went away
  cancelled @11;
  digestMismatch @12;
  transferAborted @13;
}

# Ends the stream in the frame header (stream 0: the whole connection).
struct Error {
  code @0 :ErrorCode;
  message @1 :Text;
  retryable @2 :Bool;
  retryAfterMs @3 :UInt32;     # 0: no hint
}

# ---------------------------------------------------------------- generation

struct Sampling {
  maxTokens @0 :UInt32;
  temperature @1 :Float32;     # 0 = greedy
  topP @2 :Float32 = 1.0;
  seed :union {
    random @3 :Void;
    fixed @4 :UInt64;
  }
  stopSequences @5 :List(Text);
}

struct StreamOptions {
  includeUsage @0 :Bool = true;   # Finish carries Usage
  includeText @1 :Bool = true;    # Tokens carry text pieces
  includeTimings @2 :Bool = true; # Finish carries per-hop timings
}

# Opens a generation stream: the stream id is the frame header's.
struct GenerateRequest {
  requestId @0 :Text;          # the client's id, kept in logs and timings
  model @1 :Text;              # empty: the endpoint's default model
  prompt :union {
    text @2 :Text;
    tokenIds @3 :List(UInt32);
  }
  sampling @4 :Sampling;
  timeoutUs @5 :UInt64;        # budget left from receipt; 0 = none
  priority @6 :Int8;           # higher first
  streamOptions @7 :StreamOptions;
  # Minor version 2: disaggregated prefill/decode, set by a router only.
  disaggregation @8 :Disaggregation;
}

# A request split between a prefill worker and a decode worker (DESIGN.md,
# "Flows"): both get the same request with the same transferKey; the
# prefill worker computes the prompt's KV and first token, sends that token
# on its stream and pushes the KV to the decode worker, which continues the
# stream from the next token.
struct Disaggregation {
  transferKey @0 :Text;          # the router's name for this transfer; unique while it lasts
  union {
    none @1 :Void;               # served whole here (the default)
    prefillTo @2 :Text;          # prefill here, push the KV to the decode worker at HOST:PORT
    decode @3 :Void;             # wait for the KV offered under transferKey, then decode
  }
}

# One or more generated tokens, in order.
struct Tokens {
  firstIndex @0 :UInt32;       # index of tokenIds[0] in the completion
  tokenIds @1 :List(UInt32);
  textPieces @2 :List(Text);   # one per token; "" while a UTF-8 char is open
  logprobs @3 :List(Float32);  # empty unless asked for
}

enum FinishReason {
  endOfSequence @0;
  maxTokens @1;
  stopSequence @2;
  cancelled @3;
  deadlineExceeded @4;
  error @5;
  handedOff @6;                # minor version 2: a prefill worker's stream ends here, the decode worker's goes on
}

struct Usage {
  promptTokens @0 :UInt32;
  completionTokens @1 :UInt32;
  cachedPromptTokens @2 :UInt32;  # prompt tokens served from the prefix cache
}

# Where time went at one hop, appended by each hop on the way back.
struct HopTiming {
  hop @0 :Text;                # "worker w1", "router", "gateway"
  role @1 :Role;
  queueUs @2 :UInt64;
  prefillUs @3 :UInt64;
  decodeUs @4 :UInt64;
  firstTokenUs @5 :UInt64;     # from receipt to the first token leaving
  totalUs @6 :UInt64;          # from receipt to Finish leaving
  kvTransferUs @7 :UInt64;     # minor version 2: Offer to Committed, at the side that sent the KV
}

# Last frame of a generation stream.
struct Finish {
  reason @0 :FinishReason;
  usage @1 :Usage;
  timings @2 :List(HopTiming);
  # Text released only at the end, with no token of its own (an unfinished
  # UTF-8 character as U+FFFD, text held back as a possible stop sequence).
  trailingText @3 :Text;
  kvTransfer @4 :KvTransferSummary;  # minor version 2: where the KV came by transfer
}

# How a sequence's KV reached the worker that finished it.
struct KvTransferSummary {
  bytes @0 :UInt64;             # decoded bytes of the shard
  wireBytes @1 :UInt64;         # attachment bytes sent (after compression)
  compression @2 :Compression;  # the mode the sender chose
  transferUs @3 :UInt64;        # Offer to Committed, at the receiver
}

enum CancelReason {
  client @0;                   # the client asked or went away
  deadline @1;
  shutdown @2;
}

struct Cancel {
  reason @0 :CancelReason;
}

# A worker's state, sent to subscribed peers (routers).
struct LoadReport {
  workerName @0 :Text;
  queueDepth @1 :UInt32;
  runningSequences @2 :UInt32;
  freeKvBlocks @3 :UInt32;
  totalKvBlocks @4 :UInt32;
  recentStepTimeUs @5 :UInt32;
  draining @6 :Bool;
  prefixesAdded @7 :List(UInt64);   # hashes of full KV blocks now cached
  prefixesEvicted @8 :List(UInt64);
  # Counters since the worker started.
  pausedSequences @9 :UInt32;       # waiting for their readers' credit
  promptTokens @10 :UInt64;         # admitted prompt tokens
  cachedPromptTokens @11 :UInt64;   # of those, served from the prefix cache
  generatedTokens @12 :UInt64;
  cachedKvBlocks @13 :UInt32;       # full blocks in the prefix cache
  workerRole @14 :WorkerRole;       # minor version 2
  kvTransfersActive @15 :UInt32;    # sessions open now, either direction
  kvReservedBlocks @16 :UInt32;     # blocks held for incoming transfers
  maxRunning @17 :UInt32;           # batch slots: sequences admitted at once, at most; 0: not said
}

# What a worker serves in disaggregated serving (`fmwire worker --role`).
enum WorkerRole {
  both @0;
  prefill @1;
  decode @2;
}

# ---------------------------------------------------------------- KV transfer
#
#   Offer -> Accept | Reject
#   Accept -> Chunk* -> Commit -> Committed
#   any state -> Abort (either side, with a reason) -> both sides release

enum DType {
  float16 @0;
  bfloat16 @1;
  float32 @2;
  float8e4m3 @3;
}

enum KvLayout {
  blockLayerKvHeadTokenDim @0;  # per block: [layer][k|v][head][token][dim]
}

enum Compression {
  none @0;
  zstd @1;                      # after a byte shuffle by element size
}

# Describes a shard the sender wants to push.
struct KvOffer {
  requestId @0 :Text;
  modelFingerprint @1 :UInt64;  # both sides must run the same weights
  layerBegin @2 :UInt32;
  layerEnd @3 :UInt32;          # exclusive
  tokenBegin @4 :UInt32;
  tokenEnd @5 :UInt32;          # exclusive
  blockTokens @6 :UInt32;
  dtype @7 :DType;
  layout @8 :KvLayout;
  totalBytes @9 :UInt64;        # decoded bytes of the whole shard
  compression @10 :Compression; # the sender's plan; chunks say what they are
  timeoutUs @11 :UInt64;        # the whole transfer's budget; 0 = none
  prefixHashes @12 :List(UInt64); # one per full block, for the receiver's cache
  # Minor version 2.
  layers @13 :UInt32;           # the model's, so a layer range is checked against it
  kvHeads @14 :UInt32;
  headDim @15 :UInt32;
  chunkBytes @16 :UInt32;       # the sender's plan: decoded bytes per chunk (whole blocks), the last may be shorter
  # The ids of the offered tokens past the receiver's prompt: a migrated
  # sequence's generated tokens whose KV is computed (tokenEnd minus the
  # prompt's length of them); empty when the shard ends within the prompt.
  extraTokens @17 :List(UInt32);
}

# From a router to the worker serving a generation stream (which is
# draining): stop the sequence where it is, push its KV to the worker at
# decodeTo under transferKey, and end the stream with Finish(handedOff) once
# that worker committed it; or with an Error if the transfer fails (the
# router then re-issues the request). Minor version 2.
struct KvHandoff {
  transferKey @0 :Text;
  decodeTo @1 :Text;            # HOST:PORT
}

# The receiver reserved blocks: chunks name this id and generation, so a
# reused slot can never take another transfer's bytes.
struct KvAccept {
  transferId @0 :UInt32;
  generation @1 :UInt32;
  maxChunkBytes @2 :UInt32;
  creditBytes @3 :UInt64;
}

struct KvReject {
  code @0 :ErrorCode;
  message @1 :Text;
  retryable @2 :Bool;
  reason @3 :KvEnd;             # minor version 2
}

# Why a KV transfer session ended without Committed (KvReject, KvAbort).
enum KvEnd {
  internal @0;
  noCapacity @1;                # no free blocks for the shard; retryable elsewhere
  layoutMismatch @2;            # layers, heads, head dim, dtype or layout differ
  modelMismatch @3;             # another model fingerprint
  shuttingDown @4;
  integrity @5;                 # a chunk's digest did not match its bytes
  deadline @6;                  # a state's deadline passed
  cancelled @7;                 # the request was cancelled
  peerLost @8;                  # the connection went away
  badMessage @9;                # a message out of order or out of range
  unknownRequest @10;           # no request is waiting under this transferKey
}

# Carries bytes [offset, offset + decoded size) of the shard as the frame's
# attachment; the digest is in the attachment descriptor.
struct KvChunk {
  transferId @0 :UInt32;
  generation @1 :UInt32;
  offset @2 :UInt64;
}

struct KvCommit {
  transferId @0 :UInt32;
  generation @1 :UInt32;
  totalBytes @2 :UInt64;
  chunkCount @3 :UInt32;
  # Minor version 2: tokens the sender generated after the offered ones
  # (a prefill worker's first token): the receiver's sequence goes on
  # after them. Known only once the KV is computed, so here, not in Offer.
  generatedTokens @4 :List(UInt32);
}

struct KvCommitted {
  transferId @0 :UInt32;
  generation @1 :UInt32;
  blocksStored @2 :UInt32;
}

struct KvAbort {
  transferId @0 :UInt32;
  generation @1 :UInt32;
  code @2 :ErrorCode;
  message @3 :Text;
  reason @4 :KvEnd;             # minor version 2
}
