#include "cli/native_tls_flags.h"

namespace fmwire::cli {

namespace po = boost::program_options;

void add_native_tls_flags(po::options_description& description, NativeTlsFlags& flags) {
  const std::string& prefix = flags.prefix;
  const std::string ca = prefix + "ca";
  const std::string cert = prefix + "cert";
  const std::string key = prefix + "key";
  description.add_options()
      (ca.c_str(), po::value(&flags.files.ca_file),
       ("native protocol TLS 1.3 with mutual authentication: the CA (PEM) every peer's certificate must chain "
        "to; with --" + cert + " and --" + key + " (all three or none)").c_str())
      (cert.c_str(), po::value(&flags.files.cert_file),
       "native protocol TLS: this process's certificate chain (PEM), signed by that CA")
      (key.c_str(), po::value(&flags.files.key_file), "native protocol TLS: the certificate's private key (PEM)");
}

std::shared_ptr<const transport::TlsCredentials> load_native_tls(const NativeTlsFlags& flags) {
  const transport::TlsFiles& files = flags.files;
  if (!files.enabled()) return nullptr;
  const std::string& prefix = flags.prefix;
  std::string missing;
  if (files.ca_file.empty()) missing += " --" + prefix + "ca";
  if (files.cert_file.empty()) missing += " --" + prefix + "cert";
  if (files.key_file.empty()) missing += " --" + prefix + "key";
  if (!missing.empty()) {
    throw po::error("--" + prefix + "ca, --" + prefix + "cert and --" + prefix +
                    "key go together: give all three or none (missing:" + missing + ")");
  }
  auto loaded = transport::TlsCredentials::load(files);
  if (!loaded) throw po::error("--" + prefix + "*: " + loaded.error());
  return *loaded;
}

}  // namespace fmwire::cli
