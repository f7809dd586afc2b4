#include "gateway/http_listener.h"

#include <pthread.h>

#include <algorithm>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <cstdio>
#include <iostream>

#include "gateway/gateway_stream.h"
#include "gateway/http_session.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

constexpr auto kProbeWhileDown = 250ms;  // /ready: how often an unreachable upstream is tried again
constexpr auto kProbeWhileUp = 2s;       // ... and a reachable one checked
constexpr auto kUpstreamConnectTimeout = 2000ms;

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

HttpListener::HttpListener(HttpGatewayOptions options)
    : options_(std::move(options)), acceptor_(ioc_), defaults_{options_.model, options_.max_tokens_default} {}

HttpListener::~HttpListener() { stop(); }

std::optional<std::string> HttpListener::listen() {
  beast::error_code error;
  const auto address = asio::ip::make_address(options_.listen.host, error);
  if (error) return "bad listen address " + options_.listen.host + ": " + error.message();
  const tcp::endpoint endpoint(address, options_.listen.port);
  acceptor_.open(endpoint.protocol(), error);
  if (!error) acceptor_.set_option(asio::socket_base::reuse_address(true), error);
  if (!error) acceptor_.bind(endpoint, error);
  if (!error) acceptor_.listen(asio::socket_base::max_listen_connections, error);
  if (error) return "cannot listen on " + options_.listen.to_string() + ": " + error.message();
  port_ = acceptor_.local_endpoint().port();
  return std::nullopt;
}

void HttpListener::run() {
  if (options_.api_keys.empty()) {
    std::cerr << "fmwire gateway: no API keys: the API is open to anyone who can reach it" << std::endl;
  }
  probe_upstream();  // once now, so that a reachable upstream is ready at once
  watcher_ = std::thread([this] { watch_upstream(); });
  accept();
  const unsigned count = options_.http_threads != 0 ? options_.http_threads
                                                    : std::max(1u, std::thread::hardware_concurrency() / 4);
  for (unsigned i = 0; i < count; ++i) {
    threads_.emplace_back([this] {
      pthread_setname_np(pthread_self(), "fmwire-http");  // named so that per-thread CPU can be told apart
      ioc_.run();
    });
  }
}

