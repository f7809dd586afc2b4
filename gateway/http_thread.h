// One HTTP thread of the gateway, shared nothing (Seastar's shard): its own
// io_context, the connections handed to it, their streams, and its own
// upstream fmwire::Client. A stream's tokens come from this thread's client
// and are written by this thread; the client's loop thread hands them over
// once per loop turn (ClientOptions::on_turn_end), never per token.
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gateway/http_limits.h"
#include "gateway/http_metrics.h"
#include "gateway/openai_api.h"
#include "transport/client.h"

namespace fmwire::gateway {

class GatewayContext;
class GatewayStream;

class HttpThread {
 public:
  using Executor = boost::asio::io_context::executor_type;

  HttpThread(GatewayContext& context, unsigned index);
  ~HttpThread();  // stop(), close_upstream(), then the io_context
  HttpThread(const HttpThread&) = delete;
  HttpThread& operator=(const HttpThread&) = delete;

  // The upstream client, before start(): connected (waiting up to the
  // connect timeout) when `wait`, else connecting in the background; a
  // client that is not connected connects again on its next request.
  void connect_upstream(bool wait);
  // The routers changed (etcd): the client's list, in this thread's order.
  // Any thread, while the client is there.
  void set_upstreams(const std::vector<transport::Endpoint>& upstreams);
  void start();
  // The thread ends (its io_context stopped, its handlers kept until it goes).
  void stop();
  // The client goes (after stop(): nothing calls into it any more). Its
  // streams end (the router cancels them with the connection); their last
  // callbacks gather deliveries that are never handed over.
  void close_upstream() { upstream_.reset(); }

  GatewayContext& context() { return context_; }
  boost::asio::io_context& io() { return io_; }
  Executor executor() { return io_.get_executor(); }
  Client& upstream() { return *upstream_; }
  const Client* upstream_if_any() const { return upstream_.get(); }

  // A new stream's id (128 random bits: random_id.h) and "created" time.
  StreamIdentity new_identity(ApiKind kind);

  // For the client's callbacks, on its loop thread: this thread's token
  // times, and the time of the loop turn (read once per turn: its chunks
  // arrived together).
  TokenTimings& token_timings() { return token_timings_; }
  Clock::time_point turn_now() {
    if (!turn_now_) turn_now_ = Clock::now();
    return *turn_now_;
  }

  // What the client's loop thread hands this thread: a chunk's text for a
  // stream, or (`other`) a stream's finish or error, or a whole response's.
  struct Delivery {
    std::shared_ptr<GatewayStream> stream;
    std::string text;
    std::uint64_t wire_bytes = 0;
    std::function<void()> other;
  };
  // From the client's callbacks, on its loop thread: gathered there without
  // a lock until the turn ends (hand_over).
  void gather(Delivery delivery) { gathered_.push_back(std::move(delivery)); }

 private:
  // The routers in this thread's order: the list turned by the thread's
  // index, so that a gateway's threads spread over the routers instead of
  // all starting at the first (each still fails over round the whole list).
  std::vector<transport::Endpoint> in_own_order(std::vector<transport::Endpoint> upstreams) const;
  void hand_over();
  void take_deliveries();

  GatewayContext& context_;
  unsigned index_;
  boost::asio::io_context io_{1};  // run by one thread (Asio's hint; posts from others stay safe)
  boost::asio::executor_work_guard<Executor> work_;
  std::thread thread_;

  // The client's loop thread's side.
  TokenTimings& token_timings_;
  std::optional<Clock::time_point> turn_now_;
  std::vector<Delivery> gathered_;
  // Between the two: one lock and at most one post per loop turn. A
  // take_deliveries() is posted while posted_, so deliveries keep their order.
  std::mutex mailbox_mutex_;
  std::vector<Delivery> mailbox_;
  bool posted_ = false;
  // This thread's side.
  std::vector<Delivery> taking_;

  std::unique_ptr<Client> upstream_;  // last: destroyed first, while what its hook touches lives
};

}  // namespace fmwire::gateway
