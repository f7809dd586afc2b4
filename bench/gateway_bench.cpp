// bench/gateway: what the OpenAI-compatible front costs end to end, with
// every part a process of its own on 127.0.0.1 and the synthetic engine
// ("tiny" KV shape, paced steps) in the workers.
//
// 1. Pipeline, same run, alternating per repetition, S streaming completions
//    of T tokens at once from this program's own HTTP/1.1 load generator:
//    - fmwire: `fmwire gateway --workers W` (its router embedded) in front of
//      `fmwire worker --model synthetic:tiny`, the internal hops native.
//    - peer: bench_gateway_peer's front in front of its worker, the internal
//      hop JSON lines over HTTP/1.1 chunked transfer (gateway_peer.cpp); no
//      router hop, which favours the peer.
//    Both fronts run the same number of HTTP threads (--http-threads; by
//    default what `fmwire gateway` picks here, one per four cores).
//    Reported: tokens/s at the clients; CPU per token, the front's and the
//    worker's processes together (utime + stime of every thread but the
//    engine's, "fmwire-engine", from /proc/PID/task) over the tokens the
//    clients got (target: fmwire at most a third of the peer's, ratio >= 3);
//    time to first token and inter-token latency, p50 and p99.
//    - native: fmwire::Client straight to the worker, the same streams.
//    - added latency: one stream of 32 tokens at a time, 10 times a
//      repetition, through the gateway and natively, alternating; what the
//      gateway and router add is the difference of the first-token times'
//      medians (each token takes the same hops as the first; with one
//      stream no batching muddles it).
// 2. Concurrency: C streaming clients at once against one gateway (default
//    10,000; connections opened 256 at a time), 48 tokens each at 150 ms
//    steps (every client open at once, the machine not overloaded): tokens/s,
//    p99 inter-token latency, and the gateway's RSS (VmRSS, sampled every
//    50 ms) above its idle value at the moment most streams were open, per
//    stream open then (target: under 16 KiB per open stream; no stream here
//    is resumable, so no replay buffer is kept).
//
// 3. Overload: requests arriving open-loop at twice what one worker serves
//    (measured first, closed loop), through the gateway to a worker with
//    --max-waiting R (R its batch slots) against the same worker with no
//    bound: time to first token p99 of the admitted requests, requests/s
//    served, and the share refused with 429 + Retry-After (issue 17).
//
// Run: build/bench/bench_gateway [--quick] [--repetitions N] [--clients C] [--http-threads N] [--only PART] [--json FILE]
//      (finds ../cli/fmwire and bench_gateway_peer beside itself; --fmwire PATH)
#include <boost/asio.hpp>
#include <boost/program_options.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench_main.h"
#include "bench_results.h"
#include "serving_harness.h"
#include "transport/client.h"

namespace {

namespace asio = boost::asio;
namespace po = boost::program_options;
using tcp = asio::ip::tcp;
using namespace fmwire;
using bench::Clock;

// ---------------------------------------------------------------- child processes

// A program run as a process of its own until stop(); it must print
// "listening on [http://]HOST:PORT" first. Killed with this program too.
class Child {
 public:
  Child(std::string label, const std::vector<std::string>& command) : label_(std::move(label)) {
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    log_path_ = "/tmp/bench_gateway." + std::to_string(getpid()) + "." + label_ + ".log";
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      dup2(out[1], STDOUT_FILENO);
      const int log = open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) dup2(log, STDERR_FILENO);
      close(out[0]);
      std::vector<char*> argv;
      for (const std::string& word : command) argv.push_back(const_cast<char*>(word.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      std::perror("execv");
      _exit(127);
    }
    close(out[1]);
    out_ = out[0];
    const std::string line = read_line(std::chrono::seconds(20));
    const std::size_t at = line.rfind(':');
    if (line.find("listening on ") != 0 || at == std::string::npos) {
      stop();
      throw std::runtime_error(label_ + " printed \"" + line + "\"; its log: " + log_path_);
    }
    port_ = static_cast<std::uint16_t>(std::stoi(line.substr(at + 1)));
    // Whatever it prints later is read and dropped, so it never blocks on a full pipe.
    drain_ = std::thread([fd = out_] {
      char scratch[4096];
      while (read(fd, scratch, sizeof scratch) > 0) {
      }
    });
  }
  ~Child() { stop(); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  std::uint16_t port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  void stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      for (int i = 0; i < 500 && waitpid(pid_, &status, WNOHANG) == 0; ++i) usleep(10'000);
      if (waitpid(pid_, &status, WNOHANG) == 0) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
      }
      pid_ = -1;
    }
    if (drain_.joinable()) drain_.join();
    if (out_ >= 0) close(out_);
    out_ = -1;
    if (!log_path_.empty()) unlink(log_path_.c_str());
  }

 private:
  std::string read_line(std::chrono::seconds limit) {
    std::string line;
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
      pollfd ready{out_, POLLIN, 0};
      if (poll(&ready, 1, 100) <= 0) continue;
      char c = 0;
      if (read(out_, &c, 1) != 1) break;
      if (c == '\n') return line;
      line += c;
    }
    return line;
  }

  std::string label_;
  std::string log_path_;
  pid_t pid_ = -1;
  int out_ = -1;
  std::uint16_t port_ = 0;
  std::thread drain_;
};

