#include "kv_fmwire.h"

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <utility>

#include "perf/kv_handlers.h"
#include "transport/connection.h"
#include "transport/server.h"

#include "loop_until.h"
#include "transport_measure.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
using transport::Connection;
using transport::EventLoop;

// Registers `memory` with the loop in pieces of at most 1 GiB (io_uring's
// limit for one fixed buffer), each a whole number of chunks so that no
// chunk straddles two.
bool register_in_pieces(EventLoop& loop, std::span<std::byte> memory, std::size_t chunk_bytes, bool add) {
  const std::size_t piece_bytes = std::max<std::size_t>(chunk_bytes, (std::size_t{1} << 30) / chunk_bytes * chunk_bytes);
  for (std::size_t offset = 0; offset < memory.size(); offset += piece_bytes) {
    const auto piece = std::as_bytes(memory.subspan(offset, std::min(piece_bytes, memory.size() - offset)));
    if (add && !loop.register_memory(piece)) return false;
    if (!add) loop.unregister_memory(piece);
  }
  return true;
}

}  // namespace

std::vector<KvSideRun> fmwire_kv_receive(const std::string& backend, const transport::Endpoint& listen,
                                         const engine::KvGeometry& geometry, std::span<std::byte> blocks,
                                         const std::function<void(std::uint16_t port)>& on_listening) {
  EventLoop loop(backend);
  perf::KvReceiver service(geometry, blocks, true);
  transport::Server server(loop, listen, perf::kv_connection_options(protocol::Role::WORKER, "bench-kv-receiver"), service);
  on_listening(server.port());
  // Until the sender has been and gone; a sender that never comes is the
  // bench's to notice (it kills this process).
  run_until(loop, [&] { return service.finished(); }, std::chrono::hours(1), 100ms);
  if (!service.failure().empty()) throw std::runtime_error("fmwire receiver: " + service.failure());
  return service.take_runs();
}

KvSideRun fmwire_kv_send(const transport::Endpoint& to, std::span<std::byte> kv, const KvTransferShape& shape,
                         const KvSendOptions& options) {
  if (kv.size() < shape.total_bytes()) throw std::invalid_argument("fmwire_kv_send: less KV than the shape's bytes");
  EventLoop loop(options.backend, transport::UringOptions{.zero_copy_min_bytes = options.zero_copy_min_bytes});
  const std::span<std::byte> source = kv.first(shape.total_bytes());
  if (options.register_source && !register_in_pieces(loop, source, shape.chunk_bytes(), true)) {
    throw std::runtime_error("fmwire sender: the loop refused to register the KV source (zero-copy off, or no io_uring?)");
  }
  perf::KvSender session(loop, source);
  std::unique_ptr<Connection> connection;
  std::string problem;
  loop.backend().connect(to.host, to.port, [&](int fd, std::error_code error) {
    if (error) {
      problem = "connect to " + to.to_string() + ": " + error.message();
      return;
    }
    connection = std::make_unique<Connection>(loop, fd, true, perf::kv_connection_options(protocol::Role::WORKER, "bench-kv-sender"),
                                              session);
  });
  if (!run_until(loop, [&] { return !problem.empty() || (connection && connection->ready()); }, 10'000ms)) {
    throw std::runtime_error("fmwire sender: not connected to " + to.to_string() + " within 10 s");
  }
  if (!problem.empty()) throw std::runtime_error("fmwire sender: " + problem);

  KvSideRun measured;
  const std::uint64_t chunk_bytes = shape.chunk_bytes();
  const std::uint64_t warmup_bytes = std::min(shape.total_bytes(), (options.warmup_bytes + chunk_bytes - 1) / chunk_bytes * chunk_bytes);
  for (const std::uint64_t bytes : {warmup_bytes, shape.total_bytes()}) {
    if (bytes == 0) continue;
    session.start(*connection, shape, bytes);
    if (!run_until(loop, [&] { return session.done(); }, std::chrono::hours(1), 100ms)) {
      throw std::runtime_error("fmwire KV transfer not finished within an hour");
    }
    if (!session.failure().empty()) throw std::runtime_error("fmwire sender: " + session.failure());
    if (!session.committed()) throw std::runtime_error("fmwire sender: the transfer ended without KvCommitted");
    measured = session.run();
  }
  connection->close();
  run_until(loop, [&] { return connection->closed(); }, 2000ms);
  connection.reset();
  if (options.register_source) register_in_pieces(loop, source, shape.chunk_bytes(), false);
  return measured;
}

}  // namespace fmwire::bench
