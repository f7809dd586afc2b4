// libFuzzer target: a decode worker's KV transfer session table
// (worker/kv_transfers.h, the receiver side) driven by a peer that sends
// whatever the input says: Offers (of the right shape, or any), chunks at
// any offset with any transfer id, good or corrupt digests, Commits with
// any totals, Aborts, stream resets, decode requests expected and
// cancelled, in any order, on a few streams at once. The worker side is the
// real one: KvTransfers on an event loop, an EngineRunner over the built-in
// CPU engine, and a Connection pair on a TCP connection to itself on
// 127.0.0.1 within this process; the peer is the test's own Connection,
// as a prefill worker's.
//
// Besides no crash and no sanitizer report: once the peer's connection is
// gone and every decode request is cancelled, no session is left open and
// the engine has every block back: nothing reserved, nothing importing.
// Run by scripts/fuzz.sh.
#include <arpa/inet.h>
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "codec/attachment_codec.h"
#include "engine/batching_engine.h"
#include "engine/cpu_backend.h"
#include "engine/llama_weights.h"
#include "protocol/kv_abort.h"
#include "protocol/kv_accept.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_offer.h"
#include "tests/transport/loopback.h"
#include "transport/connection.h"
#include "transport/event_loop.h"
#include "worker/engine_runner.h"
#include "worker/kv_transfers.h"
#include "worker/worker_service.h"

namespace {

using namespace fmwire;
using namespace std::chrono_literals;
using transport::Connection;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "kv_session_fuzz: %s\n", what);
  std::abort();
}

// The built-in model's engine (as `fmwire worker --model builtin` runs it)
// with few blocks, so that offers also meet a full cache.
std::unique_ptr<engine::BatchingEngine> builtin_engine() {
  auto weights = std::make_shared<const engine::LlamaWeights>(
      engine::make_seeded_weights(engine::builtin_llama_config(), 1));
  engine::EngineInfo info;
  info.model_name = "builtin";
  info.model_fingerprint = weights->fingerprint();
  return std::make_unique<engine::BatchingEngine>(std::move(info),
                                                  std::make_unique<engine::CpuBackend>(weights, 16, 16));
}

// A prompt of `count` tokens: BOS, then letters.
std::vector<std::uint32_t> prompt_of(std::size_t count) {
  std::vector<std::uint32_t> prompt{1};
  while (prompt.size() < count) prompt.push_back(3 + 'a' + static_cast<std::uint32_t>(prompt.size() % 26));
  return prompt;
}

// The engine and its runner live across inputs (building the model is the
// slow part); each input gets a fresh KvTransfers and connection pair, and
// sequence ids never repeat. The runner's outputs go to whichever
// KvTransfers is current, on the loop thread, as WorkerService does.
struct World {
  World()
      : engine(builtin_engine()),
        info(engine->info()),
        runner(*engine, [this](std::shared_ptr<worker::RunnerOutput> output) {
          loop.post([this, output] { on_output(*output); });
        }) {}

  void on_output(const worker::RunnerOutput& output) {
    stats = output.stats;
    for (const auto& result : output.kv_imports) {
      if (result.id > kMarkerBase) {
        marker_answered = result.id - kMarkerBase;
      } else if (kv != nullptr) {
        kv->on_import(result);
      }
    }
  }

  // Asks the runner for an answer after every command issued so far.
  std::uint64_t send_marker() {
    runner.commit_import(kMarkerBase + ++markers_sent);  // an unknown sequence: answered with an error
    return markers_sent;
  }

  // Every runner command issued before this one has been answered (and
  // the answers handed to the KvTransfers) once it comes back: the runner
  // applies commands in order and the loop runs posts in order.
  bool drain_runner() {
    const std::uint64_t marker = send_marker();
    return transport::test::run_until(loop, [&] { return marker_answered >= marker; }, 5000ms);
  }

  static constexpr engine::SequenceId kMarkerBase = 1ull << 62;
  transport::EventLoop loop{"asio"};
  std::unique_ptr<engine::BatchingEngine> engine;
  engine::EngineInfo info;
  worker::EngineRunner runner;
  worker::KvTransfers* kv = nullptr;
  engine::EngineStats stats;
  std::uint64_t markers_sent = 0;
  std::uint64_t marker_answered = 0;
  engine::SequenceId next_sequence = 1;
};

World& world() {
  static World* made = new World();  // never destroyed: the runner's thread outlives every input
  return *made;
}

