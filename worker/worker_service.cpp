#include "worker/worker_service.h"

#include <algorithm>
#include <span>

#include "codec/frame_decoder.h"
#include "log/log.h"
#include "protocol/finish.h"
#include "protocol/kv_handoff.h"

namespace fmwire::worker {
namespace {

using transport::Connection;
using transport::SendStatus;

std::uint64_t micros(std::chrono::steady_clock::duration duration) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(duration).count());
}

protocol::FinishReason finish_reason(engine::FinishCause cause) {
  switch (cause) {
    case engine::FinishCause::end_of_sequence: return protocol::FinishReason::END_OF_SEQUENCE;
    case engine::FinishCause::max_tokens: return protocol::FinishReason::MAX_TOKENS;
    case engine::FinishCause::context_full: return protocol::FinishReason::MAX_TOKENS;  // "length" to OpenAI clients
    case engine::FinishCause::cancelled: return protocol::FinishReason::CANCELLED;
  }
  return protocol::FinishReason::ERROR;
}

// Hashes per LoadReport frame: a full report of a large cache goes in several.
constexpr std::size_t kHashesPerReport = 4096;

// Tokens per Tokens frame, at most: about 3 KiB with their text.
constexpr std::size_t kTokensPerFrame = 128;

}  // namespace

transport::ConnectionOptions WorkerService::server_options(std::string name) {
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  options.name = std::move(name);
  options.capabilities.kv_transfer = true;
  options.capabilities.load_reports = true;
  return options;
}

WorkerService::WorkerService(transport::EventLoop& loop, engine::Engine& engine, const engine::Tokenizer& tokenizer,
                             WorkerOptions options)
    : loop_(loop), tokenizer_(tokenizer), options_(std::move(options)), info_(engine.info()),
      seeds_(std::random_device{}()), engine_stats_(engine.stats()) {
  // The stats above are the engine's before its first step (all blocks
  // free): load reports sent before a step has run must not say none are.
  std::weak_ptr<bool> alive = alive_;
  runner_ = std::make_unique<EngineRunner>(engine, [this, alive](std::shared_ptr<RunnerOutput> output) {
    // On the engine's thread. A small step's tokens leave from here when
    // the loop sleeps: waking it would cost the tokens a thread wake-up
    // (tens of microseconds on a VM whose idle vCPU the host must wake). A
    // large step's go through the loop, which encodes and sends them while
    // the engine steps on. In order either way: never lent while an
    // earlier output waits in the loop's queue.
    const std::size_t tokens = output->step.tokens.size();
    // (No liveness check in the lent turn: a loop lends no turn while its
    // services are destroyed, which happens on the loop in a turn of its own
    // or after run() returned; two captured words fit std::function
    // unallocated.)
    if (tokens <= options_.engine_delivers_max_tokens && posted_outputs_.load(std::memory_order_acquire) == 0 &&
        loop_.try_run_turn([this, &output] { deliver(*output); })) {
      return;
    }
    posted_outputs_.fetch_add(1, std::memory_order_acq_rel);
    loop_.post([this, alive, output = std::move(output)] {
      posted_outputs_.fetch_sub(1, std::memory_order_acq_rel);
      if (alive.lock()) deliver(*output);
    });
  });
  KvTransfersOwner& owner = *this;
  kv_ = std::make_unique<KvTransfers>(loop_, *runner_, info_, options_.kv, owner, "fmwire worker " + options_.name);
}

WorkerService::~WorkerService() {
  kv_.reset();      // its links close; it calls the runner no more
  runner_.reset();  // no step output arrives after this
  if (report_timer_ != 0) loop_.backend().cancel(report_timer_);
  for (auto& [key, stream] : streams_) {
    if (stream->deadline_timer != 0) loop_.backend().cancel(stream->deadline_timer);
  }
}

void WorkerService::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (kv_->on_server_frame(connection, frame)) return;  // a KV session another worker opened
  switch (frame.kind()) {
    case codec::FrameKind::generate_request:
      start(connection, frame.header.stream_id, frame);
      break;
    case codec::FrameKind::load_report:
      subscribe(connection, frame.header.stream_id);
      break;
    case codec::FrameKind::kv_handoff:
      hand_off(connection, frame);
      break;
    default:
      // Cancel and Error end the stream (on_stream_closed cleans up); a
      // client sends nothing else on a generation stream.
      break;
  }
}

