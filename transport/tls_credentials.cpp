#include "transport/tls_credentials.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <fstream>
#include <sstream>

#include "transport/openssl_errors.h"

namespace fmwire::transport {

codec::Result<std::shared_ptr<const TlsCredentials>, std::string> TlsCredentials::load(const TlsFiles& files) {
  if (files.ca_file.empty() || files.cert_file.empty() || files.key_file.empty()) {
    return std::string("TLS needs all three of the CA, the certificate and the key files (") +
           (files.ca_file.empty() ? "no CA" : files.cert_file.empty() ? "no certificate" : "no key") + " given)";
  }
  ERR_clear_error();
  SSL_CTX* context = SSL_CTX_new(TLS_method());
  if (context == nullptr) return "OpenSSL cannot make a TLS context: " + openssl_errors();
  std::shared_ptr<const TlsCredentials> credentials(new TlsCredentials(files, context));
  // TLS 1.3 only: every native peer is fmwire, so nothing older is needed.
  if (SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(context, TLS1_3_VERSION) != 1) {
    return "OpenSSL refused TLS 1.3 only: " + openssl_errors();
  }
  // AES-128-GCM first: the fastest with AES-NI, and as strong as needed here.
  if (SSL_CTX_set_ciphersuites(context,
                               "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") != 1) {
    return "OpenSSL refused the TLS 1.3 cipher suites: " + openssl_errors();
  }
  if (SSL_CTX_load_verify_locations(context, files.ca_file.c_str(), nullptr) != 1) {
    return "cannot use the TLS CA " + files.ca_file + ": " + openssl_errors();
  }
  // The server names the CA it wants in its CertificateRequest.
  if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(files.ca_file.c_str())) {
    SSL_CTX_set_client_CA_list(context, names);
  }
  if (SSL_CTX_use_certificate_chain_file(context, files.cert_file.c_str()) != 1) {
    return "cannot use the TLS certificate " + files.cert_file + ": " + openssl_errors();
  }
  if (SSL_CTX_use_PrivateKey_file(context, files.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    return "cannot use the TLS key " + files.key_file + ": " + openssl_errors();
  }
  if (SSL_CTX_check_private_key(context) != 1) {
    return "the TLS key " + files.key_file + " is not the key of the certificate " + files.cert_file;
  }
  // Both ways: a server asks for the client's certificate and refuses a
  // client without one; a client refuses a server whose chain fails.
  SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  // Connections live long and are not resumed: no tickets, no session cache.
  SSL_CTX_set_num_tickets(context, 0);
  SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
  // Read whole records at once from what the socket delivered.
  SSL_CTX_set_read_ahead(context, 1);
  // OpenSSL decodes a certificate's extensions (its key identifiers among
  // them) the first time a verification needs them and keeps them in the
  // X509, which every loop's handshakes share for the CA and this side's
  // certificate. ThreadSanitizer caught two loops' handshakes meeting
  // there (one writing the cache under the certificate's lock, another
  // reading the key identifier without it), so the cache of every shared
  // certificate is filled now, on this thread, before any loop uses it.
  STACK_OF(X509_OBJECT)* trusted = X509_STORE_get0_objects(SSL_CTX_get_cert_store(context));
  for (int i = 0; i < sk_X509_OBJECT_num(trusted); ++i) {
    if (X509* certificate = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(trusted, i))) {
      (void)X509_check_purpose(certificate, -1, 0);
    }
  }
  if (X509* own = SSL_CTX_get0_certificate(context)) (void)X509_check_purpose(own, -1, 0);
  STACK_OF(X509)* chain = nullptr;
  if (SSL_CTX_get0_chain_certs(context, &chain) == 1 && chain != nullptr) {
    for (int i = 0; i < sk_X509_num(chain); ++i) (void)X509_check_purpose(sk_X509_value(chain, i), -1, 0);
  }
  return credentials;
}

TlsCredentials::~TlsCredentials() { SSL_CTX_free(context_); }

std::string tls_engine_line(const std::string& ulp_file) {
  std::ifstream file(ulp_file);
  std::stringstream contents;
  contents << file.rdbuf();
  bool kernel_tls = false;
  std::string name;
  while (contents >> name) kernel_tls = kernel_tls || name == "tls";
  std::string line = std::string("native TLS 1.3, mutual: OpenSSL (") + OpenSSL_version(OPENSSL_VERSION) +
                     ") on the loop thread; ";
  line += kernel_tls ? "the kernel offers kernel TLS (the `tls` ULP), not used yet"
                     : "kernel TLS not offered here (no `tls` in " + ulp_file + ")";
  return line;
}

}  // namespace fmwire::transport
