// bench/gateway's peer: the same serving pipeline with its internal hop
// carried as JSON over HTTP/1.1 chunked transfer, as most serving stacks join
// their own parts. Two roles, each a process of its own:
//
//   bench_gateway_peer worker --listen HOST:PORT [--step-us N] [--max-running N]
//       [--max-batch-tokens N] [--kv-memory-mib N]
//     The synthetic engine (synthetic:tiny) on an EngineRunner, as `fmwire
//     worker` runs it. POST /generate {"prompt": "...", "max_tokens": N}
//     answers 200 with a chunked application/x-ndjson body: per step, one
//     line {"index": i, "token_ids": [...], "text": "..."} for the tokens it
//     made, then {"finish_reason": ..., "prompt_tokens": N,
//     "completion_tokens": N}. A reader that falls 64 KiB behind pauses its
//     sequence; one that goes away cancels it.
//   bench_gateway_peer front --listen HOST:PORT --upstream HOST:PORT [--http-threads N]
//     POST /v1/completions with "stream": true, checked by the gateway's own
//     parser and answered with the gateway's own OpenAI chunks as server-sent
//     events; each request goes to the worker over an HTTP/1.1 connection of
//     its own (HTTP/1.1 has no multiplexing), whose lines Boost.JSON parses.
//     --http-threads N threads run one io_context (a strand per client),
//     as Beast's multi-threaded examples do; bench_gateway gives it the
//     count fmwire's gateway gets.
//
// Both print "listening on HOST:PORT" once they serve and stop on SIGTERM or
// SIGINT. What the peer leaves out, in its favour: no router hop (fmwire's
// path has one), no API keys, no metrics, no resumable streams.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <boost/program_options.hpp>

#include <algorithm>
#include <array>
#include <csignal>
#include <functional>
#include <thread>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/model_loader.h"
#include "engine/text_stream.h"
#include "gateway/openai_api.h"
#include "transport/endpoint.h"
#include "worker/engine_runner.h"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
namespace po = boost::program_options;
using tcp = asio::ip::tcp;
using namespace fmwire;

constexpr std::size_t kPauseBehindBytes = 64 * 1024;

std::string chunk_of(std::string_view body) {
  char size[20];
  std::snprintf(size, sizeof size, "%zx\r\n", body.size());
  std::string out = size;
  out += body;
  out += "\r\n";
  return out;
}

tcp::endpoint endpoint_of(const std::string& text) {
  std::string problem;
  auto parsed = transport::parse_endpoint(text, &problem);
  if (!parsed) throw std::runtime_error(text + ": " + problem);
  return {asio::ip::make_address(parsed->host), parsed->port};
}

void stop_on_signals(asio::io_context& ioc, asio::signal_set& signals) {
  signals.async_wait([&ioc](beast::error_code, int) { ioc.stop(); });
}

// ---------------------------------------------------------------- worker

class PeerWorker;

// One POST /generate: its sequence's lines on their way out.
struct WorkerSession : std::enable_shared_from_this<WorkerSession> {
  WorkerSession(PeerWorker& owner, tcp::socket socket) : worker(owner), socket(std::move(socket)) {}

  PeerWorker& worker;
  tcp::socket socket;
  beast::flat_buffer buffer;
  http::request<http::string_body> request;
  engine::SequenceId id = 0;
  std::optional<engine::TextStream> text;
  std::string pending;        // lines not yet written
  std::string writing;        // the write in flight
  bool header_sent = false;
  bool ended = false;         // the finish line is in pending (or written)
  bool paused = false;
  bool gone = false;
  std::array<char, 256> scratch{};
  // This step's tokens, gathered into one line.
  std::uint32_t step_first = 0;
  std::vector<std::uint32_t> step_ids;
  std::string step_text;
};