void WorkerService::refuse(Connection& connection, std::uint32_t stream_id, protocol::ErrorCode code,
                           const std::string& message) {
  ++counters_.streams_refused;
  connection.reset_stream(stream_id, code, message);
}

void WorkerService::start(Connection& connection, std::uint32_t stream_id, const codec::FrameView& frame) {
  if (streams_.contains({&connection, stream_id})) {
    refuse(connection, stream_id, protocol::ErrorCode::BAD_REQUEST, "a second GenerateRequest on one stream");
    return;
  }
  auto stream = std::make_unique<GenerationStream>();
  stream->connection = &connection;
  stream->stream_id = stream_id;
  stream->received = Clock::now();
  engine::SequenceRequest request;
  std::vector<std::string> stops;
  std::optional<protocol::MessageError> problem;
  std::uint64_t timeout_us = 0;
  std::string transfer_key;
  std::string prefill_to;
  const codec::Status read = codec::read_body<protocol::GenerateRequest>(
      frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& body) {
        const std::string_view model = body.model();
        if (!model.empty() && model != info_.model_name) {
          problem = protocol::MessageError{protocol::ErrorCode::NOT_FOUND,
                                           "model '" + std::string(model) + "' is not served here; this worker serves '" +
                                               info_.model_name + "'"};
          return;
        }
        problem = body.check(options_.request_limits);
        if (problem) return;
        request = sequence_request(body);
        for (capnp::Text::Reader stop : body.stop_sequences()) stops.emplace_back(stop.cStr(), stop.size());
        timeout_us = body.timeout_us();
        stream->include_text = body.include_text();
        stream->include_usage = body.include_usage();
        stream->include_timings = body.include_timings();
        if (body.prefill_only()) {
          stream->part = GenerationStream::Part::prefill;
          prefill_to = std::string(body.prefill_to());
        } else if (body.decode_only()) {
          stream->part = GenerationStream::Part::decode;
        }
        transfer_key = std::string(body.transfer_key());
      });
  if (!read) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable GenerateRequest: " + read.error().message};
  }
  std::optional<transport::Endpoint> decode_worker;
  if (!problem && stream->part != GenerationStream::Part::whole && transfer_key.empty()) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST, "a disaggregated request without a transfer key"};
  }
  if (!problem && stream->part == GenerationStream::Part::prefill) {
    std::string why;
    decode_worker = transport::parse_endpoint(prefill_to, &why);
    if (!decode_worker) {
      problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST, "the decode worker's address: " + why};
    }
  }
  if (problem) {
    refuse(connection, stream_id, problem->code, problem->message);
    return;
  }
  if (const std::optional<std::uint32_t> retry_after_ms = overloaded(stream->part)) {
    ++counters_.streams_overloaded;
    connection.reset_stream(stream_id, protocol::ErrorCode::OVERLOADED,
                            "worker " + options_.name + " is overloaded: " + std::to_string(options_.max_waiting) +
                                " requests are waiting for a batch slot (--max-waiting)",
                            true, *retry_after_ms);
    return;
  }
  if (stream->part == GenerationStream::Part::prefill) {
    if (request.max_tokens <= 1) {
      stream->part = GenerationStream::Part::whole;  // done at its first token: nothing to hand over
    } else {
      stream->max_tokens = request.max_tokens;
      request.max_tokens = 1;
      request.hold_kv = true;
    }
  }
  // The engine checks the rest (context, vocabulary, sampling ranges) and
  // refuses through the runner's output.
  stream->prompt_tokens = static_cast<std::uint32_t>(request.prompt.size());
  stream->text.emplace(tokenizer_, std::move(stops));
  stream->sequence = next_sequence_++;
  GenerationStream& started = *stream;
  by_sequence_[started.sequence] = &started;
  streams_[{&connection, stream_id}] = std::move(stream);
  ++counters_.streams_started;
  if (timeout_us > 0) {
    const auto delay = std::chrono::ceil<std::chrono::milliseconds>(std::chrono::microseconds(timeout_us));
    const engine::SequenceId sequence = started.sequence;
    std::weak_ptr<bool> alive = alive_;
    started.deadline_timer = loop_.backend().schedule(delay, [this, alive, sequence] {
      if (!alive.lock()) return;
      auto found = by_sequence_.find(sequence);
      if (found == by_sequence_.end()) return;
      found->second->deadline_timer = 0;
      end_early(*found->second, protocol::FinishReason::DEADLINE_EXCEEDED);
    });
  }
  if (started.part != GenerationStream::Part::decode) {
    started.awaiting_first_token = true;
    ++awaiting_first_token_;
  }
  switch (started.part) {
    case GenerationStream::Part::whole:
      runner_->submit(started.sequence, std::move(request));
      break;
    case GenerationStream::Part::prefill: {
      const auto prompt_tokens = static_cast<std::uint32_t>(request.prompt.size());
      runner_->submit(started.sequence, std::move(request));
      // The offer leaves now: the transfer overlaps the prefill.
      kv_->send(started.sequence, transfer_key, *decode_worker, prompt_tokens);
      break;
    }
    case GenerationStream::Part::decode:
      kv_->expect(started.sequence, transfer_key, std::move(request));
      break;
  }
}

