#include "kv_session.h"

#include <dirent.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "codec/frame_decoder.h"
#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "transport/connection.h"
#include "transport/event_loop.h"

#include "loop_until.h"
#include "transport_measure.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
using transport::Connection;
using transport::EndReason;

// Only the threads' names and times; the fields after the name, counted
// from 3 (the state), as proc(5) numbers them.
constexpr int kUtimeField = 14;
constexpr int kStimeField = 15;

// How one stream the router opened ended.
struct StreamEnd {
  bool closed = false;
  bool finished = false;
  protocol::FinishReason reason = protocol::FinishReason::ERROR;
  bool has_kv_transfer = false;
  std::uint64_t kv_bytes = 0;
  std::uint64_t kv_wire_bytes = 0;
  bool kv_compressed = false;
  std::uint64_t kv_transfer_us = 0;       // the Finish's kvTransfer summary
  std::uint64_t hop_kv_transfer_us = 0;   // the worker's HopTiming
  std::uint64_t hop_prefill_us = 0;
  EndReason end;
};

// The router's side of one worker connection: what each stream's Finish
// said, and how the stream ended.
class WorkerLink final : public transport::ConnectionHandler {
 public:
  explicit WorkerLink(std::string name) : name_(std::move(name)) {}

  const std::string& name() const { return name_; }
  bool ready() const { return ready_; }
  bool lost() const { return lost_; }
  const EndReason& lost_reason() const { return lost_reason_; }
  StreamEnd& stream(std::uint32_t id) { return streams_[id]; }
  void forget(std::uint32_t id) { streams_.erase(id); }

  void on_ready(Connection&) override { ready_ = true; }
  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.kind() != codec::FrameKind::finish) return;  // token frames: one or two, not needed
    StreamEnd& end = streams_[frame.header.stream_id];
    const codec::Status read =
        codec::read_body<protocol::Finish>(frame, codec::FrameLimits{}, [&](const protocol::FinishReader& finish) {
          end.finished = true;
          end.reason = finish.reason();
          if (finish.has_kv_transfer()) {
            const auto summary = finish.kv_transfer();
            end.has_kv_transfer = true;
            end.kv_bytes = summary.getBytes();
            end.kv_wire_bytes = summary.getWireBytes();
            end.kv_compressed = summary.getCompression() != protocol::Compression::NONE;
            end.kv_transfer_us = summary.getTransferUs();
          }
          const auto timings = finish.timings();
          if (timings.size() > 0) {
            const protocol::HopTimingReader worker(timings[0]);
            end.hop_kv_transfer_us = worker.kv_transfer_us();
            end.hop_prefill_us = worker.prefill_us();
          }
        });
    if (!read) end.end = EndReason::failure(protocol::ErrorCode::BAD_FRAME, "unreadable Finish: " + read.error().message);
  }
  void on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) override {
    StreamEnd& end = streams_[stream_id];
    end.closed = true;
    if (reason.error) end.end = reason;
  }
  void on_closed(Connection&, const EndReason& reason) override {
    lost_ = true;
    lost_reason_ = reason;
  }

 private:
  std::string name_;
  bool ready_ = false;
  bool lost_ = false;
  EndReason lost_reason_;
  std::map<std::uint32_t, StreamEnd> streams_;
};

