// The shared secret of --auth-token-file, and the challenge and response
// that proves, in the Hello exchange, that both ends of a native connection
// hold it, without sending it (DESIGN.md, "Across nodes": the HMAC challenge
// where TLS is off).
//
// The exchange (protocol/fmwire.capnp Hello, HelloAck, HelloProof):
//   client -> Hello      { authNonce: Nc }
//   server -> HelloAck   { authNonce: Ns, authProof: HMAC(K, "fmwire auth v1 server" 0 Nc Ns) }
//   client -> HelloProof { authProof: HMAC(K, "fmwire auth v1 client" 0 Nc Ns) }
// Nc and Ns are 32 bytes from RAND_bytes, fresh per connection; proofs are
// compared with CRYPTO_memcmp. Each proof covers the other side's fresh nonce,
// so a recorded exchange fits no other connection, and the two labels differ,
// so one side's proof can never be reflected back as the other's.
// It authenticates the handshake, not the frames after it: against a peer on
// the path, use TLS.
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "codec/codec_error.h"

namespace fmwire::transport {

inline constexpr std::size_t kAuthNonceBytes = 32;
inline constexpr std::size_t kAuthProofBytes = 32;  // HMAC-SHA256
inline constexpr std::size_t kMinAuthTokenBytes = 16;

using AuthNonce = std::array<std::byte, kAuthNonceBytes>;
using AuthProof = std::array<std::byte, kAuthProofBytes>;

// Which side a proof speaks for: the HMAC's label.
enum class AuthSide { client, server };

// The secret itself: never printed, wiped when dropped. Shared between the
// connections of a process (ConnectionOptions holds a shared_ptr).
class AuthToken {
 public:
  // At least kMinAuthTokenBytes, else an error that says so.
  static codec::Result<std::shared_ptr<const AuthToken>, std::string> from_secret(std::string_view secret);
  // FILE's contents, surrounding whitespace trimmed; an error naming FILE
  // when it cannot be read, is empty, or holds fewer than 16 bytes.
  static codec::Result<std::shared_ptr<const AuthToken>, std::string> read_file(const std::string& path);

  explicit AuthToken(std::string_view secret);
  ~AuthToken();
  AuthToken(const AuthToken&) = delete;
  AuthToken& operator=(const AuthToken&) = delete;

  AuthProof proof(AuthSide side, std::span<const std::byte> client_nonce,
                  std::span<const std::byte> server_nonce) const;
  // In constant time; false for a proof of the wrong length.
  bool verify(AuthSide side, std::span<const std::byte> client_nonce, std::span<const std::byte> server_nonce,
              std::span<const std::byte> proof) const;

 private:
  std::vector<unsigned char> secret_;
};

// 32 bytes from OpenSSL's CSPRNG; throws if it has none (start-up failure).
AuthNonce make_auth_nonce();

// What one step of the exchange decided: go on (with what to send, if
// anything) or refuse with a message for the Error frame (code unauthorized).
struct AuthStep {
  bool refused = false;
  std::string message;                 // why, when refused
  std::vector<std::byte> nonce;        // the server's, for HelloAck
  std::vector<std::byte> proof;        // for HelloAck (server) or HelloProof (client)

  static AuthStep refuse(std::string why) { return {true, std::move(why), {}, {}}; }
};

// One connection's side of the exchange; `token` null: this side holds no
// secret. The steps in the order a connection meets them.
class AuthHandshake {
 public:
  explicit AuthHandshake(std::shared_ptr<const AuthToken> token) : token_(std::move(token)) {}

  bool enabled() const { return token_ != nullptr; }

  // Client: the nonce for Hello; empty without a secret.
  std::span<const std::byte> client_challenge();
  // Server: on the peer's Hello (its authNonce, empty if none). Refuses a
  // missing or malformed nonce when this side holds a secret, and a nonce
  // when it holds none; else the nonce and proof for HelloAck (none without
  // a secret).
  AuthStep on_hello(std::span<const std::byte> client_nonce);
  // Client: on HelloAck. Checks the server's proof; the proof for HelloProof.
  AuthStep on_hello_ack(std::span<const std::byte> server_nonce, std::span<const std::byte> server_proof);
  // Server: on HelloProof. Refuses a proof that does not fit this
  // connection's nonces.
  AuthStep on_hello_proof(std::span<const std::byte> client_proof) const;

 private:
  std::shared_ptr<const AuthToken> token_;
  AuthNonce client_nonce_{};
  AuthNonce server_nonce_{};
};

}  // namespace fmwire::transport
