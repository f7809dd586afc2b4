#include "transport/auth_token.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cctype>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace fmwire::transport {

namespace {

constexpr std::string_view kClientLabel = "fmwire auth v1 client";
constexpr std::string_view kServerLabel = "fmwire auth v1 server";

std::string trimmed(std::string text) {
  std::size_t begin = 0;
  std::size_t end = text.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(text[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(text[end - 1]))) --end;
  std::string result = text.substr(begin, end - begin);
  OPENSSL_cleanse(text.data(), text.size());
  return result;
}

std::string too_short(std::size_t bytes) {
  return "the auth token is " + std::to_string(bytes) + " bytes; at least " + std::to_string(kMinAuthTokenBytes) +
         " are required (for example: openssl rand -hex 32)";
}

std::vector<std::byte> bytes_of(std::span<const std::byte> span) { return {span.begin(), span.end()}; }

}  // namespace

codec::Result<std::shared_ptr<const AuthToken>, std::string> AuthToken::from_secret(std::string_view secret) {
  if (secret.size() < kMinAuthTokenBytes) return too_short(secret.size());
  return std::make_shared<const AuthToken>(secret);
}

codec::Result<std::shared_ptr<const AuthToken>, std::string> AuthToken::read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return "--auth-token-file " + path + ": cannot be read: " + std::strerror(errno);
  std::string contents((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (file.bad()) return "--auth-token-file " + path + ": cannot be read";
  const std::string secret = trimmed(std::move(contents));
  if (secret.empty()) return "--auth-token-file " + path + ": the file is empty";
  auto token = from_secret(secret);
  OPENSSL_cleanse(const_cast<char*>(secret.data()), secret.size());
  if (!token) return "--auth-token-file " + path + ": " + token.error();
  return std::move(token).value();
}

AuthToken::AuthToken(std::string_view secret) : secret_(secret.begin(), secret.end()) {}

AuthToken::~AuthToken() { OPENSSL_cleanse(secret_.data(), secret_.size()); }

AuthProof AuthToken::proof(AuthSide side, std::span<const std::byte> client_nonce,
                           std::span<const std::byte> server_nonce) const {
  // label, a zero byte, then the two fixed-size nonces: no two inputs alike.
  const std::string_view label = side == AuthSide::client ? kClientLabel : kServerLabel;
  std::vector<unsigned char> message;
  message.reserve(label.size() + 1 + client_nonce.size() + server_nonce.size());
  message.insert(message.end(), label.begin(), label.end());
  message.push_back(0);
  for (std::byte b : client_nonce) message.push_back(static_cast<unsigned char>(b));
  for (std::byte b : server_nonce) message.push_back(static_cast<unsigned char>(b));
  AuthProof out{};
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), secret_.data(), static_cast<int>(secret_.size()), message.data(), message.size(),
           reinterpret_cast<unsigned char*>(out.data()), &length) == nullptr ||
      length != out.size()) {
    throw std::runtime_error("HMAC-SHA256 failed: OpenSSL's libcrypto has no SHA-256");
  }
  return out;
}

bool AuthToken::verify(AuthSide side, std::span<const std::byte> client_nonce, std::span<const std::byte> server_nonce,
                       std::span<const std::byte> proof) const {
  if (proof.size() != kAuthProofBytes) return false;
  const AuthProof expected = this->proof(side, client_nonce, server_nonce);
  return CRYPTO_memcmp(expected.data(), proof.data(), expected.size()) == 0;
}

AuthNonce make_auth_nonce() {
  AuthNonce nonce{};
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()), static_cast<int>(nonce.size())) != 1) {
    throw std::runtime_error("RAND_bytes failed: no nonce for the auth challenge");
  }
  return nonce;
}

// ---------------------------------------------------------------- AuthHandshake

namespace {
constexpr const char* kNeitherOrBoth = "both sides need the same --auth-token-file";
}  // namespace

std::span<const std::byte> AuthHandshake::client_challenge() {
  if (!token_) return {};
  client_nonce_ = make_auth_nonce();
  return client_nonce_;
}

AuthStep AuthHandshake::on_hello(std::span<const std::byte> client_nonce) {
  if (!token_) {
    if (client_nonce.empty()) return {};
    return AuthStep::refuse(std::string("auth refused: the peer sent an auth challenge, but this side has no auth "
                                        "token; ") + kNeitherOrBoth);
  }
  if (client_nonce.empty()) {
    return AuthStep::refuse(std::string("auth refused: this side requires an auth token and the peer sent no auth "
                                        "challenge (start it with --auth-token-file); ") + kNeitherOrBoth);
  }
  if (client_nonce.size() != kAuthNonceBytes) {
    return AuthStep::refuse("auth refused: the peer's auth nonce is " + std::to_string(client_nonce.size()) +
                            " bytes; " + std::to_string(kAuthNonceBytes) + " expected");
  }
  std::memcpy(client_nonce_.data(), client_nonce.data(), kAuthNonceBytes);
  server_nonce_ = make_auth_nonce();
  AuthStep step;
  step.nonce = bytes_of(server_nonce_);
  step.proof = bytes_of(token_->proof(AuthSide::server, client_nonce_, server_nonce_));
  return step;
}

AuthStep AuthHandshake::on_hello_ack(std::span<const std::byte> server_nonce, std::span<const std::byte> server_proof) {
  if (!token_) {
    if (server_nonce.empty() && server_proof.empty()) return {};
    return AuthStep::refuse("auth refused: the peer answered an auth challenge this side never sent");
  }
  if (server_nonce.empty() && server_proof.empty()) {
    return AuthStep::refuse(std::string("auth refused: the peer did not answer the auth challenge (it has no auth "
                                        "token, or predates them); ") + kNeitherOrBoth);
  }
  if (server_nonce.size() != kAuthNonceBytes || server_proof.size() != kAuthProofBytes) {
    return AuthStep::refuse("auth refused: the peer's auth answer has a " + std::to_string(server_nonce.size()) +
                            "-byte nonce and a " + std::to_string(server_proof.size()) + "-byte proof; " +
                            std::to_string(kAuthNonceBytes) + " and " + std::to_string(kAuthProofBytes) + " expected");
  }
  std::memcpy(server_nonce_.data(), server_nonce.data(), kAuthNonceBytes);
  if (!token_->verify(AuthSide::server, client_nonce_, server_nonce_, server_proof)) {
    return AuthStep::refuse(std::string("auth refused: the peer's auth proof does not match this side's token (the "
                                        "two sides' --auth-token-file differ)"));
  }
  AuthStep step;
  step.proof = bytes_of(token_->proof(AuthSide::client, client_nonce_, server_nonce_));
  return step;
}

AuthStep AuthHandshake::on_hello_proof(std::span<const std::byte> client_proof) const {
  if (!token_) return AuthStep::refuse("auth refused: the peer sent an auth proof, but this side has no auth token");
  if (client_proof.size() != kAuthProofBytes) {
    return AuthStep::refuse("auth refused: the peer's auth proof is " + std::to_string(client_proof.size()) +
                            " bytes; " + std::to_string(kAuthProofBytes) + " expected");
  }
  if (!token_->verify(AuthSide::client, client_nonce_, server_nonce_, client_proof)) {
    return AuthStep::refuse(std::string("auth refused: the peer's auth proof does not match this side's token (the "
                                        "two sides' --auth-token-file differ)"));
  }
  return {};
}

}  // namespace fmwire::transport
