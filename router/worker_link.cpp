#include "router/worker_link.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "codec/frame_decoder.h"
#include "transport/host_resolver.h"

namespace fmwire::router {
namespace {

std::string hex(std::uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

}  // namespace

WorkerLink::WorkerLink(transport::EventLoop& loop, transport::Endpoint endpoint, WorkerLinkOptions options,
                       WorkerLinkOwner& owner)
    : loop_(loop),
      endpoint_(std::move(endpoint)),
      options_(std::move(options)),
      owner_(owner),
      backoff_(options_.reconnect_min) {
  view_.name = endpoint_.to_string();
  view_.prefixes = &prefixes_;
  connect();
}

WorkerLink::~WorkerLink() {
  if (reconnect_timer_ != 0) loop_.backend().cancel(reconnect_timer_);
}

void WorkerLink::connect() {
  if (retired_ || connecting_) return;
  connecting_ = true;
  std::weak_ptr<bool> alive = alive_;
  loop_.backend().connect(endpoint_.host, endpoint_.port, [this, alive](int fd, std::error_code error) {
    if (!alive.lock()) {
      if (fd >= 0) ::close(fd);
      return;
    }
    connecting_ = false;
    if (error || fd < 0) {
      if (error.category() == transport::lookup_category()) {
        std::string reason = "worker " + endpoint_.to_string() + ": looking up " + endpoint_.host + ": " +
                             error.message() + " (retrying)";
        if (reason != lookup_error_) {
          lookup_error_ = reason;
          owner_.on_worker_unresolved(*this, lookup_error_);
        }
      }
      schedule_reconnect();
      return;
    }
    lookup_error_.clear();
    if (retired_) {
      ::close(fd);
      return;
    }
    transport::ConnectionHandler& handler = *this;
    connection_ = std::make_unique<transport::Connection>(loop_, fd, true, options_.connection, handler);
  });
}

void WorkerLink::schedule_reconnect() {
  if (retired_ || reconnect_timer_ != 0) return;
  std::weak_ptr<bool> alive = alive_;
  reconnect_timer_ = loop_.backend().schedule(backoff_, [this, alive] {
    if (!alive.lock()) return;
    reconnect_timer_ = 0;
    connect();
  });
  backoff_ = std::min(backoff_ * 2, options_.reconnect_max);
}

void WorkerLink::retire() {
  retired_ = true;
  if (reconnect_timer_ != 0) loop_.backend().cancel(reconnect_timer_);
  reconnect_timer_ = 0;
  update_health();
  if (connection_ && !connection_->closed()) connection_->drain("worker left the membership");
}

void WorkerLink::update_health() {
  const bool healthy = ready() && !draining_ && !retired_ && view_.refused.empty();
  if (healthy == view_.healthy) return;
  view_.healthy = healthy;
  owner_.on_worker_health(*this);
}

void WorkerLink::subscribe() {
  report_stream_ = connection_->open_stream();
  if (report_stream_ == 0) return;
  connection_->send<protocol::LoadReport>(report_stream_, [](protocol::LoadReport::Builder) {});
}

std::string WorkerLink::registration_problem(const transport::Connection& connection) const {
  const std::uint64_t own = options_.tokenizer_fingerprint;
  const std::uint64_t theirs = connection.peer_tokenizer_fingerprint();
  if (own == 0 || theirs == own) return {};
  const std::string why = " and this router sends prompts as token ids of tokenizer " + hex(own) +
                          ": ids it makes would not be the worker's; give the router the workers' tokenizer";
  if (theirs == 0) {
    return "worker " + view_.name + " refused: it says no tokenizer fingerprint (an fmwire before protocol 1.1, " +
           "or a service that reads no token ids)" + why;
  }
  return "worker " + view_.name + " refused: its tokenizer is " + hex(theirs) + why;
}

void WorkerLink::on_ready(transport::Connection& connection) {
  backoff_ = options_.reconnect_min;
  hello_error_.clear();
  draining_ = false;
  view_.refused = registration_problem(connection);
  view_.tokenizer_fingerprint = connection.peer_tokenizer_fingerprint();
  if (!view_.refused.empty()) {
    // Kept connected (a worker restarted with another tokenizer is a new
    // connection, checked again) but never picked and not subscribed.
    owner_.on_worker_refused(*this, view_.refused);
    update_health();
    return;
  }
  subscribe();
  update_health();
}

void WorkerLink::read_report(const codec::FrameView& frame) {
  const codec::Status read = codec::read_body<protocol::LoadReport>(
      frame, options_.connection.limits, [&](const protocol::LoadReportReader& report) {
        view_.has_load = true;
        view_.load = report.load();
        // Applied in this order, added then evicted, as the worker reports them.
        for (std::uint64_t hash : report.prefixes_added()) prefixes_.insert(hash);
        for (std::uint64_t hash : report.prefixes_evicted()) prefixes_.erase(hash);
        view_.publishes_prefixes = view_.publishes_prefixes || !prefixes_.empty();
        if (view_.load.draining) draining_ = true;
      });
  if (!read) {
    connection_->fail(protocol::ErrorCode::BAD_FRAME, "unreadable LoadReport: " + read.error().message);
    return;
  }
  update_health();
}

void WorkerLink::on_stream_frame(transport::Connection&, const codec::FrameView& frame) {
  if (frame.header.stream_id == report_stream_) {
    if (frame.kind() == codec::FrameKind::load_report) read_report(frame);
    return;
  }
  owner_.on_worker_frame(*this, frame.header.stream_id, frame);
}

void WorkerLink::on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                                  const transport::EndReason& reason) {
  if (stream_id == report_stream_) {
    report_stream_ = 0;
    if (!connection.closed() && connection.ready()) subscribe();  // the worker ended it: ask again
    return;
  }
  owner_.on_worker_stream_closed(*this, stream_id, reason);
}

void WorkerLink::on_go_away(transport::Connection& connection) {
  draining_ = true;
  // The subscription would keep the draining worker's connection open (it
  // closes when its last stream ends): end it. The view keeps the latest
  // numbers, reported on as draining, until the connection closes.
  if (report_stream_ != 0) {
    const std::uint32_t stream_id = report_stream_;
    report_stream_ = 0;  // first: the reset closes the stream at once
    connection.reset_stream(stream_id, protocol::ErrorCode::CANCELLED, "the worker is draining");
  }
  update_health();
}

void WorkerLink::on_closed(transport::Connection& connection, const transport::EndReason& reason) {
  last_close_reason_ = reason.message.empty() ? std::string("connection closed") : reason.message;
  if (!connection.ready() && reason.error) {
    std::string said = "worker " + endpoint_.to_string() + " refused the link in the Hello exchange: " +
                       reason.message + " (retrying)";
    if (said != hello_error_) {
      hello_error_ = std::move(said);
      owner_.on_worker_hello_failed(*this, hello_error_);
    }
  }
  report_stream_ = 0;
  view_.has_load = false;
  view_.tokenizer_fingerprint = 0;
  prefixes_.clear();
  // Not destroyed inside its own callback: after this turn of the loop.
  std::shared_ptr<transport::Connection> closed(connection_.release());
  loop_.post([closed] {});
  update_health();
  schedule_reconnect();
}

}  // namespace fmwire::router
