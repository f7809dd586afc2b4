#include "gateway/request_headers.h"

#include <charconv>

namespace fmwire::gateway {

std::string_view path_of(std::string_view target) { return target.substr(0, target.find('?')); }

std::optional<std::string_view> resumed_stream_id(std::string_view path) {
  constexpr std::string_view kStreams = "/v1/streams/";
  if (!path.starts_with(kStreams) || path.size() == kStreams.size()) return std::nullopt;
  return path.substr(kStreams.size());
}

codec::Result<std::uint64_t, ApiError> last_event_id_of(std::string_view header) {
  if (header.empty()) return std::uint64_t{0};
  std::uint64_t id = 0;
  const char* end = header.data() + header.size();
  const auto [stopped, error] = std::from_chars(header.data(), end, id);
  // from_chars takes no sign or space; a '-' or '+' leaves it at the front.
  if (error != std::errc{} || stopped != end) {
    return bad_request("Last-Event-ID must be a non-negative decimal integer below 2^64", "Last-Event-ID");
  }
  return id;
}

bool resumable_requested(std::string_view header) { return header == "1" || header == "true"; }

}  // namespace fmwire::gateway
