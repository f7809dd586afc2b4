#include "transport/asio_backend.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace fmwire::transport {
namespace {

using boost::asio::ip::tcp;

std::error_code last_system_error() { return {errno, std::system_category()}; }

// IPv4 or IPv6, from the socket's own address: Asio needs the protocol to
// take over a descriptor it did not create.
tcp protocol_of(int fd, std::error_code& error) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    error = last_system_error();
    return tcp::v4();
  }
  if (address.ss_family == AF_INET) return tcp::v4();
  if (address.ss_family == AF_INET6) return tcp::v6();
  error = std::make_error_code(std::errc::address_family_not_supported);
  return tcp::v4();
}

std::string describe(const char* operation, int fd) {
  return std::string(operation) + ": descriptor " + std::to_string(fd);
}

}  // namespace

AsioBackend::SocketState::SocketState(boost::asio::io_context& io, int fd_, std::uint64_t serial_,
                                      SocketEvents* events_)
    : fd(fd_),
      serial(serial_),
      events(events_),
      socket(io),
      receive_buffer(std::make_unique_for_overwrite<std::uint64_t[]>(kReceiveBufferBytes / sizeof(std::uint64_t))) {}

AsioBackend::AcceptorState::AcceptorState(boost::asio::io_context& io, std::uint64_t serial_,
                                          std::function<void(int)> on_accept_)
    : serial(serial_), acceptor(io), retry_timer(io), on_accept(std::move(on_accept_)) {}

AsioBackend::AsioBackend() : io_(1), work_(boost::asio::make_work_guard(io_)) {
  // Asio creates its epoll reactor (an epoll descriptor, an eventfd, a
  // timerfd) on the first socket or timer. Creating it here makes start-up
  // the one place that can fail for want of descriptors: later, accept()
  // under EMFILE must retry, not throw from deep inside Asio.
  boost::asio::steady_timer reactor_now(io_);
}

AsioBackend::~AsioBackend() {
  resolver_.reset();  // first: its helper threads post to this backend until it has gone
  // Destroying the Asio objects closes their descriptors and cancels their
  // operations; nothing runs the context again, so the cancelled handlers
  // (and any posted on_close) are destroyed by io_'s destructor, unrun.
  timers_.clear();
  sockets_.clear();
  acceptors_.clear();
}

BackendKind AsioBackend::kind() const { return BackendKind::asio; }

// ---- accepting ----

