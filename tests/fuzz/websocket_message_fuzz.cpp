// libFuzzer target: arbitrary bytes as what a client sends on GET
// /v1/stream once the upgrade is answered. The gateway's WebSocket is
// Beast's (gateway/websocket_sink.cpp), configured here as the sink
// configures it (server role, read_message_max of the body limit); every
// message it reads goes through the gateway's own reading of a request
// message (parse_any_api_request), as the sink's first message does. No
// socket: Beast's test stream, the fuzz bytes its input. Besides no crash
// and no sanitizer report: a message is parsed as the endpoint its
// "messages" field says. Run by scripts/fuzz.sh.
#include <boost/asio/io_context.hpp>
#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <boost/json.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "gateway/http_gateway.h"
#include "gateway/openai_api.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using namespace fmwire::gateway;

void require(bool condition) {
  if (!condition) std::abort();
}

http::request<http::string_body> upgrade_request() {
  http::request<http::string_body> request{http::verb::get, "/v1/stream", 11};
  request.set(http::field::host, "127.0.0.1");
  request.set(http::field::upgrade, "websocket");
  request.set(http::field::connection, "upgrade");
  request.set(http::field::sec_websocket_key, "dGhlIHNhbXBsZSBub25jZQ==");
  request.set(http::field::sec_websocket_version, "13");
  return request;
}

void check_message(const std::string& message) {
  static const ApiDefaults defaults{.model = "builtin", .max_tokens = 16};
  auto parsed = parse_any_api_request(message, defaults);
  boost::system::error_code error;
  const boost::json::value document = boost::json::parse(message, error);
  const bool chat = !error && document.is_object() && document.get_object().contains("messages");
  auto as_kind = parse_api_request(chat ? ApiKind::chat : ApiKind::completions, message, defaults);
  require(static_cast<bool>(parsed) == static_cast<bool>(as_kind));
  if (parsed) require(parsed->kind == (chat ? ApiKind::chat : ApiKind::completions));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const HttpGatewayOptions options;
  boost::asio::io_context io;
  beast::test::stream client(io);
  websocket::stream<beast::test::stream> socket(io);
  socket.next_layer().connect(client);
  socket.read_message_max(options.max_body_bytes);
  beast::error_code error;
  socket.accept(upgrade_request(), error);
  require(!error);
  // What the client sends, then its end of the connection goes.
  socket.next_layer().append(beast::string_view(reinterpret_cast<const char*>(data), size));
  client.close();
  beast::flat_buffer buffer;
  for (int messages = 0; messages < 64; ++messages) {
    socket.read(buffer, error);
    if (error) break;
    check_message(beast::buffers_to_string(buffer.data()));
    buffer.consume(buffer.size());
  }
  return 0;
}
