// The resumable streams of one gateway by id, so that a reader coming back
// (GET /v1/streams/<id>) finds its stream from any HTTP thread. Locked: a
// lookup is once per request, never per token.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace fmwire::gateway {

class GatewayStream;

class ResumableRegistry {
 public:
  void keep(const std::string& id, std::shared_ptr<GatewayStream> stream);
  void forget(const std::string& id);
  std::shared_ptr<GatewayStream> find(const std::string& id) const;
  void clear();

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<GatewayStream>> streams_;  // until resume_window after their end
};

}  // namespace fmwire::gateway
