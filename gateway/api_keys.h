// The gateway's API keys, kept as SHA-256 hashes only: a presented key is
// hashed and compared in constant time (CRYPTO_memcmp) with every
// configured key's hash, all of them, so neither the time taken nor an
// early exit says which key, or how much of one, matched. A hash also
// names a key where one must be remembered (the opener of a resumable
// stream, a rate-limit bucket) without keeping the key itself.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fmwire::gateway {

using KeyHash = std::array<unsigned char, 32>;

KeyHash sha256_of(std::string_view text);
// Equal in constant time (CRYPTO_memcmp).
bool same_key_hash(const KeyHash& a, const KeyHash& b);

// Overwrites each key's bytes (OPENSSL_cleanse) and empties the list: for
// clear-text keys once they are hashed.
void forget_api_keys(std::vector<std::string>& keys);

class ApiKeys {
 public:
  explicit ApiKeys(const std::vector<std::string>& keys);

  bool empty() const { return hashes_.empty(); }
  std::size_t size() const { return hashes_.size(); }
  // The hash of `presented` when it is one of the keys, else none. Every
  // key's hash is compared, whichever matches.
  std::optional<KeyHash> find(std::string_view presented) const;

 private:
  std::vector<KeyHash> hashes_;
};

}  // namespace fmwire::gateway
