#include "transport/tls_backend.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>

#include "log/log.h"
#include "transport/endpoint.h"
#include "transport/openssl_errors.h"

namespace fmwire::transport {
namespace {

// Plaintext handed to an owner per call at most: a few records' worth.
constexpr std::size_t kPlaintextBytes = 64 * 1024;
// A piece of a send at least this big is encrypted from where it lies; smaller
// ones are gathered first, up to kGatherBytes, so that many small frames make
// full records rather than a record each.
constexpr std::size_t kDirectBytes = 16 * 1024;
constexpr std::size_t kGatherBytes = 64 * 1024;

class TlsCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tls"; }
  std::string message(int value) const override {
    switch (static_cast<TlsError>(value)) {
      case TlsError::peer_certificate_untrusted:
        return "TLS handshake refused: the peer's certificate does not chain to our CA";
      case TlsError::certificate_refused_by_peer:
        return "TLS handshake refused by the peer: our certificate does not chain to its CA";
      case TlsError::peer_not_tls:
        return "TLS handshake failed: the peer does not speak TLS 1.3 (plaintext, or an older TLS)";
      case TlsError::handshake_failed: return "TLS handshake failed";
      case TlsError::closed_during_handshake: return "the peer closed the connection during the TLS handshake";
      case TlsError::bad_record: return "TLS: a record from the peer failed (tampered or cut short)";
    }
    return "TLS error " + std::to_string(value);
  }
};


// What the first queued OpenSSL error says about who refused what.
TlsError classify(bool handshake_done) {
  const unsigned long code = ERR_peek_error();
  if (ERR_GET_LIB(code) == ERR_LIB_SSL) {
    switch (ERR_GET_REASON(code)) {
      case SSL_R_CERTIFICATE_VERIFY_FAILED:
      case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
        return TlsError::peer_certificate_untrusted;
      case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
      case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
      case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
      case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
      case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
      case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
      case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
      case SSL_R_TLSV1_ALERT_DECRYPT_ERROR:
        return TlsError::certificate_refused_by_peer;
      case SSL_R_WRONG_VERSION_NUMBER:
      case SSL_R_PACKET_LENGTH_TOO_LONG:
      case SSL_R_HTTP_REQUEST:
      case SSL_R_UNSUPPORTED_PROTOCOL:
      case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
      case SSL_R_UNEXPECTED_MESSAGE:
      case SSL_R_RECORD_LENGTH_MISMATCH:
        return handshake_done ? TlsError::bad_record : TlsError::peer_not_tls;
      default: break;
    }
  }
  return handshake_done ? TlsError::bad_record : TlsError::handshake_failed;
}

}  // namespace

const std::error_category& tls_category() {
  static const TlsCategory category;
  return category;
}

std::error_code make_error_code(TlsError error) { return {static_cast<int>(error), tls_category()}; }

// ------------------------------------------------------------ Socket

// One socket's TLS session, in the order of its life: open (the handshake
// starts), receive (handshake, then plaintext to the owner), send (encrypt,
// then the inner send), close. The inner backend's SocketEvents for the fd.
class TlsBackend::Socket final : public SocketEvents {
 public:
  Socket(TlsBackend& backend, int fd, SocketEvents* events, TlsSide side)
      : backend_(backend), fd_(fd), events_(events), side_(side), ssl_(SSL_new(backend.credentials_->context())) {
    if (ssl_ == nullptr) throw std::runtime_error("OpenSSL cannot make a TLS session: " + openssl_errors());
    BIO* bio = BIO_new(bio_method());
    if (bio == nullptr) throw std::runtime_error("OpenSSL cannot make a BIO: " + openssl_errors());
    BIO_set_data(bio, this);
    BIO_set_init(bio, 1);
    SSL_set_bio(ssl_, bio, bio);  // one BIO both ways: one reference, owned by the SSL
    if (side_ == TlsSide::server) {
      SSL_set_accept_state(ssl_);
    } else {
      SSL_set_connect_state(ssl_);
    }
  }
  ~Socket() override { SSL_free(ssl_); }

