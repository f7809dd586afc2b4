#include "engine/cuda_module.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <vector>

namespace fmwire::engine {
namespace {

#ifdef FMWIRE_CUDA_MODULE
constexpr const char* kModuleFile = "libfmwire_engine_cuda.so";

std::string dl_error() {
  const char* error = dlerror();
  return error != nullptr ? error : "unknown dlopen error";
}

std::vector<std::string> module_candidates() {
  if (const char* chosen = std::getenv("FMWIRE_CUDA_MODULE"); chosen != nullptr && *chosen != '\0') return {chosen};
  std::vector<std::string> candidates;
  std::error_code error;
  const std::filesystem::path executable = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) candidates.push_back((executable.parent_path() / kModuleFile).string());
  candidates.push_back(FMWIRE_CUDA_MODULE);
  return candidates;
}
#endif

CudaModuleLoad open_module() {
#ifndef FMWIRE_CUDA_MODULE
  return {nullptr, "not built (no CUDA toolkit when this build was configured)"};
#else
  std::string looked_in;
  for (const std::string& path : module_candidates()) {
    std::error_code error;
    if (!std::filesystem::exists(path, error)) {
      looked_in += (looked_in.empty() ? "" : ", ") + path;
      continue;
    }
    // RTLD_LOCAL: the CUDA runtime's symbols stay out of the process's namespace.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) return {nullptr, dl_error()};
    void* entry = dlsym(handle, kCudaModuleEntry);
    if (entry == nullptr) return {nullptr, path + ": " + dl_error()};
    // The module stays open for the life of the process: backends it made may
    // live until exit.
    return {reinterpret_cast<const CudaModule* (*)()>(entry)(), {}};
  }
  return {nullptr, "module not found (looked for " + looked_in + ")"};
#endif
}

}  // namespace

const CudaModuleLoad& cuda_module() {
  static const CudaModuleLoad load = open_module();
  return load;
}

CudaChoice choose_cuda() {
#ifdef FMWIRE_CUDA_MODULE
  // The driver's library is what every CUDA runtime opens first; a machine
  // without it has no usable device, whatever the module would say.
  void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (driver == nullptr) return {nullptr, "CUDA: no driver (" + dl_error() + "), CUDA backend skipped"};
  dlclose(driver);
#endif
  const CudaModuleLoad& load = cuda_module();
  if (load.module == nullptr) return {nullptr, "CUDA: backend " + load.problem + ", CUDA backend skipped"};
  CudaProbe probe = load.module->probe();
  return {probe.available ? load.module : nullptr, std::move(probe.log_line)};
}

}  // namespace fmwire::engine
