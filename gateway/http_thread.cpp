#include "gateway/http_thread.h"

#include <pthread.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <cstdio>
#include <iterator>

#include "gateway/gateway_context.h"
#include "gateway/gateway_stream.h"
#include "gateway/http_limits.h"
#include "log/log.h"
#include "gateway/random_id.h"

namespace fmwire::gateway {

namespace asio = boost::asio;

HttpThread::HttpThread(GatewayContext& context, unsigned index)
    : context_(context),
      index_(index),
      work_(io_.get_executor()),
      token_timings_(context.metrics().token_timings(index)) {}

HttpThread::~HttpThread() {
  stop();
  close_upstream();
}

void HttpThread::connect_upstream(bool wait) {
  const HttpGatewayOptions& options = context_.options();
  ClientOptions client_options;
  client_options.backend = options.io_backend;
  client_options.connect_timeout = kUpstreamConnectTimeout;
  client_options.connection.initial_stream_credit_bytes = kStreamCreditBytes;
  client_options.connection.keepalive_interval = options.upstream_keepalive;
  client_options.connection.dead_after = options.upstream_dead_after;
  client_options.connection.tls = options.upstream_tls;
  client_options.connection.auth_token = options.upstream_auth_token;
  client_options.on_turn_end = [this] { hand_over(); };
  // Failovers in the log: which router each HTTP thread's connection went
  // to, when it was lost and why; "none accepts" once until one does.
  client_options.on_connection_change = [index = index_, told_none = false](const ConnectionChange& change) mutable {
    switch (change.kind) {
      case ConnectionChange::Kind::connected:
        told_none = false;
        log::info("upstream router connected", {{"router", change.endpoint}, {"http_thread", index}});
        return;
      case ConnectionChange::Kind::lost:
        log::warn("upstream router lost", {{"router", change.endpoint}, {"http_thread", index}, {"why", change.why}});
        return;
      case ConnectionChange::Kind::none_accepts:
        if (!told_none) log::error("no upstream router accepts", {{"http_thread", index}, {"why", change.why}});
        told_none = true;
        return;
    }
  };
  if (wait && !options.upstreams.empty()) {
    auto connected = Client::connect(in_own_order(options.upstreams), client_options);
    if (connected) {
      upstream_ = std::move(*connected);
      return;
    }
  }
  upstream_ = Client::connect_in_background(in_own_order(options.upstreams), client_options);
}

void HttpThread::set_upstreams(const std::vector<transport::Endpoint>& upstreams) {
  upstream_->set_endpoints(in_own_order(upstreams));
}

std::vector<transport::Endpoint> HttpThread::in_own_order(std::vector<transport::Endpoint> upstreams) const {
  if (!upstreams.empty()) std::rotate(upstreams.begin(), upstreams.begin() + index_ % upstreams.size(), upstreams.end());
  return upstreams;
}

void HttpThread::start() {
  thread_ = std::thread([this] {
    char name[16];
    std::snprintf(name, sizeof name, "fmwire-http-%u", index_ % 100);
    pthread_setname_np(pthread_self(), name);  // named so that per-thread CPU can be told apart
    io_.run();
  });
}

void HttpThread::stop() {
  work_.reset();
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

StreamIdentity HttpThread::new_identity(ApiKind kind) {
  return StreamIdentity{kind, std::string(kind == ApiKind::chat ? "chatcmpl-" : "cmpl-") + random_id_128(),
                        unix_seconds(), context_.options().model};
}

// The end of the client's loop turn (its loop thread): what the turn's
// callbacks gathered (a step's tokens for every stream) goes over in one
// go, with one lock and at most one post (an allocation and a wake-up),
// where a post per token would cost those per token.
void HttpThread::hand_over() {
  turn_now_.reset();
  if (gathered_.empty()) return;
  bool wake = false;
  {
    std::lock_guard lock(mailbox_mutex_);
    if (mailbox_.empty()) {
      mailbox_.swap(gathered_);  // vectors trade places, capacity and all: no allocation once warm
    } else {
      mailbox_.insert(mailbox_.end(), std::make_move_iterator(gathered_.begin()),
                      std::make_move_iterator(gathered_.end()));
    }
    wake = !posted_;
    posted_ = true;
  }
  gathered_.clear();
  if (wake) asio::post(io_, [this] { take_deliveries(); });
}

void HttpThread::take_deliveries() {
  {
    std::lock_guard lock(mailbox_mutex_);
    taking_.swap(mailbox_);
    posted_ = false;
  }
  // Every stream here is this thread's: its handlers run inline.
  for (Delivery& delivery : taking_) {
    if (delivery.other) {
      delivery.other();
    } else {
      delivery.stream->on_chunk(std::move(delivery.text), delivery.wire_bytes);
    }
  }
  taking_.clear();
}

}  // namespace fmwire::gateway