// CPU seconds of a process's threads, but those named `except`.
double cpu_seconds(pid_t pid, const std::string& except) {
  static const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* dir = opendir(tasks.c_str());
  if (dir == nullptr) throw std::runtime_error("cannot read " + tasks);
  double total = 0;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    std::ifstream stat(tasks + "/" + entry->d_name + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const std::size_t open = text.find('(');
    const std::size_t close = text.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    if (text.substr(open + 1, close - open - 1) == except) continue;
    std::istringstream fields(text.substr(close + 2));
    std::string field;
    double utime = 0;
    double stime = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i) {  // field 3 is the state
      if (i == 14) utime = std::stod(field);
      if (i == 15) stime = std::stod(field);
    }
    total += (utime + stime) / ticks;
  }
  closedir(dir);
  return total;
}

double rss_kib(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6));
  }
  throw std::runtime_error("no VmRSS for pid " + std::to_string(pid));
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  const std::size_t at = std::min(values.size() - 1, static_cast<std::size_t>(p * static_cast<double>(values.size())));
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(at), values.end());
  return values[at];
}

// ---------------------------------------------------------------- load generator

struct LoadShape {
  std::uint32_t streams = 64;
  std::uint32_t tokens = 400;
  std::uint32_t connecting_at_once = 256;
};

// What the clients saw: per-token gaps (an event's gap shared by its
// tokens), first-token times, totals.
struct LoadResult {
  double seconds = 0;          // first request to the last [DONE]
  std::uint64_t tokens = 0;
  std::uint32_t finished = 0;
  std::vector<double> first_token_us;
  std::vector<double> inter_token_us;
  std::uint32_t max_open = 0;  // streams requested and not yet ended, at once
  std::string error;           // the first failure
};

// Tokens in one completions event: the synthetic model's tokens are one
// character each, so its "text" piece's length (0: none, or no text).
std::size_t event_tokens(std::string_view event) {
  const std::size_t text = event.find("\"text\":\"");
  if (text == std::string_view::npos) return 0;
  const std::size_t quote = event.find('"', text + 8);
  return quote == std::string_view::npos ? 0 : quote - (text + 8);
}

// Streaming completions against an OpenAI-compatible front, on one thread:
// raw HTTP/1.1, events taken from the bytes as they come.
class SseLoad {
 public:
  using Sampler = std::function<void(std::uint32_t open)>;

  SseLoad(std::uint16_t port, LoadShape shape, Sampler sampler = {})
      : endpoint_(asio::ip::make_address("127.0.0.1"), port), shape_(shape), sampler_(std::move(sampler)),
        timer_(ioc_) {
    result_.first_token_us.reserve(shape.streams);
    result_.inter_token_us.reserve(std::size_t{shape.streams} * shape.tokens);
  }

  LoadResult run() {
    start_ = Clock::now();
    for (std::uint32_t i = 0; i < std::min(shape_.connecting_at_once, shape_.streams); ++i) launch();
    if (sampler_) sample();
    ioc_.run_for(std::chrono::seconds(300));
    if (result_.finished < shape_.streams && result_.error.empty()) {
      result_.error = std::to_string(shape_.streams - result_.finished) + " streams did not finish in 300 s";
    }
    result_.seconds = bench::seconds_between(start_, last_done_);
    return std::move(result_);
  }

 private:
  struct LoadConnection {
    explicit LoadConnection(asio::io_context& ioc) : socket(ioc) {}
    tcp::socket socket;
    std::string request;
    std::string in;
    std::array<char, 16384> buffer{};
    Clock::time_point sent;
    Clock::time_point last;
    bool first = true;
  };

  void launch() {
    if (launched_ == shape_.streams) return;
    const std::uint32_t index = launched_++;
    auto client = std::make_shared<LoadConnection>(ioc_);
    const std::string body = "{\"model\":\"builtin\",\"prompt\":\"" + bench::prompt_text(index) +
                             "\",\"max_tokens\":" + std::to_string(shape_.tokens) +
                             ",\"stream\":true,\"stream_options\":{\"include_usage\":true}}";
    client->request = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    client->socket.async_connect(endpoint_, [this, client](boost::system::error_code error) {
      if (error) return fail(client, "connect: " + error.message());
      client->socket.set_option(tcp::no_delay(true));
      client->sent = Clock::now();
      ++open_;
      result_.max_open = std::max(result_.max_open, open_);
      launch();  // the next connection starts once this one is up
      asio::async_write(client->socket, asio::buffer(client->request), [this, client](boost::system::error_code e, std::size_t) {
        if (e) return fail(client, "write: " + e.message());
        read(client);
      });
    });
  }

