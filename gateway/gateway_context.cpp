#include "gateway/gateway_context.h"

#include <algorithm>

namespace fmwire::gateway {
namespace {

// Compares without an early exit on the first differing byte.
bool constant_time_equal(std::string_view a, std::string_view b) {
  const std::size_t length = std::max(a.size(), b.size());
  unsigned char difference = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < length; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    difference |= static_cast<unsigned char>(x ^ y);
  }
  return difference == 0;
}

}  // namespace

GatewayContext::GatewayContext(HttpGatewayOptions options)
    : options_(std::move(options)),
      defaults_{options_.model, options_.max_tokens_default},
      metrics_(HttpMetrics::kDefaultWorkerLoadTtl, options_.http_threads) {}

std::shared_ptr<void> GatewayContext::activity() {
  active_.fetch_add(1);
  return std::shared_ptr<void>(nullptr, [this](void*) { active_.fetch_sub(1); });
}

bool GatewayContext::authorized(std::string_view authorization) const {
  if (options_.api_keys.empty()) return true;
  constexpr std::string_view kBearer = "Bearer ";
  if (!authorization.starts_with(kBearer)) return false;
  const std::string_view key = authorization.substr(kBearer.size());
  bool match = false;
  for (const std::string& allowed : options_.api_keys) match |= constant_time_equal(key, allowed);
  return match;
}

bool GatewayContext::upstream_ready() const {
  return std::any_of(upstreams_.begin(), upstreams_.end(), [](const Client* client) { return client->connected(); });
}

}  // namespace fmwire::gateway
