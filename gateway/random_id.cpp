#include "gateway/random_id.h"

#include <openssl/rand.h>

#include <array>
#include <stdexcept>

namespace fmwire::gateway {

std::string random_id_128() {
  std::array<unsigned char, kRandomIdBits / 8> bytes;
  if (RAND_bytes(bytes.data(), static_cast<int>(bytes.size())) != 1) {
    throw std::runtime_error("RAND_bytes failed: no random stream id");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(bytes.size() * 2, '0');
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    id[2 * i] = kHex[bytes[i] >> 4];
    id[2 * i + 1] = kHex[bytes[i] & 0xf];
  }
  return id;
}

}  // namespace fmwire::gateway