class PeerWorker {
 public:
  PeerWorker(asio::io_context& ioc, const tcp::endpoint& listen, engine::LoadedModel model)
      : ioc_(ioc), acceptor_(ioc, listen), model_(std::move(model)),
        runner_(*model_.engine, [this](std::shared_ptr<worker::RunnerOutput> output) {
          asio::post(ioc_, [this, output = std::move(output)] { on_output(*output); });
        }) {}

  std::uint16_t port() const { return acceptor_.local_endpoint().port(); }
  void start() { accept(); }

  void write_more(const std::shared_ptr<WorkerSession>& session) {
    if (!session->writing.empty() || session->gone) return;
    if (session->pending.empty()) return;
    if (!session->header_sent) {
      session->writing =
          "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
      session->header_sent = true;
    }
    session->writing += chunk_of(session->pending);
    session->pending.clear();
    const bool last = session->ended;
    if (last) session->writing += "0\r\n\r\n";
    asio::async_write(session->socket, asio::buffer(session->writing),
                      [this, session, last](beast::error_code error, std::size_t) {
                        session->writing.clear();
                        if (error) return lost(session);
                        if (last) {
                          beast::error_code ignored;
                          session->socket.shutdown(tcp::socket::shutdown_send, ignored);
                          sessions_.erase(session->id);
                          return;
                        }
                        if (session->paused && session->pending.size() < kPauseBehindBytes / 2) {
                          session->paused = false;
                          runner_.set_paused(session->id, false);
                        }
                        write_more(session);
                      });
  }

 private:
  void accept() {
    acceptor_.async_accept([this](beast::error_code error, tcp::socket socket) {
      if (error) return;
      socket.set_option(tcp::no_delay(true));
      auto session = std::make_shared<WorkerSession>(*this, std::move(socket));
      http::async_read(session->socket, session->buffer, session->request,
                       [this, session](beast::error_code read_error, std::size_t) {
                         if (!read_error) begin(session);
                       });
      accept();
    });
  }

  void begin(const std::shared_ptr<WorkerSession>& session) {
    engine::SequenceRequest request;
    try {
      const json::object body = json::parse(session->request.body()).as_object();
      request.prompt = model_.tokenizer->encode(json::value_to<std::string>(body.at("prompt")), true);
      request.max_tokens = static_cast<std::uint32_t>(body.at("max_tokens").to_number<std::int64_t>());
    } catch (const std::exception& problem) {
      session->writing = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      asio::async_write(session->socket, asio::buffer(session->writing), [session](beast::error_code, std::size_t) {});
      return;
    }
    session->id = next_id_++;
    session->text.emplace(*model_.tokenizer);
    sessions_[session->id] = session;
    runner_.submit(session->id, std::move(request));
    watch(session);
  }

  // Reads what the reader sends after its request, to see it go away.
  void watch(const std::shared_ptr<WorkerSession>& session) {
    session->socket.async_read_some(asio::buffer(session->scratch), [this, session](beast::error_code error, std::size_t) {
      if (error) return lost(session);
      watch(session);
    });
  }

  void lost(const std::shared_ptr<WorkerSession>& session) {
    if (session->gone) return;
    session->gone = true;
    if (!session->ended) runner_.cancel(session->id);
    sessions_.erase(session->id);
  }

