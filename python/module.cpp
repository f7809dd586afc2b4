// fmwire._fmwire: the Python binding of fmwire::Client (pybind11). The
// package (python/fmwire/__init__.py) checks arguments and adds asyncio;
// this file is the part that runs per chunk: a stream's __next__ takes every
// chunk queued for it in one call (the GIL released while it waits) and
// returns them one by one as fmwire.Chunk, a struct sequence (C-level tuple
// with names: made without a Python call per chunk).
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "python/client_core.h"
#include "python/stream_queue.h"
#include "transport/auth_token.h"
#include "transport/tls_credentials.h"

namespace py = pybind11;

namespace fmwire::python {
namespace {

// A reader that waits this long at a time checks for signals (Ctrl-C) in between.
constexpr std::chrono::milliseconds kSignalCheck{100};
// Flow control: chunks taken are acknowledged once this many wire bytes add up
// (well below the stream's window, ConnectionOptions::initial_stream_credit_bytes).
constexpr std::uint64_t kAcknowledgeBytes = 16 * 1024;

PyTypeObject* chunk_type = nullptr;

PyStructSequence_Field chunk_fields[] = {
    {"text", "the chunk's text (str); '' while a character is incomplete"},
    {"token_ids", "the chunk's token ids (list of int)"},
    {"first_index", "index in the completion of token_ids[0]"},
    {nullptr, nullptr},
};
PyStructSequence_Desc chunk_desc = {
    "fmwire.Chunk",
    "One Tokens frame of a stream: its text, its token ids and the index of the first.",
    chunk_fields,
    3,
};

py::object make_chunk(std::string_view text, const std::uint32_t* ids, std::size_t id_count,
                      std::uint32_t first_index) {
  PyObject* chunk = PyStructSequence_New(chunk_type);
  if (chunk == nullptr) throw py::error_already_set();
  py::object owned = py::reinterpret_steal<py::object>(chunk);
  PyObject* py_text = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
  if (py_text == nullptr) throw py::error_already_set();
  PyStructSequence_SetItem(chunk, 0, py_text);
  PyObject* py_ids = PyList_New(static_cast<Py_ssize_t>(id_count));
  if (py_ids == nullptr) throw py::error_already_set();
  PyStructSequence_SetItem(chunk, 1, py_ids);
  for (std::size_t i = 0; i < id_count; ++i) {
    PyObject* id = PyLong_FromUnsignedLong(ids[i]);
    if (id == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(py_ids, static_cast<Py_ssize_t>(i), id);
  }
  PyObject* py_first = PyLong_FromUnsignedLong(first_index);
  if (py_first == nullptr) throw py::error_already_set();
  PyStructSequence_SetItem(chunk, 2, py_first);
  return owned;
}

// Raises the fmwire.errors exception for `code` (fmwire.errors.from_code).
[[noreturn]] void raise_error(std::string_view code, const std::string& message, bool retryable,
                              std::uint32_t retry_after_ms) {
  py::object error = py::module_::import("fmwire.errors").attr("from_code")(code, message, retryable, retry_after_ms);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  throw py::error_already_set();
}

[[noreturn]] void raise_error(const ClientError& error) {
  raise_error(to_string(error.code), error.message, error.retryable, error.retry_after_ms);
}

// One generation stream as Python reads it: an iterator of fmwire.Chunk
// (a thread that waits) or, for fmwire.AsyncStream, next_nowait() (an
// asyncio loop woken by its Notifier). Dropping it cancels the stream.
class Stream {
 public:
  Stream(std::shared_ptr<ClientCore> core, std::shared_ptr<StreamQueue> queue, GenerationHandle handle)
      : core_(std::move(core)), queue_(std::move(queue)), handle_(handle) {}
  ~Stream() {
    if (!ended_ && !cancelled_) core_->cancel(handle_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  // __next__: waits, the GIL released, for the next chunk; StopIteration at
  // the end, or the stream's error.
  py::object next() {
    for (;;) {
      if (py::object chunk = deliver(); chunk) return chunk;
      if (reading_) throw std::runtime_error("another thread is reading this stream");
      if (take(StreamQueue::kNoWait)) {  // queued already: no GIL hand-off
        after_take();
        continue;
      }
      reading_ = true;
      bool took = false;
      {
        py::gil_scoped_release release;
        took = take(kSignalCheck);
      }
      reading_ = false;
      after_take();
      if (!took && PyErr_CheckSignals() != 0) {  // Ctrl-C while waiting: the stream goes too
        cancel();
        throw py::error_already_set();
      }
    }
  }

  // For asyncio: the next chunk, or None when none has come (the notifier is
  // then armed: it rings when one does); StopAsyncIteration at the end.
  py::object next_nowait() {
    py::object chunk = deliver();
    if (!chunk && take(StreamQueue::kArm)) {
      after_take();
      chunk = deliver();
    }
    return chunk ? chunk : py::none();
  }

  void cancel() {
    if (ended_ || cancelled_) return;
    cancelled_ = true;
    core_->cancel(handle_);
  }

  std::uint64_t id() const { return queue_->id(); }
  bool cancelled() const { return cancelled_; }
  bool ended() const { return ended_; }
  const std::optional<Completion>& completion() const { return completion_; }
  void set_async() { stop_ = PyExc_StopAsyncIteration; }

 private:
  bool take(std::chrono::milliseconds wait) {
    taken_.clear();
    next_entry_ = 0;
    return queue_->take(taken_, end_, wait);
  }

  void after_take() {
    unacknowledged_ += taken_.wire_bytes;
    if (unacknowledged_ >= kAcknowledgeBytes && !end_) {
      core_->consumed(handle_, unacknowledged_);
      unacknowledged_ = 0;
    }
  }

  // The next chunk taken and not yet given; at the end, the trailing text
  // as a last chunk, then the stop or the error. An empty object when the
  // reader has to take more.
  py::object deliver() {
    if (cancelled_) stop();  // what was queued goes with the stream
    if (next_entry_ < taken_.entries.size()) {
      // Every frame taken in one chunk: a reader that keeps up gets a frame
      // at a time, one that falls behind catches up in one step.
      const ChunkBatch::Entry& entry = taken_.entries[next_entry_];
      const std::uint32_t ids_begin = next_entry_ == 0 ? 0 : taken_.entries[next_entry_ - 1].ids_end;
      const std::uint32_t text_begin = next_entry_ == 0 ? 0 : taken_.entries[next_entry_ - 1].text_end;
      next_entry_ = taken_.entries.size();
      return make_chunk(std::string_view(taken_.text).substr(text_begin), taken_.token_ids.data() + ids_begin,
                        taken_.token_ids.size() - ids_begin, entry.first_index);
    }
    if (!end_) return {};
    if (!ended_) {
      ended_ = true;
      if (end_->completion) {
        completion_ = end_->completion;
        if (!completion_->trailing_text.empty()) {
          return make_chunk(completion_->trailing_text, nullptr, 0, completion_->completion_tokens);
        }
      }
    }
    if (!outcome_given_) {
      outcome_given_ = true;
      if (end_->error && !(cancelled_ && end_->error->code == protocol::ErrorCode::CANCELLED)) {
        raise_error(*end_->error);
      }
      if (completion_ && completion_->reason == protocol::FinishReason::DEADLINE_EXCEEDED) {
        raise_error("deadline_exceeded",
                    "the request's timeout passed after " + std::to_string(completion_->completion_tokens) + " tokens",
                    false, 0);
      }
    }
    stop();
  }

  [[noreturn]] void stop() {
    PyErr_SetNone(stop_);
    throw py::error_already_set();
  }

  std::shared_ptr<ClientCore> core_;
  std::shared_ptr<StreamQueue> queue_;
  GenerationHandle handle_;
  PyObject* stop_ = PyExc_StopIteration;
  // Guarded by the GIL (take() runs without it, but only while reading_).
  ChunkBatch taken_;
  std::size_t next_entry_ = 0;
  std::optional<StreamEnd> end_;
  std::optional<Completion> completion_;
  std::uint64_t unacknowledged_ = 0;
  bool reading_ = false;
  bool ended_ = false;          // the end came and was seen
  bool outcome_given_ = false;  // raised or stopped once
  bool cancelled_ = false;      // by this side: its "cancelled" end is no error
};

std::vector<transport::Endpoint> endpoints_of(const std::vector<std::string>& texts) {
  if (texts.empty()) throw py::value_error("no endpoint given: a \"host:port\" or a list of them");
  std::string problem;
  auto endpoints = transport::parse_endpoints(texts, &problem);
  if (!endpoints) throw py::value_error("bad endpoint " + problem);
  return std::move(*endpoints);
}

std::shared_ptr<ClientCore> connect_core(const std::vector<std::string>& endpoints, double connect_timeout_s,
                                    const std::string& backend, const std::vector<std::string>& tls_files,
                                    const std::string& auth_token_file) {
  ClientOptions options;
  options.backend = backend;
  if (!auth_token_file.empty()) {
    // The shared secret the workers and routers were given (--auth-token-file).
    auto token = transport::AuthToken::read_file(auth_token_file);
    if (!token) throw py::value_error("auth_token_file: " + token.error());
    options.connection.auth_token = std::move(*token);
  }
  if (!tls_files.empty()) {
    // (CA, certificate, key): TLS 1.3 with mutual authentication.
    if (tls_files.size() != 3) throw py::value_error("tls must be (ca_file, cert_file, key_file)");
    auto credentials = transport::TlsCredentials::load({tls_files[0], tls_files[1], tls_files[2]});
    if (!credentials) throw py::value_error("tls: " + credentials.error());
    options.connection.tls = std::move(*credentials);
  }
  options.connect_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(connect_timeout_s * 1000.0));
  std::vector<transport::Endpoint> parsed = endpoints_of(endpoints);
  ClientResult<std::shared_ptr<ClientCore>> core = [&] {
    py::gil_scoped_release release;
    return ClientCore::connect(std::move(parsed), std::move(options));
  }();
  if (!core) raise_error(core.error());
  return std::move(*core);
}

std::unique_ptr<Stream> generate(const std::shared_ptr<ClientCore>& core, std::string prompt,
                                 std::vector<std::uint32_t> prompt_token_ids, std::uint32_t max_tokens,
                                 float temperature, float top_p, std::optional<std::uint64_t> seed,
                                 std::vector<std::string> stop, std::int64_t timeout_us, std::int8_t priority,
                                 std::string request_id, std::string model, std::shared_ptr<Notifier> notifier) {
  GenerateParams params;
  params.prompt = std::move(prompt);
  params.prompt_token_ids = std::move(prompt_token_ids);
  params.max_tokens = max_tokens;
  params.temperature = temperature;
  params.top_p = top_p;
  params.seed = seed;
  params.stop_sequences = std::move(stop);
  params.timeout = std::chrono::microseconds(timeout_us);
  params.priority = priority;
  params.request_id = std::move(request_id);
  params.model = std::move(model);
  params.manual_flow = true;  // acknowledged as Python takes chunks: a slow reader holds back its own stream
  const bool is_async = notifier != nullptr;
  auto queue = std::make_shared<StreamQueue>(core->next_stream_id(), std::move(notifier));
  std::optional<GenerationHandle> handle = core->generate(std::move(params), queue);
  if (!handle) raise_error(to_string(protocol::ErrorCode::CANCELLED), "the client is closed", false, 0);
  auto stream = std::make_unique<Stream>(core, std::move(queue), *handle);
  if (is_async) stream->set_async();
  return stream;
}

}  // namespace
}  // namespace fmwire::python

PYBIND11_MODULE(_fmwire, m) {
  using namespace fmwire;
  using namespace fmwire::python;
  m.doc() = "fmwire's native client (fmwire::Client); use the fmwire package, not this module";

  chunk_type = PyStructSequence_NewType(&chunk_desc);
  if (chunk_type == nullptr) throw py::error_already_set();
  m.add_object("Chunk", py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(chunk_type)));
  Py_INCREF(chunk_type);  // kept by this module for make_chunk, whatever happens to the attribute

