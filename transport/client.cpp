#include "transport/client.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <future>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "protocol/load_report.h"
#include "transport/connection.h"

namespace fmwire {

namespace {

using protocol::ErrorCode;
using Clock = std::chrono::steady_clock;

ClientError error_of(const transport::EndReason& reason) {
  return {reason.code, reason.message, reason.retryable, 0};
}

}  // namespace

std::string_view to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::INTERNAL: return "internal";
    case ErrorCode::BAD_FRAME: return "bad_frame";
    case ErrorCode::UNSUPPORTED_VERSION: return "unsupported_version";
    case ErrorCode::LIMIT_EXCEEDED: return "limit_exceeded";
    case ErrorCode::BAD_REQUEST: return "bad_request";
    case ErrorCode::UNAUTHORIZED: return "unauthorized";
    case ErrorCode::NOT_FOUND: return "not_found";
    case ErrorCode::OVERLOADED: return "overloaded";
    case ErrorCode::NO_WORKER: return "no_worker";
    case ErrorCode::DEADLINE_UNREACHABLE: return "deadline_unreachable";
    case ErrorCode::WORKER_LOST: return "worker_lost";
    case ErrorCode::CANCELLED: return "cancelled";
    case ErrorCode::DIGEST_MISMATCH: return "digest_mismatch";
    case ErrorCode::TRANSFER_ABORTED: return "transfer_aborted";
  }
  return "unknown";
}

std::string_view to_string(protocol::FinishReason reason) {
  switch (reason) {
    case protocol::FinishReason::END_OF_SEQUENCE: return "end_of_sequence";
    case protocol::FinishReason::MAX_TOKENS: return "max_tokens";
    case protocol::FinishReason::STOP_SEQUENCE: return "stop_sequence";
    case protocol::FinishReason::CANCELLED: return "cancelled";
    case protocol::FinishReason::DEADLINE_EXCEEDED: return "deadline_exceeded";
    case protocol::FinishReason::ERROR: return "error";
    case protocol::FinishReason::HANDED_OFF: return "handed_off";
  }
  return "unknown";
}