  void read(const std::shared_ptr<LoadConnection>& client) {
    client->socket.async_read_some(asio::buffer(client->buffer), [this, client](boost::system::error_code error, std::size_t n) {
      if (error) {
        return fail(client, "read: " + error.message() + " before [DONE], after \"" +
                                client->in.substr(0, std::min<std::size_t>(client->in.size(), 400)) + "\"");
      }
      client->in.append(client->buffer.data(), n);
      if (take_events(*client)) return done(client);
      read(client);
    });
  }

  // Takes every complete event; true at [DONE].
  bool take_events(LoadConnection& client) {
    const Clock::time_point now = Clock::now();
    std::size_t begin = 0;
    bool finished = false;
    for (std::size_t end = client.in.find("\n\n"); end != std::string::npos; end = client.in.find("\n\n", begin)) {
      const std::string_view event = std::string_view(client.in).substr(begin, end - begin);
      begin = end + 2;
      if (event.find("data: [DONE]") != std::string_view::npos) {
        finished = true;
        break;
      }
      if (event.find("\"error\"") != std::string_view::npos) {
        result_.error = "an error event: " + std::string(event.substr(0, 300));
        continue;
      }
      const std::size_t tokens = event_tokens(event);
      if (tokens == 0) continue;
      result_.tokens += tokens;
      if (client.first) {
        result_.first_token_us.push_back(bench::micros_between(client.sent, now));
        client.first = false;
      } else {
        const double each = bench::micros_between(client.last, now) / static_cast<double>(tokens);
        for (std::size_t i = 0; i < tokens; ++i) result_.inter_token_us.push_back(each);
      }
      client.last = now;
    }
    client.in.erase(0, begin);
    return finished;
  }

  void done(const std::shared_ptr<LoadConnection>& client) {
    boost::system::error_code ignored;
    client->socket.close(ignored);
    --open_;
    ++result_.finished;
    last_done_ = Clock::now();
    if (result_.finished == shape_.streams) {
      timer_.cancel();
      ioc_.stop();
    }
  }

  void fail(const std::shared_ptr<LoadConnection>& client, const std::string& what) {
    if (result_.error.empty()) result_.error = what;
    boost::system::error_code ignored;
    client->socket.close(ignored);
    ioc_.stop();
  }

  void sample() {
    timer_.expires_after(std::chrono::milliseconds(50));
    timer_.async_wait([this](boost::system::error_code error) {
      if (error) return;
      sampler_(open_);
      sample();
    });
  }

  asio::io_context ioc_{1};
  tcp::endpoint endpoint_;
  LoadShape shape_;
  Sampler sampler_;
  asio::steady_timer timer_;
  LoadResult result_;
  Clock::time_point start_;
  Clock::time_point last_done_;
  std::uint32_t launched_ = 0;
  std::uint32_t open_ = 0;
};

// The same streams through fmwire::Client straight to a worker.
LoadResult native_load(std::uint16_t worker_port, const LoadShape& shape) {
  auto client = bench::connect_client({"127.0.0.1", worker_port}, "the worker");
  struct NativeStream {
    Clock::time_point sent;
    Clock::time_point last;
    bool first = true;
  };
  std::vector<NativeStream> streams(shape.streams);
  LoadResult result;
  std::mutex mutex;
  std::condition_variable changed;
  Clock::time_point last_done;
  const Clock::time_point start = Clock::now();
  for (std::uint32_t s = 0; s < shape.streams; ++s) {
    GenerateParams params;
    params.prompt = bench::prompt_text(s);
    params.max_tokens = shape.tokens;
    streams[s].sent = Clock::now();
    client->generate(std::move(params),
                     {[&, s](const TokenChunk& chunk) {
                        const Clock::time_point now = Clock::now();
                        std::lock_guard lock(mutex);
                        NativeStream& stream = streams[s];
                        result.tokens += chunk.token_ids.size();
                        if (stream.first) {
                          result.first_token_us.push_back(bench::micros_between(stream.sent, now));
                          stream.first = false;
                        } else {
                          const double each = bench::micros_between(stream.last, now) / static_cast<double>(chunk.token_ids.size());
                          for (std::size_t i = 0; i < chunk.token_ids.size(); ++i) result.inter_token_us.push_back(each);
                        }
                        stream.last = now;
                      },
                      [&](const Completion&) {
                        std::lock_guard lock(mutex);
                        ++result.finished;
                        last_done = Clock::now();
                        changed.notify_all();
                      },
                      [&](const ClientError& error) {
                        std::lock_guard lock(mutex);
                        if (result.error.empty()) result.error = error.message;
                        ++result.finished;
                        changed.notify_all();
                      }});
  }
  std::unique_lock lock(mutex);
  if (!changed.wait_for(lock, bench::kPathTimeout, [&] { return result.finished == shape.streams; })) {
    throw std::runtime_error("native path: streams did not finish");
  }
  if (!result.error.empty()) throw std::runtime_error("native path: " + result.error);
  result.seconds = bench::seconds_between(start, last_done);
  return result;
}

// ---------------------------------------------------------------- open-loop overload