  // After the inner open: a client says its ClientHello.
  void start() {
    if (side_ == TlsSide::client) {
      handshake();
      flush();
    }
  }

  // ------------------------------------------------ receive

  void on_receive(std::span<const std::byte> bytes) override {
    if (closing_) return;
    in_ = bytes.data();
    in_left_ = bytes.size();
    if (!handshake_done_) handshake();
    if (handshake_done_ && !closing_) read_plaintext();
    in_left_ = 0;
    flush();
  }

  void handshake() {
    ERR_clear_error();
    const int result = SSL_do_handshake(ssl_);
    if (result == 1) {
      // The chain was checked in the handshake (SSL_VERIFY_PEER); this says so again.
      const long verified = SSL_get_verify_result(ssl_);
      if (SSL_get0_peer_certificate(ssl_) == nullptr || verified != X509_V_OK) {
        fail(TlsError::peer_certificate_untrusted, X509_verify_cert_error_string(verified));
        return;
      }
      handshake_done_ = true;
      if (held_) {
        held_ = false;
        encrypt(held_buffers_);
        held_buffers_.clear();
        owner_send_pending_ = true;
      }
      return;
    }
    const int error = SSL_get_error(ssl_, result);
    if (error == SSL_ERROR_WANT_READ) return;  // what it wrote (flush) goes out; more to come
    const TlsError why = classify(false);
    std::string detail = openssl_errors();
    const long verified = SSL_get_verify_result(ssl_);
    if (verified != X509_V_OK) detail += std::string(" (certificate: ") + X509_verify_cert_error_string(verified) + ")";
    fail(why, detail);
  }

  void read_plaintext() {
    auto* plaintext = reinterpret_cast<char*>(backend_.plaintext_.get());
    while (!closing_ && !peer_finished_) {
      std::size_t filled = 0;
      int error = SSL_ERROR_NONE;
      while (filled < kPlaintextBytes) {
        ERR_clear_error();
        const int read = SSL_read(ssl_, plaintext + filled, static_cast<int>(kPlaintextBytes - filled));
        if (read <= 0) {
          error = SSL_get_error(ssl_, read);
          break;
        }
        filled += static_cast<std::size_t>(read);
      }
      if (filled > 0) events_->on_receive({reinterpret_cast<const std::byte*>(plaintext), filled});
      if (error == SSL_ERROR_NONE) continue;  // the buffer filled: more may wait
      if (error == SSL_ERROR_WANT_READ) return;
      if (error == SSL_ERROR_ZERO_RETURN) {
        // close_notify: the peer sends no more; its TCP close follows.
        peer_finished_ = true;
        return;
      }
      const TlsError why = classify(true);
      fail(why, openssl_errors());
      return;
    }
  }

  // What OpenSSL reads: the rest of the bytes the inner backend delivered.
  int bio_read(char* out, int size) {
    if (in_left_ == 0) return -1;
    const std::size_t taken = std::min(in_left_, static_cast<std::size_t>(size));
    std::memcpy(out, in_, taken);
    in_ += taken;
    in_left_ -= taken;
    return static_cast<int>(taken);
  }

  // ------------------------------------------------ send

  void send(std::span<const iovec> buffers) {
    if (closing_) return;
    if (!handshake_done_) {
      // Kept until the handshake is done; the owner keeps the memory valid
      // until on_send_complete.
      held_buffers_.assign(buffers.begin(), buffers.end());
      held_ = true;
      return;
    }
    encrypt(buffers);
    owner_send_pending_ = true;
    flush();
  }

