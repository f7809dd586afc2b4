#include "gateway/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

namespace fmwire::gateway {

KeyHash sha256_of(std::string_view text) {
  KeyHash hash;
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), hash.data());
  return hash;
}

bool same_key_hash(const KeyHash& a, const KeyHash& b) { return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

void forget_api_keys(std::vector<std::string>& keys) {
  for (std::string& key : keys) OPENSSL_cleanse(key.data(), key.size());
  keys.clear();
}

ApiKeys::ApiKeys(const std::vector<std::string>& keys) {
  hashes_.reserve(keys.size());
  for (const std::string& key : keys) hashes_.push_back(sha256_of(key));
}

std::optional<KeyHash> ApiKeys::find(std::string_view presented) const {
  const KeyHash hash = sha256_of(presented);
  bool found = false;
  for (const KeyHash& allowed : hashes_) found |= same_key_hash(hash, allowed);
  if (!found) return std::nullopt;
  return hash;
}

}  // namespace fmwire::gateway
