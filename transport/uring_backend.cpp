#include "transport/uring_backend.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>

namespace fmwire::transport {

namespace {

constexpr std::uint16_t kBufferGroup = 1;
constexpr std::size_t kMaxIovecs = 1024;  // IOV_MAX

std::error_code errno_code(int error) { return {error, std::system_category()}; }

void set_no_delay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

struct UringBackend::Socket {
  int fd = -1;
  std::uint32_t generation = 0;
  SocketEvents* events = nullptr;
  int in_flight = 0;        // submissions whose last completion has not come
  bool receiving = false;          // a receive is armed
  bool sending = false;
  bool closing = false;
  std::error_code close_error;
  std::vector<iovec> send_iovecs;  // reused: no allocation per send once warm
  std::size_t send_first = 0;
  msghdr message{};
  // A zero-copy send whose result came but whose notification (the kernel
  // done with our pages) has not: the result waits here.
  bool awaiting_notification = false;
  int zero_copy_result = 0;
  // A send split around attachments in registered memory: linked
  // submissions, each sending all it was given (MSG_WAITALL) or failing,
  // which cancels the ones after it. Done when every one has completed.
  std::vector<msghdr> chain_messages;     // sized once: the kernel reads them
  std::vector<std::size_t> chain_bytes;   // what each submission is to send
  int chain_pending = 0;                  // submissions whose last completion has not come
  std::size_t chain_results = 0;          // results come in chain order
  std::size_t chain_end = 0;              // send_iovecs index after the chain's last
  int chain_error = 0;
};

struct UringBackend::Listener {
  int fd = -1;
  std::uint32_t generation = 0;
  std::function<void(int)> on_accept;
};

// A connect under way: the socket trying addresses[next - 1], and those
// left to try after it.
struct UringBackend::PendingConnect {
  int fd = -1;
  SocketAddresses addresses;
  std::size_t next = 0;
  std::function<void(int, std::error_code)> on_connected;
};

std::uint64_t UringBackend::user_data(Op op, std::uint32_t generation, std::uint32_t index) {
  return (std::uint64_t{static_cast<std::uint8_t>(op)} << 56) | (std::uint64_t{generation & 0xffffff} << 32) | index;
}

namespace {

// FMWIRE_URING_ABLATE: features turned off for a measurement (uring_backend.h).
void apply_ablations(UringOptions& options) {
  const char* text = std::getenv("FMWIRE_URING_ABLATE");
  if (text == nullptr) return;
  const std::string_view list(text);
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t end = std::min(list.find(',', begin), list.size());
    const std::string_view word = list.substr(begin, end - begin);
    if (word == "unbatched") {
      options.batch_submissions = false;
    } else if (word == "no-coop-taskrun") {
      options.coop_taskrun = false;
    } else if (word == "small-buffers") {
      options.receive_buffer_bytes = 4096;
    } else if (word == "single-shot-receive") {
      options.multishot_receive = false;
    } else if (word == "single-shot-accept") {
      options.multishot_accept = false;
    } else if (word == "no-lent-turns") {
      options.lend_turns = false;
    } else if (!word.empty()) {
      throw std::invalid_argument("FMWIRE_URING_ABLATE: unknown feature '" + std::string(word) +
                                  "' (unbatched, no-coop-taskrun, small-buffers, single-shot-receive, "
                                  "single-shot-accept, no-lent-turns)");
    }
    begin = end + 1;
  }
}

}  // namespace

UringBackend::UringBackend(UringOptions options) : options_(options) {
  apply_ablations(options_);
  if (options_.receive_buffers == 0 || (options_.receive_buffers & (options_.receive_buffers - 1)) != 0 ||
      options_.receive_buffers > 32768) {
    throw std::invalid_argument("io_uring: receive_buffers must be a power of two up to 32768");
  }
  io_uring_params params{};
  params.flags = (options_.coop_taskrun ? IORING_SETUP_COOP_TASKRUN : 0u) | IORING_SETUP_SUBMIT_ALL;
  int result = io_uring_queue_init_params(options_.queue_entries, &ring_, &params);
  if (result == -EINVAL) {  // an older kernel without those flags
    params = {};
    result = io_uring_queue_init_params(options_.queue_entries, &ring_, &params);
  }
  if (result < 0) throw std::system_error(errno_code(-result), "io_uring_queue_init");
  if ((params.features & IORING_FEAT_EXT_ARG) == 0) {
    io_uring_queue_exit(&ring_);
    throw std::system_error(errno_code(ENOSYS), "io_uring without IORING_FEAT_EXT_ARG (kernel < 5.11)");
  }

  // Zero-copy send needs kernel 6.1; an older one sends the plain way.
  if (options_.zero_copy_min_bytes > 0) {
    io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
    if (probe == nullptr || !io_uring_opcode_supported(probe, IORING_OP_SENDMSG_ZC)) options_.zero_copy_min_bytes = 0;
    if (probe != nullptr) io_uring_free_probe(probe);
  }

  // The fixed-buffer table, its slots empty until register_memory(). Only
  // zero-copy sends use it, so there is none without them.
  if (options_.zero_copy_min_bytes > 0 && io_uring_register_buffers_sparse(&ring_, kRegisteredSlots) == 0) {
    registered_.resize(kRegisteredSlots);
  }

  // The provided-buffer ring (liburing 2.3 has no io_uring_setup_buf_ring).
  buffer_ring_bytes_ = options_.receive_buffers * sizeof(io_uring_buf);
  void* mapped = ::mmap(nullptr, buffer_ring_bytes_, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
  if (mapped == MAP_FAILED) {
    io_uring_queue_exit(&ring_);
    throw std::system_error(errno_code(errno), "mmap of the provided-buffer ring");
  }
  buffer_ring_ = static_cast<io_uring_buf_ring*>(mapped);
  io_uring_buf_reg registration{};
  registration.ring_addr = reinterpret_cast<std::uint64_t>(mapped);
  registration.ring_entries = options_.receive_buffers;
  registration.bgid = kBufferGroup;
  result = io_uring_register_buf_ring(&ring_, &registration, 0);
  if (result < 0) {
    ::munmap(mapped, buffer_ring_bytes_);
    io_uring_queue_exit(&ring_);
    throw std::system_error(errno_code(-result), "io_uring_register_buf_ring (kernel < 5.19?)");
  }
  io_uring_buf_ring_init(buffer_ring_);
  const std::size_t words = std::size_t{options_.receive_buffers} * options_.receive_buffer_bytes / 8;
  receive_memory_.reset(new std::uint64_t[words]);
  const int mask = io_uring_buf_ring_mask(options_.receive_buffers);
  for (unsigned id = 0; id < options_.receive_buffers; ++id) {
    io_uring_buf_ring_add(buffer_ring_, reinterpret_cast<std::byte*>(receive_memory_.get()) + std::size_t{id} * options_.receive_buffer_bytes,
                          options_.receive_buffer_bytes, static_cast<unsigned short>(id), mask, static_cast<int>(id));
  }
  io_uring_buf_ring_advance(buffer_ring_, static_cast<int>(options_.receive_buffers));

  wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    const int error = errno;
    ::munmap(mapped, buffer_ring_bytes_);
    io_uring_queue_exit(&ring_);
    throw std::system_error(errno_code(error), "eventfd");
  }
  arm_wake();
}

UringBackend::~UringBackend() {
  resolver_.reset();  // first: its helper threads post to this backend until it has gone
  for (auto& socket : sockets_) {
    if (socket) ::close(socket->fd);
  }
  for (auto& listener : listeners_) {
    if (!listener) continue;
    ::shutdown(listener->fd, SHUT_RDWR);  // out of LISTEN before the ring's teardown lets go of it
    ::close(listener->fd);
  }
  for (auto& [id, pending] : connects_) ::close(pending->fd);
  io_uring_queue_exit(&ring_);
  ::munmap(buffer_ring_, buffer_ring_bytes_);
  ::close(wake_fd_);
}

io_uring_sqe* UringBackend::next_sqe() {
  // Unbatched (a measurement only): what was prepared goes in now, alone.
  if (!options_.batch_submissions) io_uring_submit(&ring_);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {  // the queue is full: hand what is there to the kernel
    io_uring_submit(&ring_);
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

UringBackend::Socket* UringBackend::socket_for(int fd) {
  if (fd < 0 || static_cast<std::size_t>(fd) >= sockets_.size()) return nullptr;
  return sockets_[fd].get();
}

void UringBackend::arm_wake() {
  io_uring_sqe* sqe = next_sqe();
  io_uring_prep_read(sqe, wake_fd_, &wake_value_, sizeof wake_value_, 0);
  io_uring_sqe_set_data64(sqe, user_data(Op::wake, 0, 0));
}

void UringBackend::accept(int listen_fd, std::function<void(int fd)> on_accept) {
  if (static_cast<std::size_t>(listen_fd) >= listeners_.size()) listeners_.resize(listen_fd + 1);
  auto listener = std::make_unique<Listener>();
  listener->fd = listen_fd;
  listener->generation = next_generation_++;
  listener->on_accept = std::move(on_accept);
  arm_accept(*listener);
  listeners_[listen_fd] = std::move(listener);
}

void UringBackend::arm_accept(Listener& listener) {
  io_uring_sqe* sqe = next_sqe();
  if (options_.multishot_accept) {
    io_uring_prep_multishot_accept(sqe, listener.fd, nullptr, nullptr, SOCK_CLOEXEC);
  } else {
    io_uring_prep_accept(sqe, listener.fd, nullptr, nullptr, SOCK_CLOEXEC);
  }
  io_uring_sqe_set_data64(sqe, user_data(Op::accept, listener.generation, static_cast<std::uint32_t>(listener.fd)));
}

void UringBackend::stop_accepting(int listen_fd) {
  if (listen_fd < 0 || static_cast<std::size_t>(listen_fd) >= listeners_.size() || !listeners_[listen_fd]) return;
  // The armed multishot accept holds the socket open inside the ring until
  // its cancellation completes, which with COOP_TASKRUN waits for the loop
  // (or the ring's asynchronous teardown). shutdown() takes the socket out
  // of LISTEN now, so the port is free at once for a replacement server.
  ::shutdown(listen_fd, SHUT_RDWR);
  io_uring_sqe* sqe = next_sqe();
  io_uring_prep_cancel_fd(sqe, listen_fd, IORING_ASYNC_CANCEL_ALL);
  io_uring_sqe_set_data64(sqe, user_data(Op::cancel, 0, 0));
  io_uring_submit(&ring_);
  // Kept until this batch of completions is done: stop_accepting() may be
  // called from inside the listener's own on_accept. Late completions fail
  // the generation check.
  retired_listeners_.push_back(std::move(listeners_[listen_fd]));
  ::close(listen_fd);
}

void UringBackend::connect(const std::string& host, std::uint16_t port,
                           std::function<void(int fd, std::error_code error)> on_connected) {
  if (auto address = numeric_address(host, port)) {
    connect_to({*address}, std::move(on_connected));
    return;
  }
  if (!resolver_) resolver_ = std::make_unique<HostResolver>(*this);
  resolver_->resolve(host, port, [this, on_connected = std::move(on_connected)](SocketAddresses addresses,
                                                                                std::error_code error) mutable {
    if (error) {
      on_connected(-1, error);
      return;
    }
    connect_to(std::move(addresses), std::move(on_connected));
  });
}

void UringBackend::connect_to(SocketAddresses addresses, std::function<void(int, std::error_code)> on_connected) {
  auto pending = std::make_unique<PendingConnect>();
  pending->addresses = std::move(addresses);
  pending->on_connected = std::move(on_connected);
  connect_next(std::move(pending), std::make_error_code(std::errc::invalid_argument));
}

// Tries the next address; with none left, reports the last error (posted:
// on_connected never runs inside connect()).
void UringBackend::connect_next(std::unique_ptr<PendingConnect> pending, std::error_code last_error) {
  while (pending->next < pending->addresses.size()) {
    const SocketAddress& address = pending->addresses[pending->next++];
    pending->fd = ::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (pending->fd < 0) {
      last_error = errno_code(errno);
      continue;
    }
    const std::uint32_t id = next_connect_++;
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_connect(sqe, pending->fd, address.get(), address.bytes);
    io_uring_sqe_set_data64(sqe, user_data(Op::connect, 0, id));
    connects_.emplace(id, std::move(pending));
    return;
  }
  post([on_connected = std::move(pending->on_connected), last_error] { on_connected(-1, last_error); });
}

void UringBackend::open(int fd, SocketEvents* events) {
  if (static_cast<std::size_t>(fd) >= sockets_.size()) sockets_.resize(fd + 1);
  auto socket = std::make_unique<Socket>();
  socket->fd = fd;
  socket->generation = next_generation_++;
  socket->events = events;
  set_no_delay(fd);
  arm_receive(*socket);
  sockets_[fd] = std::move(socket);
}

void UringBackend::arm_receive(Socket& socket) {
  io_uring_sqe* sqe = next_sqe();
  if (options_.multishot_receive) {
    io_uring_prep_recv_multishot(sqe, socket.fd, nullptr, 0, 0);
  } else {
    io_uring_prep_recv(sqe, socket.fd, nullptr, 0, 0);  // length 0: the picked buffer's
  }
  sqe->flags |= IOSQE_BUFFER_SELECT;
  sqe->buf_group = kBufferGroup;
  io_uring_sqe_set_data64(sqe, user_data(Op::receive, socket.generation, static_cast<std::uint32_t>(socket.fd)));
  ++socket.in_flight;
  socket.receiving = true;
}

void UringBackend::send(int fd, std::span<const iovec> buffers) {
  Socket* socket = socket_for(fd);
  if (socket == nullptr || socket->closing) return;  // on_close is on its way
  if (socket->sending) throw std::logic_error("io_uring: send() while a send is in flight on this socket");
  socket->send_iovecs.assign(buffers.begin(), buffers.end());
  socket->send_first = 0;
  if (borrowed_ && send_now(*socket)) return;
  submit_send(*socket);
}

bool UringBackend::send_now(Socket& socket) {
  const std::size_t count = std::min(kMaxIovecs, socket.send_iovecs.size());
  if (options_.zero_copy_min_bytes > 0) {  // registered memory is used only with zero-copy on (the constructor)
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < count; ++i) {
      if (!registered_.empty() && registered_slot(socket.send_iovecs[i]) >= 0) return false;
      bytes += socket.send_iovecs[i].iov_len;
    }
    if (bytes >= options_.zero_copy_min_bytes) return false;
  }
  msghdr message{};
  message.msg_iov = socket.send_iovecs.data();
  message.msg_iovlen = count;
  ssize_t written = ::sendmsg(socket.fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (written < 0) {
    // Nothing fitted: the ring sends it all when the socket can take it.
    written = errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -errno;
  }
  // Completed as a ring send would be, at the end of the lent turn: the
  // owner's on_send_complete may send again, and not from inside send().
  ++socket.in_flight;
  socket.sending = true;
  sent_now_.push_back({socket.fd, socket.generation, static_cast<int>(written)});
  return true;
}

bool UringBackend::register_memory(std::span<const std::byte> memory) {
  if (memory.empty()) return false;
  RegisteredMemory* free_slot = nullptr;
  for (RegisteredMemory& registered : registered_) {
    if (registered.begin == memory.data() && registered.bytes == memory.size()) return true;
    if (registered.bytes == 0 && free_slot == nullptr) free_slot = &registered;
  }
  if (free_slot == nullptr) return false;
  // The kernel pins the pages for writing, so read-only memory is refused
  // (EFAULT), as is more than the memlock limit without CAP_IPC_LOCK.
  iovec buffer{const_cast<std::byte*>(memory.data()), memory.size()};
  const auto slot = static_cast<unsigned>(free_slot - registered_.data());
  if (io_uring_register_buffers_update_tag(&ring_, slot, &buffer, nullptr, 1) != 1) return false;
  *free_slot = {memory.data(), memory.size()};
  return true;
}

void UringBackend::unregister_memory(std::span<const std::byte> memory) {
  for (RegisteredMemory& registered : registered_) {
    if (registered.bytes == 0 || registered.begin != memory.data() || registered.bytes != memory.size()) continue;
    // Sends in flight from it keep their own reference to the pinned pages
    // in the kernel; the slot empties for new ones.
    iovec empty{nullptr, 0};
    io_uring_register_buffers_update_tag(&ring_, static_cast<unsigned>(&registered - registered_.data()), &empty,
                                         nullptr, 1);
    registered = {};
    return;
  }
}

// The fixed buffer a zero-copy send of `buffer` may use: a registered slot
// holding all of it, or -1.
int UringBackend::registered_slot(const iovec& buffer) const {
  if (buffer.iov_len < options_.zero_copy_min_bytes || buffer.iov_len > UINT32_MAX) return -1;
  const auto* begin = static_cast<const std::byte*>(buffer.iov_base);
  for (std::size_t slot = 0; slot < registered_.size(); ++slot) {
    const RegisteredMemory& registered = registered_[slot];
    if (begin >= registered.begin && begin + buffer.iov_len <= registered.begin + registered.bytes) {
      return static_cast<int>(slot);
    }
  }
  return -1;
}

void UringBackend::submit_send(Socket& socket) {
  iovec* const first = socket.send_iovecs.data() + socket.send_first;
  const std::size_t count = std::min(kMaxIovecs, socket.send_iovecs.size() - socket.send_first);
  if (!registered_.empty()) {
    for (std::size_t i = 0; i < count; ++i) {
      if (registered_slot(first[i]) >= 0) return submit_send_chain(socket);
    }
  }
  io_uring_sqe* sqe = next_sqe();
  socket.message = {};
  socket.message.msg_iov = first;
  socket.message.msg_iovlen = count;
  std::size_t bytes = 0;
  if (options_.zero_copy_min_bytes > 0) {
    for (std::size_t i = 0; i < socket.message.msg_iovlen; ++i) bytes += socket.message.msg_iov[i].iov_len;
  }
  if (options_.zero_copy_min_bytes > 0 && bytes >= options_.zero_copy_min_bytes) {
    io_uring_prep_sendmsg_zc(sqe, socket.fd, &socket.message, MSG_NOSIGNAL);
  } else {
    io_uring_prep_sendmsg(sqe, socket.fd, &socket.message, MSG_NOSIGNAL);
  }
  io_uring_sqe_set_data64(sqe, user_data(Op::send, socket.generation, static_cast<std::uint32_t>(socket.fd)));
  ++socket.in_flight;
  socket.sending = true;
}

// An attachment in registered memory goes as SEND_ZC on its fixed buffer;
// the runs of frames between such attachments go as gathered sendmsgs, zero-
// copy or not as usual; all linked, so that they leave in order, in one
// io_uring_enter. A link cannot span two submissions, so the chain is at
// most kMaxChain long and the queue is flushed first when it lacks room.
void UringBackend::submit_send_chain(Socket& socket) {
  constexpr std::size_t kMaxChain = 32;
  if (socket.chain_messages.size() < kMaxChain) {
    socket.chain_messages.resize(kMaxChain);
    socket.chain_bytes.resize(kMaxChain);
  }
  if (io_uring_sq_space_left(&ring_) < kMaxChain) io_uring_submit(&ring_);
  const std::size_t max_ops = std::min<std::size_t>(kMaxChain, io_uring_sq_space_left(&ring_));
  const std::uint64_t data = user_data(Op::send, socket.generation, static_cast<std::uint32_t>(socket.fd));
  std::size_t i = socket.send_first;
  const std::size_t end = socket.send_iovecs.size();
  io_uring_sqe* previous = nullptr;
  std::size_t ops = 0;
  while (i < end && ops < max_ops) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    iovec& buffer = socket.send_iovecs[i];
    if (const int slot = registered_slot(buffer); slot >= 0) {
      io_uring_prep_send_zc_fixed(sqe, socket.fd, buffer.iov_base, buffer.iov_len, MSG_NOSIGNAL | MSG_WAITALL, 0,
                                  static_cast<unsigned>(slot));
      socket.chain_bytes[ops] = buffer.iov_len;
      ++fixed_buffer_sends_;
      ++i;
    } else {
      const std::size_t run_begin = i;
      std::size_t bytes = 0;
      while (i < end && i - run_begin < kMaxIovecs && registered_slot(socket.send_iovecs[i]) < 0) {
        bytes += socket.send_iovecs[i].iov_len;
        ++i;
      }
      msghdr& message = socket.chain_messages[ops];
      message = {};
      message.msg_iov = socket.send_iovecs.data() + run_begin;
      message.msg_iovlen = i - run_begin;
      if (options_.zero_copy_min_bytes > 0 && bytes >= options_.zero_copy_min_bytes) {
        io_uring_prep_sendmsg_zc(sqe, socket.fd, &message, MSG_NOSIGNAL | MSG_WAITALL);
      } else {
        io_uring_prep_sendmsg(sqe, socket.fd, &message, MSG_NOSIGNAL | MSG_WAITALL);
      }
      socket.chain_bytes[ops] = bytes;
    }
    io_uring_sqe_set_data64(sqe, data);
    if (previous != nullptr) previous->flags |= IOSQE_IO_LINK;
    previous = sqe;
    ++ops;
  }
  socket.chain_end = i;
  socket.chain_pending = static_cast<int>(ops);
  socket.chain_results = 0;
  socket.chain_error = 0;
  socket.in_flight += static_cast<int>(ops);
  socket.sending = true;
}

// One completion of a chained send. A submission's last completion is its
// result, or for a zero-copy one the notification after it (its result then
// says F_MORE, also when it failed or was cancelled with its link).
void UringBackend::handle_send_chain(Socket& socket, const io_uring_cqe& cqe) {
  if ((cqe.flags & IORING_CQE_F_NOTIF) == 0) {
    const std::size_t expected = socket.chain_bytes[socket.chain_results++];
    // With MSG_WAITALL a short send has failed: the connection broke under
    // it, its error already taken by the send (so a receive would see a
    // plain end of stream). The rest of the chain is cancelled.
    const int error = cqe.res < 0 ? -cqe.res : static_cast<std::size_t>(cqe.res) < expected ? EPIPE : 0;
    if (error != 0 && socket.chain_error == 0) {
      socket.chain_error = error;
      begin_close(socket, errno_code(error));
    }
    if ((cqe.flags & IORING_CQE_F_MORE) != 0) return;
  }
  --socket.in_flight;
  if (--socket.chain_pending > 0) return;
  socket.sending = false;
  if (socket.closing) return;
  socket.send_first = socket.chain_end;
  if (socket.send_first < socket.send_iovecs.size()) {
    submit_send(socket);
  } else {
    socket.events->on_send_complete();
  }
}

void UringBackend::close(int fd) {
  if (Socket* socket = socket_for(fd)) begin_close(*socket, std::make_error_code(std::errc::operation_canceled));
}

void UringBackend::begin_close(Socket& socket, std::error_code error) {
  if (socket.closing) return;
  socket.closing = true;
  socket.close_error = error;
  // Shutdown wakes the armed receive; the cancel ends anything else in flight.
  ::shutdown(socket.fd, SHUT_RDWR);
  io_uring_sqe* sqe = next_sqe();
  io_uring_prep_cancel_fd(sqe, socket.fd, IORING_ASYNC_CANCEL_ALL);
  io_uring_sqe_set_data64(sqe, user_data(Op::cancel, 0, 0));
  closing_.push_back(&socket);
}

bool UringBackend::finish_closes() {
  // Sockets whose last submission has completed are closed; on_close may
  // open new sockets (reusing the number), so the slot is freed first.
  bool closed = false;
  for (std::size_t i = 0; i < closing_.size();) {
    Socket* socket = closing_[i];
    if (socket->in_flight > 0) {
      ++i;
      continue;
    }
    closing_[i] = closing_.back();
    closing_.pop_back();
    std::unique_ptr<Socket> owned = std::move(sockets_[socket->fd]);
    ::close(owned->fd);
    owned->events->on_close(owned->close_error);
    closed = true;
  }
  return closed;
}

TimerId UringBackend::schedule(std::chrono::milliseconds delay, std::function<void()> fn) {
  const auto deadline = std::chrono::steady_clock::now() + delay;
  const TimerId id = next_timer_++;
  timers_.emplace(id, std::make_pair(deadline, std::move(fn)));
  timer_queue_.emplace(deadline, id);
  return id;
}

void UringBackend::cancel(TimerId timer) { timers_.erase(timer); }

void UringBackend::run_due_timers() {
  const auto now = std::chrono::steady_clock::now();
  while (!timer_queue_.empty() && timer_queue_.begin()->first <= now) {
    const TimerId id = timer_queue_.begin()->second;
    timer_queue_.erase(timer_queue_.begin());
    auto found = timers_.find(id);
    if (found == timers_.end()) continue;  // cancelled
    std::function<void()> fn = std::move(found->second.second);
    timers_.erase(found);
    fn();
  }
}

bool UringBackend::try_run_turn(const std::function<void()>& fn) {
  std::unique_lock turn(turn_mutex_, std::try_to_lock);
  if (!turn.owns_lock() || !lending_) return false;
  const auto first_timer = [this] {
    return timer_queue_.empty() ? std::chrono::steady_clock::time_point::max() : timer_queue_.begin()->first;
  };
  const auto waited_until = first_timer();
  borrowed_ = true;
  try {
    fn();
    // The loop's own turn end: connections flush (their sends written now),
    // then each send's completion, which may flush more.
    for (;;) {
      if (before_wait_) before_wait_();
      if (sent_now_.empty()) {
        if (finish_closes()) continue;
        break;
      }
      completing_.swap(sent_now_);  // completions may send again: into the other vector
      for (const SentNow& done : completing_) {
        Socket* socket = socket_for(done.fd);
        if (socket != nullptr && socket->generation == done.generation) finish_send(*socket, done.result);
      }
      completing_.clear();
    }
  } catch (...) {
    borrowed_ = false;
    completing_.clear();
    throw;
  }
  borrowed_ = false;
  // The loop sleeps on what it knew: it must wake to submit what this turn
  // left on the ring (a send that did not fit, a close) or to serve a timer
  // due sooner than the one it waits for.
  const bool wake = io_uring_sq_ready(&ring_) > 0 || first_timer() < waited_until;
  turn.unlock();
  if (wake) wake_loop();
  return true;
}

void UringBackend::post(std::function<void()> fn) {
  bool first = false;
  {
    std::lock_guard lock(posted_mutex_);
    first = posted_.empty();
    posted_.push_back(std::move(fn));
  }
  // One wake-up per batch: while the queue is not empty, the post that made
  // it so has written the eventfd and the loop has not yet taken the queue
  // (run_posted() swaps it out whole). A gateway acknowledging each token
  // from its HTTP threads made one write(2) and one loop wake-up per token.
  if (!first) return;
  wake_loop();
}

void UringBackend::wake_loop() {
  const std::uint64_t one = 1;
  [[maybe_unused]] const auto written = ::write(wake_fd_, &one, sizeof one);
}

void UringBackend::run_posted() {
  {
    std::lock_guard lock(posted_mutex_);
    running_posted_.swap(posted_);
  }
  for (auto& fn : running_posted_) fn();
  running_posted_.clear();
}

void UringBackend::stop() {
  stopped_.store(true);
  wake_loop();
}

void UringBackend::handle_receive(Socket& socket, const io_uring_cqe& cqe) {
  if ((cqe.flags & IORING_CQE_F_MORE) == 0) {
    socket.receiving = false;
    --socket.in_flight;
  }
  if (cqe.res > 0) {
    const unsigned id = cqe.flags >> IORING_CQE_BUFFER_SHIFT;
    std::byte* buffer = reinterpret_cast<std::byte*>(receive_memory_.get()) + std::size_t{id} * options_.receive_buffer_bytes;
    if (!socket.closing) socket.events->on_receive({buffer, static_cast<std::size_t>(cqe.res)});
    io_uring_buf_ring_add(buffer_ring_, buffer, options_.receive_buffer_bytes, static_cast<unsigned short>(id),
                          io_uring_buf_ring_mask(options_.receive_buffers), 0);
    io_uring_buf_ring_advance(buffer_ring_, 1);
  } else if (cqe.res == 0) {
    begin_close(socket, {});
  } else if (cqe.res != -ENOBUFS && cqe.res != -ECANCELED) {
    begin_close(socket, errno_code(-cqe.res));
  }
  // A multishot receive ends on ENOBUFS (all buffers out) or after a
  // kernel-side limit (a single-shot one after each piece); buffers are
  // back by now, so arm the next receive.
  if (!socket.receiving && !socket.closing) arm_receive(socket);
}

void UringBackend::handle_send(Socket& socket, const io_uring_cqe& cqe) {
  if (socket.chain_pending > 0) return handle_send_chain(socket, cqe);
  // A zero-copy send completes twice: its result (with F_MORE when a
  // notification follows), then the notification. The pages are ours again
  // only at the second, so the send is finished there.
  if ((cqe.flags & IORING_CQE_F_NOTIF) != 0) {
    socket.awaiting_notification = false;
    finish_send(socket, socket.zero_copy_result);
    return;
  }
  if ((cqe.flags & IORING_CQE_F_MORE) != 0) {
    socket.awaiting_notification = true;
    socket.zero_copy_result = cqe.res;
    return;
  }
  finish_send(socket, cqe.res);
}

void UringBackend::finish_send(Socket& socket, int result) {
  --socket.in_flight;
  socket.sending = false;
  if (result < 0) {
    begin_close(socket, errno_code(-result));
    return;
  }
  std::size_t written = static_cast<std::size_t>(result);
  while (written > 0 && socket.send_first < socket.send_iovecs.size()) {
    iovec& first = socket.send_iovecs[socket.send_first];
    if (first.iov_len <= written) {
      written -= first.iov_len;
      ++socket.send_first;
    } else {
      first.iov_base = static_cast<std::byte*>(first.iov_base) + written;
      first.iov_len -= written;
      written = 0;
    }
  }
  while (socket.send_first < socket.send_iovecs.size() && socket.send_iovecs[socket.send_first].iov_len == 0) {
    ++socket.send_first;
  }
  if (socket.closing) return;
  if (socket.send_first < socket.send_iovecs.size()) {
    submit_send(socket);  // a partial send: the rest goes now
  } else {
    socket.events->on_send_complete();
  }
}

void UringBackend::handle(const io_uring_cqe& cqe) {
  const std::uint64_t data = io_uring_cqe_get_data64(&cqe);
  const auto op = static_cast<Op>(data >> 56);
  const auto generation = static_cast<std::uint32_t>((data >> 32) & 0xffffff);
  const auto index = static_cast<std::uint32_t>(data);
  switch (op) {
    case Op::accept: {
      Listener* listener = index < listeners_.size() ? listeners_[index].get() : nullptr;
      if (listener == nullptr || (listener->generation & 0xffffff) != generation) {
        if (cqe.res >= 0) ::close(cqe.res);  // accepted after stop_accepting
        return;
      }
      if (cqe.res >= 0) {
        listener->on_accept(cqe.res);
      } else if (cqe.res == -EMFILE || cqe.res == -ENFILE || cqe.res == -ENOBUFS || cqe.res == -ENOMEM) {
        // Out of descriptors or memory: try again shortly instead of spinning.
        if ((cqe.flags & IORING_CQE_F_MORE) == 0) {
          const int fd = listener->fd;
          const std::uint32_t expected = listener->generation;
          schedule(std::chrono::milliseconds(50), [this, fd, expected] {
            if (static_cast<std::size_t>(fd) < listeners_.size() && listeners_[fd] && listeners_[fd]->generation == expected) {
              arm_accept(*listeners_[fd]);
            }
          });
        }
        return;
      }
      if ((cqe.flags & IORING_CQE_F_MORE) == 0 && listener == (index < listeners_.size() ? listeners_[index].get() : nullptr)) {
        arm_accept(*listener);
      }
      return;
    }
    case Op::receive:
    case Op::send: {
      Socket* socket = socket_for(static_cast<int>(index));
      if (socket == nullptr || (socket->generation & 0xffffff) != generation) {
        if (op == Op::receive && cqe.res > 0 && (cqe.flags & IORING_CQE_F_BUFFER)) {
          const unsigned id = cqe.flags >> IORING_CQE_BUFFER_SHIFT;
          io_uring_buf_ring_add(buffer_ring_, reinterpret_cast<std::byte*>(receive_memory_.get()) + std::size_t{id} * options_.receive_buffer_bytes,
                                options_.receive_buffer_bytes, static_cast<unsigned short>(id),
                                io_uring_buf_ring_mask(options_.receive_buffers), 0);
          io_uring_buf_ring_advance(buffer_ring_, 1);
        }
        return;
      }
      if (op == Op::receive) {
        handle_receive(*socket, cqe);
      } else {
        handle_send(*socket, cqe);
      }
      return;
    }
    case Op::connect: {
      auto found = connects_.find(index);
      if (found == connects_.end()) return;
      std::unique_ptr<PendingConnect> pending = std::move(found->second);
      connects_.erase(found);
      if (cqe.res < 0) {
        ::close(pending->fd);
        pending->fd = -1;
        const std::error_code error = errno_code(-cqe.res);
        if (pending->next < pending->addresses.size()) {
          connect_next(std::move(pending), error);
        } else {
          pending->on_connected(-1, error);
        }
      } else {
        set_no_delay(pending->fd);
        pending->on_connected(pending->fd, {});
      }
      return;
    }
    case Op::wake:
      // Re-armed even when stopping: the next run() must hear its own stop().
      run_posted();
      arm_wake();
      return;
    case Op::cancel:
      return;
  }
}

int UringBackend::submit_and_wait(std::unique_lock<std::mutex>& turn, __kernel_timespec* wait_for) {
  if (!lending_) {
    io_uring_cqe* first = nullptr;
    return io_uring_submit_and_wait_timeout(&ring_, &first, 1, wait_for, nullptr);
  }
  // The submission queue's user-space side is the turn's (under the
  // mutex): what this turn prepared is published to the kernel here (as
  // liburing's own flush does), so that the one io_uring_enter below, the
  // mutex let go, submits exactly that and touches nothing a lent turn may
  // be preparing meanwhile (slots past the published tail).
  io_uring_sq& sq = ring_.sq;
  const unsigned tail = sq.sqe_tail;
  if (sq.sqe_head != tail) {
    sq.sqe_head = tail;
    io_uring_smp_store_release(sq.ktail, tail);
  }
  const unsigned to_submit = tail - io_uring_smp_load_acquire(sq.khead);
  const auto enter = [&](unsigned min_complete, unsigned flags, const void* arg, std::size_t arg_bytes) {
    const long result = ::syscall(__NR_io_uring_enter, ring_.ring_fd, to_submit, min_complete, flags, arg, arg_bytes);
    return result < 0 ? -errno : 0;
  };
  if (io_uring_cq_ready(&ring_) > 0) return to_submit > 0 ? enter(0, 0, nullptr, 0) : 0;  // no wait: work is there
  io_uring_getevents_arg arg{};
  arg.ts = reinterpret_cast<std::uint64_t>(wait_for);
  turn.unlock();
  const int result = enter(1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
  turn.lock();
  return result;
}

void UringBackend::run() {
  std::unique_lock turn(turn_mutex_);
  lending_ = options_.lend_turns;
  // However run() ends, no turn is lent after it: a loop not running would
  // never submit what a lent turn left it.
  struct StopLending {
    std::unique_lock<std::mutex>& turn;
    bool& lending;
    ~StopLending() {
      if (!turn.owns_lock()) turn.lock();
      lending = false;
    }
  } stop_lending{turn, lending_};
  while (!stopped_.load()) {
    // The hook ends the turn (flushes, hands callbacks' results over): a
    // socket it closed whose on_close comes now gets the hook again, so
    // that what on_close did is not left waiting for the next completion.
    do {
      if (before_wait_) before_wait_();
    } while (finish_closes());

    __kernel_timespec timeout{};
    __kernel_timespec* wait_for = nullptr;
    if (!timer_queue_.empty()) {
      const auto delay = std::max(timer_queue_.begin()->first - std::chrono::steady_clock::now(),
                                  std::chrono::steady_clock::duration::zero());
      const auto nanoseconds = std::chrono::duration_cast<std::chrono::nanoseconds>(delay).count();
      timeout.tv_sec = nanoseconds / 1'000'000'000;
      timeout.tv_nsec = nanoseconds % 1'000'000'000;
      wait_for = &timeout;
    }
    const int result = submit_and_wait(turn, wait_for);
    if (result < 0 && result != -ETIME && result != -EINTR && result != -EAGAIN && result != -EBUSY) {
      throw std::system_error(errno_code(-result), "io_uring_submit_and_wait_timeout");
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      const io_uring_cqe copy = *cqe;
      handle(copy);
    }
    io_uring_cq_advance(&ring_, seen);
    retired_listeners_.clear();
    run_due_timers();
    finish_closes();
  }
  // A stop is used up by the run it ended: the loop can run again.
  stopped_.store(false);
}

}  // namespace fmwire::transport
