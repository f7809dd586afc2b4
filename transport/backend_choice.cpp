#include <stdexcept>
#include <string>

#include "transport/asio_backend.h"
#include "transport/io_backend.h"
#include "transport/uring_backend.h"

namespace fmwire::transport {

std::string_view to_string(BackendKind kind) {
  switch (kind) {
    case BackendKind::io_uring: return "io_uring";
    case BackendKind::asio: return "asio";
  }
  return "unknown";
}

BackendChoice make_backend(std::string_view forced) { return make_backend(forced, UringOptions{}); }

BackendChoice make_backend(std::string_view forced, const UringOptions& uring) {
  if (forced == "auto") forced = {};
  if (forced == "asio") {
    return {std::make_unique<AsioBackend>(), "I/O backend: Boost.Asio (forced)"};
  }
  if (!forced.empty() && forced != "uring" && forced != "io_uring") {
    throw std::invalid_argument("unknown I/O backend '" + std::string(forced) + "'; choose uring or asio");
  }
  try {
    auto backend = std::make_unique<UringBackend>(uring);
    return {std::move(backend), forced.empty() ? "I/O backend: io_uring" : "I/O backend: io_uring (forced)"};
  } catch (const std::system_error& error) {
    if (!forced.empty()) throw;  // asked for io_uring by name: say why it cannot be had
    return {std::make_unique<AsioBackend>(),
            std::string("I/O backend: Boost.Asio, because io_uring cannot be set up here (") + error.what() + ")"};
  }
}

}  // namespace fmwire::transport
