#include "python/client_core.h"

#include <algorithm>

namespace fmwire::python {

ClientResult<std::shared_ptr<ClientCore>> ClientCore::connect(std::vector<transport::Endpoint> endpoints,
                                                              ClientOptions options) {
  std::shared_ptr<ClientCore> core(new ClientCore());
  // The core owns the client, so the hook never outlives what it touches.
  options.on_turn_end = [raw = core.get()] { raw->hand_over(); };
  ClientResult<std::unique_ptr<Client>> client = Client::connect(std::move(endpoints), std::move(options));
  if (!client) return client.error();
  core->client_ = std::move(*client);
  return core;
}

std::optional<GenerationHandle> ClientCore::generate(GenerateParams params, const std::shared_ptr<StreamQueue>& queue) {
  StreamCallbacks callbacks;
  // On the loop thread: gathered, handed over at the end of the turn.
  callbacks.on_tokens = [this, queue](const TokenChunk& chunk) {
    if (queue->gather(chunk)) listed_.push_back(queue);
  };
  callbacks.on_finish = [this, queue](const Completion& completion) {
    if (queue->gather(StreamEnd{completion, std::nullopt})) listed_.push_back(queue);
  };
  callbacks.on_error = [this, queue](const ClientError& error) {
    if (queue->gather(StreamEnd{std::nullopt, error})) listed_.push_back(queue);
  };
  std::lock_guard lock(client_mutex_);
  if (!client_) return std::nullopt;
  return client_->generate(std::move(params), std::move(callbacks));
}

void ClientCore::cancel(const GenerationHandle& handle) {
  std::lock_guard lock(client_mutex_);
  if (client_) handle.cancel();
}

void ClientCore::consumed(const GenerationHandle& handle, std::uint64_t wire_bytes) {
  std::lock_guard lock(client_mutex_);
  if (client_) handle.consumed(wire_bytes);
}

void ClientCore::close() {
  std::lock_guard closing(close_mutex_);
  std::unique_ptr<Client> client;
  {
    std::lock_guard lock(client_mutex_);
    client = std::move(client_);
  }
  if (!client) return;
  // Joins the loop thread; the streams' last callbacks (cancelled, "client
  // closed") may come in a last turn without on_turn_end: handed over here.
  client.reset();
  hand_over();
}

bool ClientCore::connected() {
  std::lock_guard lock(client_mutex_);
  return client_ && client_->connected();
}

std::string ClientCore::connected_endpoint() {
  std::lock_guard lock(client_mutex_);
  return client_ ? client_->connected_endpoint() : std::string();
}

void ClientCore::hand_over() {
  for (const std::shared_ptr<StreamQueue>& queue : listed_) {
    if (queue->hand_over() && std::find(to_ring_.begin(), to_ring_.end(), queue->notifier()) == to_ring_.end()) {
      to_ring_.push_back(queue->notifier());
    }
  }
  for (Notifier* notifier : to_ring_) notifier->ring();  // once per asyncio loop per turn
  to_ring_.clear();
  listed_.clear();
}

}  // namespace fmwire::python