// The owner: what a WorkerService does with a finished session, minus the
// client stream: the sequence goes (cancelled in the engine, committed or not).
struct Owner final : worker::KvTransfersOwner {
  explicit Owner(worker::EngineRunner& runner) : runner(runner) {}
  void on_kv_sent(engine::SequenceId, const worker::KvTransferResult&) override { fail("on_kv_sent on a receiver"); }
  void on_kv_received(engine::SequenceId sequence, const worker::KvTransferResult&) override {
    if (!reported.insert(sequence).second) fail("a session reported twice");
    runner.cancel(sequence);
  }
  worker::EngineRunner& runner;
  std::set<engine::SequenceId> reported;
};

// The worker's server connection handler, as WorkerService passes KV frames on.
struct ServerSide final : transport::ConnectionHandler {
  explicit ServerSide(worker::KvTransfers& kv) : kv(kv) {}
  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override {
    if (!kv.on_server_frame(connection, frame)) connection.reset_stream(frame.header.stream_id, protocol::ErrorCode::BAD_REQUEST, "not KV");
  }
  void on_stream_closed(Connection& connection, std::uint32_t stream_id, const transport::EndReason& reason) override {
    kv.on_server_stream_closed(connection, stream_id, reason);
  }
  void on_closed(Connection& connection, const transport::EndReason&) override {
    kv.on_server_closed(connection);
    closed = true;
  }
  worker::KvTransfers& kv;
  bool closed = false;
};

// The prefill worker's side: what it learns from the answers.
struct PeerSide final : transport::ConnectionHandler {
  void on_ready(Connection&) override { ready = true; }
  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.kind() != codec::FrameKind::kv_accept) return;
    (void)codec::read_body<protocol::KvAccept>(frame, codec::FrameLimits{}, [&](const protocol::KvAcceptReader& accept) {
      accepted[frame.header.stream_id] = accept.transfer();
    });
  }
  void on_closed(Connection&, const transport::EndReason&) override { closed = true; }
  bool ready = false;
  bool closed = false;
  std::map<std::uint32_t, protocol::KvTransferRef> accepted;
};

// Two ends of a TCP connection on 127.0.0.1, non-blocking (the transport
// sets TCP options, which a socketpair refuses).
void tcp_pair(int& connecting, int& accepted) {
  static const int listener = [] {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 || ::listen(fd, 4) != 0) {
      fail("cannot listen on 127.0.0.1");
    }
    return fd;
  }();
  sockaddr_in address{};
  socklen_t length = sizeof address;
  if (::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) != 0) fail("getsockname");
  connecting = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connecting < 0 || ::connect(connecting, reinterpret_cast<sockaddr*>(&address), length) != 0) fail("connect");
  accepted = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (accepted < 0) fail("accept");
  const int flags = ::fcntl(connecting, F_GETFL);
  ::fcntl(connecting, F_SETFL, flags | O_NONBLOCK);
}

