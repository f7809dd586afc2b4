// Test support for the transport: a loop that runs until a condition holds
// (or a deadline passes: tests never hang), a client connection, and a raw
// blocking socket for peers that misbehave on purpose.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "codec/byte_buffer.h"
#include "transport/connection.h"
#include "transport/io_backend.h"

namespace fmwire::transport::test {

inline constexpr const char* kBackends[] = {"uring", "asio"};

// Runs the loop until `done()` is true, checked every millisecond; false when
// `limit` passed first.
bool run_until(EventLoop& loop, const std::function<bool()>& done,
               std::chrono::milliseconds limit = std::chrono::milliseconds(10000));

// An I/O backend made fresh for each case: io_uring and Asio, and with
// `zero_copy` io_uring once more with every send zero-copy.
struct NamedBackend {
  std::string name;
  std::function<std::unique_ptr<IoBackend>()> make;
};
std::vector<NamedBackend> io_backends(bool zero_copy = false);

// Runs a bare backend's loop on this thread until something calls stop():
// false when the `limit` timer had to stop it instead. A watchdog aborts
// the test binary if the loop ignores even that stop (10 s later).
bool run_until_stopped(IoBackend& backend, std::chrono::milliseconds limit = std::chrono::milliseconds(5000));

// Connects to 127.0.0.1:port and makes an outgoing Connection (its Hello
// goes at once). The connection appears in `out` from the loop.
void connect_client(EventLoop& loop, std::uint16_t port, ConnectionOptions options, ConnectionHandler& handler,
                    std::unique_ptr<Connection>& out);

// A blocking TCP socket to 127.0.0.1:port, for raw bytes.
class RawSocket {
 public:
  explicit RawSocket(std::uint16_t port);
  ~RawSocket();
  void write(std::span<const std::byte> bytes);
  // Reads until the peer closes or `limit` passes; returns what came.
  std::vector<std::byte> read_until_closed(std::chrono::milliseconds limit);
  // Closes with a reset (SO_LINGER 0), as a killed process would.
  void reset();
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

// Encodes a Hello as a client would, into `out`.
void append_hello(codec::ByteBuffer& out, std::uint16_t major = 1);

}  // namespace fmwire::transport::test
