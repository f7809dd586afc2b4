#include "gateway/http_gateway.h"

#include <pthread.h>
#include <sys/socket.h>

#include <cerrno>

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "gateway/http_metrics.h"
#include "gateway/openai_api.h"
#include "transport/client.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using Executor = asio::any_io_executor;  // always a strand here
using namespace std::chrono_literals;

constexpr auto kRequestReadTimeout = 30s;      // a request's header and body, and a WebSocket's first message
constexpr auto kProbeWhileDown = 250ms;        // /ready: how often an unreachable upstream is tried again
constexpr auto kProbeWhileUp = 2s;             // ... and a reachable one checked
constexpr auto kUpstreamConnectTimeout = 2000ms;
// What the upstream may send ahead on one stream before the HTTP reader
// takes it: the most a stalled reader makes the gateway hold (as frames, and
// then as encoded events of about 2.5 times their size). 64 KiB is about a
// thousand tokens in flight, far more than a reader keeping up needs.
constexpr std::uint32_t kStreamCreditBytes = 64 * 1024;
constexpr std::uint64_t kAckBatchBytes = kStreamCreditBytes / 4;
// The kernel's send buffer of a streaming response (the kernel doubles it):
// fixed, so that a stalled reader's socket holds this much and no more
// (autotuning would let it grow to tcp_wmem's maximum, megabytes), and
// still far more than a token stream needs to keep a long link busy.
constexpr int kStreamSocketSendBytes = 128 * 1024;
// Events that wait for a reader leave together, up to this many bytes of
// them in one write: one write, one send and one acknowledgement upstream
// for the lot (DESIGN.md, natural batching). A reader that keeps up gets
// each event alone, at once.
constexpr std::size_t kMaxEventBytesPerWrite = 8 * 1024;

std::int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

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

std::size_t decimal_digits(std::uint64_t n) {
  std::size_t digits = 1;
  while (n >= 10) {
    n /= 10;
    ++digits;
  }
  return digits;
}

std::string http_chunk(std::string_view data) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string chunk = size;
  chunk += data;
  chunk += "\r\n";
  return chunk;
}

// A whole response as bytes, for the sinks that write raw.
std::string response_bytes(const ApiError& error) {
  const std::string body = error_json(error);
  std::string out = "HTTP/1.1 " + std::to_string(error.status) + ' ' +
                    std::string(http::obsolete_reason(http::int_to_status(error.status))) +
                    "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n";
  if (error.retry_after_s != 0) out += "Retry-After: " + std::to_string(error.retry_after_s) + "\r\n";
  out += "\r\n";
  out += body;
  return out;
}

// Times token chunks as they arrive (on the client's thread) for the
// first-token and inter-token histograms.
struct TokenClock {
  Clock::time_point received;
  std::optional<Clock::time_point> last;
  void observe(HttpMetrics& metrics, std::size_t tokens) {
    const Clock::time_point now = Clock::now();
    if (!last) {
      metrics.observe_first_token(std::chrono::duration<double>(now - received).count());
    } else if (tokens > 0) {
      const double seconds = std::chrono::duration<double>(now - *last).count() / static_cast<double>(tokens);
      for (std::size_t i = 0; i < tokens; ++i) metrics.observe_inter_token(seconds);
    }
    last = now;
  }
};

void count_finish(HttpMetrics& metrics, const Completion& completion) {
  metrics.count_tokens(completion.prompt_tokens, completion.completion_tokens);
  for (const HopTime& hop : completion.timings) metrics.observe_hop(hop.hop, static_cast<double>(hop.total_us) / 1e6);
}

std::string joined(std::span<const std::string_view> pieces) {
  std::string text;
  for (std::string_view piece : pieces) text += piece;
  return text;
}

struct Event {
  std::uint64_t n = 0;           // the SSE id, from 1
  std::string json;
  std::uint64_t wire_bytes = 0;  // to acknowledge upstream once delivered (or kept)
};

class Stream;

// Where a write of events reports when it is done: the stream (kept alive
// until then) and which of its writes it was. A plain value, so that a
// write costs no allocation for its completion.
struct WriteDone {
  std::shared_ptr<Stream> stream;
  std::uint64_t sink_generation = 0;
  std::uint64_t through = 0;  // the last event written
  void operator()(bool ok) const;  // defined after Stream
};

// Where a stream's events go: an SSE response or a WebSocket. Everything on
// the stream's strand.
class Sink {
 public:
  virtual ~Sink() = default;
  // Watches for the peer going away: `lost` is called once if it does.
  virtual void watch(std::function<void()> lost) = 0;
  // Writes `events` (at most max_events_per_write(), in order); `done` once
  // all are written or the write failed. The events need not outlive the call.
  virtual void write_events(std::span<const Event* const> events, WriteDone done) = 0;
  virtual std::size_t max_events_per_write() const = 0;
  // The end: [DONE] (a WebSocket's normal close) or an error event, then
  // the close; `done` is dropped once it is written (or failed).
  virtual void write_end(const std::string* error, std::shared_ptr<void> done) = 0;
  // An error before the first event: an HTTP error response, or (WebSocket) the error message.
  virtual void write_refusal(const ApiError& error, std::shared_ptr<void> done) = 0;
  // Another reader took the stream over.
  virtual void close() = 0;
};

// Server-sent events on a chunked HTTP/1.1 response; the header goes out
// with the first event, so that an error before it can still be an HTTP status.
class SseSink final : public Sink, public std::enable_shared_from_this<SseSink> {
 public:
  SseSink(beast::tcp_stream stream, const std::string& stream_id, std::chrono::milliseconds stalled_write_timeout)
      : stream_(std::move(stream)), stall_timer_(stream_.get_executor()), stalled_write_timeout_(stalled_write_timeout) {
    // Stalled writes are watched by stall_timer_, not by a deadline re-armed
    // (a timer wait queued and cancelled) on every write.
    stream_.expires_never();
    beast::error_code ignored;
    stream_.socket().set_option(asio::socket_base::send_buffer_size(kStreamSocketSendBytes), ignored);
    stream_.socket().non_blocking(true, ignored);  // for write()'s first try
    header_ = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              "Connection: close\r\nTransfer-Encoding: chunked\r\nX-Fmwire-Stream-Id: " +
              stream_id + "\r\n\r\n";
  }

