// OpenSSL's queued reasons for its last failure as one line, for the errors
// the native TLS (tls_credentials, tls_backend) reports.
#pragma once

#include <string>

namespace fmwire::transport {

// The thread's queued OpenSSL errors, oldest first, "; " between them, and
// the queue cleared; "no reason given" when the queue is empty.
std::string openssl_errors();

}  // namespace fmwire::transport
