// Two network namespaces joined by a veth pair, made by bench_kv for the
// length of a run so that its sender and receiver (and iperf3's client and
// server) talk over a link shaped with tc: a token bucket (tbf) at a given
// rate, and netem delay where the kernel has netem. Root only.
//
// The only addresses used are the pair's own, 10.213.X.1/30 (the receiver's
// side) and 10.213.X.2/30 (the sender's), inside namespaces named after the
// bench's pid; nothing outside them is touched. The namespaces and the pair
// are removed when the NetnsLink goes away, and by the SignalCleanup thread
// on SIGINT, SIGTERM or SIGHUP (a SIGKILL leaves them: `ip netns list` shows
// fmkv-PID-*, `ip netns del` removes them).
#pragma once

#include <pthread.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace fmwire::bench {

class NetnsLink;

// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in every
// thread started after it: construct it before any other), and waits for
// them on a thread of its own; on one, removes every NetnsLink alive,
// says so, and exits with 128 + the signal. Child processes get the
// signals unblocked (ChildProcess).
class SignalCleanup {
 public:
  SignalCleanup();
  ~SignalCleanup();
  SignalCleanup(const SignalCleanup&) = delete;
  SignalCleanup& operator=(const SignalCleanup&) = delete;

 private:
  friend class NetnsLink;
  void watch();

  std::mutex mutex_;                 // held while a link is made, shaped or removed
  std::vector<NetnsLink*> links_;    // alive, under mutex_
  std::thread thread_;
  pthread_t thread_handle_{};
};

// Why the namespaces could not be made: not root, no `ip`, a kernel without
// veth or netns. bench_kv prints it and skips those rows.
class NetnsUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class NetnsLink {
 public:
  // Makes the namespaces and the pair, addresses them and brings them up.
  // Throws NetnsUnavailable, after removing whatever it made.
  explicit NetnsLink(SignalCleanup& cleanup);
  ~NetnsLink();
  NetnsLink(const NetnsLink&) = delete;
  NetnsLink& operator=(const NetnsLink&) = delete;

  // Limits both directions to `rate_bits_per_s` (tbf), and, when
  // `delay_us` > 0 and netem is there, delays the sender -> receiver
  // direction by it. Throws std::runtime_error when tc fails.
  void shape(std::uint64_t rate_bits_per_s, std::uint32_t delay_us);
  // Whether this kernel has netem (probed when the link was made).
  bool has_netem() const { return has_netem_; }

  const std::string& receiver_namespace() const { return receiver_namespace_; }
  const std::string& sender_namespace() const { return sender_namespace_; }
  const std::string& receiver_address() const { return receiver_address_; }
  const std::string& sender_address() const { return sender_address_; }
  // {"/path/to/ip", "netns", "exec", NAME}: what runs a program in a namespace.
  std::vector<std::string> exec_prefix(const std::string& namespace_name) const;

 private:
  friend class SignalCleanup;
  void remove();  // under cleanup_.mutex_; idempotent

  SignalCleanup& cleanup_;
  std::string ip_path_;
  std::string tc_path_;
  std::string receiver_namespace_;
  std::string sender_namespace_;
  std::string receiver_device_;
  std::string sender_device_;
  std::string receiver_address_;
  std::string sender_address_;
  bool has_netem_ = false;
  bool removed_ = false;
};

}  // namespace fmwire::bench
