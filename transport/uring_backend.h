// IoBackend on io_uring (liburing), one ring per loop thread:
// - multishot accept: one submission accepts every connection;
// - multishot receive into a provided-buffer ring: one submission per socket
//   receives until it closes, into buffers the kernel picks, handed back to
//   the ring as soon as on_receive returns (no per-socket receive buffer).
//   A frame larger than a buffer is copied out into the connection's frame
//   buffer: receiving the rest of a large frame straight into it instead
//   (plain receives, the multishot one cancelled meanwhile) was measured
//   and removed: each piece then costs a submission and a poll arming, and
//   bulk transfers of 4 and 16 MiB attachments ran 7% and 30% slower;
// - sends gathered with sendmsg (MSG_NOSIGNAL), all frames that queued up
//   while the previous send was in flight going out in one submission;
//   zero-copy (SENDMSG_ZC) above UringOptions::zero_copy_min_bytes, the
//   send then completing only at the kernel's notification that it has let
//   go of the pages;
// - registered (fixed) buffers: memory given to register_memory() is pinned
//   once in a table of kRegisteredSlots; a zero-copy send of an attachment
//   lying inside it goes as SEND_ZC on that fixed buffer, which spares the
//   kernel pinning its pages per send, linked with sendmsgs for the frames
//   around it. Copying sends cannot use them: a socket's SEND takes no
//   fixed buffer (EINVAL on 6.18) and WRITE_FIXED raises SIGPIPE;
// - one io_uring_enter per loop turn submits and waits (batched submission),
//   its timeout serving the timers;
// - turns lent (try_run_turn): while the loop waits, another thread may run
//   a turn under the loop's turn mutex, its sends written at once with a
//   non-blocking sendmsg(2) from that thread (what does not fit goes to the
//   ring, the loop woken to submit it). A worker's engine thread delivers a
//   step's tokens so: one thread wake-up fewer between the step's end and
//   the client (bench_router's hop section).
// make_backend() falls back to Asio when the ring cannot be set up.
#pragma once

#include <liburing.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "transport/host_resolver.h"
#include "transport/io_backend.h"

namespace fmwire::transport {

struct UringOptions {
  unsigned queue_entries = 1024;
  unsigned receive_buffers = 256;           // a power of two
  unsigned receive_buffer_bytes = 64 * 1024;
  // Writes of at least this many bytes go as IORING_OP_SENDMSG_ZC: the
  // kernel sends from our pages and says when it is done with them. 0: never;
  // also never where the kernel lacks it (before 6.1).
  std::size_t zero_copy_min_bytes = 0;
  // Measuring what each feature is worth (bench/transport's feature table):
  // false submits every request on its own io_uring_enter instead of one
  // per loop turn, and leaves out IORING_SETUP_COOP_TASKRUN. The
  // environment can set these for a whole process: FMWIRE_URING_ABLATE=
  // "unbatched", "no-coop-taskrun", "small-buffers" (4 KiB receive buffers),
  // "single-shot-receive" and "single-shot-accept" (one submission per
  // receive, per accepted connection), "no-lent-turns" (try_run_turn
  // refuses: every hand-off to the loop is a post and a wake-up),
  // comma-separated. Never for production.
  bool batch_submissions = true;
  bool coop_taskrun = true;
  bool multishot_receive = true;
  bool multishot_accept = true;
  bool lend_turns = true;
};

class UringBackend final : public IoBackend {
 public:
  // Throws std::system_error when io_uring cannot be set up here.
  explicit UringBackend(UringOptions options = {});
  ~UringBackend() override;

  BackendKind kind() const override { return BackendKind::io_uring; }
  void accept(int listen_fd, std::function<void(int fd)> on_accept) override;
  void stop_accepting(int listen_fd) override;
  // A name is looked up off the loop (host_resolver.h), and its addresses
  // tried in order until one connects.
  void connect(const std::string& host, std::uint16_t port,
               std::function<void(int fd, std::error_code error)> on_connected) override;
  void open(int fd, SocketEvents* events) override;
  void send(int fd, std::span<const iovec> buffers) override;
  void close(int fd) override;
  bool register_memory(std::span<const std::byte> memory) override;
  void unregister_memory(std::span<const std::byte> memory) override;
  TimerId schedule(std::chrono::milliseconds delay, std::function<void()> fn) override;
  void cancel(TimerId timer) override;
  void post(std::function<void()> fn) override;
  bool try_run_turn(const std::function<void()>& fn) override;
  void set_before_wait(std::function<void()> hook) override { before_wait_ = std::move(hook); }
  void run() override;
  void stop() override;