  void watch(std::function<void()> lost) override {
    lost_ = std::move(lost);
    read_some();
  }

  // All the events in one HTTP chunk.
  void write_events(std::span<const Event* const> events, WriteDone done) override {
    constexpr std::string_view kId = "id: ", kData = "\ndata: ", kEnd = "\n\n";
    std::size_t bytes = 0;
    for (const Event* event : events) {
      bytes += kId.size() + decimal_digits(event->n) + kData.size() + event->json.size() + kEnd.size();
    }
    char size[32];
    std::snprintf(size, sizeof size, "%zx\r\n", bytes);
    out_.clear();
    take_header();
    out_ += size;
    for (const Event* event : events) {
      out_ += kId;
      out_ += std::to_string(event->n);
      out_ += kData;
      out_ += event->json;
      out_ += kEnd;
    }
    out_ += "\r\n";
    write(std::move(done));
  }
  std::size_t max_events_per_write() const override { return std::numeric_limits<std::size_t>::max(); }

  void write_end(const std::string* error, std::shared_ptr<void> done) override {
    lost_ = nullptr;
    out_.clear();
    take_header();
    out_ += http_chunk("data: " + (error != nullptr ? *error : std::string("[DONE]")) + "\n\n");
    out_ += "0\r\n\r\n";
    write([self = shared_from_this(), done = std::move(done)](bool) { self->close(); });
  }

  void write_refusal(const ApiError& error, std::shared_ptr<void> done) override {
    lost_ = nullptr;
    out_ = header_sent_ ? http_chunk("data: " + error_json(error) + "\n\n") + "0\r\n\r\n" : response_bytes(error);
    header_sent_ = true;
    write([self = shared_from_this(), done = std::move(done)](bool) { self->close(); });
  }

  void close() override {
    lost_ = nullptr;
    stall_timer_.cancel();
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

 private:
  void take_header() {
    if (header_sent_) return;
    out_ = header_;
    header_sent_ = true;
  }

  // A reader that keeps up takes the bytes at once: one non-blocking send,
  // and `done` runs before write() returns, with no asynchronous operation
  // and no completion queued through the strand for each event. What the
  // kernel does not take (or an error) goes on as an asynchronous write.
  template <typename Done>
  void write(Done done) {
    beast::error_code error;
    const std::size_t sent = stream_.socket().write_some(asio::buffer(out_), error);
    if (!error && sent == out_.size()) {
      const auto keep_alive = shared_from_this();  // `done` may drop the stream's hold on this sink
      return done(true);
    }
    write_started_ = Clock::now();
    writing_ = true;
    if (!stall_timer_armed_) watch_for_stall(write_started_ + stalled_write_timeout_);
    asio::async_write(stream_, asio::buffer(out_.data() + sent, out_.size() - sent),
                      [self = shared_from_this(), done = std::move(done)](beast::error_code error, std::size_t) mutable {
                        self->writing_ = false;
                        if (error) self->peer_gone();
                        done(!error);
                      });
  }

  // A write that has taken stalled_write_timeout_ is cut off (its completion
  // then fails); armed by a write when not already armed, so that the timer
  // is touched about once per timeout, not once per event.
  void watch_for_stall(Clock::time_point deadline) {
    stall_timer_armed_ = true;
    stall_timer_.expires_at(deadline);
    stall_timer_.async_wait([weak = weak_from_this()](beast::error_code error) {
      auto self = weak.lock();
      if (!self) return;
      self->stall_timer_armed_ = false;
      if (error || !self->writing_) return;
      const Clock::time_point due = self->write_started_ + self->stalled_write_timeout_;
      if (Clock::now() < due) return self->watch_for_stall(due);
      beast::error_code ignored;
      self->stream_.socket().close(ignored);
    });
  }

  // Reads (and drops) whatever the client sends, to see it go away.
  void read_some() {
    stream_.socket().async_read_some(asio::buffer(scratch_), [self = shared_from_this()](beast::error_code error, std::size_t) {
      if (error) return self->peer_gone();
      self->read_some();
    });
  }

  void peer_gone() {
    if (!lost_) return;
    auto lost = std::move(lost_);
    lost_ = nullptr;
    lost();
  }

  beast::tcp_stream stream_;
  asio::steady_timer stall_timer_;
  std::chrono::milliseconds stalled_write_timeout_;
  bool stall_timer_armed_ = false;
  bool writing_ = false;
  Clock::time_point write_started_;
  std::string header_;
  bool header_sent_ = false;
  std::string out_;
  std::array<char, 512> scratch_{};
  std::function<void()> lost_;
};

class GatewayImpl;

// One generation stream: its events on their way to a reader, and (when
// resumable) kept for one that reconnects. Everything on its strand but
// construction; the client's callbacks reach it through GatewayImpl::deliver.
//
// Events are acknowledged upstream (GenerationHandle::consumed) once written
// to the reader, or, for a resumable stream with no reader, once kept while
// the replay buffer has room; so a slow reader, or a full buffer, holds back
// this stream at the worker and nothing else.
class Stream final : public std::enable_shared_from_this<Stream> {
 public:
  friend struct WriteDone;
  friend class GatewayImpl;  // hands it the client's deliveries (GatewayImpl::deliver)
  Stream(GatewayImpl& gateway, Executor executor, StreamIdentity identity, bool include_usage, bool resumable,
         Clock::time_point received);

  const StreamIdentity& identity() const { return identity_; }
  const Executor& executor() const { return executor_; }
  bool resumable() const { return resumable_; }

  void begin(Client& client, GenerateParams params, std::shared_ptr<Sink> sink);
  // A reader back after a cut: the events after `last_event_id`, then live ones.
  void attach(std::shared_ptr<Sink> sink, std::uint64_t last_event_id);

