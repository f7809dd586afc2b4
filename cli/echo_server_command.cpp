#include "cli/echo_server_command.h"

#include <ostream>

#include "cli/signal_watcher.h"
#include "transport/echo_service.h"
#include "transport/server.h"

namespace fmwire::cli {

int run_echo_server(const EchoServerCommand& command, std::ostream& out, std::ostream& err) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    err << "fmwire echo-server: " << problem << std::endl;
    return 2;
  }
  transport::EventLoop loop(command.backend);
  transport::EchoService service(loop, {command.token_interval, command.tokens_per_frame});
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  options.name = "fmwire echo-server";
  transport::Server server(loop, *endpoint, options, service);

  int result = 0;
  bool draining = false;
  // Signals arrive on the watcher's thread; everything they do runs on the loop.
  SignalWatcher signals([&](int, int count) {
    loop.post([&, count] {
      if (count > 1 || draining) {
        err << "fmwire echo-server: second signal, closing now" << std::endl;
        result = 1;
        loop.stop();
        return;
      }
      draining = true;
      err << "fmwire echo-server: draining " << server.connections() << " connection(s)" << std::endl;
      server.drain("server shutting down", [&] { loop.stop(); });
      loop.backend().schedule(command.drain_timeout, [&] {
        err << "fmwire echo-server: drain took over " << command.drain_timeout.count() << " ms, closing now"
            << std::endl;
        result = 1;
        loop.stop();
      });
    });
  });

  err << "fmwire echo-server: " << loop.backend_log_line() << std::endl;
  out << "listening on " << transport::Endpoint{endpoint->host, server.port()}.to_string() << std::endl;
  loop.run();
  err << "fmwire echo-server: stopped after " << service.tokens_sent() << " tokens, "
      << service.streams_cancelled() << " streams cancelled" << std::endl;
  return result;
}

}  // namespace fmwire::cli
