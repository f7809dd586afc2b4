#include "gateway/tls_context.h"

#include <openssl/ssl.h>

namespace fmwire::gateway {
namespace {

namespace ssl = boost::asio::ssl;

// TLS 1.2's suites: ECDHE for forward secrecy, AES-GCM or ChaCha20-Poly1305.
// TLS 1.3's are OpenSSL's defaults, all AEAD.
constexpr const char* kTls12Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

codec::Result<std::shared_ptr<ssl::context>, std::string> server_context(const std::string& cert_file,
                                                                        const std::string& key_file) {
  auto context = std::make_shared<ssl::context>(ssl::context::tls_server);
  SSL_CTX* native = context->native_handle();
  if (SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_cipher_list(native, kTls12Ciphers) != 1) {
    return std::string("OpenSSL refused the TLS 1.2+ settings");
  }
  context->set_options(ssl::context::default_workarounds | ssl::context::no_compression |
                       ssl::context::single_dh_use);
  SSL_CTX_set_options(native, SSL_OP_NO_RENEGOTIATION);
  boost::system::error_code error;
  context->use_certificate_chain_file(cert_file, error);
  if (error) return "cannot use the TLS certificate " + cert_file + ": " + error.message();
  context->use_private_key_file(key_file, ssl::context::pem, error);
  if (error) return "cannot use the TLS key " + key_file + ": " + error.message();
  if (SSL_CTX_check_private_key(native) != 1) {
    return "the TLS key " + key_file + " is not the key of the certificate " + cert_file;
  }
  return context;
}

}  // namespace

codec::Result<std::unique_ptr<TlsContext>, std::string> TlsContext::load(std::string cert_file, std::string key_file) {
  auto context = server_context(cert_file, key_file);
  if (!context) return context.error();
  return std::unique_ptr<TlsContext>(new TlsContext(std::move(cert_file), std::move(key_file), std::move(*context)));
}

TlsContext::TlsContext(std::string cert_file, std::string key_file, std::shared_ptr<ssl::context> context)
    : cert_file_(std::move(cert_file)), key_file_(std::move(key_file)), current_(std::move(context)) {}

std::shared_ptr<ssl::context> TlsContext::current() const {
  std::lock_guard lock(mutex_);
  return current_;
}

std::optional<std::string> TlsContext::reload() {
  auto context = server_context(cert_file_, key_file_);
  if (!context) return context.error();
  std::lock_guard lock(mutex_);
  current_ = std::move(*context);
  return std::nullopt;
}

}  // namespace fmwire::gateway