 private:
  void on_chunk(std::string text, std::uint64_t wire_bytes);
  void on_finish(const Completion& completion);
  void on_error(const ClientError& error);
  void push(std::string json, std::uint64_t wire_bytes);
  void set_sink(std::shared_ptr<Sink> sink);
  void pump();
  void on_written(std::uint64_t generation, std::uint64_t n, bool ok);
  void on_lost(std::uint64_t generation);
  void acknowledge_through(std::uint64_t n);
  void keep_detached();
  void trim();
  void began();
  void arm_expiry(bool cancel_generation);
  void expire(std::uint64_t generation, bool cancel_generation);
  void release_when_idle();

  GatewayImpl& gateway_;
  Executor executor_;
  StreamIdentity identity_;
  TextChunkEncoder text_chunk_;  // identity_'s chunks, one per event
  bool include_usage_;
  bool resumable_;
  Clock::time_point received_;
  GenerationHandle handle_;
  std::deque<Event> events_;
  std::vector<const Event*> batch_;  // the events of the write under way (reused)
  // Written events' strings, their capacity reused for the next chunks' JSON.
  static constexpr std::size_t kSpareJsonStrings = 4;
  std::vector<std::string> spare_json_;
  std::uint64_t next_n_ = 1;
  std::uint64_t delivered_ = 0;     // written to the current reader
  std::uint64_t acknowledged_ = 0;  // taken (written, or kept), through this event
  std::uint64_t unsent_ack_bytes_ = 0;  // of those, not yet passed to consumed()
  std::shared_ptr<Sink> sink_;
  std::uint64_t sink_generation_ = 0;
  bool writing_ = false;
  bool began_ = false;              // the first event exists (the response is a 200 from here)
  bool generating_ = true;          // no Finish or error yet
  bool abandoned_ = false;          // its reader went away and it was cancelled
  std::optional<std::string> end_error_;   // the error event that ends it
  std::optional<ApiError> refusal_;        // an error before the first event, for a reader to come
  asio::steady_timer expiry_;
  std::uint64_t expiry_generation_ = 0;
  std::shared_ptr<void> activity_;  // what drain() waits for: held until the last event is out
};

class GatewayImpl final : public HttpGateway {
 public:
  explicit GatewayImpl(HttpGatewayOptions options)
      : options_(std::move(options)), acceptor_(ioc_), defaults_{options_.model, options_.max_tokens_default} {}

  ~GatewayImpl() override { stop(); }