// What an open-loop run saw: requests that arrived at a fixed rate whatever
// the front did with the earlier ones (a closed loop would slow down with
// the server and never overload it).
struct OverloadResult {
  std::uint32_t sent = 0;
  std::uint32_t served = 0;              // 200, every token, [DONE]
  std::uint32_t refused = 0;             // 429
  std::uint32_t refused_without_hint = 0;  // of those, no Retry-After
  std::vector<double> first_token_us;    // of the served ones
  double seconds = 0;                    // first arrival to the last end
  std::string error;                     // the first failure
};

// Streaming completions arriving `rate` a second for `duration`, each on a
// connection of its own, on one thread.
class OpenLoopLoad {
 public:
  OpenLoopLoad(std::uint16_t port, double rate, std::chrono::milliseconds duration, std::uint32_t tokens)
      : endpoint_(asio::ip::make_address("127.0.0.1"), port), tokens_(tokens), timer_(ioc_) {
    total_ = static_cast<std::uint32_t>(rate * std::chrono::duration<double>(duration).count());
    interval_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate));
  }

  OverloadResult run() {
    start_ = Clock::now();
    arrive();
    ioc_.run_for(std::chrono::seconds(300));
    if (ended_ < total_ && result_.error.empty()) {
      result_.error = std::to_string(total_ - ended_) + " requests did not end in 300 s";
    }
    result_.seconds = bench::seconds_between(start_, last_end_);
    return std::move(result_);
  }

 private:
  struct Request {
    explicit Request(asio::io_context& ioc) : socket(ioc) {}
    tcp::socket socket;
    std::string out;
    std::string in;
    std::array<char, 16384> buffer{};
    Clock::time_point sent;
    bool headers_read = false;
    bool first = true;
    std::uint32_t tokens = 0;
  };

  void arrive() {
    if (result_.sent == total_) return;
    launch(result_.sent++);
    timer_.expires_at(start_ + interval_ * result_.sent);
    timer_.async_wait([this](boost::system::error_code error) {
      if (!error) arrive();
    });
  }

  void launch(std::uint32_t index) {
    auto request = std::make_shared<Request>(ioc_);
    const std::string body = "{\"model\":\"builtin\",\"prompt\":\"" + bench::prompt_text(index) +
                             "\",\"max_tokens\":" + std::to_string(tokens_) + ",\"stream\":true}";
    request->out = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Connection: close\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    request->sent = Clock::now();
    request->socket.async_connect(endpoint_, [this, request](boost::system::error_code error) {
      if (error) return fail(request, "connect: " + error.message());
      request->socket.set_option(tcp::no_delay(true));
      asio::async_write(request->socket, asio::buffer(request->out), [this, request](boost::system::error_code e, std::size_t) {
        if (e) return fail(request, "write: " + e.message());
        read(request);
      });
    });
  }

  void read(const std::shared_ptr<Request>& request) {
    request->socket.async_read_some(asio::buffer(request->buffer), [this, request](boost::system::error_code error, std::size_t n) {
      if (!error) request->in.append(request->buffer.data(), n);
      if (!request->headers_read && !take_headers(*request, error)) return;
      if (request->headers_read && take_events(*request)) return end(request, true);
      if (error) return fail(request, "read: " + error.message() + " before [DONE]");
      read(request);
    });
  }

  // False when the request has ended here (a 429 read whole, or a failure).
  bool take_headers(Request& request, boost::system::error_code error) {
    const std::size_t end = request.in.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (!error) return true;
      fail_now("read: " + error.message() + " before the headers");
      finish(request);
      return false;
    }
    const std::string_view head = std::string_view(request.in).substr(0, end);
    if (head.starts_with("HTTP/1.1 429")) {
      ++result_.refused;
      if (head.find("\r\nRetry-After: ") == std::string_view::npos) ++result_.refused_without_hint;
      finish(request);
      return false;
    }
    if (!head.starts_with("HTTP/1.1 200")) {
      fail_now("status " + std::string(head.substr(0, head.find('\r'))));
      finish(request);
      return false;
    }
    request.headers_read = true;
    request.in.erase(0, end + 4);
    return true;
  }

  // Takes every complete event; true at [DONE].
  bool take_events(Request& request) {
    std::size_t begin = 0;
    bool done = false;
    for (std::size_t end = request.in.find("\n\n"); end != std::string::npos; end = request.in.find("\n\n", begin)) {
      const std::string_view event = std::string_view(request.in).substr(begin, end - begin);
      begin = end + 2;
      if (event.find("data: [DONE]") != std::string_view::npos) {
        done = true;
        break;
      }
      if (event.find("\"error\"") != std::string_view::npos) fail_now("an error event: " + std::string(event.substr(0, 300)));
      const auto tokens = static_cast<std::uint32_t>(event_tokens(event));
      if (tokens == 0) continue;
      request.tokens += tokens;
      if (request.first) {
        request.first = false;
        result_.first_token_us.push_back(bench::micros_between(request.sent, Clock::now()));
      }
    }
    request.in.erase(0, begin);
    return done;
  }

  void end(const std::shared_ptr<Request>& request, bool served) {
    if (served && request->tokens != tokens_) {
      fail_now(std::to_string(request->tokens) + " tokens of " + std::to_string(tokens_));
    } else if (served) {
      ++result_.served;
    }
    finish(*request);
  }

  void finish(Request& request) {
    boost::system::error_code ignored;
    request.socket.close(ignored);
    ++ended_;
    last_end_ = Clock::now();
    if (ended_ == total_) ioc_.stop();
  }

  void fail(const std::shared_ptr<Request>& request, const std::string& what) {
    fail_now(what);
    finish(*request);
  }

  void fail_now(const std::string& what) {
    if (result_.error.empty()) result_.error = what;
  }

  asio::io_context ioc_{1};
  tcp::endpoint endpoint_;
  std::uint32_t tokens_;
  std::uint32_t total_ = 0;
  std::uint32_t ended_ = 0;
  Clock::duration interval_{};
  asio::steady_timer timer_;
  OverloadResult result_;
  Clock::time_point start_;
  Clock::time_point last_end_;
};

