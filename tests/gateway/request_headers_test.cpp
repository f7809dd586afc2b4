// What the gateway reads from a request's target and headers
// (gateway/request_headers.h): the path, a resumed stream's id,
// Last-Event-ID and X-Fmwire-Resumable.
#include <doctest/doctest.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "gateway/request_headers.h"

namespace fmwire::gateway {
namespace {

TEST_CASE("request_headers: Last-Event-ID is decimal digits up to 2^64 - 1, absent or empty meaning 0") {
  for (const auto& [header, id] : {std::pair<std::string, std::uint64_t>{"", 0},
                                   {"0", 0},
                                   {"42", 42},
                                   {"007", 7},
                                   {"18446744073709551615", UINT64_MAX}}) {
    CAPTURE(header);
    auto parsed = last_event_id_of(header);
    REQUIRE(parsed);
    CHECK(parsed.value() == id);
  }
}

TEST_CASE("request_headers: a Last-Event-ID with a sign, spaces, other characters or over 2^64 - 1 is a 400 naming it") {
  // strtoull took "-1" as 2^64 - 1 and " 5" as 5.
  const std::string with_nul("1\0", 2);
  const std::initializer_list<std::string_view> headers = {
      "-1", "+1", " 5", "5 ", "18446744073709551616", "99999999999999999999999", "abc", "1e3", "0x10", "1.0",
      with_nul};
  for (const std::string_view header : headers) {
    CAPTURE(header);
    auto parsed = last_event_id_of(header);
    REQUIRE_FALSE(parsed);
    CHECK(parsed.error().status == 400);
    CHECK(parsed.error().param == "Last-Event-ID");
  }
}

TEST_CASE("request_headers: the path is the target without its query, and /v1/streams/<id> names a stream") {
  CHECK(path_of("/v1/completions?stream=1") == "/v1/completions");
  CHECK(path_of("/v1/models") == "/v1/models");
  CHECK(path_of("?") == "");
  CHECK(resumed_stream_id("/v1/streams/cmpl-12ab") == std::optional<std::string_view>("cmpl-12ab"));
  CHECK_FALSE(resumed_stream_id("/v1/streams/"));
  CHECK_FALSE(resumed_stream_id("/v1/streams"));
  CHECK_FALSE(resumed_stream_id("/v1/stream"));
}

TEST_CASE("request_headers: X-Fmwire-Resumable asks for resumption with 1 or true only") {
  CHECK(resumable_requested("1"));
  CHECK(resumable_requested("true"));
  for (const std::string_view header : {"", "0", "false", "yes", "TRUE", " 1"}) {
    CAPTURE(header);
    CHECK_FALSE(resumable_requested(header));
  }
}

}  // namespace
}  // namespace fmwire::gateway
