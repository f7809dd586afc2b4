"""fmwire for Python: stream tokens from an fmwire worker or router.

    import fmwire

    client = fmwire.Client("127.0.0.1:7000")          # or a list: failover in order
    for chunk in client.generate("Once upon a time", max_tokens=64):
        print(chunk.text, end="", flush=True)         # chunk.token_ids, chunk.first_index

    async for chunk in client.agenerate("Hello", max_tokens=64):   # asyncio
        ...

    async for index, chunk in client.agenerate_many(prompts, max_tokens=64):
        ...                                           # many streams, one task

Leaving the loop (break, an exception, the stream dropped), stream.cancel()
or stream.close() cancels the stream: the worker is told and frees it.
stream.completion holds the finish (reason, usage, timings) once it ended.
Errors are fmwire.Error subclasses, one per protocol error code
(fmwire.errors).

The client is fmwire::Client (C++) running on a thread of its own; tokens
reach Python in batches, one hand-over per loop turn, and a thread waiting
for tokens releases the GIL.
"""
import asyncio
import math
import os
import weakref

from . import _fmwire
from .errors import (BadFrame, Cancelled, DeadlineExceeded, DeadlineUnreachable, DigestMismatch, Error,  # noqa: F401
                     Internal, InvalidRequest, LimitExceeded, NoWorker, NotFound, Overloaded, TransferAborted,
                     Unauthorized, UnsupportedVersion, WorkerLost)

Chunk = _fmwire.Chunk
Completion = _fmwire.Completion
HopTime = _fmwire.HopTime
Stream = _fmwire.Stream

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _endpoint_list(endpoints):
    if isinstance(endpoints, str):
        endpoints = endpoints.split(",")
    elif isinstance(endpoints, (bytes, bytearray)) or not hasattr(endpoints, "__iter__"):
        raise TypeError(f"endpoints must be a \"host:port\" str or a list of them, not {type(endpoints).__name__}")
    endpoints = list(endpoints)
    for endpoint in endpoints:
        if not isinstance(endpoint, str):
            raise TypeError(f"each endpoint must be a \"host:port\" str, not {type(endpoint).__name__}")
    endpoints = [endpoint.strip() for endpoint in endpoints if endpoint.strip()]
    if not endpoints:
        raise ValueError("no endpoint given: a \"host:port\" or a list of them")
    return endpoints


def _integer(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], not {value}")
    return value


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value}")
    return value


