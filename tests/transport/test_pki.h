// Test certificates for the native protocol's TLS, made at test time with
// the openssl command in a folder of their own (removed at the end), never
// committed: two CAs, and leaf certificates each signed by one of them.
// Used by the TLS tests and by bench/transport's TLS rows, so it throws
// std::runtime_error (a failed test case, or a bench that stops) rather
// than using doctest's checks.
#pragma once

#include <string>

#include "transport/tls_credentials.h"

namespace fmwire::transport::test {

class TestPki {
 public:
  TestPki();  // makes "ca" and "other-ca"
  ~TestPki();
  TestPki(const TestPki&) = delete;
  TestPki& operator=(const TestPki&) = delete;

  // A leaf certificate `name` signed by `ca` ("ca" or "other-ca"), made on
  // first use; the files of a peer that trusts "ca" and presents it.
  TlsFiles peer(const std::string& name, const std::string& ca = "ca");
  // Loaded credentials of peer(name, ca); throws when they do not load.
  std::shared_ptr<const TlsCredentials> credentials(const std::string& name, const std::string& ca = "ca");
  const std::string& folder() const { return folder_; }
  std::string cert(const std::string& name) const { return folder_ + "/" + name + ".pem"; }
  std::string key(const std::string& name) const { return folder_ + "/" + name + ".key"; }

 private:
  void make_ca(const std::string& name);
  std::string folder_;
};

}  // namespace fmwire::transport::test