  py::class_<HopTime>(m, "HopTime", "Where one hop's time went, in microseconds.")
      .def_readonly("hop", &HopTime::hop)
      .def_readonly("queue_us", &HopTime::queue_us)
      .def_readonly("prefill_us", &HopTime::prefill_us)
      .def_readonly("decode_us", &HopTime::decode_us)
      .def_readonly("first_token_us", &HopTime::first_token_us)
      .def_readonly("total_us", &HopTime::total_us)
      .def("__repr__", [](const HopTime& hop) {
        return "HopTime(hop=" + hop.hop + ", total_us=" + std::to_string(hop.total_us) + ")";
      });

  py::class_<Completion>(m, "Completion", "How a stream finished: reason, usage, timings per hop.")
      .def_property_readonly("reason", [](const Completion& c) { return std::string(to_string(c.reason)); })
      .def_readonly("prompt_tokens", &Completion::prompt_tokens)
      .def_readonly("completion_tokens", &Completion::completion_tokens)
      .def_readonly("cached_prompt_tokens", &Completion::cached_prompt_tokens)
      .def_readonly("trailing_text", &Completion::trailing_text)
      .def_readonly("timings", &Completion::timings)
      .def("__repr__", [](const Completion& c) {
        return "Completion(reason=" + std::string(to_string(c.reason)) +
               ", prompt_tokens=" + std::to_string(c.prompt_tokens) +
               ", completion_tokens=" + std::to_string(c.completion_tokens) + ")";
      });

