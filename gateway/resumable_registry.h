// The resumable streams of one gateway by id, so that a reader coming back
// (GET /v1/streams/<id>) finds its stream from any HTTP thread. Locked: a
// lookup is once per request, never per token. A stream is found only with
// the hash of the API key that opened it: for any other key it is not
// there, as an id that never was (so ids cannot be probed with a key).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "gateway/api_keys.h"

namespace fmwire::gateway {

class GatewayStream;

class ResumableRegistry {
 public:
  void keep(const std::string& id, const KeyHash& opener, std::shared_ptr<GatewayStream> stream);
  void forget(const std::string& id);
  // Null unless `id` is there and was opened with `key`.
  std::shared_ptr<GatewayStream> find(const std::string& id, const KeyHash& key) const;
  void clear();

 private:
  mutable std::mutex mutex_;
  struct Kept {
    KeyHash opener;
    std::shared_ptr<GatewayStream> stream;
  };
  std::map<std::string, Kept> streams_;  // until resume_window after their end
};

}  // namespace fmwire::gateway