void HttpListener::drain(std::chrono::milliseconds grace) {
  asio::post(ioc_, [this] {
    beast::error_code ignored;
    acceptor_.close(ignored);
  });
  const Clock::time_point deadline = Clock::now() + grace;
  while (active_.load() > 0 && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
  stop();
}

std::shared_ptr<void> HttpListener::activity() {
  active_.fetch_add(1);
  return std::shared_ptr<void>(nullptr, [this](void*) { active_.fetch_sub(1); });
}

Client* HttpListener::client() {
  std::lock_guard lock(client_mutex_);
  return client_.get();
}

void HttpListener::upstream_failed(const ClientError& error) {
  // The client's own findings about the connection: the upstream is gone.
  if (error.code == protocol::ErrorCode::NO_WORKER && error.message.starts_with("cannot connect")) ready_ = false;
  if (error.code == protocol::ErrorCode::WORKER_LOST && error.message.starts_with("connection closed")) ready_ = false;
}

ApiError HttpListener::unreachable() const {
  ApiError error;
  error.status = 503;
  error.type = "server_error";
  error.code = "no_worker";
  error.message = "the upstream " + options_.upstream.to_string() + " is not reachable";
  error.retry_after_s = 1;
  return error;
}

bool HttpListener::authorized(std::string_view authorization) const {
  if (options_.api_keys.empty()) return true;
  constexpr std::string_view kBearer = "Bearer ";
  if (!authorization.starts_with(kBearer)) return false;
  const std::string_view key = authorization.substr(kBearer.size());
  bool match = false;
  for (const std::string& allowed : options_.api_keys) match |= constant_time_equal(key, allowed);
  return match;
}

std::string HttpListener::new_stream_id(ApiKind kind) {
  std::lock_guard lock(random_mutex_);
  char hex[40];
  std::snprintf(hex, sizeof hex, "%016llx%08llx", static_cast<unsigned long long>(random_()),
                static_cast<unsigned long long>(random_() & 0xffffffffu));
  return std::string(kind == ApiKind::chat ? "chatcmpl-" : "cmpl-") + hex;
}

// From the client's loop thread. Deliveries gather and go to the HTTP
// threads with one post per batch (a loop turn's worth: a step's token for
// every stream), not one post (an allocation, a lock, maybe a wake-up)
// per token; on an HTTP thread each goes to its stream's strand, run at
// once when the strand is free.
void HttpListener::deliver(Delivery delivery) {
  std::lock_guard lock(deliveries_mutex_);
  deliveries_.push_back(std::move(delivery));
  if (delivery_posted_) return;
  delivery_posted_ = true;
  asio::post(ioc_, [this] { hand_out_deliveries(); });
}

void HttpListener::accept() {
  acceptor_.async_accept(asio::make_strand(ioc_), [this](beast::error_code error, tcp::socket socket) {
    if (error == asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (!error) {
      beast::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      std::make_shared<HttpSession>(*this, std::move(socket))->run();
    }
    accept();
  });
}

void HttpListener::probe_upstream() {
  ClientOptions client_options;
  client_options.backend = options_.io_backend;
  client_options.connect_timeout = kUpstreamConnectTimeout;
  client_options.connection.initial_stream_credit_bytes = kStreamCreditBytes;
  auto connected = Client::connect(options_.upstream, client_options);
  if (!connected) {
    ready_ = false;
    return;
  }
  std::lock_guard lock(client_mutex_);
  // The first connection stays as the gateway's client (it reconnects by
  // itself); later probes only say whether the upstream answers.
  if (!client_) {
    client_ = std::shared_ptr<Client>(std::move(*connected));
    // For /metrics: the workers' loads. The watch keeps the client
    // connected, and subscribed again after the upstream was away.
    client_->watch_load([this](const WorkerLoad& load) { metrics_.observe_worker_load(load); });
  }
  ready_ = true;
}

void HttpListener::watch_upstream() {
  std::unique_lock lock(watcher_mutex_);
  while (!stopping_) {
    const auto interval = ready_ ? kProbeWhileUp : kProbeWhileDown;
    if (watcher_wake_.wait_for(lock, interval, [this] { return stopping_; })) break;
    lock.unlock();
    probe_upstream();
    lock.lock();
  }
}

void HttpListener::stop() {
  {
    std::lock_guard lock(watcher_mutex_);
    if (stopped_) return;
    stopped_ = stopping_ = true;
  }
  watcher_wake_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  ioc_.stop();
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
  // The loop threads are gone: nothing calls into the client any more. Its
  // streams end (the router cancels them with the connection); their last
  // callbacks post to the stopped context and are dropped with it.
  std::shared_ptr<Client> client;
  {
    std::lock_guard lock(client_mutex_);
    client.swap(client_);
  }
  client.reset();
  {
    std::lock_guard lock(deliveries_mutex_);
    deliveries_.clear();
  }
  resumable_.clear();
}

// One batch, then posted again if more came meanwhile (other HTTP work
// gets its turn between batches).
void HttpListener::hand_out_deliveries() {
  {
    std::lock_guard lock(deliveries_mutex_);
    handing_out_.swap(deliveries_);
  }
  for (Delivery& delivery : handing_out_) {
    // A copy, not a reference: the handler, run inline, may drop the last
    // hold on the stream (and its executor) while dispatch is still running.
    const GatewayStream::Executor executor = delivery.stream->executor();
    if (delivery.other) {
      asio::dispatch(executor, std::move(delivery.other));
      continue;
    }
    asio::dispatch(executor, [stream = std::move(delivery.stream), text = std::move(delivery.text),
                              wire_bytes = delivery.wire_bytes]() mutable {
      stream->on_chunk(std::move(text), wire_bytes);
    });
  }
  handing_out_.clear();
  std::lock_guard lock(deliveries_mutex_);
  if (deliveries_.empty()) {
    delivery_posted_ = false;
    return;
  }
  asio::post(ioc_, [this] { hand_out_deliveries(); });
}

// ------------------------------------------------------------------ HttpGateway

codec::Result<std::unique_ptr<HttpGateway>, std::string> HttpGateway::start(HttpGatewayOptions options) {
  if (options.max_body_bytes == 0) return std::string("max_body_bytes must be positive");
  if (options.max_header_bytes == 0 || options.max_header_bytes > 0xffffffffu) {
    return std::string("max_header_bytes must be from 1 to 2^32 - 1");
  }
  if (options.max_tokens_default == 0) return std::string("max_tokens_default must be positive");
  if (options.replay_events == 0) return std::string("replay_events must be positive");
  if (options.model.empty()) return std::string("the model name is empty");
  auto gateway = std::make_unique<HttpListener>(std::move(options));
  if (auto problem = gateway->listen()) return *problem;
  gateway->run();
  return std::unique_ptr<HttpGateway>(std::move(gateway));
}

}  // namespace fmwire::gateway
