// IoBackend on Boost.Asio's epoll reactor: the fallback where io_uring is
// refused (seccomp profiles that block it). One io_context driven by one loop
// thread; sockets, acceptors and timers are Asio objects kept in maps keyed by
// descriptor or timer id, so the interface stays in plain descriptors.
//
// Ownership: the backend owns a listening descriptor from accept() on (it is
// closed by stop_accepting() or the destructor), and a connected descriptor
// from open() until it delivers on_close. Descriptors handed to on_accept and
// on_connected belong to the callee.
//
// Owners must close() their sockets and see on_close before destroying the
// backend. One that does not is not called back: the destructor closes
// whatever is still open and drops every pending callback unrun.
//
// Asio has no "before the loop waits" point, so run() drives the context one
// batch at a time (block for one handler, then run those already ready, up to
// a bound) and calls the before-wait hook before each wait, the first included.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "transport/host_resolver.h"
#include "transport/io_backend.h"

namespace fmwire::transport {

class AsioBackend final : public IoBackend {
 public:
  // Bytes of each socket's receive buffer (one read's worth).
  static constexpr std::size_t kReceiveBufferBytes = 64 * 1024;
  // Most bytes one write system call is offered (the kernel takes what fits).
  static constexpr std::size_t kMaxBytesPerWrite = std::size_t{1} << 30;
  // Most handlers run in one batch before the before-wait hook: a busy
  // socket must not keep the hook (and so every flush) waiting forever.
  static constexpr int kMaxHandlersPerBatch = 128;
  // Wait before accepting again after an accept error such as EMFILE.
  static constexpr std::chrono::milliseconds kAcceptRetryDelay{100};

  AsioBackend();
  ~AsioBackend() override;
  AsioBackend(const AsioBackend&) = delete;
  AsioBackend& operator=(const AsioBackend&) = delete;

  BackendKind kind() const override;

  // Throws std::system_error when listen_fd cannot be taken over (not a
  // socket, not IPv4/IPv6); the descriptor then stays the caller's.
  void accept(int listen_fd, std::function<void(int fd)> on_accept) override;
  void stop_accepting(int listen_fd) override;

  // A name is looked up off the loop (host_resolver.h; not Asio's resolver,
  // whose one private thread a stalled lookup would hold up for every other
  // name), and its addresses tried in order until one connects. A name that
  // does not resolve is reported through on_connected, from the loop.
  void connect(const std::string& host, std::uint16_t port,
               std::function<void(int fd, std::error_code error)> on_connected) override;

  // A descriptor that cannot be taken over (not a TCP socket) is reported by
  // on_close with the error, from the loop. Opening a descriptor the backend
  // already holds, or sending on / closing one it does not, is a programmer
  // error and throws std::invalid_argument.
  void open(int fd, SocketEvents* events) override;
  // On a socket that is already closing (close() called, or the peer gone
  // and on_close not yet delivered) send() does nothing: on_close follows.
  void send(int fd, std::span<const iovec> buffers) override;
  // Cancels the socket's operations and shuts it down; the descriptor itself
  // is closed just before on_close, once Asio has returned every operation,
  // so its number cannot be reused while the backend still holds it. on_close(error) reports an empty error for a close() asked for,
  // and the first failure otherwise. A second close() of a closing socket
  // does nothing.
  void close(int fd) override;

  TimerId schedule(std::chrono::milliseconds delay, std::function<void()> fn) override;
  // Cancelling a timer that already fired or was cancelled does nothing.
  void cancel(TimerId timer) override;

  void post(std::function<void()> fn) override;
  void set_before_wait(std::function<void()> hook) override;

  // A stop() made while run() is not running makes the next run() return
  // after at most one batch; run() can be called again after it returned.
  void run() override;
  void stop() override;

 private:
  // One connected socket: its Asio object, receive buffer and the buffer
  // list of the send in flight. `serial` tells a handler of this socket from
  // one of an earlier socket that had the same descriptor number.
  struct SocketState {
    SocketState(boost::asio::io_context& io, int fd, std::uint64_t serial, SocketEvents* events);
    int fd;
    std::uint64_t serial;
    SocketEvents* events;
    boost::asio::ip::tcp::socket socket;
    std::unique_ptr<std::uint64_t[]> receive_buffer;  // 8-byte aligned
    std::vector<boost::asio::const_buffer> send_buffers;  // reused between sends
    int operations_in_flight = 0;  // Asio still holds buffers or the socket
    bool send_in_flight = false;
    bool closing = false;       // from here on only on_close is delivered
    bool close_posted = false;  // deliver_close is queued
    std::error_code close_error;
  };

  // One listening socket given to accept().
  struct AcceptorState {
    AcceptorState(boost::asio::io_context& io, std::uint64_t serial, std::function<void(int)> on_accept);
    std::uint64_t serial;
    boost::asio::ip::tcp::acceptor acceptor;
    boost::asio::steady_timer retry_timer;
    std::function<void(int)> on_accept;
  };

  void start_accept(int listen_fd, AcceptorState& state);
  void handle_accept(int listen_fd, std::uint64_t serial, const boost::system::error_code& error,
                     boost::asio::ip::tcp::socket peer);
  void start_receive(SocketState& state);
  void handle_receive(int fd, std::uint64_t serial, const boost::system::error_code& error,
                      std::size_t bytes);
  void handle_send(int fd, std::uint64_t serial, const boost::system::error_code& error);
  // Marks the socket closing and cancels its operations; once every one of
  // them has come back, posts deliver_close, which closes the descriptor,
  // frees the state and calls on_close.
  void begin_close(SocketState& state, std::error_code error);
  void finish_close_when_idle(SocketState& state);
  void deliver_close(int fd, std::uint64_t serial);
  // The state of a live socket, or null when fd is unknown or has been
  // reused by a socket other than `serial`.
  SocketState* find_socket(int fd, std::uint64_t serial);
  SocketState& require_socket(int fd, const char* operation);
  void run_batch();
  void connect_next(std::shared_ptr<SocketAddresses> addresses, std::size_t next,
                    std::function<void(int fd, std::error_code error)> on_connected, std::error_code last_error);

  // Declared first, destroyed last: every Asio object below is destroyed
  // (and its operations cancelled) while the context still exists, and the
  // context's destructor then drops the cancelled handlers without running
  // them.
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::atomic<bool> stop_requested_{false};
  std::function<void()> before_wait_;
  std::uint64_t next_serial_ = 1;
  TimerId next_timer_id_ = 1;
  std::unordered_map<int, std::unique_ptr<AcceptorState>> acceptors_;
  std::unordered_map<int, std::unique_ptr<SocketState>> sockets_;
  std::unordered_map<TimerId, std::unique_ptr<boost::asio::steady_timer>> timers_;
  std::unique_ptr<HostResolver> resolver_;  // made at the first name; gone first in the destructor
};

}  // namespace fmwire::transport
