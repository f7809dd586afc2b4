// What gRPC's ends of the token and KV tests share (built only with gRPC):
// the address form gRPC takes, and the credentials for each end, plaintext
// or TLS with mutual authentication from the same three files fmwire's
// `--tls-ca --tls-cert --tls-key` name, so that `perf run --compare` and
// bench/transport measure gRPC with TLS against fmwire with TLS.
#pragma once

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <cstdint>
#include <memory>
#include <string>

#include "transport/tls_credentials.h"

namespace fmwire::perf {

// "host:port" as gRPC's URIs take it: IPv6 in brackets.
std::string grpc_address(const std::string& host, std::uint16_t port);

// Without files (!tls.enabled()): plaintext. With them: gRPC's TLS (its
// default versions and ciphers, OpenSSL's TLS 1.3 here), this side
// presenting cert_file, the peer's certificate required to chain to
// ca_file. As fmwire's native TLS does, the server's name is not checked
// against its certificate: a cluster's CA is the trust, and a perf client
// may name its server by any address. Throws std::runtime_error naming a
// file that cannot be read.
std::shared_ptr<grpc::ServerCredentials> grpc_server_credentials(const transport::TlsFiles& tls);
std::shared_ptr<grpc::ChannelCredentials> grpc_channel_credentials(const transport::TlsFiles& tls);

}  // namespace fmwire::perf
