// libFuzzer target: arbitrary bytes as what a client sends the gateway,
// read with Beast's request parser under the gateway's header and body
// limits, then through the gateway's own reading of the target and headers
// (gateway/request_headers.h: path, resumed stream id, Last-Event-ID,
// X-Fmwire-Resumable) as http_session.cpp reads them. The bytes are also
// taken whole as a Last-Event-ID value. Besides no crash and no sanitizer
// report: an accepted Last-Event-ID is the number its digits say.
// Run by scripts/fuzz.sh.
#include <boost/beast/core/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "gateway/http_gateway.h"
#include "gateway/request_headers.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using namespace fmwire::gateway;

void require(bool condition) {
  if (!condition) std::abort();
}

void check_last_event_id(std::string_view header) {
  auto parsed = last_event_id_of(header);
  if (!parsed) {
    require(parsed.error().status == 400 && parsed.error().param == "Last-Event-ID");
    return;
  }
  // The digits, less leading zeros, are the number.
  std::string_view digits = header;
  while (digits.size() > 1 && digits.front() == '0') digits.remove_prefix(1);
  require(header.empty() ? parsed.value() == 0 : std::to_string(parsed.value()) == digits);
}

std::uint64_t sink = 0;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  check_last_event_id(bytes);

  static const HttpGatewayOptions options;
  http::request_parser<http::string_body> parser;
  parser.header_limit(static_cast<std::uint32_t>(options.max_header_bytes));
  parser.body_limit(options.max_body_bytes);
  parser.eager(true);
  beast::error_code error;
  parser.put(boost::asio::buffer(bytes.data(), bytes.size()), error);
  if (error || !parser.is_header_done()) return 0;

  const auto& request = parser.get();
  const std::string_view path = path_of(request.target());
  require(path.size() <= request.target().size());
  if (const auto id = resumed_stream_id(path)) {
    require(!id->empty());
    check_last_event_id(request["Last-Event-ID"]);
  }
  sink += resumable_requested(request["X-Fmwire-Resumable"]);
  sink += beast::iequals(request[http::field::expect], "100-continue");
  sink += beast::websocket::is_upgrade(request);
  sink += request.keep_alive();
  return 0;
}
