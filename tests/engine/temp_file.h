// A file path under the system's temporary folder, unique to this process
// and this object, removed when the object goes.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <system_error>

namespace fmwire::engine::test {

class TempFile {
 public:
  explicit TempFile(const std::string& stem) {
    static std::atomic<unsigned> counter{0};
    path_ = (std::filesystem::temp_directory_path() /
             (stem + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++)))
                .string();
  }
  ~TempFile() {
    std::error_code ignored;  // a file the test never wrote is fine
    std::filesystem::remove(path_, ignored);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace fmwire::engine::test
