// libFuzzer target: arbitrary bytes as the body of POST /v1/completions and
// /v1/chat/completions, and as a WebSocket request message, through the
// JSON -> GenerateParams mapping (gateway/openai_api.h). Besides no crash
// and no sanitizer report: every answer is a parameter set within the
// documented bounds or an error that names a status the gateway sends.
// Run by scripts/fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "gateway/openai_api.h"

namespace {

using namespace fmwire::gateway;

void require(bool condition) {
  if (!condition) std::abort();
}

void check(const fmwire::codec::Result<ApiRequest, ApiError>& parsed) {
  if (!parsed) {
    const ApiError& error = parsed.error();
    require(error.status == 400 || error.status == 404);
    require(!error.message.empty());
    return;
  }
  const fmwire::GenerateParams& params = parsed->params;
  require(params.max_tokens > 0);
  require(params.temperature >= 0.0f && params.temperature <= 2.0f);
  require(params.top_p > 0.0f && params.top_p <= 1.0f);
  require(params.stop_sequences.size() <= 16);
  for (const std::string& stop : params.stop_sequences) require(!stop.empty());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  static const ApiDefaults defaults{.model = "builtin", .max_tokens = 16};
  check(parse_api_request(ApiKind::completions, body, defaults));
  check(parse_api_request(ApiKind::chat, body, defaults));
  check(parse_any_api_request(body, defaults));
  return 0;
}
