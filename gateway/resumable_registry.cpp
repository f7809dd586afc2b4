#include "gateway/resumable_registry.h"

namespace fmwire::gateway {

void ResumableRegistry::keep(const std::string& id, const KeyHash& opener, std::shared_ptr<GatewayStream> stream) {
  std::lock_guard lock(mutex_);
  streams_[id] = Kept{opener, std::move(stream)};
}

void ResumableRegistry::forget(const std::string& id) {
  std::lock_guard lock(mutex_);
  streams_.erase(id);
}

std::shared_ptr<GatewayStream> ResumableRegistry::find(const std::string& id, const KeyHash& key) const {
  std::lock_guard lock(mutex_);
  auto found = streams_.find(id);
  if (found == streams_.end() || !same_key_hash(found->second.opener, key)) return nullptr;
  return found->second.stream;
}

void ResumableRegistry::clear() {
  // Destroyed outside the lock: a stream's end may call back into forget().
  std::map<std::string, Kept> streams;
  {
    std::lock_guard lock(mutex_);
    streams.swap(streams_);
  }
}

}  // namespace fmwire::gateway
