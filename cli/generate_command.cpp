#include "cli/generate_command.h"

#include <boost/json.hpp>

#include <csignal>
#include <future>
#include <memory>
#include <ostream>

#include "cli/signal_watcher.h"
#include "log/log.h"
#include "transport/client.h"

namespace fmwire::cli {

namespace {

boost::json::object error_json(const ClientError& error) {
  return {{"type", "error"},
          {"code", to_string(error.code)},
          {"message", error.message},
          {"retryable", error.retryable},
          {"retry_after_ms", error.retry_after_ms}};
}

boost::json::object finish_json(const Completion& completion) {
  boost::json::array timings;
  for (const HopTime& hop : completion.timings) {
    timings.push_back({{"hop", hop.hop},
                       {"queue_us", hop.queue_us},
                       {"prefill_us", hop.prefill_us},
                       {"decode_us", hop.decode_us},
                       {"first_token_us", hop.first_token_us},
                       {"total_us", hop.total_us}});
  }
  return {{"type", "finish"},
          {"reason", to_string(completion.reason)},
          {"usage",
           {{"prompt_tokens", completion.prompt_tokens},
            {"completion_tokens", completion.completion_tokens},
            {"cached_prompt_tokens", completion.cached_prompt_tokens}}},
          {"trailing_text", completion.trailing_text},
          {"timings", std::move(timings)}};
}

void report_error(const ClientError& error, bool json, std::ostream& out) {
  if (json) out << boost::json::serialize(error_json(error)) << std::endl;
  log::error(std::string(to_string(error.code)) + ": " + error.message + (error.retryable ? " (retryable)" : ""));
}

}  // namespace

int run_generate(const GenerateCommand& command, std::ostream& out) {
  std::string problem;
  const auto endpoints = transport::parse_endpoints(command.endpoints, &problem);
  if (!endpoints || endpoints->empty()) {
    log::error(std::string("--endpoint ") + (endpoints ? "names no endpoint" : problem));
    return 2;
  }
  if (command.prompt.empty()) {
    log::error("the prompt is empty");
    return 2;
  }

  std::promise<int> exit_code;
  std::future<int> done = exit_code.get_future();
  std::atomic<bool> cancelled{false};
  GenerationHandle handle;
  std::promise<GenerationHandle> handle_ready;
  std::shared_future<GenerationHandle> started = handle_ready.get_future().share();
  // Declared before the watcher, so destroyed after it: a signal that comes
  // as the stream ends cancels through the client on the watcher's thread,
  // and the watcher's destructor joins that thread before the client goes.
  std::unique_ptr<Client> client;
  // Before the client's thread starts, so that it inherits the blocked signals.
  SignalWatcher signals([&](int, int) {
    cancelled.store(true);
    if (started.wait_for(std::chrono::seconds(0)) == std::future_status::ready) started.get().cancel();
  });

  ClientOptions options;
  options.backend = command.backend;
  options.connect_timeout = command.connect_timeout;
  options.connection.tls = command.tls;
  options.connection.auth_token = command.auth_token;
  ClientResult<std::unique_ptr<Client>> connected = Client::connect(*endpoints, options);
  if (!connected) {
    report_error(connected.error(), command.json, out);
    return 1;
  }
  client = std::move(*connected);

  GenerateParams params;
  params.prompt = command.prompt;
  params.max_tokens = command.max_tokens;
  params.temperature = command.temperature;
  params.seed = command.seed;
  params.request_id = "fmwire-generate";

  StreamCallbacks callbacks;
  std::string text;  // one write per frame; reused
  callbacks.on_tokens = [&](const TokenChunk& chunk) {
    if (command.json) {
      boost::json::array ids(chunk.token_ids.begin(), chunk.token_ids.end());
      boost::json::array pieces;
      for (std::string_view piece : chunk.text_pieces) pieces.emplace_back(piece);
      out << boost::json::serialize(boost::json::object{{"type", "tokens"},
                                                        {"first_index", chunk.first_index},
                                                        {"token_ids", std::move(ids)},
                                                        {"text", std::move(pieces)},
                                                        {"wire_bytes", chunk.wire_bytes}})
          << '\n';
    } else {
      text.clear();
      for (std::string_view piece : chunk.text_pieces) text += piece;
      out << text;
    }
    out.flush();
  };
  callbacks.on_finish = [&](const Completion& completion) {
    if (command.json) {
      out << boost::json::serialize(finish_json(completion)) << std::endl;
    } else {
      out << completion.trailing_text << std::endl;
    }
    exit_code.set_value(0);
  };
  callbacks.on_error = [&](const ClientError& error) {
    if (!command.json) out << std::endl;
    if (cancelled.load() && error.code == protocol::ErrorCode::CANCELLED) {
      log::warn("cancelled");
      exit_code.set_value(130);
      return;
    }
    report_error(error, command.json, out);
    exit_code.set_value(1);
  };
  handle = client->generate(std::move(params), std::move(callbacks));
  handle_ready.set_value(handle);
  if (cancelled.load()) handle.cancel();  // a signal that came before the handle
  return done.get();
}

}  // namespace fmwire::cli