  void on_output(const worker::RunnerOutput& output) {
    touched_.clear();
    for (const engine::StepOutput::Token& token : output.step.tokens) {
      auto found = sessions_.find(token.id);
      if (found == sessions_.end()) continue;
      WorkerSession& session = *found->second;
      if (session.step_ids.empty()) {
        session.step_first = token.index;
        touched_.push_back(found->second);
      }
      session.step_ids.push_back(token.token);
      session.step_text += session.text->push(token.token);
    }
    for (const std::shared_ptr<WorkerSession>& session : touched_) {
      json::object line;
      line["index"] = session->step_first;
      json::array ids;
      for (std::uint32_t id : session->step_ids) ids.push_back(id);
      line["token_ids"] = std::move(ids);
      line["text"] = session->step_text;
      session->pending += json::serialize(line);
      session->pending += '\n';
      session->step_ids.clear();
      session->step_text.clear();
    }
    for (const engine::StepOutput::Finished& finished : output.step.finished) {
      auto found = sessions_.find(finished.id);
      if (found == sessions_.end()) continue;
      WorkerSession& session = *found->second;
      json::object line;
      line["finish_reason"] = finished.cause == engine::FinishCause::max_tokens ? "length" : "stop";
      line["prompt_tokens"] = finished.prompt_tokens;
      line["completion_tokens"] = finished.completion_tokens;
      line["text"] = std::string(session.text->finish());
      session.pending += json::serialize(line);
      session.pending += '\n';
      session.ended = true;
      touched_.push_back(found->second);
    }
    for (const worker::RunnerOutput::Rejected& rejected : output.rejected) {
      auto found = sessions_.find(rejected.id);
      if (found == sessions_.end()) continue;
      json::object line;
      line["error"] = rejected.message;
      found->second->pending += json::serialize(line) + "\n";
      found->second->ended = true;
      touched_.push_back(found->second);
    }
    for (const std::shared_ptr<WorkerSession>& session : touched_) {
      if (!session->ended && !session->paused && session->pending.size() >= kPauseBehindBytes) {
        session->paused = true;
        runner_.set_paused(session->id, true);
      }
      write_more(session);
    }
    touched_.clear();
  }

  asio::io_context& ioc_;
  tcp::acceptor acceptor_;
  engine::LoadedModel model_;
  std::unordered_map<engine::SequenceId, std::shared_ptr<WorkerSession>> sessions_;
  std::vector<std::shared_ptr<WorkerSession>> touched_;
  engine::SequenceId next_id_ = 1;
  worker::EngineRunner runner_;  // last: its thread starts once the rest exists
};

int run_worker(const std::vector<std::string>& arguments) {
  std::string listen = "127.0.0.1:0";
  std::uint32_t step_us = 1000;
  engine::ModelSpec spec;
  spec.model = "synthetic:tiny";
  po::options_description description("usage: bench_gateway_peer worker [options]");
  description.add_options()
      ("listen", po::value(&listen)->default_value(listen), "HOST:PORT")
      ("step-us", po::value(&step_us)->default_value(step_us), "time per step")
      ("max-running", po::value(&spec.batching.max_running)->default_value(spec.batching.max_running), "sequences at once")
      ("max-batch-tokens", po::value(&spec.batching.max_batch_tokens)->default_value(spec.batching.max_batch_tokens),
       "tokens per step")
      ("kv-memory-mib", po::value(&spec.kv_memory_mib)->default_value(spec.kv_memory_mib), "KV cache size");
  po::variables_map values;
  po::store(po::command_line_parser(arguments).options(description).run(), values);
  po::notify(values);
  spec.step_time = std::chrono::microseconds(step_us);
  spec.prefill_time_per_token = std::chrono::nanoseconds(0);
  auto model = engine::load_model(spec);
  if (!model) throw std::runtime_error(model.error());

  asio::io_context ioc(1);
  asio::signal_set signals(ioc, SIGINT, SIGTERM);
  stop_on_signals(ioc, signals);
  PeerWorker worker(ioc, endpoint_of(listen), std::move(*model));
  worker.start();
  std::cout << "listening on 127.0.0.1:" << worker.port() << std::endl;
  ioc.run();
  return 0;
}

// ---------------------------------------------------------------- front

// One client request: its SSE response, fed from its own connection to the worker.
class FrontSession : public std::enable_shared_from_this<FrontSession> {
 public:
  // `client` is bound to a strand of its own: the session's handlers run one at a time.
  FrontSession(tcp::socket client, const tcp::endpoint& upstream,
               const gateway::ApiDefaults& defaults)
      : client_(std::move(client)), upstream_(client_.get_executor()), upstream_endpoint_(upstream), defaults_(defaults) {
    on_chunk_ = [this](std::uint64_t, beast::string_view body, beast::error_code&) {
      lines_.append(body.data(), body.size());
      return body.size();
    };
    parser_.on_chunk_body(on_chunk_);
    parser_.body_limit(boost::none);
  }