std::optional<std::uint32_t> WorkerService::overloaded(GenerationStream::Part part) const {
  // A decode part's sequence is admitted with its KV, past any queue.
  if (options_.max_waiting == 0 || part == GenerationStream::Part::decode) return std::nullopt;
  // Those awaiting a first token are the queued ones and those in their
  // prefill, which the batch holds (max_running at most).
  if (awaiting_first_token_ < std::uint64_t{engine_stats_.max_running} + options_.max_waiting) return std::nullopt;
  constexpr double kMinHintMs = 100, kMaxHintMs = 60000;
  return static_cast<std::uint32_t>(std::clamp(recent_first_token_ms_, kMinHintMs, kMaxHintMs));
}

void WorkerService::first_token_or_end(GenerationStream& stream) {
  if (!stream.awaiting_first_token) return;
  stream.awaiting_first_token = false;
  --awaiting_first_token_;
}

engine::SequenceRequest WorkerService::sequence_request(const protocol::GenerateRequestReader& body) {
  engine::SequenceRequest request;
  if (body.has_text_prompt()) {
    request.prompt = tokenizer_.encode(body.prompt_text(), true);
    ++counters_.prompts_tokenized;
  } else {
    body.append_prompt_token_ids(request.prompt);
  }
  request.max_tokens = body.max_tokens();
  request.sampling.temperature = body.temperature();
  request.sampling.top_p = body.top_p();
  const std::optional<std::uint64_t> seed = body.seed();
  request.sampling.seed = seed ? *seed : seeds_();
  request.priority = body.priority();
  return request;
}