// ---------------------------------------------------------------- the runs

struct PipelineRun {
  double tokens_per_second = 0;
  double cpu_us_per_token = 0;
  std::vector<double> cpu_us_per_token_by_process;  // in the order measure_http was given them
  double ttft_p50_us = 0;
  double ttft_p99_us = 0;
  double itl_p50_us = 0;
  double itl_p99_us = 0;
};

PipelineRun measure_http(const char* path, std::uint16_t front_port, const std::vector<pid_t>& processes,
                         const LoadShape& shape) {
  std::vector<double> cpu_before;
  for (pid_t pid : processes) cpu_before.push_back(cpu_seconds(pid, "fmwire-engine"));
  LoadResult result = SseLoad(front_port, shape).run();
  std::vector<double> cpu_used;
  for (std::size_t i = 0; i < processes.size(); ++i) {
    cpu_used.push_back(cpu_seconds(processes[i], "fmwire-engine") - cpu_before[i]);
  }
  if (!result.error.empty()) throw std::runtime_error(std::string(path) + ": " + result.error);
  const std::uint64_t expected = std::uint64_t{shape.streams} * shape.tokens;
  if (result.tokens != expected) {
    throw std::runtime_error(std::string(path) + ": " + std::to_string(result.tokens) + " tokens of " +
                             std::to_string(expected));
  }
  PipelineRun run;
  run.tokens_per_second = static_cast<double>(result.tokens) / result.seconds;
  for (double seconds : cpu_used) {
    run.cpu_us_per_token_by_process.push_back(seconds * 1e6 / static_cast<double>(result.tokens));
    run.cpu_us_per_token += run.cpu_us_per_token_by_process.back();
  }
  run.ttft_p50_us = percentile(result.first_token_us, 0.5);
  run.ttft_p99_us = percentile(result.first_token_us, 0.99);
  run.itl_p50_us = percentile(result.inter_token_us, 0.5);
  run.itl_p99_us = percentile(result.inter_token_us, 0.99);
  return run;
}

std::string self_dir() {
  char path[4096];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0) throw std::runtime_error("cannot read /proc/self/exe");
  std::string text(path, static_cast<std::size_t>(n));
  return text.substr(0, text.rfind('/'));
}