// Everything that lives on the loop thread: the loop, the connection, the
// requests, the endpoints and which one is tried. Client is a thin shell
// that posts into it.
class Client::Session final : public transport::ConnectionHandler {
 public:
  Session(std::vector<transport::Endpoint> endpoints, ClientOptions options)
      : endpoints_(std::move(endpoints)), options_(std::move(options)), loop_(options_.backend),
        reconnect_backoff_(options_.reconnect_min) {
    options_.connection.role = protocol::Role::CLIENT;
    loop_.use_tls(options_.connection.tls);  // (null: plaintext)
    if (options_.on_turn_end) loop_.set_turn_end(options_.on_turn_end);
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "fmwire-client");  // named so that per-thread CPU can be told apart
      loop_.run();
    });
  }

  ~Session() override {
    loop_.post([this] { shut_down(); });
    thread_.join();
    // The loop has stopped: what is left is destroyed without callbacks.
    retired_.clear();
    connection_.reset();
  }

  const std::string& backend_log_line() const { return loop_.backend_log_line(); }
  bool connected() const { return connected_.load(std::memory_order_relaxed); }
  std::string connected_endpoint() const {
    std::lock_guard lock(connected_endpoint_mutex_);
    return connected_endpoint_;
  }
  bool on_loop_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Connects (if not connected) and waits for the Hello exchange.
  std::optional<ClientError> connect_and_wait() {
    auto done = std::make_shared<std::promise<std::optional<ClientError>>>();
    std::future<std::optional<ClientError>> result = done->get_future();
    loop_.post([this, done] {
      if (state_ == State::ready) {
        done->set_value(std::nullopt);
        return;
      }
      connect_waiters_.push_back(done);
      if (state_ == State::idle) start_round();
    });
    return result.get();
  }

  void connect_in_background() {
    loop_.post([this] {
      if (state_ == State::idle && !shutting_down_ && !endpoints_.empty()) start_round();
    });
  }

  void set_endpoints(std::vector<transport::Endpoint> endpoints) {
    loop_.post([this, endpoints = std::move(endpoints)]() mutable {
      endpoints_ = std::move(endpoints);
      round_errors_.clear();  // a round in progress goes on over the new list, all of it
      // Connected or connecting, current_ is that endpoint, and the next
      // attempt is the one after it in the new list, or the new list's
      // first when it is not there. Idle, current_ is the next attempt.
      const auto peer = std::find(endpoints_.begin(), endpoints_.end(), peer_);
      if (state_ == State::idle || endpoints_.empty()) {
        current_ = 0;
      } else {
        current_ = peer != endpoints_.end() ? static_cast<std::size_t>(peer - endpoints_.begin()) : endpoints_.size() - 1;
      }
      if (state_ == State::idle && !shutting_down_ && !endpoints_.empty() && wants_connection()) start_round();
    });
  }

  void generate(std::uint64_t id, GenerateParams params, StreamCallbacks callbacks) {
    loop_.post([this, id, params = std::move(params), callbacks = std::move(callbacks)]() mutable {
      if (shutting_down_) {
        if (callbacks.on_error) callbacks.on_error({ErrorCode::CANCELLED, "client closed", false, 0});
        return;
      }
      Request& request = requests_[id];
      request.params = std::move(params);
      request.callbacks = std::move(callbacks);
      if (state_ == State::ready) {
        open(id, request);
        return;
      }
      pending_.push_back(id);
      if (state_ == State::idle) start_round();
    });
  }

  void cancel(std::uint64_t id) {
    loop_.post([this, id] {
      auto found = requests_.find(id);
      if (found == requests_.end()) return;  // ended already
      if (found->second.stream_id != 0 && connection_) {
        // The stream's end comes back through on_stream_closed.
        connection_->reset_stream(found->second.stream_id, ErrorCode::CANCELLED, "cancelled by the client");
        return;
      }
      std::erase(pending_, id);
      finish_with_error(found, {ErrorCode::CANCELLED, "cancelled by the client", false, 0});
    });
  }

  void consumed(std::uint64_t id, std::uint64_t wire_bytes) {
    loop_.post([this, id, wire_bytes] {
      auto found = requests_.find(id);
      if (found == requests_.end() || found->second.stream_id == 0 || !connection_) return;
      connection_->consume(found->second.stream_id, wire_bytes);
    });
  }

  void watch_load(std::function<void(const WorkerLoad&)> on_load) {
    loop_.post([this, on_load = std::move(on_load)]() mutable {
      if (shutting_down_) return;
      on_load_ = std::move(on_load);
      if (!on_load_) {
        cancel_reconnect_timer();
        unsubscribe_load();
        return;
      }
      if (state_ == State::ready) {
        subscribe_load();
      } else if (state_ == State::idle) {
        start_round();  // on_ready subscribes
      }
    });
  }

  // ConnectionHandler: on the loop thread.
  void on_ready(transport::Connection&) override {
    state_ = State::ready;
    connected_.store(true, std::memory_order_relaxed);
    {
      std::lock_guard lock(connected_endpoint_mutex_);
      connected_endpoint_ = peer_.to_string();
    }
    cancel_connect_timer();
    round_errors_.clear();
    ready_at_ = Clock::now();
    tell_change({ConnectionChange::Kind::connected, peer_.to_string(), {}});
    reconnect_backoff_ = options_.reconnect_min;
    subscribe_load();
    for (auto& waiter : connect_waiters_) waiter->set_value(std::nullopt);
    connect_waiters_.clear();
    std::deque<std::uint64_t> waiting;
    waiting.swap(pending_);
    for (std::uint64_t id : waiting) {
      auto found = requests_.find(id);
      if (found != requests_.end()) open(id, found->second);
    }
  }

  void on_stream_frame(transport::Connection&, const codec::FrameView& frame) override {
    if (frame.header.stream_id == load_stream_ && load_stream_ != 0) {
      if (frame.kind() == codec::FrameKind::load_report) deliver_load(frame);
      return;
    }
    auto stream = by_stream_.find(frame.header.stream_id);
    if (stream == by_stream_.end()) return;  // stream 0 (connection-wide) or one we ended
    auto found = requests_.find(stream->second);
    if (found == requests_.end()) return;
    switch (frame.kind()) {
      case codec::FrameKind::tokens:
      case codec::FrameKind::compact_tokens: return deliver_tokens(found->second, frame);
      case codec::FrameKind::finish: return deliver_finish(found, frame);
      case codec::FrameKind::error: return deliver_error(found, frame);
      default: return;  // kinds a newer peer may add: ignored, as Cap'n Proto ignores fields
    }
  }

  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override {
    if (stream_id == load_stream_ && load_stream_ != 0) {
      // The peer ended it (or sends no load reports): not asked again on this connection.
      load_stream_ = 0;
      return;
    }
    auto stream = by_stream_.find(stream_id);
    if (stream == by_stream_.end()) return;
    auto found = requests_.find(stream->second);
    if (found == requests_.end()) {
      by_stream_.erase(stream);
      return;
    }
    // Finish and Error end a request before its stream closes; to get here
    // the stream was reset or its connection lost.
    ClientError error = reason.error ? error_of(reason)
                                     : ClientError{ErrorCode::INTERNAL, "stream ended without a Finish frame", true, 0};
    // The caller retries elsewhere: it needs to know which endpoint went.
    if (connection.closed()) error.message = "connection to " + peer_.to_string() + " lost: " + error.message;
    finish_with_error(found, std::move(error));
  }

  // The peer drains: the subscription must not keep its connection open.
  void on_go_away(transport::Connection&) override { unsubscribe_load(); }

  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override {
    const bool was_ready = connection.ready();
    state_ = State::idle;
    connected_.store(false, std::memory_order_relaxed);
    {
      std::lock_guard lock(connected_endpoint_mutex_);
      connected_endpoint_.clear();
    }
    load_stream_ = 0;
    cancel_connect_timer();
    // Not destroyed inside its own callback: later, from the loop.
    if (connection_.get() == &connection) retired_.push_back(std::move(connection_));
    loop_.post([this] { retired_.clear(); });
    if (stop_when_closed_) {
      loop_.stop();
      return;
    }
    if (!was_ready) {
      ClientError error = reason.error ? error_of(reason) : ClientError{ErrorCode::NO_WORKER, "", true, 0};
      error.message = "connection to " + peer_.to_string() + " failed in the Hello exchange" +
                      (reason.message.empty() ? std::string() : ": " + reason.message);
      return attempt_failed(std::move(error));
    }
    // Lost after its Hello (its streams have ended, naming it): on to the
    // next endpoint, at once unless this one lived too briefly to trust.
    tell_change({ConnectionChange::Kind::lost, peer_.to_string(),
                 reason.message.empty() ? std::string("closed by the peer") : reason.message});
    next_endpoint();
    if (Clock::now() - ready_at_ < options_.reconnect_min) return reconnect_later();
    if (wants_connection() || !pending_.empty()) start_round();
  }

 private:
  enum class State { idle, connecting, ready };

  struct Request {
    GenerateParams params;
    StreamCallbacks callbacks;
    std::uint32_t stream_id = 0;
  };
  using Requests = std::unordered_map<std::uint64_t, Request>;

  // A round: the endpoints in turn from current_, until one accepts or each
  // has failed once.
  void start_round() {
    cancel_reconnect_timer();
    round_errors_.clear();
    connect_now();
  }

  void connect_now() {
    if (endpoints_.empty()) {
      state_ = State::idle;
      fail_waiting({ErrorCode::NO_WORKER, "no endpoint to connect to: the list is empty", true, 0});
      return;
    }
    if (current_ >= endpoints_.size()) current_ = 0;
    peer_ = endpoints_[current_];
    state_ = State::connecting;
    const std::uint64_t attempt = ++attempt_;
    connect_timer_ = loop_.backend().schedule(options_.connect_timeout, [this, attempt] {
      connect_timer_ = 0;
      if (attempt != attempt_ || state_ != State::connecting) return;
      const std::string message = "no connection to " + peer_.to_string() + " within " +
                                  std::to_string(options_.connect_timeout.count()) + " ms";
      if (connection_) {
        connection_->fail(ErrorCode::INTERNAL, message);  // on_closed reports it
        return;
      }
      ++attempt_;  // the TCP connect is still pending: its late answer is dropped
      attempt_failed({ErrorCode::NO_WORKER, message, true, 0});
    });
    loop_.backend().connect(peer_.host, peer_.port, [this, attempt](int fd, std::error_code error) {
      if (attempt != attempt_ || shutting_down_) {
        if (fd >= 0) ::close(fd);
        return;
      }
      if (error) {
        cancel_connect_timer();
        attempt_failed({ErrorCode::NO_WORKER, "cannot connect to " + peer_.to_string() + ": " + error.message(), true, 0});
        return;
      }
      connection_ = std::make_unique<transport::Connection>(loop_, fd, true, options_.connection, *this);
    });
  }

  // One endpoint of the round failed: the next one, or, when each has
  // failed, the requests waiting fail with every endpoint's reason.
  void attempt_failed(ClientError error) {
    state_ = State::idle;
    cancel_connect_timer();
    round_errors_.push_back(std::move(error));
    next_endpoint();
    if (round_errors_.size() < endpoints_.size()) return connect_now();
    ClientError failed = round_errors_.front();
    if (round_errors_.size() > 1) {
      failed = {ErrorCode::NO_WORKER,
                "none of the " + std::to_string(round_errors_.size()) + " endpoints accepts a connection", true, 0};
      for (const ClientError& each : round_errors_) failed.message += "; " + each.message;
    }
    round_errors_.clear();
    tell_change({ConnectionChange::Kind::none_accepts, {}, failed.message});
    fail_waiting(failed);
    reconnect_later();
  }

  void tell_change(const ConnectionChange& change) {
    if (options_.on_connection_change && !shutting_down_) options_.on_connection_change(change);
  }

  void next_endpoint() {
    if (!endpoints_.empty()) current_ = (current_ + 1) % endpoints_.size();
  }

  bool wants_connection() const { return (options_.stay_connected || on_load_) && !shutting_down_; }

  void cancel_connect_timer() {
    if (connect_timer_ != 0) loop_.backend().cancel(connect_timer_);
    connect_timer_ = 0;
  }

  // Load watch: a stream opened with an empty LoadReport frame, left open;
  // the peer's reports come on it (worker_service.h, router_service.h).
  void subscribe_load() {
    if (!on_load_ || load_stream_ != 0 || !connection_ || state_ != State::ready) return;
    const std::uint32_t stream_id = connection_->open_stream();
    if (stream_id == 0) return;  // draining or at the stream limit: the next connection subscribes
    if (connection_->send<protocol::LoadReport>(stream_id, [](protocol::LoadReport::Builder) {}) !=
        transport::SendStatus::sent) {
      connection_->reset_stream(stream_id, ErrorCode::CANCELLED, "load subscription not sent");
      return;
    }
    load_stream_ = stream_id;
  }

  void unsubscribe_load() {
    if (load_stream_ == 0 || !connection_) return;
    const std::uint32_t stream_id = load_stream_;
    load_stream_ = 0;  // first: the reset closes the stream at once
    connection_->reset_stream(stream_id, ErrorCode::CANCELLED, "load watch ended");
  }

  void deliver_load(const codec::FrameView& frame) {
    WorkerLoad load;
    const codec::Status read = codec::read_body<protocol::LoadReport>(
        frame, options_.connection.limits, [&](const protocol::LoadReportReader& report) { load = report.load(); });
    if (!read) {
      const std::uint32_t stream_id = load_stream_;
      load_stream_ = 0;
      connection_->reset_stream(stream_id, ErrorCode::BAD_FRAME, "unreadable LoadReport: " + read.error().message);
      return;
    }
    on_load_(load);
  }

  // A new round after the backoff, for a client that stays connected or
  // watches load; others connect again on their next request.
  void reconnect_later() {
    if (!wants_connection() || reconnect_timer_ != 0) return;
    reconnect_timer_ = loop_.backend().schedule(reconnect_backoff_, [this] {
      reconnect_timer_ = 0;
      if (wants_connection() && state_ == State::idle && !endpoints_.empty()) start_round();
    });
    reconnect_backoff_ = std::min(reconnect_backoff_ * 2, options_.reconnect_max);
  }

  void cancel_reconnect_timer() {
    if (reconnect_timer_ != 0) loop_.backend().cancel(reconnect_timer_);
    reconnect_timer_ = 0;
  }

  // Connect waiters and requests not yet on a stream share the connection's fate.
  void fail_waiting(const ClientError& error) {
    for (auto& waiter : connect_waiters_) waiter->set_value(error);
    connect_waiters_.clear();
    std::deque<std::uint64_t> waiting;
    waiting.swap(pending_);
    for (std::uint64_t id : waiting) {
      auto found = requests_.find(id);
      if (found != requests_.end()) finish_with_error(found, error);
    }
  }

  void open(std::uint64_t id, Request& request) {
    const std::uint32_t stream_id = connection_->open_stream();
    if (stream_id == 0) {
      ClientError error = connection_->open_streams() >= connection_->stream_limit()
                              ? ClientError{ErrorCode::LIMIT_EXCEEDED,
                                            "more than " + std::to_string(connection_->stream_limit()) +
                                                " streams open on this connection",
                                            true, 0}
                              : ClientError{ErrorCode::OVERLOADED, peer_.to_string() + " is draining (GoAway)", true, 0};
      return finish_with_error(requests_.find(id), std::move(error));
    }
    const GenerateParams& params = request.params;
    const transport::SendStatus status = connection_->send<protocol::GenerateRequest>(
        stream_id,
        [&](protocol::GenerateRequestBuilder message) {
          message.request_id(params.request_id).model(params.model);
          if (!params.prompt_token_ids.empty()) {
            message.prompt_token_ids(params.prompt_token_ids);
          } else {
            message.prompt_text(params.prompt);
          }
          message.max_tokens(params.max_tokens).temperature(params.temperature).top_p(params.top_p);
          message.seed(params.seed).stop_sequences(params.stop_sequences);
          message.timeout_us(static_cast<std::uint64_t>(params.timeout.count())).priority(params.priority);
        },
        transport::kEndStream);
    if (status != transport::SendStatus::sent) {
      connection_->reset_stream(stream_id, ErrorCode::CANCELLED, "request not sent");
      const std::string why = status == transport::SendStatus::too_large
                                  ? "the request is over the frame size limit (" +
                                        std::to_string(options_.connection.limits.max_body_bytes) + " bytes)"
                                  : "the request could not be sent (" + std::string(to_string(status)) + ")";
      return finish_with_error(requests_.find(id), {ErrorCode::BAD_REQUEST, why, false, 0});
    }
    request.stream_id = stream_id;
    by_stream_[stream_id] = id;
    if (params.manual_flow) connection_->set_manual_consume(stream_id);
  }

  void deliver_tokens(Request& request, const codec::FrameView& frame) {
    std::uint32_t first_index = 0;
    codec::Status read = codec::read_tokens(frame, options_.connection.limits, [&](const codec::TokensView& tokens) {
      first_index = tokens.first_index();
      token_ids_.clear();
      text_pieces_.clear();
      for (std::uint32_t i = 0; i < tokens.size(); ++i) token_ids_.push_back(tokens.id(i));
      for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) text_pieces_.push_back(tokens.piece(i));
    });
    if (!read) {
      const std::uint32_t stream_id = request.stream_id;
      connection_->reset_stream(stream_id, ErrorCode::BAD_FRAME, "unreadable Tokens frame: " + read.error().message);
      return;
    }
    if (request.callbacks.on_tokens) request.callbacks.on_tokens(TokenChunk{first_index, token_ids_, text_pieces_, frame.wire_bytes});
  }

  void deliver_finish(Requests::iterator found, const codec::FrameView& frame) {
    Completion completion;
    codec::Status read = codec::read_body<protocol::Finish>(frame, options_.connection.limits, [&](const protocol::FinishReader& finish) {
      completion.reason = finish.reason();
      completion.prompt_tokens = finish.prompt_tokens();
      completion.completion_tokens = finish.completion_tokens();
      completion.cached_prompt_tokens = finish.cached_prompt_tokens();
      completion.trailing_text = finish.trailing_text();
      for (const protocol::HopTimingReader hop : finish.timings()) {
        completion.timings.push_back({std::string(hop.hop()), hop.queue_us(), hop.prefill_us(), hop.decode_us(),
                                      hop.first_token_us(), hop.total_us()});
      }
    });
    if (!read) return finish_with_error(found, {ErrorCode::BAD_FRAME, "unreadable Finish frame: " + read.error().message, false, 0});
    StreamCallbacks callbacks = std::move(found->second.callbacks);
    forget(found);
    if (callbacks.on_finish) callbacks.on_finish(completion);
  }

  void deliver_error(Requests::iterator found, const codec::FrameView& frame) {
    ClientError error{ErrorCode::INTERNAL, "unreadable Error frame", false, 0};
    (void)codec::read_body<protocol::Error>(frame, options_.connection.limits, [&](protocol::Error::Reader message) {
      error = {message.getCode(), message.getMessage(), message.getRetryable(), message.getRetryAfterMs()};
    });
    finish_with_error(found, std::move(error));
  }

  void finish_with_error(Requests::iterator found, ClientError error) {
    if (found == requests_.end()) return;
    StreamCallbacks callbacks = std::move(found->second.callbacks);
    forget(found);
    if (callbacks.on_error) callbacks.on_error(error);
  }

  void forget(Requests::iterator found) {
    if (found->second.stream_id != 0) by_stream_.erase(found->second.stream_id);
    requests_.erase(found);
  }

  void shut_down() {
    shutting_down_ = true;
    cancel_reconnect_timer();
    on_load_ = nullptr;
    const ClientError closed{ErrorCode::CANCELLED, "client closed", false, 0};
    fail_waiting(closed);
    while (!requests_.empty()) finish_with_error(requests_.begin(), closed);
    if (connection_ && !connection_->closed()) {
      stop_when_closed_ = true;
      connection_->close();  // on_closed stops the loop
      return;
    }
    loop_.stop();
  }

  std::vector<transport::Endpoint> endpoints_;
  std::size_t current_ = 0;                // the endpoint tried next, or connected to
  transport::Endpoint peer_;               // the endpoint of the attempt or connection now
  std::vector<ClientError> round_errors_;  // this round's failed attempts
  Clock::time_point ready_at_;
  ClientOptions options_;
  transport::EventLoop loop_;
  std::thread thread_;

  State state_ = State::idle;
  std::atomic<bool> connected_{false};  // state_ == ready, for other threads
  mutable std::mutex connected_endpoint_mutex_;
  std::string connected_endpoint_;      // peer_ while ready, for other threads
  std::uint64_t attempt_ = 0;
  transport::TimerId connect_timer_ = 0;
  bool shutting_down_ = false;
  bool stop_when_closed_ = false;
  std::unique_ptr<transport::Connection> connection_;
  std::vector<std::unique_ptr<transport::Connection>> retired_;
  std::vector<std::shared_ptr<std::promise<std::optional<ClientError>>>> connect_waiters_;

  Requests requests_;
  std::unordered_map<std::uint32_t, std::uint64_t> by_stream_;
  std::deque<std::uint64_t> pending_;  // waiting for the connection

  std::function<void(const WorkerLoad&)> on_load_;  // set: load is watched
  std::uint32_t load_stream_ = 0;                   // the subscription; 0: none now
  transport::TimerId reconnect_timer_ = 0;
  std::chrono::milliseconds reconnect_backoff_;

  // Reused for every Tokens frame: no allocation per frame once warm.
  std::vector<std::uint32_t> token_ids_;
  std::vector<std::string_view> text_pieces_;
};

