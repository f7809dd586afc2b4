// What every HTTP thread of one gateway shares: its options, metrics, API
// keys (hashed: api_keys.h), rate limits, the resumable streams, the count
// of requests under way (for drain) and the upstream's readiness.
// Thread-safe; touched once per request, never per token (the per-token
// path stays on one HTTP thread: http_thread.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "codec/codec_error.h"
#include "gateway/api_keys.h"
#include "gateway/http_gateway.h"
#include "gateway/http_metrics.h"
#include "gateway/openai_api.h"
#include "gateway/rate_limiter.h"
#include "gateway/resumable_registry.h"
#include "gateway/tls_context.h"
#include "transport/client.h"

namespace fmwire::gateway {

// Who sent a request: its API key's hash (all zeros when the gateway takes
// no keys: every caller is the same one), and the name of its rate-limit
// buckets (the key's hash, or the client's address when there are no keys;
// empty when nothing is limited).
struct Caller {
  KeyHash key{};
  std::string bucket;
};

class GatewayContext {
 public:
  // options.http_threads resolved (not 0): one TokenTimings each. The
  // clear-text options.api_keys are hashed, then overwritten and dropped.
  // `tls`: HTTPS (null: plain HTTP).
  GatewayContext(HttpGatewayOptions options, std::unique_ptr<TlsContext> tls);

  const HttpGatewayOptions& options() const { return options_; }
  const ApiDefaults& defaults() const { return defaults_; }
  HttpMetrics& metrics() { return metrics_; }
  ResumableRegistry& resumable() { return resumable_; }

  // Held while a request is being answered; drain() waits for none.
  std::shared_ptr<void> activity();
  std::int64_t requests_under_way() const { return active_.load(); }

  TlsContext* tls() const { return tls_.get(); }
  const ApiKeys& api_keys() const { return api_keys_; }
  // Whether callers are told apart by their address (limits, and no keys):
  // then authenticate() needs it.
  bool limits_by_address() const { return limiter_.has_value() && api_keys_.empty(); }
  // The caller of a request with this Authorization header, from `address`;
  // none when the gateway has keys and this is not one of them (a 401).
  std::optional<Caller> authenticate(std::string_view authorization, std::string_view address) const;
  // Takes `requests` and `max_tokens` from the caller's rate limits: the
  // charge to settle at the generation's end (null when tokens are not
  // limited or none were asked for), or a 429 with Retry-After.
  codec::Result<std::shared_ptr<TokenCharge>, ApiError> admit(const Caller& caller, std::uint32_t requests,
                                                              std::uint32_t max_tokens);

  // The HTTP threads' upstream clients, given once before the gateway
  // serves. Ready (/ready) while any of their connections is up: the
  // connections the gateway serves with, not a probe of its own.
  void set_upstreams(std::vector<const Client*> upstreams) { upstreams_ = std::move(upstreams); }
  bool upstream_ready() const;

 private:
  HttpGatewayOptions options_;
  std::unique_ptr<TlsContext> tls_;
  ApiKeys api_keys_;
  std::optional<RateLimiter> limiter_;  // none without --rate-limit
  ApiDefaults defaults_;
  HttpMetrics metrics_;
  ResumableRegistry resumable_;
  std::atomic<std::int64_t> active_{0};
  std::vector<const Client*> upstreams_;
};

}  // namespace fmwire::gateway
