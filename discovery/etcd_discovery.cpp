#include "discovery/etcd_discovery.h"

#include <algorithm>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/json.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <charconv>
#include <cstring>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "transport/endpoint.h"
#include "transport/host_resolver.h"

namespace fmwire::discovery {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
namespace json = boost::json;
using namespace std::chrono_literals;
using std::chrono::milliseconds;

// A unary call (grant, put, range, revoke, keepalive) from connect to the
// last byte of the answer.
constexpr milliseconds kCallTimeout = 2s;
// Revoking from a destructor: best effort, and the destructor must not wait.
constexpr milliseconds kRevokeTimeout = 1s;
// A watch that has said nothing for this long is re-established (range,
// compare, watch again): that both bounds every read and proves etcd still
// answers, without counting on server-side progress notifications.
constexpr milliseconds kWatchIdleLimit = 30s;
// Retrying after a lost connection: 200 ms doubling to 2 s.
constexpr milliseconds kFirstBackoff = 200ms;
constexpr milliseconds kLastBackoff = 2s;
// One JSON message on a stream (a watch batch); etcd's own gRPC limit is
// near this.
constexpr std::size_t kMaxMessageBytes = 8u << 20;

using Outcome = codec::Result<codec::Done, std::string>;
using Object = codec::Result<json::object, std::string>;

// ---- etcd's encodings: base64 bytes, int64 as JSON strings ----

constexpr std::string_view kBase64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string base64_encode(std::string_view bytes) {
  std::string text;
  text.reserve((bytes.size() + 2) / 3 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    const std::size_t count = std::min<std::size_t>(3, bytes.size() - i);
    std::uint32_t group = 0;
    for (std::size_t j = 0; j < 3; ++j) {
      group = (group << 8) | (j < count ? static_cast<unsigned char>(bytes[i + j]) : 0u);
    }
    for (std::size_t j = 0; j < 4; ++j) {
      text += j <= count ? kBase64Alphabet[(group >> (18 - 6 * j)) & 63u] : '=';
    }
  }
  return text;
}

std::optional<std::string> base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) return std::nullopt;
  std::string bytes;
  bytes.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    std::uint32_t group = 0;
    std::size_t padding = 0;
    for (std::size_t j = 0; j < 4; ++j) {
      const char c = text[i + j];
      std::uint32_t value = 0;
      if (c == '=' && i + 4 == text.size() && j >= 2) {
        ++padding;
      } else {
        const auto at = kBase64Alphabet.find(c);
        if (at == std::string_view::npos || padding > 0) return std::nullopt;
        value = static_cast<std::uint32_t>(at);
      }
      group = (group << 6) | value;
    }
    for (std::size_t j = 0; j < 3 - padding; ++j) bytes += static_cast<char>((group >> (16 - 8 * j)) & 255u);
  }
  return bytes;
}

