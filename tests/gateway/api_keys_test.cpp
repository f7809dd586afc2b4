// The gateway's API keys kept as SHA-256 hashes, and its stream ids.
#include <doctest/doctest.h>

#include <set>
#include <string>
#include <vector>

#include "gateway/api_keys.h"
#include "gateway/random_id.h"

namespace fmwire::gateway {
namespace {

std::string hex(const KeyHash& hash) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string text;
  for (unsigned char byte : hash) {
    text += kHex[byte >> 4];
    text += kHex[byte & 0xf];
  }
  return text;
}

TEST_CASE("api_keys: a key's hash is its SHA-256 (FIPS 180-2's \"abc\" vector)") {
  CHECK(hex(sha256_of("abc")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex(sha256_of("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_CASE("api_keys: each configured key is found, by its hash, and nothing else is") {
  const ApiKeys keys({"sk-one", "sk-two", "sk-three"});
  CHECK(keys.size() == 3);
  for (const char* key : {"sk-one", "sk-two", "sk-three"}) {
    const auto found = keys.find(key);
    REQUIRE(found.has_value());
    CHECK(same_key_hash(*found, sha256_of(key)));
  }
  for (const char* other : {"", "sk-on", "sk-one ", "sk-onf", "SK-ONE", "sk-twothree"}) CHECK(!keys.find(other));
}

TEST_CASE("api_keys: without keys nothing is found") {
  const ApiKeys keys({});
  CHECK(keys.empty());
  CHECK(!keys.find(""));
  CHECK(!keys.find("sk-one"));
}

TEST_CASE("api_keys: hashes of different keys differ, of the same key agree") {
  CHECK(same_key_hash(sha256_of("sk-a"), sha256_of("sk-a")));
  CHECK(!same_key_hash(sha256_of("sk-a"), sha256_of("sk-b")));
  CHECK(!same_key_hash(sha256_of("sk-a"), KeyHash{}));
}

TEST_CASE("api_keys: forget_api_keys overwrites and empties the clear-text list") {
  std::vector<std::string> keys{"sk-a-key-long-enough-to-be-on-the-heap", "sk-short"};
  forget_api_keys(keys);
  CHECK(keys.empty());
}

TEST_CASE("random_id: ids are 128 bits as 32 hex digits, and 10,000 of them are distinct") {
  std::set<std::string> seen;
  for (int i = 0; i < 10'000; ++i) {
    const std::string id = random_id_128();
    REQUIRE(id.size() == kRandomIdBits / 4);
    REQUIRE(id.find_first_not_of("0123456789abcdef") == std::string::npos);
    seen.insert(id);
  }
  CHECK(seen.size() == 10'000);
}

TEST_CASE("random_id: every bit position takes both values (no fixed or truncated part)") {
  std::vector<int> ones(kRandomIdBits, 0);
  constexpr int kIds = 2'000;
  for (int i = 0; i < kIds; ++i) {
    const std::string id = random_id_128();
    for (std::size_t digit = 0; digit < id.size(); ++digit) {
      const int value = id[digit] <= '9' ? id[digit] - '0' : id[digit] - 'a' + 10;
      for (int bit = 0; bit < 4; ++bit) ones[digit * 4 + bit] += (value >> bit) & 1;
    }
  }
  // Each bit is 1 in about half the ids: 1,000 +- ~22; 800..1,200 is > 8 sigma.
  for (std::size_t bit = 0; bit < ones.size(); ++bit) {
    CHECK_MESSAGE(ones[bit] > 800, "bit " << bit);
    CHECK_MESSAGE(ones[bit] < 1200, "bit " << bit);
  }
}

}  // namespace
}  // namespace fmwire::gateway