void AsioBackend::accept(int listen_fd, std::function<void(int fd)> on_accept) {
  if (!on_accept) throw std::invalid_argument(describe("accept", listen_fd) + ": on_accept is empty");
  if (acceptors_.contains(listen_fd)) {
    throw std::invalid_argument(describe("accept", listen_fd) + ": already accepting on it");
  }
  int listening = 0;
  socklen_t length = sizeof(listening);
  if (::getsockopt(listen_fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0) {
    throw std::system_error(last_system_error(), describe("accept", listen_fd));
  }
  if (listening == 0) {
    throw std::invalid_argument(describe("accept", listen_fd) + ": socket is not listening");
  }
  std::error_code family_error;
  const tcp protocol = protocol_of(listen_fd, family_error);
  if (family_error) throw std::system_error(family_error, describe("accept", listen_fd));

  auto state = std::make_unique<AcceptorState>(io_, next_serial_++, std::move(on_accept));
  boost::system::error_code error;
  state->acceptor.assign(protocol, listen_fd, error);
  if (error) throw std::system_error(error, describe("accept", listen_fd));
  AcceptorState& accepting = *state;
  acceptors_.emplace(listen_fd, std::move(state));
  start_accept(listen_fd, accepting);
}

void AsioBackend::start_accept(int listen_fd, AcceptorState& state) {
  state.acceptor.async_accept(
      [this, listen_fd, serial = state.serial](const boost::system::error_code& error, tcp::socket peer) {
        handle_accept(listen_fd, serial, error, std::move(peer));
      });
}

void AsioBackend::handle_accept(int listen_fd, std::uint64_t serial, const boost::system::error_code& error,
                                tcp::socket peer) {
  auto found = acceptors_.find(listen_fd);
  // stop_accepting() came first; a socket accepted meanwhile closes with `peer`.
  if (found == acceptors_.end() || found->second->serial != serial) return;
  AcceptorState& state = *found->second;

  if (error) {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays in the listen
    // queue and accepting again at once would fail the same way, in a busy
    // loop. Pause, then try again. (ECONNABORTED is retried inside Asio.)
    state.retry_timer.expires_after(kAcceptRetryDelay);
    state.retry_timer.async_wait([this, listen_fd, serial](const boost::system::error_code& /*wait_error*/) {
      auto again = acceptors_.find(listen_fd);
      if (again == acceptors_.end() || again->second->serial != serial) return;  // stopped meanwhile
      // Only stop_accepting() cuts the wait short (its error), and the
      // lookup above has caught that; accepting again is the next step.
      start_accept(listen_fd, *again->second);
    });
    return;
  }

  // Accept the next connection before handing this one over: on_accept may
  // call stop_accepting(), which destroys `state`, so on_accept is called
  // through a copy.
  start_accept(listen_fd, state);
  boost::system::error_code release_error;
  const int fd = peer.release(release_error);
  // Releasing a socket Asio has just accepted does not fail; if it did,
  // `peer` would still own the connection and close it, so its client sees
  // the connection end. The listener carries on either way: an accept-side
  // failure must not stop the loop.
  if (release_error) return;
  std::function<void(int)> on_accept = state.on_accept;
  on_accept(fd);
}

void AsioBackend::stop_accepting(int listen_fd) {
  auto found = acceptors_.find(listen_fd);
  if (found == acceptors_.end()) {
    throw std::invalid_argument(describe("stop_accepting", listen_fd) + ": not accepting on it");
  }
  std::unique_ptr<AcceptorState> state = std::move(found->second);
  acceptors_.erase(found);
  state->retry_timer.cancel();
  boost::system::error_code error;
  state->acceptor.close(error);
  if (error) throw std::system_error(error, describe("stop_accepting: closing", listen_fd));
}

// ---- connecting ----

void AsioBackend::connect(const std::string& host, std::uint16_t port,
                          std::function<void(int fd, std::error_code error)> on_connected) {
  if (!on_connected) throw std::invalid_argument("connect to " + host + ": on_connected is empty");
  if (auto address = numeric_address(host, port)) {
    connect_next(std::make_shared<SocketAddresses>(1, *address), 0, std::move(on_connected), {});
    return;
  }
  if (!resolver_) resolver_ = std::make_unique<HostResolver>(*this);
  resolver_->resolve(host, port, [this, on_connected = std::move(on_connected)](SocketAddresses addresses,
                                                                                std::error_code error) mutable {
    if (error) {
      on_connected(-1, error);
      return;
    }
    connect_next(std::make_shared<SocketAddresses>(std::move(addresses)), 0, std::move(on_connected), {});
  });
}

// Connects to (*addresses)[next], then to the ones after it while each
// fails; with none left, reports the last error (from the loop).
void AsioBackend::connect_next(std::shared_ptr<SocketAddresses> addresses, std::size_t next,
                               std::function<void(int fd, std::error_code error)> on_connected,
                               std::error_code last_error) {
  if (next >= addresses->size()) {
    if (!last_error) last_error = std::make_error_code(std::errc::invalid_argument);
    boost::asio::post(io_, [on_connected = std::move(on_connected), last_error] { on_connected(-1, last_error); });
    return;
  }
  const SocketAddress& address = (*addresses)[next];
  tcp::endpoint endpoint;
  std::memcpy(endpoint.data(), address.get(), address.bytes);
  endpoint.resize(address.bytes);
  // The handler owns the socket until the descriptor is released to the
  // caller; if the backend is destroyed first, both go unrun.
  auto socket = std::make_shared<tcp::socket>(io_);
  socket->async_connect(endpoint, [this, socket, addresses, next, on_connected = std::move(on_connected)](
                                      const boost::system::error_code& error) mutable {
    if (error) {
      if (error != boost::asio::error::operation_aborted && next + 1 < addresses->size()) {
        connect_next(std::move(addresses), next + 1, std::move(on_connected), error);
        return;
      }
      on_connected(-1, error);
      return;
    }
    boost::system::error_code option_error;
    socket->set_option(tcp::no_delay(true), option_error);
    if (option_error) {
      on_connected(-1, option_error);
      return;
    }
    boost::system::error_code release_error;
    const int fd = socket->release(release_error);
    if (release_error) {
      on_connected(-1, release_error);
      return;
    }
    on_connected(fd, {});
  });
}

// ---- connected sockets: open, receive, send, close ----

void AsioBackend::open(int fd, SocketEvents* events) {
  if (events == nullptr) throw std::invalid_argument(describe("open", fd) + ": events is null");
  if (sockets_.contains(fd)) {
    throw std::invalid_argument(describe("open", fd) + ": already open in this backend");
  }
  auto owned = std::make_unique<SocketState>(io_, fd, next_serial_++, events);
  SocketState& state = *owned;
  sockets_.emplace(fd, std::move(owned));

  std::error_code family_error;
  const tcp protocol = protocol_of(fd, family_error);
  if (family_error) {
    begin_close(state, family_error);
    return;
  }
  boost::system::error_code error;
  state.socket.assign(protocol, fd, error);
  if (!error) state.socket.set_option(tcp::no_delay(true), error);
  if (error) {
    begin_close(state, error);
    return;
  }
  start_receive(state);
}

void AsioBackend::start_receive(SocketState& state) {
  ++state.operations_in_flight;
  state.socket.async_read_some(
      boost::asio::buffer(state.receive_buffer.get(), kReceiveBufferBytes),
      [this, fd = state.fd, serial = state.serial](const boost::system::error_code& error, std::size_t bytes) {
        handle_receive(fd, serial, error, bytes);
      });
}

void AsioBackend::handle_receive(int fd, std::uint64_t serial, const boost::system::error_code& error,
                                 std::size_t bytes) {
  SocketState* state = find_socket(fd, serial);
  // The state outlives its operations (deliver_close waits for them), so
  // this is only reached if that invariant broke; nothing is left to tell.
  if (state == nullptr) return;
  --state->operations_in_flight;
  if (state->closing) {
    finish_close_when_idle(*state);
    return;
  }
  if (bytes > 0) {
    state->events->on_receive(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(state->receive_buffer.get()), bytes));
    // on_receive may have called close(): the state stays until on_close.
    if (state->closing) return;
  }
  if (error == boost::asio::error::eof) {
    begin_close(*state, {});
    return;
  }
  if (error) {
    begin_close(*state, error);
    return;
  }
  start_receive(*state);
}