std::size_t readable_bytes(int fd) {
  int bytes = 0;
  return ::ioctl(fd, FIONREAD, &bytes) == 0 ? static_cast<std::size_t>(bytes) : 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  World& w = world();
  FuzzedDataProvider input(data, size);
  worker::KvTransferOptions options;
  options.state_timeout = 60s;  // deadlines never fire within an input: its order alone decides
  options.match_timeout = 60s;
  options.receive_window_bytes = input.ConsumeIntegralInRange<std::uint32_t>(1, 1u << 20);
  Owner owner(w.runner);
  auto kv = std::make_unique<worker::KvTransfers>(w.loop, w.runner, w.info, options, owner, "fuzz");
  w.kv = kv.get();

  int peer_fd = -1;
  int server_fd = -1;
  tcp_pair(peer_fd, server_fd);
  ServerSide server_side(*kv);
  PeerSide peer_side;
  transport::ConnectionOptions peer_options;
  peer_options.role = protocol::Role::WORKER;
  peer_options.capabilities.kv_transfer = true;
  peer_options.require_kv_transfer = true;
  auto server = std::make_unique<Connection>(w.loop, server_fd, false, worker::WorkerService::server_options("decode"),
                                             server_side);
  auto peer = std::make_unique<Connection>(w.loop, peer_fd, true, peer_options, peer_side);
  if (!transport::test::run_until(w.loop, [&] { return peer_side.ready || peer_side.closed; }, 5000ms)) {
    fail("no Hello exchange");
  }

  const engine::KvGeometry& geometry = w.info.kv;
  const std::uint64_t block_bytes = geometry.bytes_per_block();
  codec::AttachmentCodec codec;
  std::vector<std::uint32_t> streams;  // opened by the peer
  std::vector<engine::SequenceId> sequences;
  const std::string keys[] = {"a", "b", "c"};

  // Lets everything sent so far arrive, be answered by the engine, and
  // the answers reach the peer: both ends read dry twice in a row around
  // a round trip through the runner.
  const auto quiet = [&] {
    int checks = 0;
    (void)transport::test::run_until(w.loop, [&] {
      checks = readable_bytes(peer_fd) == 0 && readable_bytes(server_fd) == 0 ? checks + 1 : 0;
      return checks >= 2;
    }, 1000ms);
  };
  const auto settle = [&] {
    quiet();
    if (!w.drain_runner()) fail("the engine runner did not answer");
    quiet();
  };
  const auto pick_stream = [&]() -> std::uint32_t {
    if (streams.empty() || input.ConsumeIntegralInRange(0, 7) == 0) {
      const std::uint32_t opened = peer->open_stream();
      if (opened != 0) streams.push_back(opened);
      return opened;
    }
    return streams[input.ConsumeIntegralInRange<std::size_t>(0, streams.size() - 1)];
  };
  const auto transfer_on = [&](std::uint32_t stream) {
    auto found = peer_side.accepted.find(stream);
    protocol::KvTransferRef ref = found == peer_side.accepted.end() ? protocol::KvTransferRef{} : found->second;
    if (input.ConsumeIntegralInRange(0, 15) == 0) ref.generation += input.ConsumeIntegralInRange<std::uint32_t>(1, 3);
    return ref;
  };
  const auto sent = [](transport::SendStatus) {};  // blocked, reset, closed: the peer's lot, not the worker's

  for (int steps = 0; steps < 48 && input.remaining_bytes() > 0 && !peer_side.closed && !server_side.closed; ++steps) {
    switch (input.ConsumeIntegralInRange(0, 8)) {
      case 0: {  // the router's decode request for a key
        engine::SequenceRequest request;
        request.prompt = prompt_of(input.ConsumeIntegralInRange<std::size_t>(1, 80));
        request.max_tokens = input.ConsumeIntegralInRange<std::uint32_t>(1, 8);
        const engine::SequenceId sequence = w.next_sequence++;
        sequences.push_back(sequence);
        kv->expect(sequence, keys[input.ConsumeIntegralInRange(0, 2)], std::move(request));
        break;
      }
      case 1: {  // an Offer: the shape a prefill worker sends, or bent
        const std::uint32_t stream = pick_stream();
        if (stream == 0) break;
        const std::uint32_t tokens = input.ConsumeIntegralInRange<std::uint32_t>(0, 90);
        const std::uint32_t blocks = (tokens + geometry.block_tokens - 1) / geometry.block_tokens;
        const bool bent = input.ConsumeIntegralInRange(0, 7) == 0;
        const std::uint32_t extra_count = input.ConsumeIntegralInRange(0, 5) == 0 ? input.ConsumeIntegralInRange(1, 3) : 0;
        const std::vector<std::uint32_t> extra(extra_count, 5);
        const std::string& key = keys[input.ConsumeIntegralInRange(0, 2)];
        const std::uint32_t chunk_blocks = input.ConsumeIntegralInRange<std::uint32_t>(1, 4);
        const std::uint64_t total = bent ? input.ConsumeIntegral<std::uint32_t>() : blocks * block_bytes;
        sent(peer->send<protocol::KvOffer>(stream, [&](protocol::KvOfferBuilder offer) {
          offer.request_id(key)
              .model_fingerprint(bent && input.ConsumeBool() ? 1 : w.info.model_fingerprint)
              .layers(0, geometry.layers)
              .geometry(geometry.layers, geometry.kv_heads, geometry.head_dim)
              .tokens(0, tokens)
              .block_tokens(bent ? input.ConsumeIntegralInRange<std::uint32_t>(0, 64) : geometry.block_tokens)
              .dtype(geometry.dtype)
              .layout(protocol::KvLayout::BLOCK_LAYER_KV_HEAD_TOKEN_DIM)
              .total_bytes(total)
              .chunk_bytes(static_cast<std::uint32_t>(chunk_blocks * block_bytes))
              .compression(protocol::Compression::NONE)
              .extra_tokens(extra);
        }));
        break;
      }
      case 2:
      case 3: {  // a chunk of whole blocks (or not), its digest good or not
        if (streams.empty()) break;
        const std::uint32_t stream = pick_stream();
        if (stream == 0) break;
        const protocol::KvTransferRef ref = transfer_on(stream);
        const std::uint32_t first = input.ConsumeIntegralInRange<std::uint32_t>(0, 6);
        const std::uint32_t count = input.ConsumeIntegralInRange<std::uint32_t>(1, 3);
        std::uint64_t bytes = count * block_bytes;
        if (input.ConsumeIntegralInRange(0, 15) == 0) bytes = input.ConsumeIntegralInRange<std::uint64_t>(1, 4 * block_bytes);
        std::vector<std::byte> payload(bytes, std::byte{static_cast<unsigned char>(first)});
        codec::PreparedAttachment prepared = codec.prepare(payload, {.compress = input.ConsumeBool()});
        std::vector<std::byte> wire(prepared.wire.begin(), prepared.wire.end());
        if (input.ConsumeIntegralInRange(0, 15) == 0 && !wire.empty()) {
          wire[input.ConsumeIntegralInRange<std::size_t>(0, wire.size() - 1)] ^= std::byte{0x5a};
        }
        prepared.wire = wire;
        sent(peer->send<protocol::KvChunk>(stream, [&](protocol::KvChunkBuilder chunk) {
          chunk.transfer(ref).offset(std::uint64_t{first} * block_bytes);
        }, 0, &prepared));
        break;
      }
      case 4: {  // Commit with the totals so far, or others
        if (streams.empty()) break;
        const std::uint32_t stream = pick_stream();
        if (stream == 0) break;
        const protocol::KvTransferRef ref = transfer_on(stream);
        const std::uint64_t total = input.ConsumeIntegralInRange<std::uint64_t>(0, 8) * block_bytes;
        const std::uint32_t chunks = input.ConsumeIntegralInRange<std::uint32_t>(0, 8);
        const std::vector<std::uint32_t> generated(input.ConsumeIntegralInRange(0, 2), 9);
        sent(peer->send<protocol::KvCommit>(stream, [&](protocol::KvCommitBuilder commit) {
          commit.transfer(ref).totals(total, chunks).generated_tokens(generated);
        }, transport::kEndStream));
        break;
      }
      case 5: {  // the prefill worker gives up
        if (streams.empty()) break;
        const std::uint32_t stream = pick_stream();
        if (stream == 0) break;
        sent(peer->send<protocol::KvAbort>(stream, [&](protocol::KvAbortBuilder abort) {
          abort.transfer(transfer_on(stream)).end({protocol::KvEnd::CANCELLED, "fuzz"});
        }, transport::kEndStream));
        break;
      }
      case 6: {  // the stream reset under the session
        if (streams.empty()) break;
        peer->reset_stream(pick_stream(), protocol::ErrorCode::CANCELLED, "fuzz");
        break;
      }
      case 7: {  // the decode request's client went away
        if (sequences.empty()) break;
        const engine::SequenceId sequence = sequences[input.ConsumeIntegralInRange<std::size_t>(0, sequences.size() - 1)];
        kv->cancel(sequence, {protocol::KvEnd::CANCELLED, "fuzz"});
        break;
      }
      case 8:  // let everything arrive and be answered before the next step
        settle();
        break;
    }
  }
  settle();

  // The end: the prefill worker's connection goes, every decode request is
  // cancelled (the engine's sequences with them, as the worker does).
  peer->close();
  if (!transport::test::run_until(w.loop, [&] { return server_side.closed; }, 5000ms)) fail("the server side never closed");
  for (engine::SequenceId sequence : sequences) {
    kv->cancel(sequence, {protocol::KvEnd::CANCELLED, "fuzz: the end"});
    w.runner.cancel(sequence);
  }
  if (kv->active() != 0) fail("a session is still open after its connection closed");
  if (!w.drain_runner()) fail("the engine runner did not answer");
  // A cancelled sequence's blocks go back within a step: wait for the
  // engine to report itself idle.
  std::uint64_t asked = w.markers_sent;
  const bool idle = transport::test::run_until(w.loop, [&] {
    if (w.marker_answered < asked) return false;
    if (w.stats.importing == 0 && w.stats.reserved_blocks == 0 && w.stats.running == 0 && w.stats.waiting == 0 &&
        w.stats.free_blocks == w.stats.total_blocks) {
      return true;
    }
    asked = w.send_marker();  // fresh stats after the next step
    return false;
  }, 5000ms);
  if (!idle) {
    std::fprintf(stderr, "importing %u reserved %u running %u waiting %u free %u of %u\n", w.stats.importing,
                 w.stats.reserved_blocks, w.stats.running, w.stats.waiting, w.stats.free_blocks, w.stats.total_blocks);
    fail("blocks still reserved or in use after every session ended");
  }
  w.kv = nullptr;
  kv.reset();
  peer.reset();
  server.reset();
  (void)transport::test::run_until(w.loop, [] { return true; }, 100ms);
  return 0;
}
