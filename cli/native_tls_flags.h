// The native protocol's TLS flags, one helper for every command that speaks
// it: `--tls-ca FILE --tls-cert FILE --tls-key FILE` (worker, router,
// generate, perf, echo-server), or `--native-tls-*` where --tls-cert means
// the HTTPS side already (gateway, up). All three or none.
#pragma once

#include <boost/program_options.hpp>

#include <memory>
#include <string>

#include "transport/tls_credentials.h"

namespace fmwire::cli {

struct NativeTlsFlags {
  transport::TlsFiles files;
  std::string prefix = "tls-";  // the flags' names: PREFIX + "ca", "cert", "key"
};

// Declares the three flags in `description`, bound to `flags.files`.
void add_native_tls_flags(boost::program_options::options_description& description, NativeTlsFlags& flags);

// The credentials the flags name; null when none is given (plaintext).
// Throws boost::program_options::error (the command exits 2) when only some
// are given, or when the files cannot be used, saying which and why.
std::shared_ptr<const transport::TlsCredentials> load_native_tls(const NativeTlsFlags& flags);

}  // namespace fmwire::cli
