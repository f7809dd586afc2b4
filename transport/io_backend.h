// The narrow interface an I/O engine implements for one loop thread: sockets
// whose bytes arrive through a callback and which send gathered buffers,
// timers, and a wake-up from other threads. uring_backend.h (io_uring via
// liburing) and asio_backend.h (Boost.Asio's epoll reactor) implement it;
// everything per frame (framing, streams, credits) lives above it, so the
// backend is called once per write and once per receive, never per frame.
// tls_backend.h wraps any of them in TLS 1.3 (EventLoop::use_tls).
//
// Threading: every member except post() and stop() is called on the loop
// thread only. No locks on the data path.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>

namespace fmwire::transport {

// What a backend tells the owner of a socket (a Connection).
class SocketEvents {
 public:
  virtual ~SocketEvents() = default;
  // Bytes arrived. They are valid only during the call and start 8-byte
  // aligned, so whole frames inside them can be decoded in place.
  virtual void on_receive(std::span<const std::byte> bytes) = 0;
  // Everything given to the last send() has been written.
  virtual void on_send_complete() = 0;
  // The socket is closed: the peer closed (error is empty), a read or write
  // failed (that error), or close() was called (std::errc::operation_canceled).
  // The last call for this socket.
  virtual void on_close(std::error_code error) = 0;
};

enum class BackendKind { io_uring, asio };
std::string_view to_string(BackendKind kind);

using TimerId = std::uint64_t;

class IoBackend {
 public:
  virtual ~IoBackend() = default;
  virtual BackendKind kind() const = 0;

  // Accepts connections on a bound, listening socket until stop_accepting();
  // each accepted socket's descriptor goes to on_accept, which takes it over.
  virtual void accept(int listen_fd, std::function<void(int fd)> on_accept) = 0;
  virtual void stop_accepting(int listen_fd) = 0;

  // Connects a new socket to host:port (numeric IPv4/IPv6). on_connected
  // gets the descriptor, or -1 and the error.
  virtual void connect(const std::string& host, std::uint16_t port,
                       std::function<void(int fd, std::error_code error)> on_connected) = 0;

  // Takes over a connected socket: its bytes go to events->on_receive until
  // on_close. `events` must outlive the socket's on_close call.
  virtual void open(int fd, SocketEvents* events) = 0;
  // Writes every byte of `buffers` (partial writes are the backend's
  // business), then calls on_send_complete. One send in flight per socket;
  // the memory must stay valid until on_send_complete or on_close.
  virtual void send(int fd, std::span<const iovec> buffers) = 0;
  // Closes the socket; on_close follows, from the loop, not from inside close().
  virtual void close(int fd) = 0;

  // Memory that large attachments are sent from again and again (a KV pool,
  // a bench's source buffer): a backend may register it with the kernel once,
  // so that its sends from inside it skip pinning the pages each time
  // (io_uring's fixed buffers, for its zero-copy sends). False where the
  // backend does not (Asio's, io_uring's with zero-copy off), the kernel
  // refuses (the memlock limit, memory not writable), or the table is full;
  // sends from it then work as before.
  // The memory must stay mapped until unregister_memory().
  virtual bool register_memory(std::span<const std::byte> memory) {
    (void)memory;
    return false;
  }
  virtual void unregister_memory(std::span<const std::byte> memory) { (void)memory; }

  // Calls fn once after `delay`, on the loop thread, unless cancelled.
  virtual TimerId schedule(std::chrono::milliseconds delay, std::function<void()> fn) = 0;
  virtual void cancel(TimerId timer) = 0;

  // Runs fn on the loop thread. Thread-safe.
  virtual void post(std::function<void()> fn) = 0;
  // Called on the loop thread after each batch of completions, before the
  // loop waits again: connections flush what the batch produced here, so
  // frames that arrive while a write is in flight leave together.
  virtual void set_before_wait(std::function<void()> hook) = 0;

  // From another thread: when the loop is waiting (none of its turn is
  // under way), runs fn as one loop turn on the calling thread, the loop
  // kept out meanwhile, and returns true: fn may do anything a loop-thread
  // callback may, and what it queues is flushed before this returns, sent
  // from this thread where the backend can. False (fn not run) when the
  // loop is busy, not running, or the backend cannot lend its turns: then
  // post(). A thread that has work for the loop at an instant it sleeps
  // (an engine's step end) saves the loop's wake-up. Thread-safe.
  virtual bool try_run_turn(const std::function<void()>& fn) {
    (void)fn;
    return false;
  }

  // Runs until stop(). stop() is thread-safe; a stop ends one run (the one
  // under way, or the next if none is), so run() may be called again.
  virtual void run() = 0;
  virtual void stop() = 0;
};

struct BackendChoice {
  std::unique_ptr<IoBackend> backend;
  std::string log_line;  // why this one, for the one start-up log line
};

// io_uring when it can be set up, else Asio. `forced` (a flag, or the
// FMWIRE_IO_BACKEND environment variable read by the caller: "uring" or
// "asio"; "" or "auto" choose) overrides; forcing io_uring where it cannot
// start throws.
struct UringOptions;
BackendChoice make_backend(std::string_view forced, const UringOptions& uring);
BackendChoice make_backend(std::string_view forced = {});

}  // namespace fmwire::transport
