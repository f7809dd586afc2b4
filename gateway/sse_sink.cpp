#include "gateway/sse_sink.h"

#include <boost/asio/write.hpp>
#include <boost/beast/http/status.hpp>
#include <charconv>
#include <cstdio>
#include <limits>
#include <string_view>

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

std::size_t decimal_digits(std::uint64_t n) {
  std::size_t digits = 1;
  while (n >= 10) {
    n /= 10;
    ++digits;
  }
  return digits;
}

// `n` in base 10 or 16 at the end of `out`, without a format string or a
// temporary string: this is once or twice per event.
void append_number(std::string& out, std::uint64_t n, int base) {
  char digits[20];
  const auto [end, error] = std::to_chars(digits, digits + sizeof digits, n, base);
  out.append(digits, end);
}

std::string http_chunk(std::string_view data) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string chunk = size;
  chunk += data;
  chunk += "\r\n";
  return chunk;
}

// A whole response as bytes: this sink writes raw.
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

}  // namespace

SseSink::SseSink(HttpStream stream, const std::string& stream_id, std::chrono::milliseconds stalled_write_timeout)
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

void SseSink::watch(std::function<void()> lost) {
  lost_ = std::move(lost);
  read_some();
}

void SseSink::write_events(std::span<const StreamEvent* const> events, WriteDone done) {
  constexpr std::string_view kId = "id: ", kData = "\ndata: ", kEnd = "\n\n";
  std::size_t bytes = 0;
  for (const StreamEvent* event : events) {
    bytes += kId.size() + decimal_digits(event->n) + kData.size() + event->json.size() + kEnd.size();
  }
  out_.clear();
  take_header();
  append_number(out_, bytes, 16);
  out_ += "\r\n";
  for (const StreamEvent* event : events) {
    out_ += kId;
    append_number(out_, event->n, 10);
    out_ += kData;
    out_ += event->json;
    out_ += kEnd;
  }
  out_ += "\r\n";
  write(std::move(done));
}

std::size_t SseSink::max_events_per_write() const { return std::numeric_limits<std::size_t>::max(); }

void SseSink::write_end(const std::string* error, std::shared_ptr<void> done) {
  lost_ = nullptr;
  out_.clear();
  take_header();
  out_ += http_chunk("data: " + (error != nullptr ? *error : std::string("[DONE]")) + "\n\n");
  out_ += "0\r\n\r\n";
  write([self = shared_from_this(), done = std::move(done)](bool) { self->close(); });
}

void SseSink::write_refusal(const ApiError& error, std::shared_ptr<void> done) {
  lost_ = nullptr;
  out_ = header_sent_ ? http_chunk("data: " + error_json(error) + "\n\n") + "0\r\n\r\n" : response_bytes(error);
  header_sent_ = true;
  write([self = shared_from_this(), done = std::move(done)](bool) { self->close(); });
}

void SseSink::close() {
  lost_ = nullptr;
  stall_timer_.cancel();
  beast::error_code ignored;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream_.close();
}

void SseSink::take_header() {
  if (header_sent_) return;
  out_ = header_;
  header_sent_ = true;
}

// A reader that keeps up takes the bytes at once: one non-blocking send,
// and `done` runs before write() returns, with no asynchronous operation
// and no completion queued through the io_context for each event. What the
// kernel does not take (or an error) goes on as an asynchronous write.
// Over TLS every write is asynchronous: a synchronous TLS write that the
// socket cuts short would leave part of an encrypted record unsent.
template <typename Done>
void SseSink::write(Done done) {
  beast::error_code error;
  const std::size_t sent = stream_.tls() ? 0 : stream_.socket().write_some(asio::buffer(out_), error);
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
void SseSink::watch_for_stall(Clock::time_point deadline) {
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

// Reads (and drops) whatever the client sends, to see it go away; over
// TLS through the session (a close_notify is the client going away).
void SseSink::read_some() {
  auto on_read = [self = shared_from_this()](beast::error_code error, std::size_t) {
    if (error) return self->peer_gone();
    self->read_some();
  };
  if (stream_.tls()) return stream_.async_read_some(asio::buffer(scratch_), std::move(on_read));
  stream_.socket().async_read_some(asio::buffer(scratch_), std::move(on_read));
}

void SseSink::peer_gone() {
  if (!lost_) return;
  auto lost = std::move(lost_);
  lost_ = nullptr;
  lost();
}

}  // namespace fmwire::gateway
