// The loop a thread runs: it owns the thread's I/O backend (io_uring, or
// Asio where io_uring is refused) and, before the loop waits, flushes every
// connection that queued frames during the turn, so that what a turn
// produced leaves in one write per connection (DESIGN.md, natural batching).
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "transport/io_backend.h"
#include "transport/tls_credentials.h"
#include "transport/uring_backend.h"

namespace fmwire::transport {

class Connection;

// Owns a loop thread's backend and flushes its connections after each batch
// of completions. One per loop thread; not thread-safe but for post/stop.
class EventLoop {
 public:
  explicit EventLoop(std::string_view forced_backend = {});
  // With io_uring's settings (zero-copy threshold, buffer ring) when it is chosen.
  EventLoop(std::string_view forced_backend, const UringOptions& uring);
  ~EventLoop();

  IoBackend& backend() { return *backend_; }
  // Every socket of this loop, accepted or connected, runs TLS 1.3 with
  // mutual authentication from now on (tls_backend.h): call before the
  // first socket. A second call with the same credentials does nothing;
  // other credentials are a programmer error (std::logic_error). The
  // backend's log line then says which TLS does the work.
  void use_tls(std::shared_ptr<const TlsCredentials> credentials);
  // The credentials of use_tls(), or null: plaintext.
  const TlsCredentials* tls() const { return tls_.get(); }
  const std::string& backend_log_line() const { return backend_log_line_; }
  void run() { backend_->run(); }
  void stop() { backend_->stop(); }
  void post(std::function<void()> fn) { backend_->post(std::move(fn)); }
  // Runs fn as a turn of this loop on the calling thread if the loop is
  // waiting (IoBackend::try_run_turn); false: post() instead.
  bool try_run_turn(const std::function<void()>& fn) { return backend_->try_run_turn(fn); }
  // Memory attachments are sent from by reference, for the backend to
  // register once (IoBackend::register_memory).
  bool register_memory(std::span<const std::byte> memory) { return backend_->register_memory(memory); }
  void unregister_memory(std::span<const std::byte> memory) { backend_->unregister_memory(memory); }

  // Runs `hook` on the loop thread at the end of every turn, before the
  // turn's connections flush and the loop waits: whoever gathered what the
  // turn's callbacks gave it hands that on in one go (Client's on_turn_end).
  // One hook; a second call replaces it. Before run(), or on the loop thread.
  void set_turn_end(std::function<void()> hook) { turn_end_ = std::move(hook); }

  // The connection has frames queued: flush it before the loop waits.
  void want_flush(Connection* connection) { flush_list_.push_back(connection); }
  // The connection is being destroyed: forget it.
  void forget(Connection* connection);

 private:
  void end_turn();
  void flush_all();

  std::unique_ptr<IoBackend> backend_;
  std::shared_ptr<const TlsCredentials> tls_;
  std::string backend_log_line_;
  std::vector<Connection*> flush_list_;
  std::vector<Connection*> flushing_;
  std::function<void()> turn_end_;
};

}  // namespace fmwire::transport
