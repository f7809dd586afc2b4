// Ids that cannot be guessed: 128 bits from OpenSSL's CSPRNG (RAND_bytes,
// seeded from getrandom(2)), as 32 lower-case hex digits. A resumable
// stream's id is all a reader needs besides its API key, so it must not be
// predictable from others seen (as mt19937_64's outputs are).
#pragma once

#include <cstddef>
#include <string>

namespace fmwire::gateway {

inline constexpr std::size_t kRandomIdBits = 128;

// Throws std::runtime_error when the CSPRNG fails (it cannot be seeded).
std::string random_id_128();

}  // namespace fmwire::gateway