std::unique_ptr<Connection> connect_to(transport::EventLoop& loop, const transport::Endpoint& to, WorkerLink& link) {
  std::unique_ptr<Connection> connection;
  std::string problem;
  transport::ConnectionOptions options;
  options.role = protocol::Role::ROUTER;
  options.name = "bench-kv-router";
  loop.backend().connect(to.host, to.port, [&](int fd, std::error_code error) {
    if (error) {
      problem = "connect to the " + link.name() + " worker at " + to.to_string() + ": " + error.message();
      return;
    }
    connection = std::make_unique<Connection>(loop, fd, true, options, link);
  });
  if (!run_until(loop, [&] { return !problem.empty() || link.lost() || link.ready(); }, 10'000ms)) {
    throw std::runtime_error("not connected to the " + link.name() + " worker at " + to.to_string() + " within 10 s");
  }
  if (!problem.empty()) throw std::runtime_error(problem);
  if (link.lost()) throw std::runtime_error("the " + link.name() + " worker closed: " + link.lost_reason().message);
  return connection;
}

// The prompt of request `index`: token ids of the byte-level vocabulary
// (3 to 258), different per request so that no cache could serve one from
// another (the workers run without a prefix cache too).
std::vector<std::uint32_t> prompt_of(std::uint32_t tokens, int index) {
  std::vector<std::uint32_t> prompt{1};
  for (std::uint32_t i = 1; i < tokens; ++i) prompt.push_back(3 + (i * 37 + static_cast<std::uint32_t>(index) * 101) % 250);
  return prompt;
}

std::uint32_t open_generate(Connection& connection, const std::string& worker,
                            const std::function<void(protocol::GenerateRequestBuilder&)>& part,
                            const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens) {
  const std::uint32_t id = connection.open_stream();
  if (id == 0) throw std::runtime_error("the " + worker + " worker's connection opens no more streams");
  const transport::SendStatus status =
      connection.send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
        body.prompt_token_ids(prompt).max_tokens(max_tokens).temperature(0).seed(1).stream_options(false, false, true);
        part(body);
      }, transport::kEndStream);
  if (status != transport::SendStatus::sent) {
    throw std::runtime_error("GenerateRequest to the " + worker + " worker: " + std::string(transport::to_string(status)));
  }
  return id;
}

std::string describe(const StreamEnd& end) {
  if (end.end.error) return end.end.message;
  if (!end.finished) return "closed without a Finish";
  return "Finish(" + std::to_string(static_cast<int>(end.reason)) + ")";
}

}  // namespace

WorkerCpu worker_cpu(pid_t pid) {
  static const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* directory = ::opendir(tasks.c_str());
  if (directory == nullptr) throw std::runtime_error("cannot read " + tasks + ": the worker is gone");
  WorkerCpu cpu;
  while (const dirent* entry = ::readdir(directory)) {
    if (entry->d_name[0] == '.') continue;
    std::ifstream stat(tasks + "/" + entry->d_name + "/stat");
    const std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const std::size_t open = text.find('(');
    const std::size_t close = text.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 2 > text.size()) continue;  // gone meanwhile
    std::istringstream fields(text.substr(close + 2));
    std::string field;
    double user = 0;
    double system = 0;
    for (int number = 3; number <= kStimeField && fields >> field; ++number) {
      if (number == kUtimeField) user = std::stod(field);
      if (number == kStimeField) system = std::stod(field);
    }
    const double seconds = (user + system) / ticks;
    if (text.compare(open + 1, close - open - 1, "fmwire-engine") == 0) {
      cpu.engine_s += seconds;
    } else {
      cpu.other_s += seconds;
    }
  }
  ::closedir(directory);
  return cpu;
}