void WorkerService::deliver(const RunnerOutput& output) {
  engine_stats_ = output.stats;
  // One output per step: one observation per step, never per token.
  if (output.step.batch_tokens > 0) step_seconds_.observe(static_cast<double>(output.step.step_us) / 1e6);
  for (const auto& read : output.kv_reads) kv_->on_read(read);
  for (const auto& result : output.kv_imports) kv_->on_import(result);
  for (const auto& held : output.kv_holds) on_held(held);
  for (const auto& rejected : output.rejected) {
    auto found = by_sequence_.find(rejected.id);
    if (found == by_sequence_.end()) continue;
    GenerationStream& stream = *found->second;
    Connection& connection = *stream.connection;
    const std::uint32_t stream_id = stream.stream_id;
    forget(stream);
    refuse(connection, stream_id, protocol::ErrorCode::BAD_REQUEST, rejected.message);
  }
  for (const auto& token : output.step.tokens) {
    auto found = by_sequence_.find(token.id);
    if (found != by_sequence_.end()) take_token(*found->second, token.token, token.index);
  }
  for (const auto& finished : output.step.finished) {
    auto found = by_sequence_.find(finished.id);
    if (found == by_sequence_.end()) continue;
    GenerationStream& stream = *found->second;
    if (stream.finish_reason) continue;  // ended here first (stop sequence)
    if (stream.part == GenerationStream::Part::prefill && finished.cause == engine::FinishCause::max_tokens) {
      // Its one token made, not the client's last: the decode worker goes
      // on once the KV is there (on_kv_sent ends this stream).
      stream.handing_off = true;
      stream.queue_us = finished.queue_us;
      stream.prefill_us = finished.prefill_us;
      kv_->finished(finished.id, stream.generated);
      continue;
    }
    stream.finish_reason = finish_reason(finished.cause);
    stream.cached_prompt_tokens = finished.cached_prompt_tokens;
    stream.queue_us = finished.queue_us;
    stream.prefill_us = finished.prefill_us;
    stream.decode_us = finished.decode_us;
    if (stream.text && !stream.text->stopped()) {
      // Whatever the text stream held back (an unfinished character, a
      // possible stop-sequence start) goes out with the last piece.
      const std::string_view rest = stream.text->finish();
      if (rest.empty() || !stream.include_text) {
      } else if (!stream.pending_ends.empty()) {
        stream.pending_text.pop_back();  // the last piece's NUL
        stream.pending_text.append(rest);
        stream.pending_text.push_back('\0');
        stream.pending_ends.back() = static_cast<std::uint32_t>(stream.pending_text.size() - 1);
      } else {
        stream.trailing_text.assign(rest);  // every token has left already
      }
    }
  }
  // One flush per stream that has something: tokens of one step leave as
  // one frame per stream, and frames of all streams leave in one write.
  for (const auto& token : output.step.tokens) {
    auto found = by_sequence_.find(token.id);
    if (found != by_sequence_.end() && !found->second->paused) flush(*found->second);
  }
  for (const auto& finished : output.step.finished) {
    auto found = by_sequence_.find(finished.id);
    if (found != by_sequence_.end()) flush(*found->second);
  }
  for (const auto& progress : output.step.kv_progress) kv_->progress(progress.id, progress.computed);
  for (std::uint64_t hash : output.step.prefixes_added) prefixes_.insert(hash);
  for (std::uint64_t hash : output.step.prefixes_evicted) prefixes_.erase(hash);
  if (!subscribers_.empty()) {
    prefixes_added_.insert(prefixes_added_.end(), output.step.prefixes_added.begin(), output.step.prefixes_added.end());
    prefixes_evicted_.insert(prefixes_evicted_.end(), output.step.prefixes_evicted.begin(),
                             output.step.prefixes_evicted.end());
  }
}

void WorkerService::take_token(GenerationStream& stream, std::uint32_t token, std::uint32_t index) {
  if (stream.finish_reason) return;  // after a stop sequence: the engine is being told to stop
  if (stream.awaiting_first_token) {
    first_token_or_end(stream);
    const double waited_ms = std::chrono::duration<double, std::milli>(Clock::now() - stream.received).count();
    recent_first_token_ms_ += (waited_ms - recent_first_token_ms_) / 8;
  }
  index += stream.index_offset;
  if (stream.part == GenerationStream::Part::prefill) stream.generated.push_back(token);
  if (stream.pending_ids.empty()) stream.pending_first_index = index;
  stream.pending_ids.push_back(token);
  ++stream.completion_tokens;
  const std::string_view piece = stream.text->push(token);
  if (stream.include_text) stream.pending_text.append(piece);
  stream.pending_text.push_back('\0');
  stream.pending_ends.push_back(static_cast<std::uint32_t>(stream.pending_text.size() - 1));
  if (stream.text->stopped()) end_early(stream, protocol::FinishReason::STOP_SEQUENCE);
}

void WorkerService::end_early(GenerationStream& stream, protocol::FinishReason reason) {
  if (stream.finish_reason) return;
  stream.finish_reason = reason;
  kv_->let_go(stream.sequence, KvTransfers::LetGo::cancel);  // after any chunk sent from its blocks
  flush(stream);
}

