#include "perf/grpc_credentials.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <fstream>
#include <iterator>
#include <stdexcept>

#include "transport/endpoint.h"

namespace fmwire::perf {
namespace {

namespace tls_api = grpc::experimental;

std::string read_pem(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (!file.good() && !file.eof()) throw std::runtime_error("gRPC TLS: cannot read " + path);
  if (text.empty()) throw std::runtime_error("gRPC TLS: " + path + " is empty or cannot be read");
  return text;
}

// The CA and this side's key and certificate, as gRPC's TLS options take them.
std::shared_ptr<tls_api::StaticDataCertificateProvider> provider(const transport::TlsFiles& tls) {
  const std::vector<tls_api::IdentityKeyCertPair> identity{{read_pem(tls.key_file), read_pem(tls.cert_file)}};
  return std::make_shared<tls_api::StaticDataCertificateProvider>(read_pem(tls.ca_file), identity);
}

}  // namespace

std::string grpc_address(const std::string& host, std::uint16_t port) {
  return transport::Endpoint{host, port}.to_string();
}

std::shared_ptr<grpc::ServerCredentials> grpc_server_credentials(const transport::TlsFiles& tls) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  tls_api::TlsServerCredentialsOptions options(provider(tls));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  return tls_api::TlsServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> grpc_channel_credentials(const transport::TlsFiles& tls) {
  if (!tls.enabled()) return grpc::InsecureChannelCredentials();
  tls_api::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider(tls));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  // The chain is still verified (verify_server_certs stays true); only the
  // host-name check is left out, as it is in fmwire's native TLS.
  options.set_certificate_verifier(std::make_shared<tls_api::NoOpCertificateVerifier>());
  options.set_check_call_host(false);
  return tls_api::TlsCredentials(options);
}

}  // namespace fmwire::perf
