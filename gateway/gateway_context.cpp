#include "gateway/gateway_context.h"

#include <algorithm>
#include <utility>

namespace fmwire::gateway {

GatewayContext::GatewayContext(HttpGatewayOptions options, std::unique_ptr<TlsContext> tls)
    : options_(std::move(options)),
      tls_(std::move(tls)),
      api_keys_(options_.api_keys),
      defaults_{options_.model, options_.max_tokens_default},
      metrics_(HttpMetrics::kDefaultWorkerLoadTtl, options_.http_threads) {
  forget_api_keys(options_.api_keys);
  if (options_.rate_limits.any()) limiter_.emplace(options_.rate_limits, options_.rate_limit_addresses);
}

std::shared_ptr<void> GatewayContext::activity() {
  active_.fetch_add(1);
  return std::shared_ptr<void>(nullptr, [this](void*) { active_.fetch_sub(1); });
}

std::optional<Caller> GatewayContext::authenticate(std::string_view authorization, std::string_view address) const {
  Caller caller;
  if (api_keys_.empty()) {
    if (limits_by_address()) caller.bucket = address;
    return caller;
  }
  constexpr std::string_view kBearer = "Bearer ";
  if (!authorization.starts_with(kBearer)) return std::nullopt;
  const std::optional<KeyHash> key = api_keys_.find(authorization.substr(kBearer.size()));
  if (!key) return std::nullopt;
  caller.key = *key;
  if (limiter_) caller.bucket.assign(reinterpret_cast<const char*>(key->data()), key->size());
  return caller;
}

codec::Result<std::shared_ptr<TokenCharge>, ApiError> GatewayContext::admit(const Caller& caller,
                                                                            std::uint32_t requests,
                                                                            std::uint32_t max_tokens) {
  if (!limiter_) return std::shared_ptr<TokenCharge>();
  const RateLimits& limits = limiter_->limits();
  const std::uint32_t requests_taken = limits.requests_per_s > 0 ? requests : 0;
  const std::uint32_t tokens_taken = limits.tokens_per_minute > 0 ? max_tokens : 0;
  if (auto refusal = limiter_->admit(caller.bucket, requests_taken, tokens_taken, RateLimiter::Clock::now())) {
    ApiError error;
    error.status = 429;
    error.message = std::move(refusal->message);
    error.type = std::move(refusal->limit);
    error.code = "rate_limit_exceeded";
    error.retry_after_s = refusal->retry_after_s;
    return error;
  }
  if (tokens_taken == 0) return std::shared_ptr<TokenCharge>();
  return std::make_shared<TokenCharge>(*limiter_, caller.bucket, tokens_taken);
}

bool GatewayContext::upstream_ready() const {
  return std::any_of(upstreams_.begin(), upstreams_.end(), [](const Client* client) { return client->connected(); });
}

}  // namespace fmwire::gateway
