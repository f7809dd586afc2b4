#include "cli/echo_server_command.h"

#include <ostream>

#include <fmt/format.h>

#include "cli/role_shutdown.h"
#include "log/log.h"
#include "transport/echo_service.h"
#include "transport/server_group.h"

namespace fmwire::cli {

int run_echo_server(const EchoServerCommand& command, std::ostream& out) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    log::error(problem);
    return 2;
  }
  if (command.threads == 0) {
    log::error("--threads must be at least 1");
    return 2;
  }
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  options.name = "fmwire echo-server";
  options.tls = command.tls;
  options.auth_token = command.auth_token;
  std::vector<transport::EchoService*> services;  // read after the loops have stopped
  const transport::EchoOptions echo{command.token_interval, command.tokens_per_frame};

  // Before the loop threads, which inherit its signal mask.
  RoleShutdown shutdown;

  transport::ServerGroup group(command.threads, *endpoint, options,
                               [&](transport::EventLoop& loop) {
                                 auto service = std::make_unique<transport::EchoService>(loop, echo);
                                 services.push_back(service.get());
                                 return service;
                               },
                               command.backend);
  log::info(fmt::format("{}, {} loop thread(s)", group.backend_log_line(), group.threads()),
            {{"listen", command.listen}, {"threads", group.threads()}, {"tokens_per_frame", command.tokens_per_frame}});
  out << "listening on " << transport::Endpoint{endpoint->host, group.port()}.to_string() << std::endl;
  group.start();

  shutdown.wait_for_signal();
  const int result = shutdown.drain(group, "server shutting down", command.drain_timeout);
  std::uint64_t tokens = 0;
  std::uint64_t cancelled = 0;
  std::string per_loop;
  for (const transport::EchoService* service : services) {
    tokens += service->tokens_sent();
    cancelled += service->streams_cancelled();
    if (!per_loop.empty()) per_loop += ' ';
    per_loop += std::to_string(service->tokens_sent());
  }
  log::info(fmt::format("stopped after {} tokens, {} streams cancelled; tokens per loop: {}", tokens, cancelled, per_loop));
  return result;
}

}  // namespace fmwire::cli
