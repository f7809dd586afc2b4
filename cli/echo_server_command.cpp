#include "cli/echo_server_command.h"

#include <condition_variable>
#include <mutex>
#include <ostream>

#include "cli/signal_watcher.h"
#include "transport/echo_service.h"
#include "transport/server_group.h"

namespace fmwire::cli {

int run_echo_server(const EchoServerCommand& command, std::ostream& out, std::ostream& err) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    err << "fmwire echo-server: " << problem << std::endl;
    return 2;
  }
  if (command.threads == 0) {
    err << "fmwire echo-server: --threads must be at least 1" << std::endl;
    return 2;
  }
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  options.name = "fmwire echo-server";
  std::vector<transport::EchoService*> services;  // read after the loops have stopped
  const transport::EchoOptions echo{command.token_interval, command.tokens_per_frame};

  // The signal thread must exist before the loop threads, which inherit its mask.
  std::mutex mutex;
  std::condition_variable changed;
  int signals_seen = 0;
  bool drained = false;
  SignalWatcher signals([&](int, int count) {
    std::lock_guard lock(mutex);
    signals_seen = count;
    changed.notify_all();
  });

  transport::ServerGroup group(command.threads, *endpoint, options,
                               [&](transport::EventLoop& loop) {
                                 auto service = std::make_unique<transport::EchoService>(loop, echo);
                                 services.push_back(service.get());
                                 return service;
                               },
                               command.backend);
  err << "fmwire echo-server: " << group.backend_log_line() << ", " << group.threads() << " loop thread(s)" << std::endl;
  out << "listening on " << transport::Endpoint{endpoint->host, group.port()}.to_string() << std::endl;
  group.start();

  int result = 0;
  {
    std::unique_lock lock(mutex);
    changed.wait(lock, [&] { return signals_seen > 0; });
    lock.unlock();
    group.drain(
        "server shutting down",
        [&] {
          std::lock_guard drained_lock(mutex);
          drained = true;
          changed.notify_all();
        },
        [&](unsigned loop, std::size_t connections) {
          std::lock_guard print_lock(mutex);
          err << "fmwire echo-server: loop " << loop << " draining " << connections << " connection(s)" << std::endl;
        });
    lock.lock();
    if (!changed.wait_for(lock, command.drain_timeout, [&] { return drained || signals_seen > 1; })) {
      err << "fmwire echo-server: drain took over " << command.drain_timeout.count() << " ms, closing now" << std::endl;
      result = 1;
    } else if (!drained) {
      err << "fmwire echo-server: second signal, closing now" << std::endl;
      result = 1;
    }
  }
  group.stop();
  group.join();
  std::uint64_t tokens = 0;
  std::uint64_t cancelled = 0;
  std::string per_loop;
  for (const transport::EchoService* service : services) {
    tokens += service->tokens_sent();
    cancelled += service->streams_cancelled();
    if (!per_loop.empty()) per_loop += ' ';
    per_loop += std::to_string(service->tokens_sent());
  }
  err << "fmwire echo-server: stopped after " << tokens << " tokens, " << cancelled
      << " streams cancelled; tokens per loop: " << per_loop << std::endl;
  return result;
}

}  // namespace fmwire::cli