// ------------------------------------------------------------------ Client

Client::Client(std::vector<transport::Endpoint> endpoints, ClientOptions options)
    : session_(std::make_unique<Session>(std::move(endpoints), std::move(options))) {}

Client::~Client() = default;

ClientResult<std::unique_ptr<Client>> Client::connect(std::vector<transport::Endpoint> endpoints,
                                                      ClientOptions options) {
  if (endpoints.empty()) throw std::invalid_argument("Client::connect: no endpoint given");
  std::unique_ptr<Client> client(new Client(std::move(endpoints), std::move(options)));
  if (std::optional<ClientError> error = client->session_->connect_and_wait()) return std::move(*error);
  return client;
}

ClientResult<std::unique_ptr<Client>> Client::connect(const transport::Endpoint& endpoint, ClientOptions options) {
  return connect(std::vector<transport::Endpoint>{endpoint}, std::move(options));
}

std::unique_ptr<Client> Client::connect_in_background(std::vector<transport::Endpoint> endpoints,
                                                      ClientOptions options) {
  std::unique_ptr<Client> client(new Client(std::move(endpoints), std::move(options)));
  client->session_->connect_in_background();
  return client;
}

std::unique_ptr<Client> Client::connect_in_background(const transport::Endpoint& endpoint, ClientOptions options) {
  return connect_in_background(std::vector<transport::Endpoint>{endpoint}, std::move(options));
}

