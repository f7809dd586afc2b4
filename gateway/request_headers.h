// What the gateway reads from a request's target and headers besides the
// API key, as plain functions apart from I/O (http_session.cpp calls them;
// tests/fuzz/http_request_fuzz.cpp fuzzes them): the path, the id of a
// resumable stream asked for again, Last-Event-ID and X-Fmwire-Resumable.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "codec/codec_error.h"
#include "gateway/openai_api.h"

namespace fmwire::gateway {

// The target without its query ("/v1/completions?x=1" -> "/v1/completions").
std::string_view path_of(std::string_view target);

// The <id> of GET /v1/streams/<id>; none for any other path or an empty id.
std::optional<std::string_view> resumed_stream_id(std::string_view path);

// Last-Event-ID: the last SSE event id the reader has, decimal digits only
// (no sign, no spaces, no overflow: RFC 8895 ids are whatever the server
// sent, and this gateway sends 1, 2, ...). Absent or empty: 0, nothing yet.
// Anything else is a 400 naming the header.
codec::Result<std::uint64_t, ApiError> last_event_id_of(std::string_view header);

// X-Fmwire-Resumable: "1" or "true" ask for a resumable stream.
bool resumable_requested(std::string_view header);

}  // namespace fmwire::gateway