  void start() {
    http::async_read(client_, buffer_, request_, [self = shared_from_this()](beast::error_code error, std::size_t) {
      if (!error) self->route();
    });
  }

 private:
  void route() {
    auto parsed = gateway::parse_api_request(gateway::ApiKind::completions, request_.body(), defaults_);
    if (!parsed || !parsed->stream) {
      out_ = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      asio::async_write(client_, asio::buffer(out_), [self = shared_from_this()](beast::error_code, std::size_t) {});
      return;
    }
    include_usage_ = parsed->include_usage;
    identity_.kind = gateway::ApiKind::completions;
    identity_.id = "cmpl-peer" + std::to_string(reinterpret_cast<std::uintptr_t>(this));
    identity_.created = 0;
    identity_.model = defaults_.model;
    json::object body;
    body["prompt"] = parsed->params.prompt;
    body["max_tokens"] = parsed->params.max_tokens;
    upstream_request_ = "POST /generate HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\nContent-Length: ";
    const std::string json_body = json::serialize(body);
    upstream_request_ += std::to_string(json_body.size()) + "\r\n\r\n" + json_body;
    upstream_.async_connect(upstream_endpoint_, [self = shared_from_this()](beast::error_code error) {
      if (error) return self->fail();
      self->upstream_.set_option(tcp::no_delay(true));
      asio::async_write(self->upstream_, asio::buffer(self->upstream_request_),
                        [self](beast::error_code write_error, std::size_t) {
                          if (write_error) return self->fail();
                          http::async_read_header(self->upstream_, self->upstream_buffer_, self->parser_,
                                                  [self](beast::error_code header_error, std::size_t) {
                                                    if (header_error || self->parser_.get().result() != http::status::ok) {
                                                      return self->fail();
                                                    }
                                                    self->read_upstream();
                                                  });
                        });
    });
  }

  void read_upstream() {
    http::async_read_some(upstream_, upstream_buffer_, parser_, [self = shared_from_this()](beast::error_code error, std::size_t) {
      if (error) return self->fail();
      self->take_lines();
      if (self->parser_.is_done()) {
        self->upstream_done_ = true;
        self->flush();
        return;
      }
      self->read_upstream();
    });
  }

  // Each complete line of the worker's body becomes an event.
  void take_lines() {
    std::size_t begin = 0;
    for (std::size_t end = lines_.find('\n'); end != std::string::npos; end = lines_.find('\n', begin)) {
      const json::object line = json::parse(std::string_view(lines_).substr(begin, end - begin)).as_object();
      begin = end + 1;
      if (const json::value* finish = line.if_contains("finish_reason")) {
        const std::string_view tail = line.at("text").as_string();
        if (!tail.empty()) event(gateway::text_chunk_json(identity_, tail));
        const bool length = finish->as_string() == "length";
        event(gateway::finish_chunk_json(identity_, length ? protocol::FinishReason::MAX_TOKENS
                                                          : protocol::FinishReason::END_OF_SEQUENCE));
        if (include_usage_) {
          Completion completion;
          completion.prompt_tokens = static_cast<std::uint32_t>(line.at("prompt_tokens").to_number<std::int64_t>());
          completion.completion_tokens = static_cast<std::uint32_t>(line.at("completion_tokens").to_number<std::int64_t>());
          event(gateway::usage_chunk_json(identity_, completion));
        }
        pending_ += chunk_of("data: [DONE]\n\n");
        pending_ += "0\r\n\r\n";
      } else if (line.contains("error")) {
        pending_ += chunk_of("data: {\"error\": \"worker refused\"}\n\n");
        pending_ += "0\r\n\r\n";
      } else {
        const std::string_view text = line.at("text").as_string();
        if (!text.empty()) event(gateway::text_chunk_json(identity_, text));
      }
    }
    lines_.erase(0, begin);
    flush();
  }