def _request(prompt, max_tokens, temperature, top_p, seed, stop, timeout, priority, request_id, model):
    """The native generate()'s arguments, checked: TypeError or ValueError naming the argument."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        text, token_ids = prompt, []
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list of token ids")
        token_ids = [_integer("prompt token id", token, 0, _UINT32_MAX) for token in prompt]
        text = ""
    else:
        raise TypeError(f"prompt must be a str or a list of token ids, not {type(prompt).__name__}")
    max_tokens = _integer("max_tokens", max_tokens, 1, _UINT32_MAX)
    temperature = _number("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), not {temperature}")
    top_p = _number("top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if seed is not None:
        seed = _integer("seed", seed, 0, _UINT64_MAX)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, (list, tuple)):
        stop = list(stop)
        for sequence in stop:
            if not isinstance(sequence, str):
                raise TypeError(f"stop must be a str or a list of str, not a list holding {type(sequence).__name__}")
    else:
        raise TypeError(f"stop must be a str or a list of str, not {type(stop).__name__}")
    if any(not sequence for sequence in stop):
        raise ValueError("stop holds an empty string")
    if timeout is None:
        timeout_us = 0
    else:
        timeout = _number("timeout", timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds (None: no timeout), not {timeout}")
        timeout_us = max(1, round(timeout * 1e6))
    priority = _integer("priority", priority, -128, 127)
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, not {type(model).__name__}")
    return (text, token_ids, max_tokens, temperature, top_p, seed, stop, timeout_us, priority, request_id, model)


class Client:
    """A connection to one of `endpoints` (a "host:port", a comma-separated
    str of them, or a list): the first that accepts serves; when it is lost
    the client goes on to the next. Connects in the constructor (up to
    connect_timeout seconds per endpoint) and raises fmwire.Error (NoWorker,
    ...) when none accepts. backend: "" (io_uring where it works, else
    epoll), "uring" or "asio". tls: (ca_file, cert_file, key_file), PEM
    files for TLS 1.3 with mutual authentication (the peer's certificate
    must chain to the CA; a refusal either way raises Unauthorized); None:
    plaintext. auth_token_file: the file of the shared secret the servers
    were given (--auth-token-file), proved in the Hello exchange; a wrong
    or missing one raises Unauthorized. Close it with close() or `with`."""

    def __init__(self, endpoints, *, connect_timeout=5.0, backend="", tls=None, auth_token_file=None):
        endpoints = _endpoint_list(endpoints)
        connect_timeout = _number("connect_timeout", connect_timeout)
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, not {connect_timeout}")
        if backend not in ("", "uring", "asio"):
            raise ValueError(f"backend must be '', 'uring' or 'asio', not {backend!r}")
        if tls is None:
            tls = []
        elif (not isinstance(tls, (tuple, list)) or len(tls) != 3
              or not all(isinstance(path, (str, os.PathLike)) for path in tls)):
            raise TypeError(f"tls must be (ca_file, cert_file, key_file), not {tls!r}")
        if auth_token_file is None:
            auth_token_file = ""
        elif isinstance(auth_token_file, (str, os.PathLike)) and os.fspath(auth_token_file):
            auth_token_file = os.fspath(auth_token_file)
        else:
            raise TypeError(f"auth_token_file must be a file's path, not {auth_token_file!r}")
        self._core = _fmwire.Core(endpoints, connect_timeout, backend, [os.fspath(path) for path in tls],
                                  auth_token_file)
        self._hubs = weakref.WeakKeyDictionary()  # asyncio loop -> _Hub

    def generate(self, prompt, *, max_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=None, timeout=None,
                 priority=0, request_id="", model=""):
        """Starts generating; returns a Stream to iterate for fmwire.Chunk.

        prompt: text, or a list of token ids. temperature 0 is greedy; seed
        fixes sampling (None: the worker picks one). stop: a str or a list
        of them. timeout: seconds for the whole request (None: none); when
        it passes the stream raises DeadlineExceeded after the tokens made
        before it. The last chunk may carry only text (token_ids empty):
        text the worker released at the end."""
        arguments = _request(prompt, max_tokens, temperature, top_p, seed, stop, timeout, priority, request_id, model)
        return self._core.generate(*arguments, None)

    def agenerate(self, prompt, *, max_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=None, timeout=None,
                  priority=0, request_id="", model=""):
        """generate() for asyncio: an AsyncStream for `async for`. Call it
        from a coroutine (it is tied to the running loop)."""
        arguments = _request(prompt, max_tokens, temperature, top_p, seed, stop, timeout, priority, request_id, model)
        loop = asyncio.get_running_loop()
        hub = self._hubs.get(loop)
        if hub is None:
            hub = self._hubs[loop] = _Hub(loop)
        return AsyncStream(self._core.generate(*arguments, hub.notifier), hub)

    def agenerate_many(self, prompts, *, max_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=None,
                       timeout=None, priority=0, request_id="", model=""):
        """Many streams read by one task: `async for index, chunk in
        client.agenerate_many(prompts, ...)` yields each stream's chunks as
        they come, with the index of its prompt; the options apply to every
        prompt. One wake-up serves every stream that got tokens in it, where
        an AsyncStream per stream costs a task switch per stream: the way to
        read many streams at a high rate. The first error raises (the other
        streams are cancelled); .streams[i].completion once each has ended."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise TypeError(f"prompts must be a list of prompts, not {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        return AsyncStreamGroup([self.agenerate(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                seed=seed, stop=stop, timeout=timeout, priority=priority,
                                                request_id=request_id, model=model) for prompt in prompts])

    @property
    def connected(self):
        """Whether a connection is up now."""
        return self._core.connected

    @property
    def endpoint(self):
        """The endpoint connected to ("" when none)."""
        return self._core.endpoint

    def close(self):
        """Ends every open stream (they raise Cancelled) and the client's thread."""
        for hub in list(self._hubs.values()):
            hub.close()
        self._core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class _Hub:
    """One asyncio loop's side of a client: the loop watches the Notifier's
    eventfd (add_reader), which the client's thread rings at most once per
    loop turn however many streams got chunks; the wake-up then resolves
    the futures of the streams that wait. The client's thread never takes
    the GIL (loop.call_soon_threadsafe would: a GIL hand-off per wake, and
    its thread waiting on the GIL holds up every stream)."""

    def __init__(self, loop):
        self.loop = loop
        self.notifier = _fmwire.Notifier()
        self.waiters = {}  # stream id -> future
        loop.add_reader(self.notifier.fd, self._on_ready)

    def _on_ready(self):
        for stream_id in self.notifier.take_ready():
            waiter = self.waiters.pop(stream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def close(self):
        if not self.loop.is_closed():
            self.loop.remove_reader(self.notifier.fd)


class AsyncStream:
    """A generation stream for `async for chunk in stream`. Leaving the loop
    (break, the task cancelled, the stream dropped), cancel() or aclose()
    cancels it. .completion as for Stream."""

    def __init__(self, stream, hub):
        self._stream = stream
        self._hub = hub  # kept: its eventfd is this stream's
        self._loop = hub.loop
        self._waiters = hub.waiters
        self._id = stream.id

    def __aiter__(self):
        return self

    async def __anext__(self):
        chunk = self._stream.next_nowait()
        while chunk is None:
            # Armed: the hub resolves this future when chunks come (inline,
            # not a coroutine of the hub's: this runs once per wake-up).
            waiter = self._loop.create_future()
            self._waiters[self._id] = waiter
            try:
                await waiter
            except asyncio.CancelledError:
                self._waiters.pop(self._id, None)
                self._stream.cancel()
                raise
            chunk = self._stream.next_nowait()
        return chunk

    def cancel(self):
        """Ends the stream: the worker is told; iteration stops."""
        self._stream.cancel()

    async def aclose(self):
        self._stream.cancel()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self._stream.cancel()

    @property
    def completion(self):
        return self._stream.completion

    @property
    def cancelled(self):
        return self._stream.cancelled

    @property
    def ended(self):
        return self._stream.ended


class AsyncStreamGroup:
    """Client.agenerate_many's streams, read together: `async for index,
    chunk in group`. cancel() or aclose() cancels every stream still open;
    .streams holds each stream (its .completion once it has ended)."""

    def __init__(self, streams):
        self.streams = streams
        self._chunks = self._read()

    def __aiter__(self):
        return self._chunks

    async def _read(self):
        loop = self.streams[0]._loop
        waiters = self.streams[0]._waiters
        live = dict(enumerate(stream._stream for stream in self.streams))
        try:
            while live:
                # One future for every armed stream: whichever gets chunks first wakes the group.
                waiter = loop.create_future()
                for index, stream in list(live.items()):
                    while True:
                        try:
                            chunk = stream.next_nowait()
                        except StopAsyncIteration:
                            del live[index]
                            break
                        if chunk is None:
                            waiters[stream.id] = waiter
                            break
                        yield index, chunk
                if live:
                    await waiter
        finally:
            for stream in live.values():
                waiters.pop(stream.id, None)
            self.cancel()

    def cancel(self):
        """Cancels every stream of the group that has not ended."""
        for stream in self.streams:
            stream.cancel()

    async def aclose(self):
        self.cancel()
        await self._chunks.aclose()
