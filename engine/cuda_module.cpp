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

// The folder of the file this code was loaded from: the shared libfmwire
// (in <libdir>) for an SDK program, the executable for a static link.
std::filesystem::path loaded_from() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&loaded_from), &info) == 0 || info.dli_fname == nullptr) return {};
  std::error_code error;
  const std::filesystem::path file = std::filesystem::canonical(info.dli_fname, error);
  return error ? std::filesystem::path{} : file.parent_path();
}

std::vector<std::string> module_candidates() {
  if (const char* chosen = std::getenv("FMWIRE_CUDA_MODULE"); chosen != nullptr && *chosen != '\0') return {chosen};
  std::vector<std::string> candidates;
  if (const std::filesystem::path library = loaded_from(); !library.empty()) {
    candidates.push_back((library / "fmwire" / kModuleFile).string());
  }
  std::error_code error;
  const std::filesystem::path executable = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) {
#ifdef FMWIRE_CUDA_MODULE_FROM_BINDIR
    // The installed binary: <prefix>/bin/fmwire, the module in <prefix>/<libdir>/fmwire.
    candidates.push_back(
        (executable.parent_path() / FMWIRE_CUDA_MODULE_FROM_BINDIR / kModuleFile).lexically_normal().string());
#endif
    candidates.push_back((executable.parent_path() / kModuleFile).string());
  }
  candidates.push_back(FMWIRE_CUDA_MODULE);
  return candidates;
}
#endif

CudaModuleLoad open_module() {
  const CudaModuleFile file = find_cuda_module();
  if (file.path.empty()) return {nullptr, file.problem};
#ifdef FMWIRE_CUDA_MODULE
  // RTLD_LOCAL: the CUDA runtime's symbols stay out of the process's namespace.
  void* handle = dlopen(file.path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return {nullptr, dl_error()};
  void* entry = dlsym(handle, kCudaModuleEntry);
  if (entry == nullptr) return {nullptr, file.path + ": " + dl_error()};
  // The module stays open for the life of the process: backends it made may
  // live until exit.
  return {reinterpret_cast<const CudaModule* (*)()>(entry)(), {}};
#else
  return {nullptr, "not built"};
#endif
}

}  // namespace

CudaModuleFile find_cuda_module() {
#ifndef FMWIRE_CUDA_MODULE
  return {{}, "not built (no CUDA toolkit when this build was configured)"};
#else
  std::string looked_in;
  for (const std::string& path : module_candidates()) {
    std::error_code error;
    if (std::filesystem::exists(path, error)) return {path, {}};
    looked_in += (looked_in.empty() ? "" : ", ") + path;
  }
  return {{}, "module not found (looked for " + looked_in + ")"};
#endif
}

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
