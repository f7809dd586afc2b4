// One worker as the router sees it: an outgoing connection kept up
// (reconnected with backoff when it drops), a LoadReport subscription that
// keeps its WorkerView current (load, prefix hashes), and health: a worker
// is picked only while connected, not draining, and answering keepalives
// (the connection closes a silent peer within its dead_after). A worker's
// GoAway ends the subscription, so that its drain is not held up by it.
// Registration: when the router sends prompts as token ids, a worker whose
// tokenizer (its fingerprint, said in the Hello exchange) is not the
// router's is refused as its connection becomes ready: never healthy, no
// subscription, the reason in its view and told to the owner; it is
// checked again on every new connection. Frames of its generation streams
// go to the owner, the router. Loop thread only.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <unordered_set>

#include "router/worker_view.h"
#include "transport/connection.h"
#include "transport/endpoint.h"

namespace fmwire::router {

class WorkerLink;

// What a link tells the router about its generation streams.
class WorkerLinkOwner {
 public:
  virtual ~WorkerLinkOwner() = default;
  virtual void on_worker_frame(WorkerLink& link, std::uint32_t stream_id, const codec::FrameView& frame) = 0;
  // The stream ended: cleanly (after its Finish), reset by the worker, or
  // cut off because the connection went (reason.code worker_lost).
  virtual void on_worker_stream_closed(WorkerLink& link, std::uint32_t stream_id,
                                       const transport::EndReason& reason) = 0;
  // The link can take requests again, or no longer can.
  virtual void on_worker_health(WorkerLink& link) { (void)link; }
  // The worker was refused at registration; `reason` says why.
  virtual void on_worker_refused(WorkerLink& link, const std::string& reason) {
    (void)link;
    (void)reason;
  }
  // The worker refused the link in the Hello exchange (an auth token that
  // differs, a version it does not speak; the link retries with backoff);
  // said once per distinct reason until the link is up.
  virtual void on_worker_hello_failed(WorkerLink& link, const std::string& reason) {
    (void)link;
    (void)reason;
  }
  // The worker's name did not resolve (the link retries with backoff);
  // said once per distinct error until the link connects.
  virtual void on_worker_unresolved(WorkerLink& link, const std::string& reason) {
    (void)link;
    (void)reason;
  }
};

struct WorkerLinkOptions {
  transport::ConnectionOptions connection;
  // The router's tokenizer's fingerprint when it sends prompts as token
  // ids: a worker that says another (or none) is refused. 0: no check.
  std::uint64_t tokenizer_fingerprint = 0;
  std::chrono::milliseconds reconnect_min{100};
  std::chrono::milliseconds reconnect_max{2000};
};

class WorkerLink final : private transport::ConnectionHandler {
 public:
  // Connects at once.
  WorkerLink(transport::EventLoop& loop, transport::Endpoint endpoint, WorkerLinkOptions options,
             WorkerLinkOwner& owner);
  // While the loop runs, only once idle(); otherwise after the loop has
  // stopped for good (the backend closes what is left).
  ~WorkerLink() override;
  WorkerLink(const WorkerLink&) = delete;
  WorkerLink& operator=(const WorkerLink&) = delete;

  const WorkerView& view() const { return view_; }
  WorkerView& view() { return view_; }
  const transport::Endpoint& endpoint() const { return endpoint_; }
  // The ready connection, or nullptr while there is none.
  transport::Connection* connection() { return ready() ? connection_.get() : nullptr; }
  bool ready() const { return connection_ && connection_->ready() && !connection_->closed(); }

  // Gone from discovery: takes no new requests and stops reconnecting; the
  // owner destroys it once its last stream has ended.
  void retire();
  bool retired() const { return retired_; }
  // The worker said it drains (GoAway, or a draining LoadReport) while
  // still connected: its streams may still be handed over elsewhere.
  bool draining() const { return draining_ && ready(); }
  // No connection and none being made: a retired link may be destroyed.
  bool idle() const { return !connection_ && !connecting_; }
  // Why the last connection ended ("" before any did), for the log line
  // that says the worker was lost.
  const std::string& last_close_reason() const { return last_close_reason_; }

 private:
  void connect();
  void schedule_reconnect();
  void update_health();
  // Empty when the worker's tokenizer is the one the router sends ids of.
  std::string registration_problem(const transport::Connection& connection) const;
  void subscribe();
  void read_report(const codec::FrameView& frame);

  void on_ready(transport::Connection& connection) override;
  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_go_away(transport::Connection& connection) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

  transport::EventLoop& loop_;
  transport::Endpoint endpoint_;
  WorkerLinkOptions options_;
  WorkerLinkOwner& owner_;
  WorkerView view_;
  std::unordered_set<std::uint64_t> prefixes_;
  std::unique_ptr<transport::Connection> connection_;
  std::uint32_t report_stream_ = 0;
  bool connecting_ = false;
  std::string lookup_error_;  // the last one told to the owner; cleared on connecting
  std::string hello_error_;   // the last one told to the owner; cleared when ready
  std::string last_close_reason_;
  bool draining_ = false;   // GoAway or a draining LoadReport
  bool retired_ = false;
  std::chrono::milliseconds backoff_;
  transport::TimerId reconnect_timer_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace fmwire::router
