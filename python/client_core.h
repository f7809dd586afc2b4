// What the Python module wraps: one fmwire::Client and the hand-over of its
// streams' chunks to Python readers (stream_queue.h). No Python here: this
// part runs on the client's loop thread too, which never takes the GIL.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "python/stream_queue.h"
#include "transport/client.h"

namespace fmwire::python {

// Shared by the Python Client and its streams (a stream keeps it alive, so
// that its handle never outlives the client it names).
class ClientCore {
 public:
  // Connects to the first of `endpoints` that accepts, as Client::connect.
  static ClientResult<std::shared_ptr<ClientCore>> connect(std::vector<transport::Endpoint> endpoints,
                                                           ClientOptions options);
  ~ClientCore() { close(); }
  ClientCore(const ClientCore&) = delete;
  ClientCore& operator=(const ClientCore&) = delete;

  // Opens a stream whose chunks go to `queue`; nullopt once closed.
  std::optional<GenerationHandle> generate(GenerateParams params, const std::shared_ptr<StreamQueue>& queue);
  // Nothing once closed (close() ended every stream).
  void cancel(const GenerationHandle& handle);
  void consumed(const GenerationHandle& handle, std::uint64_t wire_bytes);
  // Ends every open stream (cancelled, "client closed"), their readers get
  // that end, and the loop thread stops. Blocks until it has; idempotent.
  void close();

  bool connected();
  std::string connected_endpoint();
  std::uint64_t next_stream_id() { return next_stream_id_.fetch_add(1); }

 private:
  ClientCore() = default;
  // On the loop thread, the end of each turn (ClientOptions::on_turn_end).
  void hand_over();

  std::atomic<std::uint64_t> next_stream_id_{1};
  std::mutex close_mutex_;   // one close() at a time: it runs hand_over() on its own thread
  std::mutex client_mutex_;  // client_ against close()
  std::unique_ptr<Client> client_;
  // The loop thread's: the streams that gathered something this turn, and
  // the notifiers to ring after their hand-over.
  std::vector<std::shared_ptr<StreamQueue>> listed_;
  std::vector<Notifier*> to_ring_;
};

}  // namespace fmwire::python