// etcd's "prefix" range end: the prefix with its last byte that is not 0xff
// incremented, and what follows it dropped ("\0", all keys, when none is).
std::string range_end_of(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto& last = reinterpret_cast<unsigned char&>(end.back());
    if (last < 0xff) {
      ++last;
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

// An int64 field, which the JSON gateway writes as a string; absent is 0
// (proto3 leaves out default values).
std::optional<std::int64_t> int64_field(const json::object& object, std::string_view name) {
  const json::value* field = object.if_contains(name);
  if (field == nullptr) return 0;
  if (field->is_int64()) return field->get_int64();
  if (!field->is_string()) return std::nullopt;
  const json::string& text = field->get_string();
  std::int64_t value = 0;
  const auto [end, parsed] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (parsed != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

const json::object* object_field(const json::object& object, std::string_view name) {
  const json::value* field = object.if_contains(name);
  return field != nullptr && field->is_object() ? &field->get_object() : nullptr;
}

std::string string_field(const json::object& object, std::string_view name) {
  const json::value* field = object.if_contains(name);
  return field != nullptr && field->is_string() ? std::string(field->get_string()) : std::string();
}

// A base64 field decoded; absent is empty.
std::optional<std::string> bytes_field(const json::object& object, std::string_view name) {
  return base64_decode(string_field(object, name));
}

// "connection refused", not "Connection refused": it ends a sentence. TLS
// errors say they are (OpenSSL's words: "certificate verify failed",
// "tlsv13 alert certificate required").
std::string describe(const beast::error_code& error) {
  std::string text = error.message();
  if (error.category() == asio::error::get_ssl_category() || error == asio::ssl::error::stream_truncated) {
    return "TLS: " + text;
  }
  if (!text.empty() && text[0] >= 'A' && text[0] <= 'Z' && !(text.size() > 1 && text[1] >= 'A' && text[1] <= 'Z')) {
    text[0] = static_cast<char>(text[0] - 'A' + 'a');
  }
  return text;
}

// An error etcd sent as JSON: {"error": "...", "message": "...", "code": n}
// on a unary call, {"error": {"message": "...", ...}} on a stream.
std::string etcd_error_text(const json::object& answer) {
  if (const json::object* error = object_field(answer, "error")) return string_field(*error, "message");
  std::string message = string_field(answer, "message");
  return message.empty() ? string_field(answer, "error") : message;
}

// ---- TLS to etcd ----

// OpenSSL's last queued reason, for a file it refused ("no such file",
// "key values mismatch").
std::string openssl_reason() {
  const unsigned long code = ERR_peek_last_error();
  ERR_clear_error();
  if (code == 0) return "OpenSSL gave no reason";
  char text[256];
  ERR_error_string_n(code, text, sizeof text);
  return text;
}

// A client context: TLS 1.2 or 1.3, etcd's certificate checked against the
// CA (or the system's trust store), and our certificate presented when
// given. The host is checked per connection (EtcdClient::open).
codec::Result<std::shared_ptr<asio::ssl::context>, std::string> tls_context(const EtcdTlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return std::string("--etcd-cert and --etcd-key go together: the client certificate and its key");
  }
  auto context = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  SSL_CTX* native = context->native_handle();
  if (SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION) != 1) return std::string("OpenSSL refused TLS 1.2+");
  context->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_compression);
  context->set_verify_mode(asio::ssl::verify_peer);
  boost::system::error_code error;
  if (files.ca_file.empty()) {
    context->set_default_verify_paths(error);
    if (error) return "cannot use the system's CA certificates for etcd: " + error.message();
  } else {
    if (SSL_CTX_load_verify_locations(native, files.ca_file.c_str(), nullptr) != 1) {
      return "--etcd-cacert " + files.ca_file + ": cannot use it as a CA: " + openssl_reason();
    }
  }
  if (!files.cert_file.empty()) {
    if (SSL_CTX_use_certificate_chain_file(native, files.cert_file.c_str()) != 1) {
      return "--etcd-cert " + files.cert_file + ": cannot use it as a certificate: " + openssl_reason();
    }
    if (SSL_CTX_use_PrivateKey_file(native, files.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
      return "--etcd-key " + files.key_file + ": cannot use it as a key: " + openssl_reason();
    }
    if (SSL_CTX_check_private_key(native) != 1) {
      return "--etcd-key " + files.key_file + " is not the key of the certificate " + files.cert_file;
    }
  }
  return context;
}

// ---- one etcd endpoint over HTTP/1.1 ----

// An EtcdUrl made by hand rather than by parse_etcd_url: its host must still
// be one an endpoint could have (numeric, or a well-formed name).
Outcome check_url(const EtcdUrl& url) {
  std::string problem;
  if (!transport::parse_endpoint(transport::Endpoint{url.host, url.port}.to_string(), &problem)) {
    return "etcd host '" + url.host + "': " + problem;
  }
  if (url.port == 0) return "etcd at " + url.host + ": port must be from 1 to 65535";
  return codec::Done{};
}

// Blocking calls to one etcd endpoint, on the caller's thread, one
// connection per call, every socket operation under a deadline (Beast's
// tcp_stream timeouts apply to asynchronous operations only, so each call
// starts one and runs the private io_context until it completes). stop(),
// from any thread, ends the call in progress and refuses later ones.
class EtcdClient {
 public:
  // `url` has passed check_url.
  explicit EtcdClient(const EtcdUrl& url)
      : url_(url),
        name_(transport::Endpoint{url.host, url.port}.to_string()),
        stream_(io_),
        timer_(io_) {}

  const std::string& name() const { return name_; }
  bool stopping() const { return stopping_.load(); }

  void stop() {
    stopping_ = true;
    // Runs on the calling thread's next io_context run (or never, when no
    // call comes: then there is nothing to end).
    asio::post(io_, [this] {
      stream_.close();
      timer_.cancel();
    });
  }

  // POST `request` to `target`, the answer's JSON object.
  Object call(std::string_view target, const json::object& request, milliseconds timeout = kCallTimeout) {
    if (auto opened = open(target, request, timeout, kMaxMessageBytes); !opened) return opened.error();
    beast::error_code error = run([&](auto done) {
      with_stream([&](auto& stream) { http::async_read(stream, buffer_, *parser_, done); });
    });
    close();
    if (error) return failure(target, "reading the answer", error, timeout);
    return parse_answer(target, parser_->get().result(), parser_->get().body());
  }

  // Why a stream ended: `idle` when nothing came for `idle_limit`; an empty
  // `error` when on_message asked to end it.
  struct StreamEnd {
    bool idle = false;
    std::string error;
  };

  // POST `request` to a streaming `target` (watch, keepalive), then hand each
  // newline-separated JSON object of the answer to on_message until it
  // returns false or the stream ends.
  StreamEnd stream(std::string_view target, const json::object& request, milliseconds idle_limit,
                   const std::function<bool(const json::object&)>& on_message) {
    // Streams are bounded per message instead (read_messages).
    if (auto opened = open(target, request, kCallTimeout, std::nullopt); !opened) return {false, opened.error()};
    StreamEnd end = read_messages(target, idle_limit, on_message);
    close();
    return end;
  }

  // Waits `duration`, or less when stopped.
  void sleep(milliseconds duration) {
    if (stopping_) return;
    timer_.expires_after(duration);
    run([&](auto done) { timer_.async_wait(done); });
  }

 private:
  // Calls `use` with the TLS stream over stream_ (https) or stream_ itself.
  template <typename Use>
  void with_stream(Use&& use) {
    if (tls_) {
      use(*tls_);
    } else {
      use(stream_);
    }
  }

  // Starts the asynchronous operation `start` with a completion that records
  // its error, and runs the io_context until it completes.
  template <typename Start>
  beast::error_code run(Start&& start) {
    if (stopping_) return asio::error::operation_aborted;
    beast::error_code result;
    start([&result](const beast::error_code& error, auto&&...) { result = error; });
    io_.restart();
    io_.run();
    return stopping_ ? beast::error_code(asio::error::operation_aborted) : result;
  }

  // Connects, sends the request, reads the answer's header: all within
  // `timeout`.
  Outcome open(std::string_view target, const json::object& request, milliseconds timeout,
               std::optional<std::uint64_t> body_limit) {
    // A name is looked up again on every call (on this thread, which is
    // no loop), so an etcd that moves is found at its new address.
    transport::SocketAddresses addresses;
    if (const std::error_code lookup = transport::resolve_blocking(url_.host, url_.port, timeout, addresses)) {
      return "cannot reach etcd at " + name_ + ": looking up " + url_.host + ": " + lookup.message();
    }
    std::vector<asio::ip::tcp::endpoint> endpoints;
    for (const transport::SocketAddress& address : addresses) {
      asio::ip::tcp::endpoint endpoint;
      std::memcpy(endpoint.data(), address.get(), address.bytes);
      endpoint.resize(address.bytes);
      endpoints.push_back(endpoint);
    }
    stream_.expires_after(timeout);
    if (auto error = run([&](auto done) { stream_.async_connect(endpoints, done); })) {
      close();
      if (error == beast::error::timeout) {
        return "cannot reach etcd at " + name_ + ": no answer to connect in " + std::to_string(timeout.count()) + " ms";
      }
      return "cannot reach etcd at " + name_ + ": " + describe(error);
    }
    if (url_.tls) {
      // Under the same deadline as the connect. The name is checked against
      // the certificate (a DNS name or an IP address in it), and sent as SNI.
      tls_.emplace(stream_, *url_.tls);
      SSL* ssl = tls_->native_handle();
      boost::system::error_code numeric;
      (void)asio::ip::make_address(url_.host, numeric);
      if (numeric) SSL_set_tlsext_host_name(ssl, url_.host.c_str());
      tls_->set_verify_callback(asio::ssl::host_name_verification(url_.host));
      if (auto error = run([&](auto done) { tls_->async_handshake(asio::ssl::stream_base::client, done); })) {
        close();
        if (error == beast::error::timeout) {
          return "etcd at " + name_ + ": TLS handshake: no answer in " + std::to_string(timeout.count()) + " ms";
        }
        std::string why = describe(error);
        if (why.starts_with("TLS: ")) why.erase(0, 5);
        return "etcd at " + name_ + ": TLS handshake: " + why +
               " (etcd's certificate must chain to --etcd-cacert and name " + url_.host + "; is it https?)";
      }
    }
    http::request<http::string_body> message(http::verb::post, target, 11);
    message.set(http::field::host, name_);
    message.set(http::field::content_type, "application/json");
    message.keep_alive(false);
    message.body() = json::serialize(request);
    message.prepare_payload();
    if (auto error = run([&](auto done) {
          with_stream([&](auto& stream) { http::async_write(stream, message, done); });
        })) {
      close();
      return failure(target, "sending the request", error, timeout);
    }
    buffer_.clear();
    parser_.emplace();
    if (body_limit) {
      parser_->body_limit(*body_limit);
    } else {
      parser_->body_limit(boost::none);
    }
    if (auto error = run([&](auto done) {
          with_stream([&](auto& stream) { http::async_read_header(stream, buffer_, *parser_, done); });
        })) {
      close();
      return failure(target, "reading the answer", error, timeout);
    }
    if (parser_->get().result() != http::status::ok) {
      // What etcd said follows (within the same deadline).
      beast::error_code error = run([&](auto done) {
        with_stream([&](auto& stream) { http::async_read(stream, buffer_, *parser_, done); });
      });
      close();
      if (error) return failure(target, "reading the answer", error, timeout);
      return refusal(target, parser_->get().result_int(), parser_->get().body());
    }
    return codec::Done{};
  }

  StreamEnd read_messages(std::string_view target, milliseconds idle_limit,
                          const std::function<bool(const json::object&)>& on_message) {
    std::string& body = parser_->get().body();
    for (;;) {
      std::size_t line_end;
      while ((line_end = body.find('\n')) != std::string::npos) {
        const std::string line = body.substr(0, line_end);
        body.erase(0, line_end + 1);
        if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
        auto message = parse_object(target, line);
        if (!message) return {false, message.error()};
        if (const json::object* result = object_field(*message, "result"); result == nullptr) {
          return {false, "etcd at " + name_ + ": POST " + std::string(target) + ": " + etcd_error_text(*message)};
        }
        if (!on_message(*message)) return {};
      }
      if (body.size() > kMaxMessageBytes) {
        return {false, "etcd at " + name_ + ": POST " + std::string(target) + ": a message longer than " +
                           std::to_string(kMaxMessageBytes) + " bytes"};
      }
      if (parser_->is_done()) return {false, "etcd at " + name_ + " ended the stream of POST " + std::string(target)};
      stream_.expires_after(idle_limit);
      if (auto error = run([&](auto done) {
            with_stream([&](auto& stream) { http::async_read_some(stream, buffer_, *parser_, done); });
          })) {
        if (error == beast::error::timeout) return {true, {}};
        return {false, "etcd at " + name_ + ": lost the stream of POST " + std::string(target) + ": " +
                           describe(error)};
      }
    }
  }

  Object parse_answer(std::string_view target, http::status status, const std::string& body) const {
    if (status != http::status::ok) return refusal(target, static_cast<unsigned>(status), body);
    auto answer = parse_object(target, body);
    if (!answer) return answer;
    if (answer->contains("error")) {
      return "etcd at " + name_ + ": POST " + std::string(target) + ": " + etcd_error_text(*answer);
    }
    return answer;
  }

  // An answer other than 200 OK, with what etcd said: its JSON error, or
  // the start of the body when that is not JSON ("404 page not found").
  std::string refusal(std::string_view target, unsigned status, const std::string& body) const {
    boost::system::error_code error;
    const json::value value = json::parse(body, error);
    const std::string said = !error && value.is_object() ? etcd_error_text(value.get_object()) : body.substr(0, 200);
    return "etcd at " + name_ + ": POST " + std::string(target) + " answered " + std::to_string(status) + ": " + said;
  }

  Object parse_object(std::string_view target, std::string_view text) const {
    boost::system::error_code error;
    json::value value = json::parse(text, error);
    if (error || !value.is_object()) {
      return "etcd at " + name_ + ": POST " + std::string(target) + ": the answer is not a JSON object: " +
             std::string(text.substr(0, 200));
    }
    return std::move(value.get_object());
  }

  std::string failure(std::string_view target, const char* doing, const beast::error_code& error,
                      milliseconds timeout) const {
    std::string text = "etcd at " + name_ + ": POST " + std::string(target) + ": " + doing + ": ";
    if (error == beast::error::timeout) return text + "no answer in " + std::to_string(timeout.count()) + " ms";
    text += describe(error);
    // Under TLS 1.3 the server checks our certificate after our side of the
    // handshake is done: its refusal arrives as the first request fails.
    if (url_.tls && (error == asio::error::connection_reset || error == asio::error::eof ||
                     error == asio::ssl::error::stream_truncated ||
                     error.category() == asio::error::get_ssl_category())) {
      text += " (TLS: etcd closed the connection after the handshake; with --client-cert-auth it refuses a client "
              "certificate (--etcd-cert) that does not chain to its --trusted-ca-file)";
    }
    return text;
  }

  // No TLS close_notify: HTTP's framing says where the answer ends, and
  // each call has a connection of its own.
  void close() {
    beast::error_code ignored;  // the call's outcome is known; closing cannot change it
    stream_.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
    stream_.close();
    tls_.reset();
  }

  EtcdUrl url_;
  std::string name_;
  std::atomic<bool> stopping_{false};
  asio::io_context io_{1};
  beast::tcp_stream stream_;
  std::optional<asio::ssl::stream<beast::tcp_stream&>> tls_;  // https: over stream_, one per call
  asio::steady_timer timer_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::string_body>> parser_;
};

// ---- registration ----

// Grants and puts on the starting thread, then renews on its own; the
// destructor stops that thread, then revokes.
class Registration final : public EtcdRegistration {
 public:
  Registration(const EtcdUrl& url, std::string key, std::string address, std::chrono::seconds ttl)
      : url_(url), key_(std::move(key)), address_(std::move(address)), ttl_(ttl), client_(url) {}

  ~Registration() override {
    client_.stop();
    if (thread_.joinable()) thread_.join();
    if (lease_id_ == 0) return;
    // A fresh client: client_ refuses calls once stopped.
    EtcdClient revoker(url_);
    (void)revoker.call("/v3/lease/revoke", {{"ID", std::to_string(lease_id_)}}, kRevokeTimeout);
  }

  Outcome start() {
    if (auto registered = register_once(); !registered) return registered;
    thread_ = std::thread([this] { keep_alive(); });
    return codec::Done{};
  }

 private:
  // A new lease, and the key under it.
  Outcome register_once() {
    auto granted = client_.call("/v3/lease/grant", {{"TTL", ttl_.count()}});
    if (!granted) return granted.error();
    const auto id = int64_field(*granted, "ID");
    if (!id || *id == 0) return "etcd at " + client_.name() + ": POST /v3/lease/grant: no lease ID in the answer";
    lease_id_ = *id;
    auto put = client_.call("/v3/kv/put", {{"key", base64_encode(key_)},
                                           {"value", base64_encode(address_)},
                                           {"lease", std::to_string(lease_id_)}});
    if (!put) return put.error();
    return codec::Done{};
  }

  enum class Renewal { renewed, lease_gone, failed };

  // One keepalive. The JSON gateway's keepalive is a stream: read its first
  // answer and hang up. An unknown lease comes back with no TTL.
  Renewal renew() {
    Renewal renewal = Renewal::failed;
    auto end = client_.stream("/v3/lease/keepalive", {{"ID", std::to_string(lease_id_)}}, kCallTimeout,
                              [&](const json::object& message) {
                                const auto ttl = int64_field(message.at("result").as_object(), "TTL");
                                renewal = ttl && *ttl > 0 ? Renewal::renewed : Renewal::lease_gone;
                                return false;
                              });
    return end.idle || !end.error.empty() ? Renewal::failed : renewal;
  }

  // Every ttl/3 a keepalive; while etcd is unreachable, retries with
  // backoff; when the lease is gone (it expired, or etcd lost it), a new
  // lease and the key again.
  void keep_alive() {
    const milliseconds interval = std::max<milliseconds>(ttl_ / 3, 100ms);
    milliseconds wait = interval;
    milliseconds backoff = kFirstBackoff;
    bool lease_gone = false;
    for (;;) {
      client_.sleep(wait);
      bool retrying = false;
      if (client_.stopping()) return;
      if (!lease_gone) {
        const Renewal renewal = renew();
        if (client_.stopping()) return;
        lease_gone = renewal == Renewal::lease_gone;
        retrying = renewal == Renewal::failed;
      }
      if (lease_gone) {
        lease_gone = !register_once();
        retrying = lease_gone;
      }
      if (retrying) {
        wait = std::min(backoff, interval);
        backoff = std::min(backoff * 2, kLastBackoff);
      } else {
        wait = interval;
        backoff = kFirstBackoff;
      }
    }
  }

  EtcdUrl url_;
  std::string key_;
  std::string address_;
  std::chrono::seconds ttl_;
  EtcdClient client_;
  std::int64_t lease_id_ = 0;  // the object's thread's once started; 0: none
  std::thread thread_;
};

// ---- watching ----

// Ranges on the starting thread, then watches on its own, keeping the keys
// under the prefix as a map from key to address.
class Watcher final : public EtcdWatcher {
 public:
  Watcher(const EtcdUrl& url, std::string prefix, Changed changed, Error on_error)
      : prefix_(std::move(prefix)),
        range_end_(range_end_of(prefix_)),
        changed_(std::move(changed)),
        on_error_(std::move(on_error)),
        client_(url) {}

  ~Watcher() override {
    client_.stop();
    if (thread_.joinable()) thread_.join();
  }

  Outcome start() {
    if (auto ranged = range(); !ranged) return ranged;
    thread_ = std::thread([this] { watch(); });
    return codec::Done{};
  }

 private:
  // The current keys under the prefix and the revision they are at.
  Outcome range() {
    auto answer =
        client_.call("/v3/kv/range", {{"key", base64_encode(prefix_)}, {"range_end", base64_encode(range_end_)}});
    if (!answer) return answer.error();
    const json::object* header = object_field(*answer, "header");
    const auto revision = header != nullptr ? int64_field(*header, "revision") : std::nullopt;
    if (!revision) return malformed("/v3/kv/range", "no header revision");
    std::map<std::string, std::string> keys;
    if (const json::value* kvs = answer->if_contains("kvs")) {
      if (!kvs->is_array()) return malformed("/v3/kv/range", "kvs is not an array");
      for (const json::value& kv : kvs->get_array()) {
        if (!kv.is_object()) return malformed("/v3/kv/range", "a kv is not an object");
        const auto key = bytes_field(kv.get_object(), "key");
        const auto value = bytes_field(kv.get_object(), "value");
        if (!key || !value) return malformed("/v3/kv/range", "a key or value is not base64");
        keys[*key] = *value;
      }
    }
    keys_ = std::move(keys);
    revision_ = *revision;
    return codec::Done{};
  }

  // The events of one watch answer applied to keys_.
  Outcome apply(const json::array& events) {
    for (const json::value& event : events) {
      const json::object* kv = event.is_object() ? object_field(event.get_object(), "kv") : nullptr;
      if (kv == nullptr) return malformed("/v3/watch", "an event with no kv");
      const auto key = bytes_field(*kv, "key");
      const auto value = bytes_field(*kv, "value");
      if (!key || !value) return malformed("/v3/watch", "a key or value is not base64");
      // PUT is the enum's default, so the gateway leaves it out.
      if (string_field(event.get_object(), "type") == "DELETE") {
        keys_.erase(*key);
      } else {
        keys_[*key] = *value;
      }
      if (const auto revision = int64_field(*kv, "mod_revision"); revision && *revision > revision_) {
        revision_ = *revision;
      }
    }
    return codec::Done{};
  }

  std::string malformed(std::string_view target, std::string_view what) const {
    return "etcd at " + client_.name() + ": POST " + std::string(target) + ": malformed answer: " + std::string(what);
  }

  std::vector<std::string> addresses() const {
    std::vector<std::string> values;
    for (const auto& [key, value] : keys_) values.push_back(value);
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
    return values;
  }

  void report_if_changed() {
    auto now = addresses();
    if (now == reported_) return;
    reported_ = std::move(now);
    if (changed_) changed_(reported_);
  }

  void report_error(const std::string& message) {
    if (on_error_) on_error_(message);
  }

  // Watches from the range's revision on; when the watch is lost, ranges
  // again (with backoff while etcd does not answer) and watches again.
  void watch() {
    if (changed_) changed_(reported_ = addresses());
    milliseconds backoff = kFirstBackoff;
    for (;;) {
      const EtcdClient::StreamEnd outcome = watch_once(backoff);
      if (client_.stopping()) return;
      if (!outcome.idle) {
        report_error(outcome.error + "; watching again");
        client_.sleep(backoff);
        backoff = std::min(backoff * 2, kLastBackoff);
      }
      for (;;) {
        auto ranged = range();
        if (client_.stopping()) return;
        if (ranged) break;
        report_error(ranged.error() + "; retrying in " + std::to_string(backoff.count()) + " ms");
        client_.sleep(backoff);
        backoff = std::min(backoff * 2, kLastBackoff);
      }
      report_if_changed();
    }
  }

  // One watch stream, from revision_ + 1, until it fails or idles.
  EtcdClient::StreamEnd watch_once(milliseconds& backoff) {
    const json::object request{{"create_request",
                                {{"key", base64_encode(prefix_)},
                                 {"range_end", base64_encode(range_end_)},
                                 {"start_revision", std::to_string(revision_ + 1)}}}};
    std::string error;
    auto end = client_.stream("/v3/watch", request, kWatchIdleLimit, [&](const json::object& message) {
      const json::object& result = message.at("result").as_object();
      if (result.contains("created")) backoff = kFirstBackoff;  // etcd answers: the next loss starts afresh
      if (const json::value* canceled = result.if_contains("canceled"); canceled && canceled->is_bool() &&
                                                                        canceled->get_bool()) {
        const auto compacted = int64_field(result, "compact_revision");
        error = "etcd at " + client_.name() + " canceled the watch: " + string_field(result, "cancel_reason");
        if (compacted && *compacted > 0) error += " (compacted to revision " + std::to_string(*compacted) + ")";
        return false;
      }
      if (const json::value* events = result.if_contains("events")) {
        auto applied = events->is_array() ? apply(events->get_array())
                                          : Outcome(malformed("/v3/watch", "events is not an array"));
        if (!applied) {
          error = applied.error();
          return false;
        }
        report_if_changed();
      }
      return true;
    });
    if (!error.empty()) return {false, error};
    return {end.idle, end.error};
  }

  std::string prefix_;
  std::string range_end_;
  Changed changed_;
  Error on_error_;
  EtcdClient client_;
  // The object's thread's once started.
  std::map<std::string, std::string> keys_;
  std::int64_t revision_ = 0;
  std::vector<std::string> reported_;
  std::thread thread_;
};

}  // namespace

codec::Result<EtcdUrl, std::string> parse_etcd_url(const std::string& url, const EtcdTlsFiles& tls) {
  const std::string context = "etcd URL '" + url + "': ";
  const bool https = url.starts_with("https://");
  if (!https && !url.starts_with("http://")) return context + "expected http://HOST:PORT or https://HOST:PORT";
  if (!https && !tls.empty()) {
    return context + "--etcd-cacert, --etcd-cert and --etcd-key are for https:// endpoints; this one is http://";
  }
  const std::string_view kScheme = https ? "https://" : "http://";
  std::string_view authority = std::string_view(url).substr(kScheme.size());
  if (authority.ends_with('/')) authority.remove_suffix(1);
  if (authority.find('/') != std::string_view::npos) return context + "expected no path after HOST:PORT";
  if (authority.empty()) return context + "expected a host after " + std::string(kScheme);
  // No port: etcd's client port.
  const bool has_port =
      authority.front() == '[' ? !authority.ends_with(']') : authority.find(':') != std::string_view::npos;
  const std::string host_port = has_port ? std::string(authority) : std::string(authority) + ":2379";
  std::string error;
  const auto endpoint = transport::parse_endpoint(host_port, &error);
  if (!endpoint) return context + error;
  if (endpoint->port == 0) return context + "port must be from 1 to 65535";
  EtcdUrl parsed{endpoint->host, endpoint->port, nullptr};
  if (https) {
    auto made = tls_context(tls);
    if (!made) return made.error();
    parsed.tls = std::move(*made);
  }
  return parsed;
}

codec::Result<std::unique_ptr<EtcdRegistration>, std::string> EtcdRegistration::start(const EtcdUrl& url,
                                                                                      std::string prefix,
                                                                                      std::string address,
                                                                                      std::chrono::seconds ttl) {
  if (auto checked = check_url(url); !checked) return checked.error();
  if (ttl < 1s) return "etcd registration of " + address + ": ttl must be at least 1 s";
  if (address.empty()) return std::string("etcd registration: the address is empty");
  auto registration = std::make_unique<Registration>(url, prefix + address, address, ttl);
  if (auto started = registration->start(); !started) return started.error();
  return std::unique_ptr<EtcdRegistration>(std::move(registration));
}

codec::Result<std::unique_ptr<EtcdWatcher>, std::string> EtcdWatcher::start(const EtcdUrl& url, std::string prefix,
                                                                           Changed changed, Error on_error) {
  if (auto checked = check_url(url); !checked) return checked.error();
  auto watcher = std::make_unique<Watcher>(url, std::move(prefix), std::move(changed), std::move(on_error));
  if (auto started = watcher->start(); !started) return started.error();
  return std::unique_ptr<EtcdWatcher>(std::move(watcher));
}

}  // namespace fmwire::discovery