  void event(const std::string& chunk_json) {
    ++events_;
    pending_ += chunk_of("id: " + std::to_string(events_) + "\ndata: " + chunk_json + "\n\n");
  }

  void flush() {
    if (writing_ || pending_.empty()) {
      if (!writing_ && upstream_done_ && pending_.empty()) close();
      return;
    }
    if (!header_sent_) {
      out_ = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             "Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
      header_sent_ = true;
    } else {
      out_.clear();
    }
    out_ += pending_;
    pending_.clear();
    writing_ = true;
    asio::async_write(client_, asio::buffer(out_), [self = shared_from_this()](beast::error_code error, std::size_t) {
      self->writing_ = false;
      if (error) return self->fail();
      self->flush();
    });
  }

  void close() {
    beast::error_code ignored;
    client_.shutdown(tcp::socket::shutdown_both, ignored);
    client_.close(ignored);
    upstream_.close(ignored);
  }

  void fail() {
    beast::error_code ignored;
    client_.close(ignored);
    upstream_.close(ignored);
  }

  tcp::socket client_;
  tcp::socket upstream_;
  tcp::endpoint upstream_endpoint_;
  const gateway::ApiDefaults& defaults_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  std::string upstream_request_;
  beast::flat_buffer upstream_buffer_;
  http::response_parser<http::empty_body> parser_;
  std::function<std::size_t(std::uint64_t, beast::string_view, beast::error_code&)> on_chunk_;
  std::string lines_;
  gateway::StreamIdentity identity_;
  bool include_usage_ = false;
  std::uint64_t events_ = 0;
  std::string pending_;
  std::string out_;
  bool header_sent_ = false;
  bool writing_ = false;
  bool upstream_done_ = false;
};

int run_front(const std::vector<std::string>& arguments) {
  std::string listen = "127.0.0.1:0";
  std::string upstream;
  int threads = 1;
  po::options_description description("usage: bench_gateway_peer front --upstream HOST:PORT [options]");
  description.add_options()
      ("listen", po::value(&listen)->default_value(listen), "HOST:PORT")
      ("upstream", po::value(&upstream)->required(), "the peer worker, HOST:PORT")
      ("http-threads", po::value(&threads)->default_value(threads), "threads serving HTTP (1 to 256)");
  po::variables_map values;
  po::store(po::command_line_parser(arguments).options(description).run(), values);
  po::notify(values);
  if (threads < 1 || threads > 256) throw std::runtime_error("--http-threads must be from 1 to 256");
  const tcp::endpoint worker = endpoint_of(upstream);
  gateway::ApiDefaults defaults{"builtin", 256};

  asio::io_context ioc(threads);
  asio::signal_set signals(ioc, SIGINT, SIGTERM);
  stop_on_signals(ioc, signals);
  tcp::acceptor acceptor(ioc, endpoint_of(listen));
  std::function<void()> accept = [&] {
    acceptor.async_accept(asio::make_strand(ioc), [&](beast::error_code error, tcp::socket socket) {
      if (error) return;
      socket.set_option(tcp::no_delay(true));
      std::make_shared<FrontSession>(std::move(socket), worker, defaults)->start();
      accept();
    });
  };
  accept();
  std::cout << "listening on 127.0.0.1:" << acceptor.local_endpoint().port() << std::endl;
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back([&] { ioc.run(); });
  ioc.run();
  for (std::thread& thread : pool) thread.join();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string role = argc > 1 ? argv[1] : "";
    const std::vector<std::string> arguments(argv + std::min(argc, 2), argv + argc);
    if (role == "worker") return run_worker(arguments);
    if (role == "front") return run_front(arguments);
    std::cerr << "usage: bench_gateway_peer worker|front [options]\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "bench_gateway_peer: " << error.what() << std::endl;
    return 1;
  }
}