bool WorkerService::flush(GenerationStream& stream) {
  Connection& connection = *stream.connection;
  // At most kTokensPerFrame a frame: a frame must fit in what the reader can
  // grant back (a router grants a small window), or it would wait forever.
  while (!stream.pending_ids.empty()) {
    const auto count = static_cast<std::uint32_t>(std::min<std::size_t>(stream.pending_ids.size(), kTokensPerFrame));
    // Piece i ends at pending_ends[i]; a NUL separates it from the next.
    const auto piece = [&](std::uint32_t i) {
      const std::uint32_t begin = i == 0 ? 0 : stream.pending_ends[i - 1] + 1;
      return std::string_view(stream.pending_text.data() + begin, stream.pending_ends[i] - begin);
    };
    const SendStatus status = connection.send_tokens(
        stream.stream_id, codec::TokenBatch<decltype(piece)>{stream.pending_first_index, std::span(stream.pending_ids).first(count),
                                                             stream.include_text, piece, {}});
    if (status == SendStatus::blocked) {
      set_paused(stream, true);  // on_stream_writable resumes
      return true;
    }
    if (status != SendStatus::sent) {
      forget(stream);  // the stream or the connection is gone
      return false;
    }
    if (!stream.first_token_sent) stream.first_token_sent = Clock::now();
    counters_.tokens_sent += count;
    stream.pending_first_index += count;
    if (count == stream.pending_ids.size()) {
      stream.pending_ids.clear();
      stream.pending_text.clear();
      stream.pending_ends.clear();
    } else {
      const std::uint32_t text_end = stream.pending_ends[count - 1] + 1;
      stream.pending_ids.erase(stream.pending_ids.begin(), stream.pending_ids.begin() + count);
      stream.pending_text.erase(0, text_end);
      stream.pending_ends.erase(stream.pending_ends.begin(), stream.pending_ends.begin() + count);
      for (std::uint32_t& end : stream.pending_ends) end -= text_end;
    }
  }
  if (!stream.finish_reason) {
    if (stream.paused) set_paused(stream, false);
    return true;
  }
  // Taken out of the maps before the last frame goes: sending it may close
  // the stream at once (the peer ended its side already), and then
  // on_stream_closed must find nothing to clean up.
  const std::unique_ptr<GenerationStream> owned = detach(stream);
  const auto now = Clock::now();
  connection.send<protocol::Finish>(owned->stream_id, [&](protocol::FinishBuilder finish) {
    finish.reason(*owned->finish_reason).trailing_text(owned->trailing_text);
    if (owned->include_usage) finish.usage(owned->prompt_tokens, owned->completion_tokens, owned->cached_prompt_tokens);
    if (owned->include_timings) {
      finish.timings("worker " + options_.name, protocol::Role::WORKER)
          .queue_us(owned->queue_us)
          .prefill_us(owned->prefill_us)
          .decode_us(owned->decode_us)
          .first_token_us(owned->first_token_sent ? micros(*owned->first_token_sent - owned->received) : 0)
          .total_us(micros(now - owned->received))
          .kv_transfer_us(owned->kv_transfer ? owned->kv_transfer->transfer_us : 0);
    }
    if (owned->kv_transfer && owned->part == GenerationStream::Part::decode) {
      finish.kv_transfer(owned->kv_transfer->bytes, owned->kv_transfer->wire_bytes, owned->kv_transfer->compression,
                         owned->kv_transfer->transfer_us);
    }
  }, transport::kEndStream);
  ++counters_.streams_finished;
  return false;
}

void WorkerService::set_paused(GenerationStream& stream, bool paused) {
  if (stream.paused == paused || (paused && stream.finish_reason)) return;
  stream.paused = paused;
  if (paused) ++counters_.pauses;
  runner_->set_paused(stream.sequence, paused);
}

