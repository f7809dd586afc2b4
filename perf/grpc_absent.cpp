// perf/grpc_tokens.h and perf/grpc_kv.h where gRPC is not built in
// (-Dgrpc): callers ask grpc_built_in() first and skip the peer with a row
// that says so.
#include <stdexcept>

#include "perf/grpc_kv.h"
#include "perf/grpc_tokens.h"

namespace fmwire::perf {
namespace {

[[noreturn]] void not_built_in() { throw std::logic_error("gRPC is not built in (grpc_built_in() is false)"); }

}  // namespace

bool grpc_built_in() { return false; }

std::string grpc_version() { return {}; }

struct GrpcTokenServer::State {};

GrpcTokenServer::GrpcTokenServer(const std::string&, std::uint16_t, const transport::TlsFiles&) { not_built_in(); }
GrpcTokenServer::GrpcTokenServer(const std::string&, std::uint16_t, GrpcPacing) { not_built_in(); }
GrpcTokenServer::~GrpcTokenServer() = default;
std::uint16_t GrpcTokenServer::port() const { return 0; }

struct GrpcTokenClient::State {};

GrpcTokenClient::GrpcTokenClient(const std::string&, std::uint16_t, int, std::chrono::milliseconds,
                                 const transport::TlsFiles&) {
  not_built_in();
}
GrpcTokenClient::~GrpcTokenClient() = default;
GrpcTokenRound GrpcTokenClient::stream_tokens(int, std::uint32_t, std::chrono::milliseconds) { not_built_in(); }
double GrpcTokenClient::round_trip_us(std::chrono::milliseconds) { not_built_in(); }
std::vector<double> GrpcTokenClient::paced_latencies_us(std::uint32_t, std::uint32_t, Clock::time_point) {
  not_built_in();
}

struct GrpcKvServer::State {};

GrpcKvServer::GrpcKvServer(const std::string&, std::uint16_t, std::span<std::byte>, const transport::TlsFiles&) {
  not_built_in();
}
GrpcKvServer::GrpcKvServer(const std::string&, std::uint16_t, std::uint64_t, const transport::TlsFiles&) {
  not_built_in();
}
GrpcKvServer::~GrpcKvServer() = default;
std::uint16_t GrpcKvServer::port() const { return 0; }
std::vector<KvSideRun> GrpcKvServer::wait_runs(int, std::chrono::milliseconds) { not_built_in(); }

struct GrpcKvClient::State {};

GrpcKvClient::GrpcKvClient(const std::string&, std::uint16_t, std::chrono::milliseconds, const transport::TlsFiles&) {
  not_built_in();
}
GrpcKvClient::~GrpcKvClient() = default;
KvSideRun GrpcKvClient::push(std::span<const std::byte>, std::uint64_t, std::size_t) { not_built_in(); }

}  // namespace fmwire::perf