  // Sends made from a registered buffer so far (for tests and the bench).
  std::uint64_t fixed_buffer_sends() const { return fixed_buffer_sends_; }

  static constexpr unsigned kRegisteredSlots = 16;

 private:
  enum class Op : std::uint8_t { accept = 1, receive, send, connect, wake, cancel };
  struct Socket;
  struct Listener;
  struct PendingConnect;
  struct RegisteredMemory {
    const std::byte* begin = nullptr;
    std::size_t bytes = 0;  // 0: the slot is free
  };

  static std::uint64_t user_data(Op op, std::uint32_t generation, std::uint32_t index);
  io_uring_sqe* next_sqe();
  void arm_accept(Listener& listener);
  void arm_receive(Socket& socket);
  void submit_send(Socket& socket);
  void submit_send_chain(Socket& socket);
  int registered_slot(const iovec& buffer) const;
  void connect_to(SocketAddresses addresses, std::function<void(int, std::error_code)> on_connected);
  void connect_next(std::unique_ptr<PendingConnect> pending, std::error_code last_error);
  void arm_wake();
  void handle(const io_uring_cqe& cqe);
  void handle_receive(Socket& socket, const io_uring_cqe& cqe);
  void handle_send(Socket& socket, const io_uring_cqe& cqe);
  void handle_send_chain(Socket& socket, const io_uring_cqe& cqe);
  void finish_send(Socket& socket, int result);
  // A lent turn's send, written at once from the borrowing thread; false
  // when it must go through the ring (registered or zero-copy buffers).
  bool send_now(Socket& socket);
  // Waits for a completion (or the first timer) with the turn mutex let go,
  // after submitting what the turn prepared.
  int submit_and_wait(std::unique_lock<std::mutex>& turn, __kernel_timespec* wait_for);
  void begin_close(Socket& socket, std::error_code error);
  bool finish_closes();  // true when it closed one
  void run_due_timers();
  void run_posted();
  void wake_loop();  // the eventfd the loop always has a read armed on
  Socket* socket_for(int fd);

  UringOptions options_;
  io_uring ring_{};
  io_uring_buf_ring* buffer_ring_ = nullptr;
  std::size_t buffer_ring_bytes_ = 0;
  std::unique_ptr<std::uint64_t[]> receive_memory_;  // 8-byte aligned buffers
  std::vector<std::unique_ptr<Socket>> sockets_;     // by fd
  std::vector<std::unique_ptr<Listener>> listeners_; // by fd
  std::vector<std::unique_ptr<Listener>> retired_listeners_;  // stopped during this batch
  std::unique_ptr<HostResolver> resolver_;  // made at the first name; gone first in the destructor
  std::map<std::uint32_t, std::unique_ptr<PendingConnect>> connects_;
  std::uint32_t next_connect_ = 1;
  std::uint32_t next_generation_ = 1;
  std::vector<Socket*> closing_;
  // By slot of the ring's fixed-buffer table; empty when the kernel has no
  // sparse table (before 5.19) or zero-copy is off (nothing would use it).
  std::vector<RegisteredMemory> registered_;
  std::uint64_t fixed_buffer_sends_ = 0;

  std::multimap<std::chrono::steady_clock::time_point, TimerId> timer_queue_;
  std::map<TimerId, std::pair<std::chrono::steady_clock::time_point, std::function<void()>>> timers_;
  TimerId next_timer_ = 1;

  int wake_fd_ = -1;
  std::uint64_t wake_value_ = 0;
  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
  // Held by whoever runs a turn: the loop thread but while it waits, or a
  // thread in try_run_turn. What follows is under it.
  std::mutex turn_mutex_;
  bool lending_ = false;   // run() is under way and lends its turns
  bool borrowed_ = false;  // the turn under way is a lent one
  struct SentNow {
    int fd;
    std::uint32_t generation;
    int result;  // sendmsg's: bytes written, or -errno
  };
  std::vector<SentNow> sent_now_;  // a lent turn's sends, their completion not yet handled
  std::vector<SentNow> completing_;  // those being completed (both kept: no allocation once warm)
  std::vector<std::function<void()>> running_posted_;
  std::atomic<bool> stopped_{false};
  std::function<void()> before_wait_;
};

}  // namespace fmwire::transport