void raise_file_limit(std::uint32_t needed) {
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  if (limit.rlim_cur < needed) {
    throw std::runtime_error("open files limit " + std::to_string(limit.rlim_cur) + " is under the " +
                             std::to_string(needed) + " needed; raise it (ulimit -Hn) or pass a smaller --clients");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::uint32_t clients = 10000;
  std::string fmwire_path;
  std::string only;
  // What `fmwire gateway` picks by default (HttpGatewayOptions::http_threads).
  unsigned http_threads = std::max(1u, std::thread::hardware_concurrency() / 4);
  po::options_description own_flags;
  own_flags.add_options()
      ("clients", po::value(&clients)->default_value(clients), "concurrent clients in part 2")
      ("http-threads", po::value(&http_threads)->default_value(http_threads),
       "HTTP threads of both fronts, fmwire's gateway and the peer's (1 to 256)")
      ("fmwire", po::value(&fmwire_path), "the fmwire program (default: ../cli/fmwire beside this one)")
      ("only", po::value(&only), "one part: pipeline, concurrency or overload (default: all)");
  const bench::BenchProgram program{.name = "gateway",
                                    .caption = "bench_gateway options",
                                    .quick_help = "small shapes and one repetition (a smoke test)",
                                    .repetitions_help = "runs of each path (default 5)"};
  return bench::bench_main(argc, argv, program, own_flags, [&](const bench::CommonFlags& flags, const auto&) {
    if (http_threads < 1 || http_threads > 256) throw bench::UsageError("--http-threads must be from 1 to 256");
    if (!only.empty() && only != "pipeline" && only != "concurrency" && only != "overload") {
      throw bench::UsageError("--only must be pipeline, concurrency or overload");
    }
    const auto part = [&](const char* name) { return only.empty() || only == name; };
    bool headed = false;
    const auto heading = [&] {
      if (!headed) bench::print_table_header();
      headed = true;
    };
    const bool quick = flags.quick;
    std::uint32_t repetitions = static_cast<std::uint32_t>(flags.repetitions.value_or(5));
    signal(SIGPIPE, SIG_IGN);
    using bench::median;
    const std::string here = self_dir();
    if (fmwire_path.empty()) fmwire_path = here + "/../cli/fmwire";
    const std::string peer_path = here + "/bench_gateway_peer";
    LoadShape shape;
    LoadShape crowd;
    crowd.streams = clients;
    // Paced so that every client is open at once and the machine keeps up:
    // 10,000 streams at a token per 150 ms each is 67k tokens/s, about what
    // two cores carry through the load generator, gateway and worker
    // together. Faster steps measure a backlog instead (every stream a slow
    // reader, holding its window), slower ones nothing more.
    crowd.tokens = 48;
    std::uint32_t crowd_step_us = 150'000;
    const std::uint32_t step_us = 2000;
    if (quick) {
      repetitions = 1;
      shape.streams = 8;
      shape.tokens = 50;
      crowd.streams = std::min<std::uint32_t>(clients, 300);
      crowd.tokens = 20;
      crowd_step_us = 20'000;
    }
    raise_file_limit(crowd.streams + 200);
    std::vector<bench::Comparison> results;

    const std::string threads = std::to_string(http_threads);
    // One small run of each first: connections, pools and caches warm.
    LoadShape warm = shape;
    warm.streams = std::min<std::uint32_t>(shape.streams, 4);
    warm.tokens = 10;

    // ---- 1. pipeline
    if (part("pipeline")) {
      const std::string running = std::to_string(shape.streams);
      Child worker("worker", {fmwire_path, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny",
                              "--step-us", std::to_string(step_us), "--prefill-ns-per-token", "0",
                              "--max-running", running});
      Child gateway("gateway", {fmwire_path, "gateway", "--listen", "127.0.0.1:0", "--workers", worker.address(),
                                "--http-threads", threads});
      Child peer_worker("peer-worker", {peer_path, "worker", "--listen", "127.0.0.1:0", "--step-us",
                                        std::to_string(step_us), "--max-running", running});
      Child peer_front("peer-front", {peer_path, "front", "--listen", "127.0.0.1:0", "--upstream", peer_worker.address(),
                                      "--http-threads", threads});

      std::printf("bench/gateway: %u streams x %u tokens at once, synthetic:tiny, %u us steps, %u repetition(s); "
                  "HTTP threads: fmwire gateway %u, peer front %u\n",
                  shape.streams, shape.tokens, step_us, repetitions, http_threads, http_threads);
      measure_http("fmwire warm-up", gateway.port(), {gateway.pid()}, warm);
      measure_http("peer warm-up", peer_front.port(), {peer_front.pid()}, warm);
      native_load(worker.port(), warm);

      std::vector<double> ours_tps, peer_tps, ours_cpu, peer_cpu, ours_ttft, peer_ttft, native_ttft;
      std::vector<double> ours_front_cpu, ours_worker_cpu, peer_front_cpu, peer_worker_cpu;
      std::vector<double> ours_itl50, ours_itl99, peer_itl50, peer_itl99, native_itl50, native_itl99, added;
      std::vector<double> single_gateway, single_native;
      LoadShape single;
      single.streams = 1;
      single.tokens = 32;
      for (std::uint32_t r = 0; r < repetitions; ++r) {
        const PipelineRun ours = measure_http("fmwire", gateway.port(), {gateway.pid(), worker.pid()}, shape);
        const PipelineRun peer = measure_http("peer", peer_front.port(), {peer_front.pid(), peer_worker.pid()}, shape);
        const LoadResult native = native_load(worker.port(), shape);
        ours_tps.push_back(ours.tokens_per_second);
        peer_tps.push_back(peer.tokens_per_second);
        ours_cpu.push_back(ours.cpu_us_per_token);
        peer_cpu.push_back(peer.cpu_us_per_token);
        ours_front_cpu.push_back(ours.cpu_us_per_token_by_process.at(0));
        ours_worker_cpu.push_back(ours.cpu_us_per_token_by_process.at(1));
        peer_front_cpu.push_back(peer.cpu_us_per_token_by_process.at(0));
        peer_worker_cpu.push_back(peer.cpu_us_per_token_by_process.at(1));
        ours_ttft.push_back(ours.ttft_p50_us);
        peer_ttft.push_back(peer.ttft_p50_us);
        const double native_first = percentile(native.first_token_us, 0.5);
        native_ttft.push_back(native_first);
        ours_itl50.push_back(ours.itl_p50_us);
        ours_itl99.push_back(ours.itl_p99_us);
        peer_itl50.push_back(peer.itl_p50_us);
        peer_itl99.push_back(peer.itl_p99_us);
        native_itl50.push_back(percentile(native.inter_token_us, 0.5));
        native_itl99.push_back(percentile(native.inter_token_us, 0.99));
        std::vector<double> via_gateway;
        std::vector<double> direct;
        for (int i = 0; i < 10; ++i) {
          LoadResult one = SseLoad(gateway.port(), single).run();
          if (!one.error.empty() || one.first_token_us.empty()) throw std::runtime_error("single stream: " + one.error);
          via_gateway.push_back(one.first_token_us[0]);
          direct.push_back(native_load(worker.port(), single).first_token_us.at(0));
        }
        single_gateway.push_back(median(via_gateway));
        single_native.push_back(median(direct));
        added.push_back(median(via_gateway) - median(direct));
    }
    heading();
    bench::add_row(results, "pipeline tokens/s at the clients", median(ours_tps), "tok/s", "JSON over HTTP/1.1 chunked",
                   median(peer_tps), median(ours_tps) / median(peer_tps));
    bench::add_row(results, "pipeline CPU per token, front + worker (target ratio >= 3)", median(ours_cpu), "us",
                   "JSON over HTTP/1.1 chunked", median(peer_cpu), median(peer_cpu) / median(ours_cpu));
    bench::add_row(results, "  of which the front (gateway + embedded router)", median(ours_front_cpu), "us",
                   "its front", median(peer_front_cpu), median(peer_front_cpu) / median(ours_front_cpu));
    bench::add_row(results, "  of which the worker, engine thread excluded", median(ours_worker_cpu), "us",
                   "its worker", median(peer_worker_cpu), median(peer_worker_cpu) / median(ours_worker_cpu));
    bench::add_row(results, "time to first token p50", median(ours_ttft), "us", "JSON over HTTP/1.1 chunked",
                   median(peer_ttft), median(peer_ttft) / median(ours_ttft));
    bench::add_row(results, "inter-token latency p50", median(ours_itl50), "us", "JSON over HTTP/1.1 chunked",
                   median(peer_itl50), median(peer_itl50) / median(ours_itl50));
    bench::add_row(results, "inter-token latency p99", median(ours_itl99), "us", "JSON over HTTP/1.1 chunked",
                   median(peer_itl99), median(peer_itl99) / median(ours_itl99));
    bench::add_row(results, "time to first token p50 via gateway + router", median(ours_ttft), "us",
                   "native client to the worker", median(native_ttft), median(native_ttft) / median(ours_ttft));
    bench::add_row(results, "one stream: time to first token p50 via gateway + router", median(single_gateway), "us",
                   "native client to the worker", median(single_native), median(single_native) / median(single_gateway));
    bench::add_row(results, "latency the gateway + router add per token (one stream, TTFT difference)", median(added),
                   "us", "", 0, 0);
    bench::add_row(results, "inter-token latency p99 via gateway + router", median(ours_itl99), "us",
                   "native client to the worker", median(native_itl99), median(native_itl99) / median(ours_itl99));
    worker.stop();
    gateway.stop();
    peer_front.stop();
    peer_worker.stop();
    }

    // ---- 2. concurrency
    if (part("concurrency")) {
      const std::string crowd_running = std::to_string(crowd.streams);
      Child crowd_worker("crowd-worker", {fmwire_path, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny",
                                          "--step-us", std::to_string(crowd_step_us), "--prefill-ns-per-token", "0",
                                          "--max-running", crowd_running, "--max-batch-tokens",
                                          std::to_string(crowd.streams * 2 + 256), "--kv-memory-mib", "1024"});
      Child crowd_gateway("crowd-gateway", {fmwire_path, "gateway", "--listen", "127.0.0.1:0", "--workers",
                                            crowd_worker.address(), "--max-streams",
                                            std::to_string(crowd.streams + 1000), "--http-threads", threads});
      measure_http("concurrency warm-up", crowd_gateway.port(), {crowd_gateway.pid()}, warm);
      const double idle_kib = rss_kib(crowd_gateway.pid());
      double peak_kib = idle_kib;
      std::uint32_t open_at_peak = 0;
      const pid_t gateway_pid = crowd_gateway.pid();
      LoadResult crowd_result = SseLoad(crowd_gateway.port(), crowd, [&](std::uint32_t open) {
        const double kib = rss_kib(gateway_pid);
        // The sample with the most streams open; the larger RSS among equals.
        if (open > open_at_peak || (open == open_at_peak && kib > peak_kib)) {
          open_at_peak = open;
          peak_kib = kib;
        }
      }).run();
      if (!crowd_result.error.empty()) throw std::runtime_error("concurrency: " + crowd_result.error);
      const double per_stream_kib = open_at_peak > 0 ? (peak_kib - idle_kib) / open_at_peak : 0;
      std::printf("\nconcurrency: %u clients x %u tokens, %u us steps, %u open at most at once\n", crowd.streams,
                  crowd.tokens, crowd_step_us, crowd_result.max_open);
      heading();
      bench::add_row(results, "concurrency: tokens/s at the clients", static_cast<double>(crowd_result.tokens) / crowd_result.seconds,
                     "tok/s", "", 0, 0);
      bench::add_row(results, "concurrency: inter-token latency p99", percentile(crowd_result.inter_token_us, 0.99), "us",
                     "", 0, 0);
      bench::add_row(results, "concurrency: time to first token p99", percentile(crowd_result.first_token_us, 0.99), "us",
                     "", 0, 0);
      bench::add_row(results, "concurrency: streams open at the RSS sample", open_at_peak, "streams", "", 0, 0);
      bench::add_row(results, "concurrency: gateway RSS per open stream (target < 16)", per_stream_kib, "KiB",
                     "16 KiB target", 16, 16 / std::max(per_stream_kib, 1e-9));
      crowd_gateway.stop();
      crowd_worker.stop();
    }

    // ---- 3. overload
    if (part("overload")) {
      // Requests arrive open-loop at twice what one worker serves, measured
      // first; the same gateway and worker flags but the worker's queue
      // bound: --max-waiting R (a 429 with Retry-After past R waiting) against
      // no bound (every request queued, the queue growing all run long).
      const std::uint32_t overload_running = quick ? 4 : 8;
      const std::uint32_t overload_tokens = 25;
      const std::uint32_t overload_step_us = 4000;
      const auto overload_duration = std::chrono::milliseconds(quick ? 1000 : 5000);
      const auto overload_worker = [&](const char* label, std::uint32_t max_waiting) {
        return std::make_unique<Child>(label, std::vector<std::string>{
            fmwire_path, "worker", "--listen", "127.0.0.1:0", "--model", "synthetic:tiny", "--step-us",
            std::to_string(overload_step_us), "--prefill-ns-per-token", "0", "--max-running",
            std::to_string(overload_running), "--max-waiting", std::to_string(max_waiting)});
      };
      auto bounded_worker = overload_worker("bounded-worker", overload_running);
      auto unbounded_worker = overload_worker("unbounded-worker", 0);
      Child bounded_gateway("bounded-gateway", {fmwire_path, "gateway", "--listen", "127.0.0.1:0", "--workers",
                                                bounded_worker->address(), "--http-threads", threads});
      Child unbounded_gateway("unbounded-gateway", {fmwire_path, "gateway", "--listen", "127.0.0.1:0", "--workers",
                                                    unbounded_worker->address(), "--http-threads", threads});
      // Capacity: a closed loop keeping the batch full, four batches' worth.
      LoadShape full;
      full.streams = overload_running * 4;
      full.tokens = overload_tokens;
      measure_http("overload warm-up", bounded_gateway.port(), {bounded_gateway.pid()}, warm);
      measure_http("overload warm-up", unbounded_gateway.port(), {unbounded_gateway.pid()}, warm);
      std::vector<double> capacities;
      for (std::uint32_t r = 0; r < std::max<std::uint32_t>(repetitions, 3); ++r) {
        LoadResult closed = SseLoad(unbounded_gateway.port(), full).run();
        if (!closed.error.empty()) throw std::runtime_error("overload capacity: " + closed.error);
        capacities.push_back(full.streams / closed.seconds);
    }
    const double capacity = median(capacities);
    std::vector<double> bounded_p99, unbounded_p99, bounded_served, unbounded_served, refused_share;
    for (std::uint32_t r = 0; r < repetitions; ++r) {
      for (const bool bounded : {true, false}) {
        const std::uint16_t port = bounded ? bounded_gateway.port() : unbounded_gateway.port();
        OverloadResult run = OpenLoopLoad(port, 2 * capacity, overload_duration, overload_tokens).run();
        const char* which = bounded ? "bounded" : "unbounded";
        if (!run.error.empty()) throw std::runtime_error(std::string("overload, ") + which + ": " + run.error);
        if (run.refused_without_hint > 0) {
          throw std::runtime_error("overload: " + std::to_string(run.refused_without_hint) + " 429s without Retry-After");
        }
        if (!bounded && run.refused > 0) throw std::runtime_error("overload: the unbounded worker refused requests");
        const double p99_ms = percentile(run.first_token_us, 0.99) / 1000;
        const double served_per_s = run.served / run.seconds;
        (bounded ? bounded_p99 : unbounded_p99).push_back(p99_ms);
        (bounded ? bounded_served : unbounded_served).push_back(served_per_s);
        if (bounded) refused_share.push_back(100.0 * run.refused / run.sent);
      }
    }
    std::printf("\noverload: one worker, %u batch slots, %u tokens a request at %u us steps: %.1f requests/s "
                "(closed loop); arrivals at %.1f/s for %.1f s\n",
                overload_running, overload_tokens, overload_step_us, capacity, 2 * capacity,
                std::chrono::duration<double>(overload_duration).count());
    heading();
    bench::add_row(results, "overload 2x: time to first token p99 of admitted, --max-waiting R", median(bounded_p99),
                   "ms", "no bound (--max-waiting 0)", median(unbounded_p99), median(unbounded_p99) / median(bounded_p99));
    bench::add_row(results, "overload 2x: requests/s served, --max-waiting R", median(bounded_served), "req/s",
                   "capacity (closed loop)", capacity, median(bounded_served) / capacity);
    bench::add_row(results, "overload 2x: requests/s served, no bound", median(unbounded_served), "req/s",
                   "capacity (closed loop)", capacity, median(unbounded_served) / capacity);
    bench::add_row(results, "overload 2x: refused with 429 + Retry-After, --max-waiting R", median(refused_share), "%",
                   "", 0, 0);
    }
    return results;
  });
}