  py::class_<Notifier, std::shared_ptr<Notifier>>(m, "Notifier",
                                                  "An asyncio loop's doorbell: an eventfd rung once per client loop turn.")
      .def(py::init<>())
      .def_property_readonly("fd", &Notifier::fd)
      .def("take_ready", &Notifier::take_ready, "reads the eventfd; the ids of the streams that have chunks");

  py::class_<Stream>(m, "Stream",
                     "A generation stream: iterate it for fmwire.Chunk; dropping it, close() or cancel() "
                     "cancels it; .completion once it has finished.")
      .def("__iter__", [](py::object self) { return self; })
      .def("__next__", &Stream::next)
      .def("next_nowait", &Stream::next_nowait)
      .def("cancel", &Stream::cancel, "ends the stream: the peer is told and frees its state; iteration stops")
      .def("close", &Stream::cancel, "cancel(), unless it has ended")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](Stream& stream, py::args) { stream.cancel(); })
      .def_property_readonly("id", &Stream::id)
      .def_property_readonly("cancelled", &Stream::cancelled, "cancel() was called before the end")
      .def_property_readonly("ended", &Stream::ended, "the end (finish or error) has been read")
      .def_property_readonly("completion", &Stream::completion,
                             "the Completion once the stream has finished (None before, or after an error)");

  py::class_<ClientCore, std::shared_ptr<ClientCore>>(m, "Core", "One fmwire::Client and its loop thread.")
      .def(py::init(&connect_core), py::arg("endpoints"), py::arg("connect_timeout_s"), py::arg("backend"),
           py::arg("tls_files"), py::arg("auth_token_file"))
      .def("generate", &generate, py::arg("prompt"), py::arg("prompt_token_ids"), py::arg("max_tokens"),
           py::arg("temperature"), py::arg("top_p"), py::arg("seed"), py::arg("stop"), py::arg("timeout_us"),
           py::arg("priority"), py::arg("request_id"), py::arg("model"), py::arg("notifier").none(true))
      .def("close", &ClientCore::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("connected", &ClientCore::connected)
      .def_property_readonly("endpoint", &ClientCore::connected_endpoint);
}
