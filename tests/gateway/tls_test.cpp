// The gateway's HTTPS: its OpenSSL context (files, reload) and the
// handshake a client gets, TLS 1.2 and 1.3 only. Certificates are made at
// test time with the openssl command, in a folder of their own.
#include <doctest/doctest.h>

#include <openssl/ssl.h>
#include <stdlib.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "gateway/http_gateway.h"
#include "gateway/tls_context.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

// A self-signed P-256 certificate for 127.0.0.1 per name, in a temporary
// folder removed at the end.
class TestCertificates {
 public:
  TestCertificates() {
    // mkdtemp's template: the X's become a unique name, made 0700.
    std::string pattern = (std::filesystem::temp_directory_path() / "fmwire-tls-test-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    folder_ = pattern;
  }
  ~TestCertificates() { std::filesystem::remove_all(folder_); }

  std::string cert(const std::string& name) const { return folder_ + "/" + name + ".pem"; }
  std::string key(const std::string& name) const { return folder_ + "/" + name + ".key"; }
  void make(const std::string& name) const {
    const std::string command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
                                "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout " +
                                key(name) + " -out " + cert(name) + " 2>/dev/null";
    REQUIRE(std::system(command.c_str()) == 0);
  }

 private:
  std::string folder_;
};

TEST_CASE("tls_context: a certificate and its key load; a missing file or another key is refused, naming the file") {
  TestCertificates files;
  files.make("one");
  files.make("two");
  auto loaded = TlsContext::load(files.cert("one"), files.key("one"));
  REQUIRE_MESSAGE(loaded, (loaded ? "" : loaded.error()));
  CHECK((*loaded)->current() != nullptr);

  auto missing = TlsContext::load(files.cert("none"), files.key("one"));
  REQUIRE(!missing);
  CHECK(missing.error().find(files.cert("none")) != std::string::npos);
  auto no_key = TlsContext::load(files.cert("one"), files.key("none"));
  REQUIRE(!no_key);
  CHECK(no_key.error().find(files.key("none")) != std::string::npos);
  auto mismatched = TlsContext::load(files.cert("one"), files.key("two"));
  REQUIRE(!mismatched);
  CHECK(mismatched.error().find(files.key("two")) != std::string::npos);  // "key values mismatch"
}

TEST_CASE("tls_context: a reload that fails keeps the context in use; one that succeeds replaces it") {
  TestCertificates files;
  files.make("one");
  auto loaded = TlsContext::load(files.cert("one"), files.key("one"));
  REQUIRE(loaded);
  TlsContext& tls = **loaded;
  const auto first = tls.current();
  std::ofstream(files.cert("one")) << "not a certificate\n";
  const auto failed = tls.reload();
  REQUIRE(failed);
  CHECK(failed->find(files.cert("one")) != std::string::npos);
  CHECK(tls.current() == first);
  files.make("one");
  CHECK(!tls.reload());
  CHECK(tls.current() != first);
}

// A TLS client handshake with the gateway, between these versions: the
// error, if any; then GET /health's status when it succeeded.
struct Handshake {
  beast::error_code error;
  unsigned health_status = 0;
  int version = 0;
};

Handshake handshake(std::uint16_t port, int min_version, int max_version) {
  asio::io_context io;
  ssl::context context(ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(context.native_handle(), min_version);
  SSL_CTX_set_max_proto_version(context.native_handle(), max_version);
  SSL_CTX_set_security_level(context.native_handle(), 0);  // willing to try TLS 1.1: the refusal is the server's
  ssl::stream<tcp::socket> stream(io, context);
  stream.next_layer().connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  Handshake result;
  stream.handshake(ssl::stream_base::client, result.error);
  if (result.error) return result;
  result.version = SSL_version(stream.native_handle());
  http::request<http::empty_body> request{http::verb::get, "/health", 11};
  request.set(http::field::host, "127.0.0.1");
  http::write(stream, request);
  beast::flat_buffer buffer;
  http::response<http::string_body> response;
  http::read(stream, buffer, response);
  result.health_status = response.result_int();
  return result;
}

TEST_CASE("https: TLS 1.3 and 1.2 clients are served; TLS 1.1 and 1.0 ones are refused in the handshake") {
  TestCertificates files;
  files.make("server");
  HttpGatewayOptions options;
  options.listen = {"127.0.0.1", 0};
  options.upstreams = {{"127.0.0.1", 1}};  // none there: /health needs none
  options.http_threads = 2;
  options.tls_cert_file = files.cert("server");
  options.tls_key_file = files.key("server");
  options.reload_tls_on_sighup = false;
  auto started = HttpGateway::start(options);
  REQUIRE_MESSAGE(started, (started ? "" : started.error()));
  const std::uint16_t port = (*started)->port();

  const Handshake tls13 = handshake(port, TLS1_3_VERSION, TLS1_3_VERSION);
  CHECK_MESSAGE(!tls13.error, tls13.error.message());
  CHECK(tls13.version == TLS1_3_VERSION);
  CHECK(tls13.health_status == 200);
  const Handshake tls12 = handshake(port, TLS1_2_VERSION, TLS1_2_VERSION);
  CHECK_MESSAGE(!tls12.error, tls12.error.message());
  CHECK(tls12.health_status == 200);
  for (int old : {TLS1_1_VERSION, TLS1_VERSION}) {
    const Handshake refused = handshake(port, old, old);
    CHECK_MESSAGE(refused.error, "TLS version " << old << " was accepted");
  }
  CHECK(!(*started)->reload_tls());
  CHECK(handshake(port, TLS1_3_VERSION, TLS1_3_VERSION).health_status == 200);
}

TEST_CASE("https: half a certificate pair, or a plain gateway's reload, is an error that says why") {
  HttpGatewayOptions options;
  options.listen = {"127.0.0.1", 0};
  options.upstreams = {{"127.0.0.1", 1}};
  options.tls_cert_file = "/nonexistent.pem";
  auto half = HttpGateway::start(options);
  REQUIRE(!half);
  CHECK(half.error().find("--tls-key") != std::string::npos);
  options.tls_cert_file.clear();
  auto plain = HttpGateway::start(options);
  REQUIRE(plain);
  const auto reload = (*plain)->reload_tls();
  REQUIRE(reload);
  CHECK(reload->find("plain HTTP") != std::string::npos);
}

}  // namespace
}  // namespace fmwire::gateway
