#include "kv_content.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace fmwire::bench {
namespace {

constexpr int kStdSteps = 8;
constexpr double kSmallestStd = 0.05;
constexpr double kLargestStd = 1.0;
constexpr std::size_t kSamplesPerStep = 1 << 16;

// IEEE 754 binary32 to binary16, round to nearest even (subnormals included).
std::uint16_t float_to_half(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::int32_t exponent = static_cast<std::int32_t>((bits >> 23) & 0xffu) - 127 + 15;
  std::uint32_t mantissa = bits & 0x7fffffu;
  if (((bits >> 23) & 0xffu) == 0xffu) return static_cast<std::uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0));
  if (exponent >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (exponent <= 0) {
    if (exponent < -10) return static_cast<std::uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return static_cast<std::uint16_t>(sign | half);
  }
  std::uint32_t half = (static_cast<std::uint32_t>(exponent) << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent: still right
  return static_cast<std::uint16_t>(sign | half);
}

std::uint64_t mix(std::uint64_t value) {  // splitmix64's finalizer
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

}  // namespace

void fill_fp16_kv(std::span<std::byte> kv, const engine::KvGeometry& geometry, std::uint64_t seed) {
  if (geometry.element_bytes != 2) throw std::invalid_argument("fill_fp16_kv: the geometry is not 2 bytes per element");
  const std::size_t block_bytes = geometry.bytes_per_block();
  if (block_bytes == 0 || kv.size() % block_bytes != 0) {
    throw std::invalid_argument("fill_fp16_kv: not a whole number of KV blocks");
  }
  // Pre-drawn fp16 samples, one table per std step.
  std::vector<std::uint16_t> samples(kStdSteps * kSamplesPerStep);
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int step = 0; step < kStdSteps; ++step) {
    const double std_dev = kSmallestStd * std::pow(kLargestStd / kSmallestStd, step / double(kStdSteps - 1));
    for (std::size_t i = 0; i < kSamplesPerStep; ++i) {
      samples[step * kSamplesPerStep + i] = float_to_half(static_cast<float>(normal(engine) * std_dev));
    }
  }
  // The step of each channel: [layer][k|v][kv head][dim].
  const std::size_t rows_per_block = std::size_t{geometry.layers} * 2 * geometry.kv_heads;  // each block_tokens x head_dim
  std::vector<const std::uint16_t*> channel_table(rows_per_block * geometry.head_dim);
  for (std::size_t channel = 0; channel < channel_table.size(); ++channel) {
    channel_table[channel] = &samples[(mix(seed ^ channel) % kStdSteps) * kSamplesPerStep];
  }
  // xorshift64*: four 16-bit draws per step.
  std::uint64_t state = mix(seed) | 1;
  std::uint64_t random = 0;
  int left = 0;
  auto* out = reinterpret_cast<std::uint16_t*>(kv.data());
  const std::size_t blocks = kv.size() / block_bytes;
  for (std::size_t block = 0; block < blocks; ++block) {
    for (std::size_t row = 0; row < rows_per_block; ++row) {
      const std::uint16_t* const* tables = &channel_table[row * geometry.head_dim];
      for (std::uint32_t token = 0; token < geometry.block_tokens; ++token) {
        for (std::uint32_t dim = 0; dim < geometry.head_dim; ++dim) {
          if (left == 0) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            random = state * 0x2545f4914f6cdd1dull;
            left = 4;
          }
          *out++ = tables[dim][random & 0xffffu];
          random >>= 16;
          --left;
        }
      }
    }
  }
}

SharedKv::SharedKv(std::size_t bytes) : size_(bytes) {
  fd_ = ::memfd_create("fmwire-bench-kv", MFD_CLOEXEC);
  if (fd_ < 0) throw std::system_error(errno, std::system_category(), "memfd_create");
  if (::ftruncate(fd_, static_cast<off_t>(bytes)) != 0) {
    const int error = errno;
    ::close(fd_);
    throw std::system_error(error, std::system_category(), "ftruncate of the shared KV");
  }
  void* mapped = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0);
  if (mapped == MAP_FAILED) {
    const int error = errno;
    ::close(fd_);
    throw std::system_error(error, std::system_category(), "mmap of the shared KV");
  }
  data_ = static_cast<std::byte*>(mapped);
}

SharedKv::~SharedKv() {
  ::munmap(data_, size_);
  ::close(fd_);
}

std::string SharedKv::path() const { return "/proc/" + std::to_string(::getpid()) + "/fd/" + std::to_string(fd_); }

MappedKv::MappedKv(const std::string& path, std::size_t bytes) : size_(bytes) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "open " + path);
  void* mapped = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  const int error = errno;
  ::close(fd);
  if (mapped == MAP_FAILED) throw std::system_error(error, std::system_category(), "mmap " + path);
  data_ = static_cast<std::byte*>(mapped);
}

MappedKv::~MappedKv() { ::munmap(data_, size_); }

KvBlocks::KvBlocks(std::size_t bytes) : size_(bytes) {
  void* mapped = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (mapped == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap of the KV blocks");
  data_ = static_cast<std::byte*>(mapped);
}

KvBlocks::~KvBlocks() { ::munmap(data_, size_); }

}  // namespace fmwire::bench
