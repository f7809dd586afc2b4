#include "kv_grpc.h"

#include <algorithm>
#include <chrono>

#include "perf/grpc_kv.h"
#include "perf/grpc_tokens.h"

namespace fmwire::bench {

using namespace std::chrono_literals;

std::string grpc_version() { return perf::grpc_version(); }

std::vector<KvSideRun> grpc_kv_receive(const std::string& host, std::span<std::byte> blocks, int transfers,
                                       const std::function<void(std::uint16_t port)>& on_listening) {
  perf::GrpcKvServer server(host, 0, blocks);
  on_listening(server.port());
  return server.wait_runs(transfers, std::chrono::hours(1));
}

KvSideRun grpc_kv_send(const std::string& host, std::uint16_t port, std::span<const std::byte> kv,
                       const KvTransferShape& shape, std::uint64_t warmup_bytes) {
  perf::GrpcKvClient client(host, port, 10s);
  const std::size_t chunk_bytes = shape.chunk_bytes();
  const std::uint64_t total_bytes = shape.total_bytes();
  if (warmup_bytes > 0) {
    client.push(kv, std::min(total_bytes, (warmup_bytes + chunk_bytes - 1) / chunk_bytes * chunk_bytes), chunk_bytes);
  }
  return client.push(kv, total_bytes, chunk_bytes);
}

}  // namespace fmwire::bench
