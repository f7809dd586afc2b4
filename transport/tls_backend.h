// TLS 1.3 with mutual authentication under any IoBackend: a decorator that
// runs an OpenSSL SSL object per socket over the inner backend's bytes,
// on the loop thread (used where kernel TLS is not; tls_credentials.h says
// which in its start-up line). The socket's owner (a Connection) sees
// plaintext only, and only once the handshake is done and the peer's
// certificate chains to the CA; a peer that fails that is refused before
// any byte reaches its owner, with a log line saying why, and its owner's
// on_close carries a TlsError.
//
// Which end of the handshake a socket plays comes from how its descriptor
// was made: accepted through accept() it is the server, connected through
// connect() the client; a descriptor made elsewhere (a socketpair) is
// opened with open_as().
//
// Copies: ciphertext that arrives is read by OpenSSL straight from the inner
// backend's buffer; plaintext is decrypted into one 8-byte aligned buffer
// per loop (so that frames decode in place) and handed on from there. A send
// encrypts the gathered plaintext into an owned buffer (small pieces are
// gathered first, so that a turn's frames make few records), which the inner
// backend then sends; the owner's on_send_complete comes when that write
// has completed, so back-pressure is the inner socket's.
#pragma once

#include <memory>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "transport/io_backend.h"
#include "transport/tls_credentials.h"

namespace fmwire::transport {

// Why a TLS socket ended, as its owner's on_close error.
enum class TlsError {
  peer_certificate_untrusted = 1,  // the peer's certificate does not chain to our CA (or none)
  certificate_refused_by_peer,     // the peer refused ours (its alert)
  peer_not_tls,                    // the peer does not speak TLS 1.3 (plaintext, an older TLS)
  handshake_failed,                // any other handshake failure (the log line has OpenSSL's reason)
  closed_during_handshake,         // the peer closed before the handshake was done
  bad_record,                      // a record failed after the handshake (tampered, truncated)
};
const std::error_category& tls_category();
std::error_code make_error_code(TlsError error);

enum class TlsSide { server, client };

class TlsBackend final : public IoBackend {
 public:
  TlsBackend(std::unique_ptr<IoBackend> inner, std::shared_ptr<const TlsCredentials> credentials);
  ~TlsBackend() override;

  BackendKind kind() const override { return inner_->kind(); }
  void accept(int listen_fd, std::function<void(int fd)> on_accept) override;
  void stop_accepting(int listen_fd) override { inner_->stop_accepting(listen_fd); }
  void connect(const std::string& host, std::uint16_t port,
               std::function<void(int fd, std::error_code error)> on_connected) override;
  // The side is the one accept() or connect() recorded for `fd` (else a
  // std::logic_error: use open_as).
  void open(int fd, SocketEvents* events) override;
  void open_as(int fd, SocketEvents* events, TlsSide side);
  void send(int fd, std::span<const iovec> buffers) override;
  void close(int fd) override;
  // Ciphertext is sent from the socket's own buffer, never from the
  // caller's memory: nothing to register.
  bool register_memory(std::span<const std::byte> memory) override {
    (void)memory;
    return false;
  }
  TimerId schedule(std::chrono::milliseconds delay, std::function<void()> fn) override {
    return inner_->schedule(delay, std::move(fn));
  }
  void cancel(TimerId timer) override { inner_->cancel(timer); }
  void post(std::function<void()> fn) override { inner_->post(std::move(fn)); }
  // The inner loop's turn, whose sends come back through this one's.
  bool try_run_turn(const std::function<void()>& fn) override { return inner_->try_run_turn(fn); }
  void set_before_wait(std::function<void()> hook) override { inner_->set_before_wait(std::move(hook)); }
  void run() override { inner_->run(); }
  void stop() override { inner_->stop(); }

  IoBackend& inner() { return *inner_; }
  const TlsCredentials& credentials() const { return *credentials_; }

 private:
  class Socket;
  friend class Socket;
  Socket& socket_for(int fd, const char* operation);
  // The inner backend's on_close for `socket`: forget it, then tell its owner.
  void finish(Socket& socket, std::error_code error);

  std::shared_ptr<const TlsCredentials> credentials_;
  std::unordered_map<int, TlsSide> sides_;  // made by accept() or connect(), not opened yet
  std::unordered_map<int, std::unique_ptr<Socket>> sockets_;
  // Decrypted bytes on their way to an owner: one per loop, since a
  // delivery ends before the next begins. 8-byte aligned.
  std::unique_ptr<std::uint64_t[]> plaintext_;
  // Last: destroyed first, dropping its callbacks to the sockets unrun.
  std::unique_ptr<IoBackend> inner_;
};

}  // namespace fmwire::transport

template <>
struct std::is_error_code_enum<fmwire::transport::TlsError> : std::true_type {};