std::unique_ptr<WorkerService::GenerationStream> WorkerService::detach(GenerationStream& stream) {
  if (stream.deadline_timer != 0) loop_.backend().cancel(stream.deadline_timer);
  stream.deadline_timer = 0;
  if (stream.part != GenerationStream::Part::whole) {
    // Whatever KV session it still has ends; a held prefill sequence
    // (finished, or handed over) gives its blocks back, once no chunk is
    // being sent from them any more.
    kv_->cancel(stream.sequence, {protocol::KvEnd::CANCELLED, "the request's stream ended"});
    if (stream.part == GenerationStream::Part::prefill && stream.finish_reason) {
      kv_->let_go(stream.sequence, KvTransfers::LetGo::release);
    }
  }
  if (!stream.finish_reason) kv_->let_go(stream.sequence, KvTransfers::LetGo::cancel);
  first_token_or_end(stream);
  by_sequence_.erase(stream.sequence);
  auto found = streams_.find({stream.connection, stream.stream_id});
  std::unique_ptr<GenerationStream> owned = std::move(found->second);
  streams_.erase(found);
  return owned;
}

void WorkerService::forget(GenerationStream& stream) { detach(stream); }

void WorkerService::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  auto found = streams_.find({&connection, stream_id});
  if (found != streams_.end()) flush(*found->second);
}

void WorkerService::on_stream_closed(Connection& connection, std::uint32_t stream_id,
                                     const transport::EndReason& reason) {
  if (kv_->on_server_stream_closed(connection, stream_id, reason)) return;
  subscribers_.erase({&connection, stream_id});
  auto found = streams_.find({&connection, stream_id});
  if (found == streams_.end()) return;
  if (reason.error) ++counters_.streams_cancelled;
  GenerationStream& stream = *found->second;
  stream.finish_reason.reset();  // whatever was pending: the engine must stop
  forget(stream);
}

// Its peers (routers, KV peers, clients) are few and long-lived: each
// comes and goes in the log.
void WorkerService::on_ready(Connection& connection) {
  log::info("peer connected", {{"peer", connection.peer_address()}, {"name", connection.peer_name()}});
}

void WorkerService::on_closed(Connection& connection, const transport::EndReason& reason) {
  if (connection.ready()) {
    log::info("peer left", {{"peer", connection.peer_address()},
                            {"name", connection.peer_name()},
                            {"why", reason.message.empty() ? std::string_view("closed") : std::string_view(reason.message)}});
  }
  kv_->on_server_closed(connection);
  for (auto it = subscribers_.begin(); it != subscribers_.end();) {
    it = it->first.first == &connection ? subscribers_.erase(it) : std::next(it);
  }
  std::vector<GenerationStream*> gone;
  for (auto& [key, stream] : streams_) {
    if (key.first == &connection) gone.push_back(stream.get());
  }
  for (GenerationStream* stream : gone) {
    ++counters_.streams_cancelled;
    stream->finish_reason.reset();
    forget(*stream);
  }
}

void WorkerService::fail_stream(GenerationStream& stream, protocol::ErrorCode code, const std::string& message,
                                bool retryable) {
  Connection& connection = *stream.connection;
  const std::uint32_t stream_id = stream.stream_id;
  stream.finish_reason.reset();  // the engine must stop
  forget(stream);
  connection.reset_stream(stream_id, code, message, retryable);
}

void WorkerService::hand_off(Connection& connection, const codec::FrameView& frame) {
  auto found = streams_.find({&connection, frame.header.stream_id});
  if (found == streams_.end()) return;  // ended meanwhile: the router sees its Finish
  GenerationStream& stream = *found->second;
  std::string key;
  std::string to;
  const codec::Status read = codec::read_body<protocol::KvHandoff>(
      frame, codec::FrameLimits{}, [&](const protocol::KvHandoffReader& handoff) {
        key = std::string(handoff.transfer_key());
        to = std::string(handoff.decode_to());
      });
  std::string why;
  std::optional<transport::Endpoint> endpoint = read ? transport::parse_endpoint(to, &why) : std::nullopt;
  if (!read || !endpoint || key.empty()) {
    fail_stream(stream, protocol::ErrorCode::BAD_REQUEST,
                "a KvHandoff without a transfer key or a worker address: " + (read ? why : read.error().message), false);
    return;
  }
  if (stream.part != GenerationStream::Part::whole || stream.finish_reason || stream.handoff_to) {
    return;  // a part of a split request, finishing, or handing off already: its end comes as it would
  }
  stream.handoff_key = std::move(key);
  stream.handoff_to = *endpoint;
  runner_->hold(stream.sequence);  // every token it made reaches the stream before the answer
}

