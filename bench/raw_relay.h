// The floors bench/router measures its hop against, on 127.0.0.1: a plain
// TCP forwarder (what a relay costs with no framing at all), a 64-byte
// ping-pong (what one raw one-way hop costs), and paced one-way messages
// (what a hop costs when, like a token, it comes after the threads slept).
#pragma once

#include <cstddef>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "transport/endpoint.h"

namespace fmwire::bench {

// Listens on 127.0.0.1 and, for each connection accepted, connects to
// `target` and forwards bytes both ways on one epoll thread: read what a
// socket has (up to 64 KiB), write all of it to the other, no framing. A
// connection closed on either side closes its pair. Throws
// std::runtime_error when it cannot listen.
class RawRelay {
 public:
  explicit RawRelay(transport::Endpoint target);
  ~RawRelay();
  RawRelay(const RawRelay&) = delete;
  RawRelay& operator=(const RawRelay&) = delete;

  transport::Endpoint endpoint() const { return {"127.0.0.1", port_}; }

 private:
  void run();
  void accept_one();
  // Reads once from `from`, writes it all to `to`; false when the pair is done.
  bool forward(int from, int to);
  void close_pair(int fd);

  transport::Endpoint target_;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int stop_fd_ = -1;  // an eventfd: written by the destructor
  std::uint16_t port_ = 0;
  std::vector<int> peer_of_;  // by descriptor: the other end of its pair, -1 if none
  std::vector<std::byte> buffer_ = std::vector<std::byte>(64 * 1024);  // the relay thread's
  std::thread thread_;
};

// Round-trip times, in microseconds, of `round_trips` 64-byte messages
// echoed by a server thread over one TCP connection on 127.0.0.1 (blocking
// sockets, TCP_NODELAY), after `warm_up` untimed ones.
std::vector<double> raw_ping_pong_us(int round_trips, int warm_up);

// One-way times, in microseconds, of `messages` 64-byte messages sent one
// every `gap` over one TCP connection on 127.0.0.1 (blocking sockets,
// TCP_NODELAY), from the time a pacing thread wakes to make one to the time
// a receiving thread has it whole. `hand_off`: the pacing thread hands each
// message to a sending thread through an eventfd, as a worker's engine
// thread hands a step's tokens to its loop thread; without, it sends them
// itself. Throws std::runtime_error when a socket call fails.
std::vector<double> raw_paced_hop_us(int messages, std::chrono::microseconds gap, bool hand_off);

}  // namespace fmwire::bench
