#include "gateway/resumable_registry.h"

namespace fmwire::gateway {

void ResumableRegistry::keep(const std::string& id, std::shared_ptr<GatewayStream> stream) {
  std::lock_guard lock(mutex_);
  streams_[id] = std::move(stream);
}

void ResumableRegistry::forget(const std::string& id) {
  std::lock_guard lock(mutex_);
  streams_.erase(id);
}

std::shared_ptr<GatewayStream> ResumableRegistry::find(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto found = streams_.find(id);
  return found == streams_.end() ? nullptr : found->second;
}

void ResumableRegistry::clear() {
  // Destroyed outside the lock: a stream's end may call back into forget().
  std::map<std::string, std::shared_ptr<GatewayStream>> streams;
  {
    std::lock_guard lock(mutex_);
    streams.swap(streams_);
  }
}

}  // namespace fmwire::gateway