std::vector<KvSessionRun> route_kv_sessions(const KvSessionRoute& route) {
  transport::EventLoop loop(route.backend);
  WorkerLink prefill_link("prefill");
  WorkerLink decode_link("decode");
  std::unique_ptr<Connection> prefill = connect_to(loop, route.prefill, prefill_link);
  std::unique_ptr<Connection> decode = connect_to(loop, route.decode, decode_link);
  const std::string decode_address = route.decode.to_string();

  std::vector<KvSessionRun> runs;
  for (int index = 0; index < route.requests; ++index) {
    const std::vector<std::uint32_t> prompt = prompt_of(route.prompt_tokens, index);
    const std::string key = "bench-kv-" + std::to_string(::getpid()) + "-" + std::to_string(index);
    KvSessionRun run;
    const WorkerCpu prefill_before = worker_cpu(route.prefill_pid);
    const WorkerCpu decode_before = worker_cpu(route.decode_pid);
    // As a router: the decode side first, so that the Offer finds its request waiting.
    const std::uint32_t decode_stream = open_generate(*decode, "decode", [&](protocol::GenerateRequestBuilder& body) {
      body.decode_after_transfer(key);
    }, prompt, route.max_tokens);
    const auto start = Clock::now();
    const std::uint32_t prefill_stream = open_generate(*prefill, "prefill", [&](protocol::GenerateRequestBuilder& body) {
      body.prefill_to(key, decode_address);
    }, prompt, route.max_tokens);
    StreamEnd& prefilled = prefill_link.stream(prefill_stream);
    StreamEnd& decoded = decode_link.stream(decode_stream);
    const bool ended = run_until(loop, [&] {
      return (prefilled.closed && decoded.closed) || prefill_link.lost() || decode_link.lost();
    }, 600'000ms);
    run.request_seconds = seconds_between(start, Clock::now());
    run.prefill_cpu = worker_cpu(route.prefill_pid) - prefill_before;
    run.decode_cpu = worker_cpu(route.decode_pid) - decode_before;
    if (prefill_link.lost()) throw std::runtime_error("the prefill worker closed: " + prefill_link.lost_reason().message);
    if (decode_link.lost()) throw std::runtime_error("the decode worker closed: " + decode_link.lost_reason().message);
    if (!ended) throw std::runtime_error("a disaggregated request of " + std::to_string(route.prompt_tokens) +
                                         " tokens not finished within 10 minutes");
    if (prefilled.end.error || !prefilled.finished || prefilled.reason != protocol::FinishReason::HANDED_OFF) {
      throw std::runtime_error("the prefill stream ended with " + describe(prefilled));
    }
    if (decoded.end.error || !decoded.finished) throw std::runtime_error("the decode stream ended with " + describe(decoded));
    if (!decoded.has_kv_transfer || decoded.kv_transfer_us == 0) {
      throw std::runtime_error("the decode Finish has no kvTransfer summary");
    }
    run.bytes = decoded.kv_bytes;
    run.wire_bytes = decoded.kv_wire_bytes;
    run.compressed = decoded.kv_compressed;
    run.transfer_us = decoded.kv_transfer_us;
    run.sender_transfer_us = prefilled.hop_kv_transfer_us;
    run.prefill_us = prefilled.hop_prefill_us;
    runs.push_back(run);
    prefill_link.forget(prefill_stream);
    decode_link.forget(decode_stream);
  }
  for (Connection* connection : {prefill.get(), decode.get()}) connection->close();
  run_until(loop, [&] { return prefill->closed() && decode->closed(); }, 2000ms);
  return runs;
}

std::string session_line(const KvSessionRun& run) {
  char line[512];
  std::snprintf(line, sizeof line,
                "session bytes=%llu wire=%llu compressed=%d transfer_us=%llu sender_us=%llu prefill_us=%llu "
                "request_s=%.6f prefill_engine_s=%.3f prefill_other_s=%.3f decode_engine_s=%.3f decode_other_s=%.3f",
                static_cast<unsigned long long>(run.bytes), static_cast<unsigned long long>(run.wire_bytes),
                run.compressed ? 1 : 0, static_cast<unsigned long long>(run.transfer_us),
                static_cast<unsigned long long>(run.sender_transfer_us), static_cast<unsigned long long>(run.prefill_us),
                run.request_seconds, run.prefill_cpu.engine_s, run.prefill_cpu.other_s, run.decode_cpu.engine_s,
                run.decode_cpu.other_s);
  return line;
}

KvSessionRun parse_session_line(const std::string& line) {
  KvSessionRun run;
  unsigned long long bytes = 0, wire = 0, transfer = 0, sender = 0, prefill = 0;
  int compressed = 0;
  if (std::sscanf(line.c_str(),
                  "session bytes=%llu wire=%llu compressed=%d transfer_us=%llu sender_us=%llu prefill_us=%llu "
                  "request_s=%lf prefill_engine_s=%lf prefill_other_s=%lf decode_engine_s=%lf decode_other_s=%lf",
                  &bytes, &wire, &compressed, &transfer, &sender, &prefill, &run.request_seconds,
                  &run.prefill_cpu.engine_s, &run.prefill_cpu.other_s, &run.decode_cpu.engine_s,
                  &run.decode_cpu.other_s) != 11) {
    throw std::runtime_error("not a session line: " + line);
  }
  run.bytes = bytes;
  run.wire_bytes = wire;
  run.compressed = compressed != 0;
  run.transfer_us = transfer;
  run.sender_transfer_us = sender;
  run.prefill_us = prefill;
  return run;
}

}  // namespace fmwire::bench
