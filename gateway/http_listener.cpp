#include "gateway/http_listener.h"

#include <algorithm>
#include <boost/asio/post.hpp>
#include <thread>

#include "gateway/http_session.h"
#include "log/log.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

constexpr unsigned kMaxHttpThreads = 256;
// After an accept error (out of descriptors, say) before trying again:
// at once would spin on the same error.
constexpr auto kAcceptRetryDelay = 100ms;

}  // namespace

HttpListener::HttpListener(HttpGatewayOptions options, std::unique_ptr<TlsContext> tls)
    : context_(std::move(options), std::move(tls)) {
  for (unsigned i = 0; i < context_.options().http_threads; ++i) {
    threads_.push_back(std::make_unique<HttpThread>(context_, i));
  }
}

HttpListener::~HttpListener() { stop(); }

std::optional<std::string> HttpListener::listen() {
  const HttpGatewayOptions& options = context_.options();
  beast::error_code error;
  const auto address = asio::ip::make_address(options.listen.host, error);
  if (error) return "bad listen address " + options.listen.host + ": " + error.message();
  const tcp::endpoint endpoint(address, options.listen.port);
  acceptor_.emplace(threads_.front()->io());
  accept_retry_.emplace(threads_.front()->io());
  acceptor_->open(endpoint.protocol(), error);
  if (!error) acceptor_->set_option(asio::socket_base::reuse_address(true), error);
  if (!error) acceptor_->bind(endpoint, error);
  if (!error) acceptor_->listen(asio::socket_base::max_listen_connections, error);
  if (error) return "cannot listen on " + options.listen.to_string() + ": " + error.message();
  port_ = acceptor_->local_endpoint().port();
  return std::nullopt;
}

void HttpListener::run() {
  if (context_.api_keys().empty()) {
    log::warn("no API keys: the API is open to anyone who can reach it");
  }
  // The first thread's client is connected before serving, so that a
  // reachable upstream is ready at once; the others connect meanwhile.
  for (std::size_t i = 0; i < threads_.size(); ++i) threads_[i]->connect_upstream(i == 0);
  std::vector<const Client*> upstreams;
  for (const auto& thread : threads_) upstreams.push_back(thread->upstream_if_any());
  context_.set_upstreams(std::move(upstreams));
  // For /metrics: the workers' loads, from one client (a router reports
  // every worker on each connection; one watch is enough). The watch keeps
  // that client connected, and subscribed again after the upstream was away.
  threads_.front()->upstream().watch_load(
      [&metrics = context_.metrics()](const WorkerLoad& load) { metrics.observe_worker_load(load); });
  accept();
  if (context_.tls() != nullptr && context_.options().reload_tls_on_sighup) {
    hangup_.emplace(threads_.front()->io(), SIGHUP);
    wait_for_hangup();
  }
  for (const auto& thread : threads_) thread->start();
}

void HttpListener::drain(std::chrono::milliseconds grace) {
  if (stopped_.load()) return;
  asio::post(threads_.front()->io(), [this] {
    beast::error_code ignored;
    acceptor_->close(ignored);
    accept_retry_->cancel();
  });
  const Clock::time_point deadline = Clock::now() + grace;
  while (context_.requests_under_way() > 0 && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
  stop();
}

// On the first thread. The accepted socket belongs to the next thread's
// io_context: its session is made, and runs, there.
void HttpListener::accept() {
  HttpThread& next = *threads_[next_thread_];
  next_thread_ = (next_thread_ + 1) % threads_.size();
  acceptor_->async_accept(next.io(), [this, &next](beast::error_code error, tcp::socket socket) {
    if (error == asio::error::operation_aborted || !acceptor_->is_open()) return;
    if (error) {
      log::error("accept failed, trying again", {{"why", error.message()}, {"retry_ms", kAcceptRetryDelay.count()}});
      accept_retry_->expires_after(kAcceptRetryDelay);
      accept_retry_->async_wait([this](beast::error_code waited) {
        if (!waited) accept();
      });
      return;
    }
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    asio::post(next.io(), [&next, socket = std::move(socket)]() mutable {
      std::make_shared<HttpSession>(next, std::move(socket))->run();
    });
    accept();
  });
}

// SIGHUP: the certificate and key read again (a renewed certificate).
void HttpListener::wait_for_hangup() {
  hangup_->async_wait([this](beast::error_code error, int) {
    if (error) return;
    if (auto problem = reload_tls()) {
      log::error("SIGHUP: TLS certificate not reloaded, still serving the one loaded before", {{"why", *problem}});
    } else {
      log::info("SIGHUP: TLS certificate loaded again", {{"cert", context_.tls()->cert_file()}});
    }
    wait_for_hangup();
  });
}

std::optional<std::string> HttpListener::reload_tls() {
  if (context_.tls() == nullptr) return std::string("the gateway serves plain HTTP: no certificate to reload");
  return context_.tls()->reload();
}

void HttpListener::set_upstreams(std::vector<transport::Endpoint> upstreams) {
  std::lock_guard lock(upstreams_mutex_);
  if (stopped_.load()) return;
  for (const auto& thread : threads_) thread->set_upstreams(upstreams);
}

void HttpListener::stop() {
  std::lock_guard lock(upstreams_mutex_);
  if (stopped_.exchange(true)) return;
  // Every thread ends before any client goes (another thread's /ready reads
  // them all), and every client before any io_context: a stream, its sink
  // and its timers live on one of those.
  for (const auto& thread : threads_) thread->stop();
  for (const auto& thread : threads_) thread->close_upstream();
  context_.resumable().clear();
  accept_retry_.reset();
  hangup_.reset();
  acceptor_.reset();
  threads_.clear();
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
  if (options.http_threads > kMaxHttpThreads) {
    return "http_threads is " + std::to_string(options.http_threads) + "; at most " + std::to_string(kMaxHttpThreads);
  }
  if (options.http_threads == 0) options.http_threads = std::max(1u, std::thread::hardware_concurrency() / 4);
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return std::string("HTTPS takes both a certificate (--tls-cert) and its key (--tls-key)");
  }
  std::unique_ptr<TlsContext> tls;
  if (!options.tls_cert_file.empty()) {
    auto loaded = TlsContext::load(options.tls_cert_file, options.tls_key_file);
    if (!loaded) return loaded.error();
    tls = std::move(*loaded);
  }
  auto gateway = std::make_unique<HttpListener>(std::move(options), std::move(tls));
  if (auto problem = gateway->listen()) return *problem;
  gateway->run();
  return std::unique_ptr<HttpGateway>(std::move(gateway));
}

}  // namespace fmwire::gateway