void AsioBackend::send(int fd, std::span<const iovec> buffers) {
  SocketState& state = require_socket(fd, "send");
  if (state.closing) return;
  if (state.send_in_flight) {
    throw std::logic_error(describe("send", fd) + ": a send is already in flight (one at a time)");
  }
  // The iovec array may go away when send() returns; the bytes it points to
  // stay valid until on_send_complete or on_close. Copy the list only.
  state.send_buffers.clear();
  for (const iovec& piece : buffers) state.send_buffers.emplace_back(piece.iov_base, piece.iov_len);
  state.send_in_flight = true;
  ++state.operations_in_flight;
  // A span, not the vector, so that async_write's copy of the sequence does
  // not copy (allocate) the list. The completion condition lifts Asio's
  // default cap of 64 KiB per write_some (transfer_all): a 16 MiB attachment
  // went out in 256 system calls, half the speed of one large write.
  boost::asio::async_write(state.socket, std::span<const boost::asio::const_buffer>(state.send_buffers),
                           [](const boost::system::error_code& error, std::size_t) -> std::size_t {
                             return error ? 0 : kMaxBytesPerWrite;
                           },
                           [this, fd, serial = state.serial](const boost::system::error_code& error, std::size_t) {
                             handle_send(fd, serial, error);
                           });
}

void AsioBackend::handle_send(int fd, std::uint64_t serial, const boost::system::error_code& error) {
  SocketState* state = find_socket(fd, serial);
  if (state == nullptr) return;  // see handle_receive
  --state->operations_in_flight;
  state->send_in_flight = false;
  if (state->closing) {
    finish_close_when_idle(*state);
    return;
  }
  if (error) {
    begin_close(*state, error);
    return;
  }
  state->events->on_send_complete();
}

void AsioBackend::close(int fd) { begin_close(require_socket(fd, "close"), {}); }