void WorkerService::on_held(const RunnerOutput::KvHeld& held) {
  auto found = by_sequence_.find(held.id);
  if (found == by_sequence_.end()) return;
  GenerationStream& stream = *found->second;
  if (stream.finish_reason) return;  // it finished before the hold: its Finish went as usual
  if (!held.error.empty()) {
    fail_stream(stream, protocol::ErrorCode::TRANSFER_ABORTED, "cannot hand the sequence over: " + held.error, true);
    return;
  }
  // From here on it ends like a prefill part: Finish(handedOff) once the
  // other worker committed its KV, its held blocks released then.
  stream.part = GenerationStream::Part::prefill;
  stream.handing_off = true;
  const engine::Engine::Held& state = held.held;
  const std::uint32_t prompt = state.prompt_tokens;
  const std::uint32_t computed = state.computed;
  std::vector<std::uint32_t> extra;
  if (computed > prompt) extra.assign(state.tokens.begin() + prompt, state.tokens.begin() + computed);
  std::vector<std::uint32_t> rest(state.tokens.begin() + std::max(prompt, computed), state.tokens.end());
  kv_->send(stream.sequence, stream.handoff_key, *stream.handoff_to, computed, std::move(extra));
  kv_->finished(stream.sequence, std::move(rest));
}

void WorkerService::on_kv_sent(engine::SequenceId sequence, const KvTransferResult& result) {
  auto found = by_sequence_.find(sequence);
  if (found == by_sequence_.end()) return;
  GenerationStream& stream = *found->second;
  if (!result.committed) {
    // Retryable whatever the reason: the request itself is good, and whoever
    // sent it (a router) can serve it whole elsewhere.
    fail_stream(stream, result.error.code(), "KV transfer to the decode worker failed (" +
                                                 std::string(protocol::to_string(result.error.reason)) +
                                                 "): " + result.error.message,
                true);
    return;
  }
  stream.kv_transfer = result;
  if (!stream.handing_off) {
    // Committed before this side saw its own sequence finish: cannot be,
    // the shard is complete only then.
    fail_stream(stream, protocol::ErrorCode::INTERNAL, "KV committed before the prefill finished", true);
    return;
  }
  stream.finish_reason = protocol::FinishReason::HANDED_OFF;
  flush(stream);
}

void WorkerService::on_kv_received(engine::SequenceId sequence, const KvTransferResult& result) {
  auto found = by_sequence_.find(sequence);
  if (found == by_sequence_.end()) return;
  GenerationStream& stream = *found->second;
  if (!result.committed) {
    fail_stream(stream, result.error.code(), "KV transfer from the prefill worker failed (" +
                                                 std::string(protocol::to_string(result.error.reason)) +
                                                 "): " + result.error.message,
                true);
    return;
  }
  // The sequence runs now, after the prefill worker's tokens: they count
  // in indexes and usage, and the text stream reads them first, so that a
  // character or a stop sequence across the seam comes out whole.
  stream.kv_transfer = result;
  stream.index_offset = static_cast<std::uint32_t>(result.generated.size());
  stream.completion_tokens += stream.index_offset;
  for (std::uint32_t token : result.generated) (void)stream.text->push(token);
}

void WorkerService::subscribe(Connection& connection, std::uint32_t stream_id) {
  const bool first = subscribers_.empty();
  if (!subscribers_.emplace(Key{&connection, stream_id}, false).second) return;  // a repeat: nothing new
  const std::vector<std::uint64_t> all(prefixes_.begin(), prefixes_.end());
  send_load_report(connection, stream_id, all, {});
  subscribers_[{&connection, stream_id}] = true;
  if (first && report_timer_ == 0) {
    prefixes_added_.clear();
    prefixes_evicted_.clear();
    std::weak_ptr<bool> alive = alive_;
    report_timer_ = loop_.backend().schedule(options_.load_report_interval, [this, alive] {
      if (!alive.lock()) return;
      report_timer_ = 0;
      send_load_reports();
    });
  }
}