  void encrypt(std::span<const iovec> buffers) {
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      const auto* base = static_cast<const std::byte*>(buffers[i].iov_base);
      const std::size_t length = buffers[i].iov_len;
      if (length >= kDirectBytes || (gather_.empty() && i + 1 == buffers.size())) {
        write_gathered();
        write_plaintext(base, length);
        continue;
      }
      gather_.insert(gather_.end(), base, base + length);
      if (gather_.size() >= kGatherBytes) write_gathered();
    }
    write_gathered();
  }

  void write_gathered() {
    if (gather_.empty()) return;
    write_plaintext(gather_.data(), gather_.size());
    gather_.clear();
  }

  void write_plaintext(const std::byte* data, std::size_t length) {
    while (length > 0 && !closing_) {
      const int piece = static_cast<int>(std::min<std::size_t>(length, std::size_t{1} << 30));
      ERR_clear_error();
      const int written = SSL_write(ssl_, data, piece);
      if (written <= 0) {
        fail(TlsError::bad_record, "encrypting failed: " + openssl_errors());
        return;
      }
      data += written;
      length -= static_cast<std::size_t>(written);
    }
  }

  // What OpenSSL writes: ciphertext, gathered for the next inner send.
  int bio_write(const char* data, int size) {
    const auto* bytes = reinterpret_cast<const std::byte*>(data);
    pending_.insert(pending_.end(), bytes, bytes + size);
    return size;
  }

  // Hands the gathered ciphertext to the inner backend, unless a send is in flight.
  void flush() {
    if (sending_ || pending_.empty() || inner_closed_) return;
    in_flight_.swap(pending_);
    pending_.clear();
    owner_send_in_flight_ = owner_send_pending_;
    owner_send_pending_ = false;
    sending_ = true;
    iovec_ = {in_flight_.data(), in_flight_.size()};
    backend_.inner_->send(fd_, {&iovec_, 1});  // may complete at once: nothing after this
  }

  void on_send_complete() override {
    sending_ = false;
    const bool tell_owner = owner_send_in_flight_;
    owner_send_in_flight_ = false;
    if (failure_) {
      // The alert has left (or there is more of it): then close.
      if (pending_.empty()) return close_inner();
      return flush();
    }
    flush();
    if (tell_owner) events_->on_send_complete();
  }

  // ------------------------------------------------ close

  // The handshake or a record failed: a log line why, the alert OpenSSL
  // wrote goes out, then the socket closes and the owner's on_close says why.
  void fail(TlsError why, const std::string& detail) {
    if (failure_) return;
    failure_ = why;
    closing_ = true;
    const std::error_code code = make_error_code(why);
    log::warn(code.message(), {{"peer", address_of_peer(fd_)},
                               {"side", side_ == TlsSide::server ? "server" : "client"},
                               {"openssl", detail.empty() ? std::string("-") : detail}});
    if (!sending_ && pending_.empty()) close_inner();
    // else: flush (from the caller) sends the alert; on_send_complete closes.
  }

  void close() {
    closing_ = true;
    owner_closed_ = true;
    close_inner();
  }

  void close_inner() {
    if (inner_closed_) return;
    inner_closed_ = true;
    backend_.inner_->close(fd_);
  }

  void on_close(std::error_code error) override {
    if (failure_) {
      error = make_error_code(*failure_);
    } else if (!handshake_done_ && !owner_closed_) {
      if (error) log::debug("closed during the TLS handshake", {{"peer", address_of_peer(fd_)}, {"why", error.message()}});
      error = make_error_code(TlsError::closed_during_handshake);
    }
    backend_.finish(*this, error);  // destroys this socket: nothing after
  }

  int fd() const { return fd_; }
  SocketEvents* events() const { return events_; }

  static BIO_METHOD* bio_method() {
    static BIO_METHOD* const method = [] {
      BIO_METHOD* made = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "fmwire socket");
      BIO_meth_set_write(made, [](BIO* bio, const char* data, int size) {
        BIO_clear_retry_flags(bio);
        return static_cast<Socket*>(BIO_get_data(bio))->bio_write(data, size);
      });
      BIO_meth_set_read(made, [](BIO* bio, char* out, int size) {
        BIO_clear_retry_flags(bio);
        const int read = static_cast<Socket*>(BIO_get_data(bio))->bio_read(out, size);
        if (read < 0) BIO_set_retry_read(bio);
        return read;
      });
      BIO_meth_set_ctrl(made, [](BIO*, int command, long, void*) -> long { return command == BIO_CTRL_FLUSH ? 1 : 0; });
      return made;
    }();
    return method;
  }

 private:
  TlsBackend& backend_;
  const int fd_;
  SocketEvents* const events_;
  const TlsSide side_;
  SSL* const ssl_;
  bool handshake_done_ = false;
  bool closing_ = false;        // failed or closed: no more bytes either way
  bool owner_closed_ = false;
  bool inner_closed_ = false;
  bool peer_finished_ = false;  // close_notify came
  std::optional<TlsError> failure_;
  // Ciphertext in: the inner backend's bytes, during on_receive only.
  const std::byte* in_ = nullptr;
  std::size_t in_left_ = 0;
  // The owner's send made before the handshake was done.
  std::vector<iovec> held_buffers_;
  bool held_ = false;
  // Ciphertext out: gathered while a send is in flight, then sent as one.
  std::vector<std::byte> gather_;
  std::vector<std::byte> pending_;
  std::vector<std::byte> in_flight_;
  iovec iovec_{};
  bool sending_ = false;
  bool owner_send_pending_ = false;    // the owner's send is in pending_
  bool owner_send_in_flight_ = false;  // the owner's send is in in_flight_
};