  std::optional<std::string> listen() {
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

  void run() {
    if (options_.api_keys.empty()) {
      std::cerr << "fmwire gateway: no API keys: the API is open to anyone who can reach it" << std::endl;
    }
    probe_upstream();  // once now, so that a reachable upstream is ready at once
    watcher_ = std::thread([this] { watch_upstream(); });
    accept();
    for (unsigned i = 0; i < http_threads(); ++i) {
      threads_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "fmwire-http");  // named so that per-thread CPU can be told apart
        ioc_.run();
      });
    }
  }

  std::uint16_t port() const override { return port_; }

  unsigned http_threads() const {
    if (options_.http_threads != 0) return options_.http_threads;
    return std::max(1u, std::thread::hardware_concurrency() / 4);
  }

  void drain(std::chrono::milliseconds grace) override {
    asio::post(ioc_, [this] {
      beast::error_code ignored;
      acceptor_.close(ignored);
    });
    const Clock::time_point deadline = Clock::now() + grace;
    while (active_.load() > 0 && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
    stop();
  }

  const HttpGatewayOptions& options() const { return options_; }
  const ApiDefaults& defaults() const { return defaults_; }
  HttpMetrics& metrics() { return metrics_; }
  // Held while a request is being answered; drain() waits for none.
  std::shared_ptr<void> activity() {
    active_.fetch_add(1);
    return std::shared_ptr<void>(nullptr, [this](void*) { active_.fetch_sub(1); });
  }
  bool ready() const { return ready_.load(); }
  Client* client() {
    std::lock_guard lock(client_mutex_);
    return client_.get();
  }
  void upstream_failed(const ClientError& error) {
    // The client's own findings about the connection: the upstream is gone.
    if (error.code == protocol::ErrorCode::NO_WORKER && error.message.starts_with("cannot connect")) ready_ = false;
    if (error.code == protocol::ErrorCode::WORKER_LOST && error.message.starts_with("connection closed")) ready_ = false;
  }

  bool authorized(std::string_view authorization) const {
    if (options_.api_keys.empty()) return true;
    constexpr std::string_view kBearer = "Bearer ";
    if (!authorization.starts_with(kBearer)) return false;
    const std::string_view key = authorization.substr(kBearer.size());
    bool match = false;
    for (const std::string& allowed : options_.api_keys) match |= constant_time_equal(key, allowed);
    return match;
  }

  std::string new_stream_id(ApiKind kind) {
    std::lock_guard lock(random_mutex_);
    char hex[40];
    std::snprintf(hex, sizeof hex, "%016llx%08llx", static_cast<unsigned long long>(random_()),
                  static_cast<unsigned long long>(random_() & 0xffffffffu));
    return std::string(kind == ApiKind::chat ? "chatcmpl-" : "cmpl-") + hex;
  }

  void keep_resumable(const std::shared_ptr<Stream>& stream) {
    std::lock_guard lock(streams_mutex_);
    resumable_[stream->identity().id] = stream;
  }
  void forget_resumable(const std::string& id) {
    std::lock_guard lock(streams_mutex_);
    resumable_.erase(id);
  }
  std::shared_ptr<Stream> find_resumable(const std::string& id) {
    std::lock_guard lock(streams_mutex_);
    auto found = resumable_.find(id);
    return found == resumable_.end() ? nullptr : found->second;
  }

  // What the client's loop thread hands a stream: a chunk's text, or its
  // finish or error (`other`), in the order they came.
  struct Delivery {
    std::shared_ptr<Stream> stream;
    std::string text;
    std::uint64_t wire_bytes = 0;
    std::function<void()> other;
  };
  // From the client's loop thread. Deliveries gather and go to the HTTP
  // threads with one post per batch (a loop turn's worth: a step's token for
  // every stream), not one post (an allocation, a lock, maybe a wake-up)
  // per token; on an HTTP thread each goes to its stream's strand, run at
  // once when the strand is free.
  void deliver(Delivery delivery) {
    std::lock_guard lock(deliveries_mutex_);
    deliveries_.push_back(std::move(delivery));
    if (delivery_posted_) return;
    delivery_posted_ = true;
    asio::post(ioc_, [this] { hand_out_deliveries(); });
  }

 private:
  void accept();

  void probe_upstream() {
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

  void watch_upstream() {
    std::unique_lock lock(watcher_mutex_);
    while (!stopping_) {
      const auto interval = ready_ ? kProbeWhileUp : kProbeWhileDown;
      if (watcher_wake_.wait_for(lock, interval, [this] { return stopping_; })) break;
      lock.unlock();
      probe_upstream();
      lock.lock();
    }
  }

  void stop() {
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
    std::lock_guard lock(streams_mutex_);
    resumable_.clear();
  }

  // One batch, then posted again if more came meanwhile (other HTTP work
  // gets its turn between batches).
  void hand_out_deliveries() {
    {
      std::lock_guard lock(deliveries_mutex_);
      handing_out_.swap(deliveries_);
    }
    for (Delivery& delivery : handing_out_) {
      // A copy, not a reference: the handler, run inline, may drop the last
      // hold on the stream (and its executor) while dispatch is still running.
      const Executor executor = delivery.stream->executor();
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

  HttpGatewayOptions options_;
  HttpMetrics metrics_;
  std::atomic<std::int64_t> active_{0};  // requests being answered (activity())
  asio::io_context ioc_;  // before everything that holds its objects
  tcp::acceptor acceptor_;
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

  std::mutex streams_mutex_;
  std::map<std::string, std::shared_ptr<Stream>> resumable_;  // until resume_window after their end

  std::mutex random_mutex_;
  std::mt19937_64 random_{std::random_device{}()};

  // One hand_out_deliveries() is posted or running at a time (while
  // delivery_posted_), so a stream's deliveries reach its strand in order.
  std::mutex deliveries_mutex_;
  std::vector<Delivery> deliveries_;
  std::vector<Delivery> handing_out_;
  bool delivery_posted_ = false;
};

// ------------------------------------------------------------------ Stream

Stream::Stream(GatewayImpl& gateway, Executor executor, StreamIdentity identity, bool include_usage, bool resumable,
               Clock::time_point received)
    : gateway_(gateway),
      executor_(executor),
      identity_(std::move(identity)),
      text_chunk_(identity_),
      include_usage_(include_usage),
      resumable_(resumable),
      received_(received),
      expiry_(executor) {}

void Stream::begin(Client& client, GenerateParams params, std::shared_ptr<Sink> sink) {
  activity_ = gateway_.activity();
  set_sink(std::move(sink));
  gateway_.metrics().stream_opened();
  params.manual_flow = true;
  params.request_id = identity_.id;
  StreamCallbacks callbacks;
  auto self = shared_from_this();
  callbacks.on_tokens = [self, clock = TokenClock{received_, std::nullopt}](const TokenChunk& chunk) mutable {
    clock.observe(self->gateway_.metrics(), chunk.token_ids.size());
    self->gateway_.deliver({self, joined(chunk.text_pieces), chunk.wire_bytes, nullptr});
  };
  callbacks.on_finish = [self](const Completion& completion) {
    self->gateway_.deliver({self, {}, 0, [self, completion] { self->on_finish(completion); }});
  };
  callbacks.on_error = [self](const ClientError& error) {
    self->gateway_.upstream_failed(error);
    self->gateway_.deliver({self, {}, 0, [self, error] { self->on_error(error); }});
  };
  handle_ = client.generate(std::move(params), std::move(callbacks));
}

void Stream::attach(std::shared_ptr<Sink> sink, std::uint64_t last_event_id) {
  if (refusal_ && !began_) return sink->write_refusal(*refusal_, nullptr);
  const std::uint64_t oldest = events_.empty() ? next_n_ : events_.front().n;
  if (last_event_id + 1 < oldest) {
    ApiError error;
    error.status = 410;
    error.message = "stream " + identity_.id + " keeps events from " + std::to_string(oldest) +
                    " on; Last-Event-ID " + std::to_string(last_event_id) + " is older";
    error.param = "Last-Event-ID";
    return sink->write_refusal(error, nullptr);
  }
  if (last_event_id >= next_n_) {
    return sink->write_refusal(bad_request("Last-Event-ID " + std::to_string(last_event_id) +
                                               " is past the stream's last event " + std::to_string(next_n_ - 1),
                                           "Last-Event-ID"),
                               nullptr);
  }
  if (sink_) sink_->close();
  set_sink(std::move(sink));
  delivered_ = last_event_id;
  acknowledge_through(last_event_id);
  if (generating_) {
    ++expiry_generation_;  // a reader again: no expiry while it stays
    expiry_.cancel();
  }
  pump();
}

void Stream::set_sink(std::shared_ptr<Sink> sink) {
  sink_ = std::move(sink);
  writing_ = false;
  const std::uint64_t generation = ++sink_generation_;
  // Weak: the sink must not keep its stream (which owns it) alive.
  sink_->watch([weak = weak_from_this(), generation] {
    if (auto self = weak.lock()) self->on_lost(generation);
  });
}

void Stream::began() {
  if (began_) return;
  began_ = true;
  gateway_.metrics().count_request(200);
  if (identity_.kind == ApiKind::chat) push(role_chunk_json(identity_), 0);
}

void Stream::on_chunk(std::string text, std::uint64_t wire_bytes) {
  if (text.empty()) {  // a character still incomplete: nothing to send
    handle_.consumed(wire_bytes);
    return;
  }
  began();
  std::string json;
  if (!spare_json_.empty()) {
    json = std::move(spare_json_.back());
    spare_json_.pop_back();
  }
  text_chunk_.encode_into(json, text);
  push(std::move(json), wire_bytes);
}

void Stream::on_finish(const Completion& completion) {
  count_finish(gateway_.metrics(), completion);
  began();
  if (!completion.trailing_text.empty()) push(text_chunk_(completion.trailing_text), 0);
  push(finish_chunk_json(identity_, completion.reason), 0);
  if (include_usage_) push(usage_chunk_json(identity_, completion), 0);
  generating_ = false;
  gateway_.metrics().stream_closed();
  if (resumable_) arm_expiry(false);
  pump();
  release_when_idle();
}

void Stream::on_error(const ClientError& error) {
  generating_ = false;
  gateway_.metrics().stream_closed();
  if (resumable_) arm_expiry(false);
  const ApiError api_error = api_error_of(error);
  if (!began_) {
    gateway_.metrics().count_request(api_error.status);
    if (sink_) {
      sink_->write_refusal(api_error, std::move(activity_));
      sink_.reset();
    } else {
      refusal_ = api_error;
      release_when_idle();
    }
    return;
  }
  end_error_ = error_json(api_error);
  pump();
  release_when_idle();
}

void Stream::push(std::string json, std::uint64_t wire_bytes) {
  if (abandoned_) return;
  events_.push_back(Event{next_n_++, std::move(json), wire_bytes});
  if (!sink_) keep_detached();
  pump();
}

void Stream::pump() {
  if (!sink_ || writing_ || !began_) return;
  if (delivered_ + 1 < next_n_) {
    // What waits goes in one write (kMaxEventBytesPerWrite).
    const std::uint64_t first = events_.front().n;
    batch_.clear();
    std::size_t bytes = 0;
    for (std::uint64_t n = delivered_ + 1; n < next_n_ && batch_.size() < sink_->max_events_per_write() &&
                                           (batch_.empty() || bytes < kMaxEventBytesPerWrite);
         ++n) {
      batch_.push_back(&events_[n - first]);
      bytes += batch_.back()->json.size();
    }
    writing_ = true;
    sink_->write_events(batch_, WriteDone{shared_from_this(), sink_generation_, batch_.back()->n});
    return;
  }
  if (generating_) return;
  sink_->write_end(end_error_ ? &*end_error_ : nullptr, std::move(activity_));
  sink_.reset();
}

// A stream with nothing left to make and no reader is no longer active.
void Stream::release_when_idle() {
  if (!generating_ && !sink_) activity_.reset();
}

void WriteDone::operator()(bool ok) const { stream->on_written(sink_generation, through, ok); }

void Stream::on_written(std::uint64_t generation, std::uint64_t n, bool ok) {
  if (generation != sink_generation_ || !sink_) return;
  writing_ = false;
  if (!ok) return;  // on_lost follows
  delivered_ = n;
  acknowledge_through(n);
  trim();
  pump();
}

void Stream::on_lost(std::uint64_t generation) {
  if (generation != sink_generation_ || !sink_) return;
  sink_->close();
  sink_.reset();
  writing_ = false;
  if (!resumable_) {
    if (generating_) handle_.cancel();  // end to end: the router and the worker drop it
    abandoned_ = true;
    events_.clear();
    activity_.reset();
    return;
  }
  keep_detached();
  if (generating_) arm_expiry(true);
  release_when_idle();
}

void Stream::acknowledge_through(std::uint64_t n) {
  if (events_.empty()) {
    acknowledged_ = std::max(acknowledged_, n);
    return;
  }
  const std::uint64_t first = events_.front().n;
  while (acknowledged_ < n && acknowledged_ + 1 < next_n_) {
    ++acknowledged_;
    if (acknowledged_ >= first) unsent_ack_bytes_ += events_[acknowledged_ - first].wire_bytes;
  }
  // Acknowledged upstream a quarter window at a time: each consumed() is a
  // hop to the client's loop thread, one per token when done per event. The
  // transport grants credit at half a window, so at most three quarters of
  // it are ever held back and the sender always has room.
  if (unsent_ack_bytes_ >= kAckBatchBytes) {
    handle_.consumed(unsent_ack_bytes_);
    unsent_ack_bytes_ = 0;
  }
}

// No reader: events count as taken while the replay buffer has room; past
// that, upstream waits (its flow-control window is all that can still come).
void Stream::keep_detached() {
  if (events_.empty()) return;
  const std::uint64_t room_through = events_.front().n + gateway_.options().replay_events - 1;
  acknowledge_through(std::min(room_through, next_n_ - 1));
}

void Stream::trim() {
  const std::size_t keep = resumable_ ? gateway_.options().replay_events : 0;
  while (events_.size() > keep && events_.front().n <= delivered_ && events_.front().n <= acknowledged_) {
    if (spare_json_.size() < kSpareJsonStrings) spare_json_.push_back(std::move(events_.front().json));
    events_.pop_front();
  }
}

// Resumable streams: no reader for resume_window while generating cancels
// it; resume_window after its end the stream (and its replay buffer) goes.
void Stream::arm_expiry(bool cancel_generation) {
  const std::uint64_t generation = ++expiry_generation_;
  expiry_.expires_after(gateway_.options().resume_window);
  expiry_.async_wait([self = shared_from_this(), generation, cancel_generation](beast::error_code error) {
    if (error) return;
    self->expire(generation, cancel_generation);
  });
}

void Stream::expire(std::uint64_t generation, bool cancel_generation) {
  if (generation != expiry_generation_) return;
  if (cancel_generation) {
    if (sink_) return;
    if (generating_) handle_.cancel();
  }
  events_.clear();
  activity_.reset();
  gateway_.forget_resumable(identity_.id);
}

// ------------------------------------------------------------------ WebSocket

// GET /v1/stream upgraded: one request message in, one message per chunk
// out, then a normal close. Its own strand is the stream's.
class WebSocketSink final : public Sink, public std::enable_shared_from_this<WebSocketSink> {
 public:
  WebSocketSink(GatewayImpl& gateway, beast::tcp_stream stream)
      : gateway_(gateway), socket_(std::move(stream)), first_message_timer_(socket_.get_executor()) {
    beast::error_code ignored;
    beast::get_lowest_layer(socket_).socket().set_option(asio::socket_base::send_buffer_size(kStreamSocketSendBytes),
                                                          ignored);
  }

  void accept(http::request<http::string_body> request) {
    beast::get_lowest_layer(socket_).expires_never();
    socket_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
    socket_.read_message_max(gateway_.options().max_body_bytes);
    received_ = Clock::now();
    socket_.async_accept(request, [self = shared_from_this()](beast::error_code error) {
      if (error) return;
      self->read_request();
    });
  }

  void watch(std::function<void()> lost) override {
    lost_ = std::move(lost);
    read_more();
  }

  // One message per event: one at a time.
  std::size_t max_events_per_write() const override { return 1; }
  void write_events(std::span<const Event* const> events, WriteDone done) override {
    out_ = events.front()->json;
    socket_.text(true);
    socket_.async_write(asio::buffer(out_), [self = shared_from_this(), done = std::move(done)](beast::error_code error, std::size_t) {
      if (error) self->peer_gone();
      done(!error);
    });
  }

  void write_end(const std::string* error, std::shared_ptr<void> done) override {
    lost_ = nullptr;
    if (error == nullptr) return close_normally(std::move(done));
    out_ = *error;
    socket_.text(true);
    socket_.async_write(asio::buffer(out_), [self = shared_from_this(), done = std::move(done)](beast::error_code failed,
                                                                                                std::size_t) mutable {
      if (!failed) self->close_normally(std::move(done));
    });
  }

  void write_refusal(const ApiError& error, std::shared_ptr<void> done) override {
    const std::string text = error_json(error);
    write_end(&text, std::move(done));
  }

  void close() override {
    lost_ = nullptr;
    beast::get_lowest_layer(socket_).close();
  }

 private:
  void read_request() {
    first_message_timer_.expires_after(kRequestReadTimeout);
    first_message_timer_.async_wait([self = shared_from_this()](beast::error_code error) {
      if (!error && !self->have_request_) beast::get_lowest_layer(self->socket_).close();
    });
    socket_.async_read(buffer_, [self = shared_from_this()](beast::error_code error, std::size_t) {
      self->have_request_ = true;
      self->first_message_timer_.cancel();
      if (error) return;
      self->on_request();
    });
  }

  void on_request() {
    const std::string body = beast::buffers_to_string(buffer_.data());
    buffer_.consume(buffer_.size());
    auto parsed = parse_any_api_request(body, gateway_.defaults());
    if (!parsed) return refuse(parsed.error());
    Client* client = gateway_.client();
    if (client == nullptr) return refuse(unreachable(gateway_));
    ApiRequest& request = parsed.value();
    StreamIdentity identity{request.kind, gateway_.new_stream_id(request.kind), unix_seconds(), gateway_.options().model};
    // Over a WebSocket the finish (and usage) messages always come; no resumption.
    auto stream = std::make_shared<Stream>(gateway_, socket_.get_executor(), std::move(identity), true, false, received_);
    stream->begin(*client, std::move(request.params), shared_from_this());
  }

 public:
  static ApiError unreachable(GatewayImpl& gateway) {
    ApiError error;
    error.status = 503;
    error.type = "server_error";
    error.code = "no_worker";
    error.message = "the upstream " + gateway.options().upstream.to_string() + " is not reachable";
    error.retry_after_s = 1;
    return error;
  }

 private:
  void read_more() {
    socket_.async_read(buffer_, [self = shared_from_this()](beast::error_code error, std::size_t) {
      self->buffer_.consume(self->buffer_.size());
      if (error) return self->peer_gone();
      self->read_more();
    });
  }

  void refuse(const ApiError& error) {
    gateway_.metrics().count_request(error.status);
    write_refusal(error, nullptr);
  }

  void close_normally(std::shared_ptr<void> done) {
    socket_.async_close(websocket::close_code::normal,
                        [self = shared_from_this(), done = std::move(done)](beast::error_code) {});
  }

  void peer_gone() {
    if (!lost_) return;
    auto lost = std::move(lost_);
    lost_ = nullptr;
    lost();
  }

  GatewayImpl& gateway_;
  websocket::stream<beast::tcp_stream> socket_;
  asio::steady_timer first_message_timer_;
  beast::flat_buffer buffer_;
  std::string out_;
  bool have_request_ = false;
  Clock::time_point received_;
  std::function<void()> lost_;
};

// ------------------------------------------------------------------ HTTP

// One HTTP connection: read a request, answer it, again while keep-alive
// holds; a streaming request hands the connection to its Stream.
class HttpSession final : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(GatewayImpl& gateway, tcp::socket socket) : gateway_(gateway), stream_(std::move(socket)) {}

  void run() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->read_request(); });
  }

 private:
  using Response = http::response<http::string_body>;

  void read_request() {
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(gateway_.options().max_header_bytes));
    parser_->body_limit(gateway_.options().max_body_bytes);
    stream_.expires_after(kRequestReadTimeout);
    http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, std::size_t) {
      if (error) return self->on_read(error);
      self->read_body();
    });
  }

  // curl and others wait (a second) for "100 Continue" before a large body.
  void read_body() {
    auto read = [self = shared_from_this()] {
      http::async_read(self->stream_, self->buffer_, *self->parser_,
                       [self](beast::error_code error, std::size_t) { self->on_read(error); });
    };
    if (!beast::iequals(parser_->get()[http::field::expect], "100-continue") || parser_->is_done()) return read();
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    asio::async_write(stream_, asio::buffer(kContinue), [self = shared_from_this(), read](beast::error_code error, std::size_t) {
      if (error) return self->close();
      read();
    });
  }

  void on_read(beast::error_code error) {
    if (error == http::error::end_of_stream || error == beast::error::timeout || error == asio::error::operation_aborted) {
      return close();
    }
    if (error == http::error::body_limit) {
      return respond_error(too_large(413, "the request body is over the limit of " +
                                              std::to_string(gateway_.options().max_body_bytes) + " bytes"),
                           false);
    }
    if (error == http::error::header_limit) {
      return respond_error(too_large(431, "the request header is over the limit of " +
                                              std::to_string(gateway_.options().max_header_bytes) + " bytes"),
                           false);
    }
    if (error) {
      if (error == asio::error::eof || error == asio::error::connection_reset) return close();
      return respond_error(bad_request("malformed HTTP request: " + error.message()), false);
    }
    request_ = parser_->release();
    received_ = Clock::now();
    handle();
  }

  static ApiError too_large(unsigned status, std::string message) {
    ApiError error;
    error.status = status;
    error.message = std::move(message);
    return error;
  }

  static ApiError not_found(std::string_view path) {
    ApiError error;
    error.status = 404;
    error.message = "no such path: " + std::string(path);
    error.code = "unknown_url";
    return error;
  }

  static ApiError wrong_method(std::string_view path, std::string_view allowed) {
    ApiError error;
    error.status = 405;
    error.message = std::string(path) + " takes " + std::string(allowed);
    error.code = "method_not_allowed";
    return error;
  }

  static ApiError unauthorized() {
    ApiError error;
    error.status = 401;
    error.message = "missing or wrong API key: send Authorization: Bearer <key>";
    error.code = "invalid_api_key";
    return error;
  }

  void handle() {
    const std::string_view target = request_.target();
    const std::string path(target.substr(0, target.find('?')));
    const http::verb method = request_.method();
    const bool authorized = gateway_.authorized(request_[http::field::authorization]);

    if (path == "/health" || path == "/ready" || path == "/metrics") {
      if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
      if (path == "/health") return respond(200, R"({"status":"ok"})", "application/json");
      if (path == "/metrics") return respond(200, gateway_.metrics().render(), "text/plain; version=0.0.4; charset=utf-8");
      if (gateway_.ready()) return respond(200, R"({"status":"ready"})", "application/json");
      return respond(503, R"({"status":"unavailable","reason":"the upstream )" + gateway_.options().upstream.to_string() +
                              R"( is not reachable"})", "application/json");
    }
    if (path == "/v1/models") {
      if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
      if (!authorized) return respond_error(unauthorized());
      return respond(200, models_json(gateway_.options().model, unix_seconds()), "application/json");
    }
    if (path == "/v1/completions" || path == "/v1/chat/completions") {
      if (method != http::verb::post) return respond_error(wrong_method(path, "POST"));
      if (!authorized) return respond_error(unauthorized());
      return generate(path == "/v1/chat/completions" ? ApiKind::chat : ApiKind::completions);
    }
    if (path == "/v1/stream") {
      if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
      if (!authorized) return respond_error(unauthorized());
      if (!websocket::is_upgrade(request_)) return respond_error(bad_request("/v1/stream takes a WebSocket upgrade"));
      gateway_.metrics().count_request(101);
      std::make_shared<WebSocketSink>(gateway_, std::move(stream_))->accept(std::move(request_));
      return;
    }
    constexpr std::string_view kStreams = "/v1/streams/";
    if (path.starts_with(kStreams) && path.size() > kStreams.size()) {
      if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
      if (!authorized) return respond_error(unauthorized());
      return resume(path.substr(kStreams.size()));
    }
    return respond_error(not_found(path));
  }

  void generate(ApiKind kind) {
    auto parsed = parse_api_request(kind, request_.body(), gateway_.defaults());
    if (!parsed) return respond_error(parsed.error());
    ApiRequest& request = parsed.value();
    const std::string_view resumable_header = request_["X-Fmwire-Resumable"];
    if (resumable_header == "1" || resumable_header == "true") request.resumable = true;
    Client* client = gateway_.client();
    if (client == nullptr) return respond_error(WebSocketSink::unreachable(gateway_));
    StreamIdentity identity{kind, gateway_.new_stream_id(kind), unix_seconds(), gateway_.options().model};
    if (!request.stream) return generate_whole(*client, std::move(identity), std::move(request.params));

    const bool resumable = request.resumable;
    auto stream = std::make_shared<Stream>(gateway_, stream_.get_executor(), identity, request.include_usage, resumable,
                                           received_);
    if (resumable) gateway_.keep_resumable(stream);
    stream_.expires_never();
    stream->begin(*client, std::move(request.params),
                  std::make_shared<SseSink>(std::move(stream_), identity.id, gateway_.options().stalled_write_timeout));
    // The connection is the stream's now; this session ends here.
  }

  // GET /v1/streams/<id> with Last-Event-ID: a resumable stream's reader back.
  void resume(const std::string& id) {
    std::shared_ptr<Stream> stream = gateway_.find_resumable(id);
    if (!stream) {
      ApiError error;
      error.status = 404;
      error.message = "no resumable stream " + id + " (never resumable, or ended more than " +
                      std::to_string(gateway_.options().resume_window.count()) + " s ago)";
      error.code = "stream_not_found";
      return respond_error(error);
    }
    std::uint64_t last_event_id = 0;
    const std::string last(request_["Last-Event-ID"]);
    if (!last.empty()) {
      char* end = nullptr;
      last_event_id = std::strtoull(last.c_str(), &end, 10);
      if (end == last.c_str() || *end != '\0') {
        return respond_error(bad_request("Last-Event-ID must be a number", "Last-Event-ID"));
      }
    }
    // The socket moves to the stream's strand.
    beast::error_code error;
    tcp::socket& socket = stream_.socket();
    const auto protocol = socket.local_endpoint(error).protocol();
    if (error) return close();
    const auto native = socket.release(error);
    if (error) return close();
    tcp::socket rebound(stream->executor());
    rebound.assign(protocol, native, error);
    if (error) return;
    auto sink = std::make_shared<SseSink>(beast::tcp_stream(std::move(rebound)), id,
                                          gateway_.options().stalled_write_timeout);
    asio::post(stream->executor(), [stream, sink, last_event_id] { stream->attach(sink, last_event_id); });
  }

  // stream: false: the whole text in one response. The connection is
  // watched meanwhile: a client that goes away cancels the request.
  void generate_whole(Client& client, StreamIdentity identity, GenerateParams params) {
    identity_ = std::move(identity);
    text_.clear();
    waiting_ = true;
    activity_ = gateway_.activity();
    const std::uint64_t request = ++request_count_;
    stream_.expires_never();
    gateway_.metrics().stream_opened();
    auto self = shared_from_this();
    StreamCallbacks callbacks;
    callbacks.on_tokens = [self, clock = TokenClock{received_, std::nullopt}](const TokenChunk& chunk) mutable {
      clock.observe(self->gateway_.metrics(), chunk.token_ids.size());
      asio::post(self->stream_.get_executor(), [self, text = joined(chunk.text_pieces)] { self->text_ += text; });
    };
    callbacks.on_finish = [self, request](const Completion& completion) {
      asio::post(self->stream_.get_executor(), [self, request, completion] { self->on_whole_finish(request, completion); });
    };
    callbacks.on_error = [self, request](const ClientError& error) {
      self->gateway_.upstream_failed(error);
      asio::post(self->stream_.get_executor(), [self, request, error] { self->on_whole_error(request, error); });
    };
    params.request_id = identity_.id;
    handle_ = client.generate(std::move(params), std::move(callbacks));
    watch_disconnect(request);
  }

  // Cancels the request when the client closes while it waits for the whole
  // response. The reactor may report the socket readable with nothing there
  // (FIONREAD cannot tell that from a close): a peek tells them apart, and
  // a wake-up with nothing to read only re-arms the watch.
  void watch_disconnect(std::uint64_t request) {
    stream_.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this(), request](beast::error_code error) {
      if (error || !self->waiting_ || request != self->request_count_) return;
      char byte;
      const ssize_t peeked = ::recv(self->stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (peeked < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        self->watch_disconnect(request);
        return;
      }
      if (peeked > 0) return;  // more bytes (a pipelined request): the client is there
      self->waiting_ = false;  // 0: closed; an error: the connection failed
      self->handle_.cancel();
      self->activity_.reset();
      self->close();
    });
  }

  void on_whole_finish(std::uint64_t request, const Completion& completion) {
    if (request != request_count_ || !waiting_) return;
    waiting_ = false;
    gateway_.metrics().stream_closed();
    count_finish(gateway_.metrics(), completion);
    text_ += completion.trailing_text;
    respond(200, response_json(identity_, text_, completion), "application/json");
  }

  void on_whole_error(std::uint64_t request, const ClientError& error) {
    if (request != request_count_) return;
    if (!waiting_) {
      gateway_.metrics().stream_closed();
      return;  // cancelled after the client went away
    }
    waiting_ = false;
    gateway_.metrics().stream_closed();
    respond_error(api_error_of(error));
  }

  void respond(unsigned status, std::string body, std::string_view content_type) {
    Response response{http::int_to_status(status), request_.version()};
    response.set(http::field::server, "fmwire");
    response.set(http::field::content_type, content_type);
    response.keep_alive(request_.keep_alive());
    response.body() = std::move(body);
    response.prepare_payload();
    send(std::move(response), request_.keep_alive());
  }

  void respond_error(const ApiError& error, bool keep_alive = true) {
    Response response{http::int_to_status(error.status), request_.version() == 0 ? 11 : request_.version()};
    response.set(http::field::server, "fmwire");
    response.set(http::field::content_type, "application/json");
    if (error.retry_after_s != 0) response.set(http::field::retry_after, std::to_string(error.retry_after_s));
    if (error.status == 401) response.set(http::field::www_authenticate, "Bearer");
    if (error.status == 405) response.set(http::field::allow, error.message.ends_with("POST") ? "POST" : "GET");
    keep_alive = keep_alive && request_.keep_alive();
    response.keep_alive(keep_alive);
    response.body() = error_json(error);
    response.prepare_payload();
    send(std::move(response), keep_alive);
  }

  void send(Response response, bool keep_alive) {
    gateway_.metrics().count_request(response.result_int());
    auto owned = std::make_shared<Response>(std::move(response));
    stream_.expires_after(gateway_.options().stalled_write_timeout);
    http::async_write(stream_, *owned, [self = shared_from_this(), owned, keep_alive,
                                        activity = std::move(activity_)](beast::error_code error, std::size_t) {
      if (error || !keep_alive) return self->close();
      self->request_ = {};
      self->read_request();
    });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  GatewayImpl& gateway_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::request<http::string_body> request_;
  Clock::time_point received_;
  // stream: false
  StreamIdentity identity_;
  GenerationHandle handle_;
  std::string text_;
  bool waiting_ = false;
  std::uint64_t request_count_ = 0;
  std::shared_ptr<void> activity_;
};

void GatewayImpl::accept() {
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

}  // namespace

codec::Result<std::unique_ptr<HttpGateway>, std::string> HttpGateway::start(HttpGatewayOptions options) {
  if (options.max_body_bytes == 0) return std::string("max_body_bytes must be positive");
  if (options.max_header_bytes == 0 || options.max_header_bytes > 0xffffffffu) {
    return std::string("max_header_bytes must be from 1 to 2^32 - 1");
  }
  if (options.max_tokens_default == 0) return std::string("max_tokens_default must be positive");
  if (options.replay_events == 0) return std::string("replay_events must be positive");
  if (options.model.empty()) return std::string("the model name is empty");
  auto gateway = std::make_unique<GatewayImpl>(std::move(options));
  if (auto problem = gateway->listen()) return *problem;
  gateway->run();
  return std::unique_ptr<HttpGateway>(std::move(gateway));
}

}  // namespace fmwire::gateway
