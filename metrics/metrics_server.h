// The /metrics endpoint of a process whose own threads must never wait on
// HTTP (a worker's loop and engine threads, a router's loops): a
// Boost.Beast server on one thread of its own. GET /metrics calls the
// owner's render function there, which gathers its numbers from the
// threads that keep them (a snapshot posted to each loop) and writes the
// page; /health answers "ok"; anything else is 404, or 405 for a method
// other than GET and HEAD. Connections follow the Beast examples' session:
// read a request, handle it, write, read the next while keep-alive holds.
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <variant>

namespace fmwire::metrics {

class MetricsServer {
 public:
  // The page, or nothing when the numbers could not be had (the process is
  // shutting down): then the answer is 503. Called on the server's thread.
  using Render = std::function<std::optional<std::string>()>;

  // Binds HOST:PORT (a numeric address; port 0: any free one) and starts
  // the thread, named `thread_name` (at most 15 characters); or says why not.
  static std::variant<std::unique_ptr<MetricsServer>, std::string> start(const std::string& host, std::uint16_t port,
                                                                       Render render,
                                                                       const std::string& thread_name = "fmwire-metrics");
  ~MetricsServer();  // stops and joins the thread; open connections are closed
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  std::uint16_t port() const { return port_; }
  // "http://HOST:PORT/metrics", for the line that tells where it is.
  std::string url() const;

 private:
  class Session;
  MetricsServer(std::string host, Render render);
  void accept();

  std::string host_;
  Render render_;
  boost::asio::io_context io_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer accept_retry_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

}  // namespace fmwire::metrics