// ------------------------------------------------------------ TlsBackend

TlsBackend::TlsBackend(std::unique_ptr<IoBackend> inner, std::shared_ptr<const TlsCredentials> credentials)
    : credentials_(std::move(credentials)),
      plaintext_(new std::uint64_t[kPlaintextBytes / sizeof(std::uint64_t)]),
      inner_(std::move(inner)) {}

TlsBackend::~TlsBackend() = default;

void TlsBackend::accept(int listen_fd, std::function<void(int fd)> on_accept) {
  inner_->accept(listen_fd, [this, on_accept = std::move(on_accept)](int fd) {
    sides_[fd] = TlsSide::server;
    on_accept(fd);
  });
}

void TlsBackend::connect(const std::string& host, std::uint16_t port,
                         std::function<void(int fd, std::error_code error)> on_connected) {
  inner_->connect(host, port, [this, on_connected = std::move(on_connected)](int fd, std::error_code error) {
    if (fd >= 0) sides_[fd] = TlsSide::client;
    on_connected(fd, error);
  });
}

void TlsBackend::open(int fd, SocketEvents* events) {
  const auto found = sides_.find(fd);
  if (found == sides_.end()) {
    throw std::logic_error("TlsBackend::open: descriptor " + std::to_string(fd) +
                           " was neither accepted nor connected here (use open_as)");
  }
  open_as(fd, events, found->second);
}

void TlsBackend::open_as(int fd, SocketEvents* events, TlsSide side) {
  sides_.erase(fd);
  auto made = std::make_unique<Socket>(*this, fd, events, side);
  Socket& socket = *made;
  sockets_[fd] = std::move(made);
  inner_->open(fd, &socket);
  socket.start();
}

TlsBackend::Socket& TlsBackend::socket_for(int fd, const char* operation) {
  const auto found = sockets_.find(fd);
  if (found == sockets_.end()) {
    throw std::logic_error(std::string("TlsBackend::") + operation + ": descriptor " + std::to_string(fd) +
                           " is not open");
  }
  return *found->second;
}

void TlsBackend::send(int fd, std::span<const iovec> buffers) { socket_for(fd, "send").send(buffers); }

void TlsBackend::close(int fd) {
  const auto found = sockets_.find(fd);
  if (found != sockets_.end()) found->second->close();
}

void TlsBackend::finish(Socket& socket, std::error_code error) {
  auto node = sockets_.extract(socket.fd());  // the number may be reused from on_close on
  SocketEvents* events = socket.events();
  events->on_close(error);
}

}  // namespace fmwire::transport
