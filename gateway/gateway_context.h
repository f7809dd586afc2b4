// What every HTTP thread of one gateway shares: its options, metrics, API
// keys, the resumable streams, the count of requests under way (for drain)
// and the upstream's readiness. Thread-safe; touched once per request, never
// per token (the per-token path stays on one HTTP thread: http_thread.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "gateway/http_gateway.h"
#include "gateway/http_metrics.h"
#include "gateway/openai_api.h"
#include "gateway/resumable_registry.h"
#include "transport/client.h"

namespace fmwire::gateway {

class GatewayContext {
 public:
  // options.http_threads resolved (not 0): one TokenTimings each.
  explicit GatewayContext(HttpGatewayOptions options);

  const HttpGatewayOptions& options() const { return options_; }
  const ApiDefaults& defaults() const { return defaults_; }
  HttpMetrics& metrics() { return metrics_; }
  ResumableRegistry& resumable() { return resumable_; }

  // Held while a request is being answered; drain() waits for none.
  std::shared_ptr<void> activity();
  std::int64_t requests_under_way() const { return active_.load(); }

  bool authorized(std::string_view authorization) const;

  // The HTTP threads' upstream clients, given once before the gateway
  // serves. Ready (/ready) while any of their connections is up: the
  // connections the gateway serves with, not a probe of its own.
  void set_upstreams(std::vector<const Client*> upstreams) { upstreams_ = std::move(upstreams); }
  bool upstream_ready() const;

 private:
  HttpGatewayOptions options_;
  ApiDefaults defaults_;
  HttpMetrics metrics_;
  ResumableRegistry resumable_;
  std::atomic<std::int64_t> active_{0};
  std::vector<const Client*> upstreams_;
};

}  // namespace fmwire::gateway
