#include "test_pki.h"

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace fmwire::transport::test {
namespace {

void run(const std::string& command) {
  if (std::system((command + " >/dev/null 2>&1").c_str()) != 0) {
    throw std::runtime_error("test PKI: failed: " + command);
  }
}

const std::string kNewKey = "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 ";

}  // namespace

TestPki::TestPki() {
  // mkdtemp requires its name to end in six X's, which it replaces with a
  // unique name; the folder is made 0700.
  std::string pattern = (std::filesystem::temp_directory_path() / "fmwire-native-tls-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("test PKI: mkdtemp " + pattern + " failed");
  folder_ = pattern;
  try {
    make_ca("ca");
    make_ca("other-ca");
  } catch (...) {
    std::filesystem::remove_all(folder_);
    throw;
  }
}

TestPki::~TestPki() { std::filesystem::remove_all(folder_); }

void TestPki::make_ca(const std::string& name) {
  run(kNewKey + "-x509 -subj /CN=fmwire-test-" + name + " -keyout " + key(name) + " -out " + cert(name));
}

TlsFiles TestPki::peer(const std::string& name, const std::string& ca) {
  if (!std::filesystem::exists(cert(name))) {
    const std::string extensions = folder_ + "/" + name + ".ext";
    std::ofstream(extensions) << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    run(kNewKey + "-subj /CN=" + name + " -keyout " + key(name) + " -out " + folder_ + "/" + name + ".csr");
    run("openssl x509 -req -in " + folder_ + "/" + name + ".csr -CA " + cert(ca) + " -CAkey " + key(ca) +
        " -CAcreateserial -days 1 -extfile " + extensions + " -out " + cert(name));
  }
  return {cert("ca"), cert(name), key(name)};
}

std::shared_ptr<const TlsCredentials> TestPki::credentials(const std::string& name, const std::string& ca) {
  auto loaded = TlsCredentials::load(peer(name, ca));
  if (!loaded) throw std::runtime_error("test PKI: " + name + "'s credentials did not load: " + loaded.error());
  return *loaded;
}

}  // namespace fmwire::transport::test