void WorkerService::send_load_reports() {
  if (subscribers_.empty()) return;  // the timer stops with the last subscriber
  for (auto it = subscribers_.begin(); it != subscribers_.end();) {
    const Key key = it->first;
    ++it;  // sending may close the stream and erase the entry
    send_load_report(*key.first, key.second, prefixes_added_, prefixes_evicted_);
  }
  prefixes_added_.clear();
  prefixes_evicted_.clear();
  std::weak_ptr<bool> alive = alive_;
  report_timer_ = loop_.backend().schedule(options_.load_report_interval, [this, alive] {
    if (!alive.lock()) return;
    report_timer_ = 0;
    send_load_reports();
  });
}

WorkerMetrics WorkerService::metrics() const {
  WorkerMetrics metrics;
  metrics.name = options_.name;
  metrics.role = options_.role;
  metrics.streams_started = counters_.streams_started;
  metrics.streams_finished = counters_.streams_finished;
  metrics.streams_cancelled = counters_.streams_cancelled;
  metrics.streams_refused = counters_.streams_refused;
  metrics.streams_overloaded = counters_.streams_overloaded;
  metrics.tokens_sent = counters_.tokens_sent;
  metrics.pauses = counters_.pauses;
  metrics.open_streams = streams_.size();
  metrics.engine = engine_stats_;
  if (metrics.engine.total_blocks == 0) metrics.engine.total_blocks = info_.total_blocks;  // as load() does
  metrics.step_seconds = step_seconds_;
  metrics.kv = kv_->counters();
  metrics.kv_transfers_active = kv_->active();
  return metrics;
}

protocol::WorkerLoad WorkerService::load() const {
  protocol::WorkerLoad load;
  load.name = options_.name;
  load.queue_depth = engine_stats_.waiting;
  load.running = engine_stats_.running;
  load.max_running = engine_stats_.max_running;
  load.paused = engine_stats_.paused;
  load.free_kv_blocks = engine_stats_.free_blocks;
  load.total_kv_blocks = engine_stats_.total_blocks != 0 ? engine_stats_.total_blocks : info_.total_blocks;
  load.cached_kv_blocks = engine_stats_.cached_blocks;
  load.recent_step_time_us = static_cast<std::uint32_t>(std::min<std::uint64_t>(engine_stats_.recent_step_us, UINT32_MAX));
  load.draining = draining_;
  load.prompt_tokens = engine_stats_.prompt_tokens;
  load.cached_prompt_tokens = engine_stats_.cached_prompt_tokens;
  load.generated_tokens = engine_stats_.generated_tokens;
  load.role = options_.role;
  load.kv_transfers_active = static_cast<std::uint32_t>(kv_->active());
  load.kv_reserved_blocks = engine_stats_.reserved_blocks;
  return load;
}

void WorkerService::send_load_report(Connection& connection, std::uint32_t stream_id,
                                     const std::vector<std::uint64_t>& added,
                                     const std::vector<std::uint64_t>& evicted) {
  const protocol::WorkerLoad now = load();
  std::size_t added_from = 0;
  std::size_t evicted_from = 0;
  do {
    const std::size_t added_count = std::min(kHashesPerReport, added.size() - added_from);
    const std::size_t evicted_count = std::min(kHashesPerReport - added_count, evicted.size() - evicted_from);
    const SendStatus status = connection.send<protocol::LoadReport>(stream_id, [&](protocol::LoadReportBuilder report) {
      report.load(now).prefixes(std::span(added).subspan(added_from, added_count),
                                std::span(evicted).subspan(evicted_from, evicted_count));
    });
    if (status != SendStatus::sent) {
      subscribers_.erase({&connection, stream_id});
      return;
    }
    added_from += added_count;
    evicted_from += evicted_count;
  } while (added_from < added.size() || evicted_from < evicted.size());
}

}  // namespace fmwire::worker
