// The native protocol's TLS settings (`--tls-ca --tls-cert --tls-key`): one
// OpenSSL context, TLS 1.3 only, that both accepts and connects, presents
// this side's certificate and requires the peer's to chain to the CA (mutual
// authentication). Loaded once per process and shared by every loop thread
// (an SSL_CTX is thread-safe once set up); tls_backend.h uses it per socket.
#pragma once

#include <memory>
#include <string>

#include "codec/codec_error.h"

struct ssl_ctx_st;  // OpenSSL's SSL_CTX: no OpenSSL header in the SDK's headers

namespace fmwire::transport {

// The three PEM files. All three or none: enabled() when any is given.
struct TlsFiles {
  std::string ca_file;    // the CA a peer's certificate must chain to
  std::string cert_file;  // this side's certificate chain
  std::string key_file;   // its private key

  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

class TlsCredentials {
 public:
  // Errors: a missing one of the three files, a file that cannot be read or
  // parsed, a key that is not the certificate's; each names the file and
  // OpenSSL's reason.
  static codec::Result<std::shared_ptr<const TlsCredentials>, std::string> load(const TlsFiles& files);
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  ssl_ctx_st* context() const { return context_; }
  const TlsFiles& files() const { return files_; }

 private:
  TlsCredentials(TlsFiles files, ssl_ctx_st* context) : files_(std::move(files)), context_(context) {}
  TlsFiles files_;
  ssl_ctx_st* context_;  // owned: SSL_CTX_free in the destructor
};

// Which TLS does the work, for the one start-up line: OpenSSL on the loop
// thread, and whether the kernel offers its `tls` ULP (kernel TLS), read
// from `ulp_file` (/proc/sys/net/ipv4/tcp_available_ulp).
std::string tls_engine_line(const std::string& ulp_file = "/proc/sys/net/ipv4/tcp_available_ulp");

}  // namespace fmwire::transport
