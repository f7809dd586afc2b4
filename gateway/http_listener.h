// The gateway as a whole (HttpGateway): it listens, runs the HTTP threads,
// holds the upstream client and what every session shares (options,
// metrics, API keys, the resumable streams), and drains.
#pragma once

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gateway/http_gateway.h"
#include "gateway/http_metrics.h"
#include "gateway/openai_api.h"
#include "gateway/resumable_registry.h"
#include "transport/client.h"

namespace fmwire::gateway {

class GatewayStream;

class HttpListener final : public HttpGateway {
 public:
  explicit HttpListener(HttpGatewayOptions options);
  ~HttpListener() override;

  std::optional<std::string> listen();
  void run();
  std::uint16_t port() const override { return port_; }
  void drain(std::chrono::milliseconds grace) override;

  const HttpGatewayOptions& options() const { return options_; }
  const ApiDefaults& defaults() const { return defaults_; }
  HttpMetrics& metrics() { return metrics_; }
  ResumableRegistry& resumable() { return resumable_; }
  // Held while a request is being answered; drain() waits for none.
  std::shared_ptr<void> activity();
  bool ready() const { return ready_.load(); }
  Client* client();
  // A request's error says the upstream is gone: not ready until a probe finds it.
  void upstream_failed(const ClientError& error);
  // The 503 for a request that finds no upstream client.
  ApiError unreachable() const;
  bool authorized(std::string_view authorization) const;
  std::string new_stream_id(ApiKind kind);

  // What the client's loop thread hands a stream: a chunk's text, or its
  // finish or error (`other`), in the order they came.
  struct Delivery {
    std::shared_ptr<GatewayStream> stream;
    std::string text;
    std::uint64_t wire_bytes = 0;
    std::function<void()> other;
  };
  void deliver(Delivery delivery);

 private:
  void accept();
  void probe_upstream();
  void watch_upstream();
  void stop();
  void hand_out_deliveries();

  HttpGatewayOptions options_;
  HttpMetrics metrics_;
  std::atomic<std::int64_t> active_{0};  // requests being answered (activity())
  boost::asio::io_context ioc_;  // before everything that holds its objects
  boost::asio::ip::tcp::acceptor acceptor_;
  ApiDefaults defaults_;
  std::uint16_t port_ = 0;
  std::vector<std::thread> threads_;

  std::mutex client_mutex_;
  std::shared_ptr<Client> client_;
  std::atomic<bool> ready_{false};
  std::thread watcher_;
  std::mutex watcher_mutex_;
  std::condition_variable watcher_wake_;
  bool stopping_ = false;
  bool stopped_ = false;

  ResumableRegistry resumable_;

  std::mutex random_mutex_;
  std::mt19937_64 random_{std::random_device{}()};

  // One hand_out_deliveries() is posted or running at a time (while
  // delivery_posted_), so a stream's deliveries reach its strand in order.
  std::mutex deliveries_mutex_;
  std::vector<Delivery> deliveries_;
  std::vector<Delivery> handing_out_;
  bool delivery_posted_ = false;
};

}  // namespace fmwire::gateway