void Client::set_endpoints(std::vector<transport::Endpoint> endpoints) {
  session_->set_endpoints(std::move(endpoints));
}

bool Client::connected() const { return session_->connected(); }

std::string Client::connected_endpoint() const { return session_->connected_endpoint(); }

const std::string& Client::backend_log_line() const { return session_->backend_log_line(); }

GenerationHandle Client::generate(GenerateParams params, StreamCallbacks callbacks) {
  const std::uint64_t id = next_request_.fetch_add(1, std::memory_order_relaxed);
  session_->generate(id, std::move(params), std::move(callbacks));
  return GenerationHandle(this, id);
}

void Client::cancel(std::uint64_t request) { session_->cancel(request); }

void GenerationHandle::cancel() const {
  if (client_ != nullptr) client_->cancel(request_);
}

void Client::consumed(std::uint64_t request, std::uint64_t wire_bytes) { session_->consumed(request, wire_bytes); }

void Client::watch_load(std::function<void(const WorkerLoad&)> on_load) { session_->watch_load(std::move(on_load)); }

void GenerationHandle::consumed(std::uint64_t wire_bytes) const {
  if (client_ != nullptr) client_->consumed(request_, wire_bytes);
}

ClientResult<CompletionText> Client::complete(GenerateParams params) {
  if (session_->on_loop_thread()) {
    return ClientError{ErrorCode::INTERNAL, "Client::complete() called from a client callback would wait forever", false, 0};
  }
  struct Outcome {
    CompletionText text;
    std::promise<ClientResult<CompletionText>> done;
  };
  auto outcome = std::make_shared<Outcome>();
  std::future<ClientResult<CompletionText>> result = outcome->done.get_future();
  StreamCallbacks callbacks;
  callbacks.on_tokens = [outcome](const TokenChunk& chunk) {
    outcome->text.token_ids.insert(outcome->text.token_ids.end(), chunk.token_ids.begin(), chunk.token_ids.end());
    for (std::string_view piece : chunk.text_pieces) outcome->text.text += piece;
  };
  callbacks.on_finish = [outcome](const Completion& completion) {
    outcome->text.finish = completion;
    outcome->text.text += completion.trailing_text;
    outcome->done.set_value(std::move(outcome->text));
  };
  callbacks.on_error = [outcome](const ClientError& error) { outcome->done.set_value(error); };
  generate(std::move(params), std::move(callbacks));
  return result.get();
}

}  // namespace fmwire
