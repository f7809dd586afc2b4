// The gateway's HTTPS settings (`--tls-cert FILE --tls-key FILE`): an
// OpenSSL server context with TLS 1.2 and 1.3 only, ECDHE key exchange and
// AEAD ciphers (Mozilla's "intermediate" set,
// https://wiki.mozilla.org/Security/Server_Side_TLS), no compression or
// renegotiation. reload() reads the files again (on SIGHUP): new
// connections get the new certificate; open ones keep the context they
// were made with (each SSL holds a reference to its SSL_CTX), so no stream
// is dropped. Thread-safe; current() is taken once per connection.
#pragma once

#include <boost/asio/ssl/context.hpp>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "codec/codec_error.h"

namespace fmwire::gateway {

class TlsContext {
 public:
  // Errors: a file that cannot be read or parsed, a key that is not the
  // certificate's; each names the file and OpenSSL's reason.
  static codec::Result<std::unique_ptr<TlsContext>, std::string> load(std::string cert_file, std::string key_file);

  std::shared_ptr<boost::asio::ssl::context> current() const;
  // Reads the files again; on an error the context in use stays, and the
  // error says why.
  std::optional<std::string> reload();
  const std::string& cert_file() const { return cert_file_; }

 private:
  TlsContext(std::string cert_file, std::string key_file, std::shared_ptr<boost::asio::ssl::context> context);

  const std::string cert_file_;
  const std::string key_file_;
  mutable std::mutex mutex_;
  std::shared_ptr<boost::asio::ssl::context> current_;
};

}  // namespace fmwire::gateway
