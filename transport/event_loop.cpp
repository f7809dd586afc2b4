#include "transport/event_loop.h"

#include <algorithm>
#include <stdexcept>

#include "transport/connection.h"
#include "transport/tls_backend.h"

namespace fmwire::transport {

EventLoop::EventLoop(std::string_view forced_backend) : EventLoop(forced_backend, UringOptions{}) {}

EventLoop::EventLoop(std::string_view forced_backend, const UringOptions& uring) {
  BackendChoice choice = make_backend(forced_backend, uring);
  backend_ = std::move(choice.backend);
  backend_log_line_ = std::move(choice.log_line);
  backend_->set_before_wait([this] { end_turn(); });
}

EventLoop::~EventLoop() = default;

void EventLoop::use_tls(std::shared_ptr<const TlsCredentials> credentials) {
  if (!credentials || credentials == tls_) return;
  if (tls_) throw std::logic_error("EventLoop::use_tls: the loop runs TLS with other credentials already");
  tls_ = credentials;
  // The inner backend keeps the before-wait hook set above.
  backend_ = std::make_unique<TlsBackend>(std::move(backend_), std::move(credentials));
  backend_log_line_ += "; " + tls_engine_line();
}

void EventLoop::end_turn() {
  if (turn_end_) turn_end_();
  flush_all();
}

void EventLoop::flush_all() {
  // A flush can complete at once and queue more (Asio), so take the list first.
  flushing_.swap(flush_list_);
  for (Connection* connection : flushing_) connection->flush();
  flushing_.clear();
}

void EventLoop::forget(Connection* connection) {
  std::erase(flush_list_, connection);
  std::replace(flushing_.begin(), flushing_.end(), connection, static_cast<Connection*>(nullptr));
  std::erase(flushing_, nullptr);
}

}  // namespace fmwire::transport