void AsioBackend::begin_close(SocketState& state, std::error_code error) {
  if (state.closing) return;
  state.closing = true;
  state.close_error = error;
  if (state.socket.is_open()) {
    // cancel() aborts the operations waiting now; shutdown() makes the
    // next step of a gathered write already past its first write fail at
    // once rather than wait for a peer that may never read. The descriptor
    // stays open (its number reserved) until deliver_close.
    boost::system::error_code step_error;
    state.socket.cancel(step_error);
    if (step_error && !state.close_error) state.close_error = step_error;
    state.socket.shutdown(tcp::socket::shutdown_both, step_error);
    // ENOTCONN: the peer reset the connection first; the reset is the news.
    if (step_error && step_error != boost::asio::error::not_connected && !state.close_error) {
      state.close_error = step_error;
    }
  }
  finish_close_when_idle(state);
}

void AsioBackend::finish_close_when_idle(SocketState& state) {
  if (state.operations_in_flight > 0 || state.close_posted) return;
  state.close_posted = true;
  boost::asio::post(io_, [this, fd = state.fd, serial = state.serial] { deliver_close(fd, serial); });
}

void AsioBackend::deliver_close(int fd, std::uint64_t serial) {
  auto found = sockets_.find(fd);
  if (found == sockets_.end() || found->second->serial != serial) {
    throw std::logic_error(describe("deliver_close", fd) + ": socket state vanished before its on_close");
  }
  std::unique_ptr<SocketState> state = std::move(found->second);
  sockets_.erase(found);
  std::error_code error = state->close_error;
  if (state->socket.is_open()) {
    boost::system::error_code close_error;
    state->socket.close(close_error);
    if (close_error && !error) error = close_error;
  } else if (::close(fd) != 0 && !error) {
    // open() could not hand the descriptor to Asio; it is still ours to close.
    error = last_system_error();
  }
  SocketEvents* events = state->events;
  state.reset();
  events->on_close(error);
}

AsioBackend::SocketState* AsioBackend::find_socket(int fd, std::uint64_t serial) {
  auto found = sockets_.find(fd);
  if (found == sockets_.end() || found->second->serial != serial) return nullptr;
  return found->second.get();
}

AsioBackend::SocketState& AsioBackend::require_socket(int fd, const char* operation) {
  auto found = sockets_.find(fd);
  if (found == sockets_.end()) throw std::invalid_argument(describe(operation, fd) + ": not open in this backend");
  return *found->second;
}

// ---- timers and cross-thread work ----

TimerId AsioBackend::schedule(std::chrono::milliseconds delay, std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("schedule: fn is empty");
  const TimerId id = next_timer_id_++;
  auto timer = std::make_unique<boost::asio::steady_timer>(io_, delay);
  timer->async_wait([this, id, fn = std::move(fn)](const boost::system::error_code& error) {
    auto found = timers_.find(id);
    if (found == timers_.end()) return;  // cancelled
    timers_.erase(found);
    // Only cancel() (which erases the entry) aborts a wait.
    if (error) throw std::system_error(error, "timer " + std::to_string(id));
    fn();
  });
  timers_.emplace(id, std::move(timer));
  return id;
}

void AsioBackend::cancel(TimerId timer) {
  auto found = timers_.find(timer);
  if (found == timers_.end()) return;  // fired or cancelled already
  found->second->cancel();
  timers_.erase(found);
}

void AsioBackend::post(std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("post: fn is empty");
  boost::asio::post(io_, std::move(fn));
}

void AsioBackend::set_before_wait(std::function<void()> hook) { before_wait_ = std::move(hook); }

// ---- the loop ----

void AsioBackend::run() {
  // The hook runs before every wait, the first included: frames queued
  // before run() was called leave before the loop blocks.
  while (!stop_requested_.load(std::memory_order_acquire)) {
    if (before_wait_) before_wait_();
    run_batch();
  }
  stop_requested_.store(false, std::memory_order_release);
  io_.restart();
}

void AsioBackend::run_batch() {
  // Blocks (the work guard keeps an idle context waiting) until one handler
  // ran or stop() was called; then runs those ready now, polling the reactor
  // once more when the queue empties, up to the bound.
  if (io_.run_one() == 0) return;
  for (int handlers = 1; handlers < kMaxHandlersPerBatch; ++handlers) {
    if (io_.poll_one() == 0) return;
  }
}

void AsioBackend::stop() {
  stop_requested_.store(true, std::memory_order_release);
  io_.stop();
}

}  // namespace fmwire::transport
