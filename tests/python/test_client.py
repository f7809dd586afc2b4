"""The Python SDK (module fmwire) against real `fmwire worker` and `fmwire
router` processes: streamed text as `fmwire generate` prints it, cancel by
leaving the loop and by cancel() (the worker frees the stream), a worker
SIGKILLed mid-stream, asyncio, typed errors and bad arguments."""
import asyncio
import gc
import os
import subprocess
import threading

import pytest

import fmwire
from conftest import LIMIT_S, until

# Greedy and seeded: the same text every time, whichever path it takes.
PROMPT = "Once upon a time"


def cli_text(binary, endpoint, max_tokens, seed):
    result = subprocess.run([binary, "generate", "--endpoint", endpoint, "--max-tokens", str(max_tokens),
                             "--seed", str(seed), "--log-level", "warn", PROMPT],
                            capture_output=True, text=True, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_streamed_text_is_what_fmwire_generate_prints(binary, endpoint):
    with fmwire.Client(endpoint) as client:
        stream = client.generate(PROMPT, max_tokens=48, seed=7)
        chunks = list(stream)
    assert "".join(chunk.text for chunk in chunks) + "\n" == cli_text(binary, endpoint, 48, 7)
    indexes = [chunk.first_index + i for chunk in chunks for i in range(len(chunk.token_ids))]
    assert indexes == list(range(48))
    completion = stream.completion
    assert completion.reason == "max_tokens"
    assert completion.completion_tokens == 48 and completion.prompt_tokens > 0
    assert completion.timings[0].hop.startswith("worker ")
    assert stream.ended and not stream.cancelled


def test_token_ids_as_prompt(worker):
    with fmwire.Client(worker.endpoint) as client:
        by_text = list(client.generate("Hi", max_tokens=8))
        # The byte-level tokenizer: BOS (1), then byte + 3.
        by_ids = list(client.generate([1] + [b + 3 for b in b"Hi"], max_tokens=8))
    # Chunks hold what arrived together, so compare the tokens, not the chunks.
    assert [t for c in by_ids for t in c.token_ids] == [t for c in by_text for t in c.token_ids]


def test_stop_sequence_ends_the_stream(worker):
    with fmwire.Client(worker.endpoint) as client:
        text = "".join(chunk.text for chunk in client.generate(PROMPT, max_tokens=48, seed=7))
        stop = text[10:12]
        stream = client.generate(PROMPT, max_tokens=48, seed=7, stop=stop)
        stopped = "".join(chunk.text for chunk in stream)
    assert stream.completion.reason == "stop_sequence"
    assert stop not in stopped and text.startswith(stopped)


def open_streams(worker):
    return worker.metric("fmwire_worker_open_streams")


def cancelled_streams(worker):
    return worker.metric('fmwire_worker_streams_total{event="cancelled"}')


def test_leaving_the_loop_cancels_the_stream(slow_worker):
    before = cancelled_streams(slow_worker)
    with fmwire.Client(slow_worker.endpoint) as client:
        received = 0
        for chunk in client.generate(PROMPT, max_tokens=1500):
            received += len(chunk.token_ids)
            if received >= 5:
                break
        gc.collect()  # CPython drops the stream at the break already; this is for other interpreters
        until(lambda: cancelled_streams(slow_worker) == before + 1, "the worker to count the stream cancelled")
        until(lambda: open_streams(slow_worker) == 0, "the worker to free the stream")
        # The connection carries on.
        assert len(list(client.generate("next", max_tokens=3))) >= 1


def test_cancel_ends_iteration_and_frees_the_stream(slow_worker):
    before = cancelled_streams(slow_worker)
    with fmwire.Client(slow_worker.endpoint) as client:
        stream = client.generate(PROMPT, max_tokens=1500)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received == 5:
                stream.cancel()
        assert 5 <= received < 1500
        assert stream.cancelled and stream.completion is None
        until(lambda: cancelled_streams(slow_worker) == before + 1, "the worker to count the stream cancelled")
        until(lambda: open_streams(slow_worker) == 0, "the worker to free the stream")


def test_cancel_from_another_thread_wakes_the_reader(slow_worker):
    with fmwire.Client(slow_worker.endpoint) as client:
        stream = client.generate(PROMPT, max_tokens=1500)
        next(stream)
        timer = threading.Timer(0.05, stream.cancel)
        timer.start()
        rest = list(stream)  # ends when cancel() comes
        timer.join()
        assert len(rest) < 1500 and stream.cancelled


@pytest.mark.parametrize("through", ["worker", "router"])
def test_worker_killed_mid_stream_raises_worker_lost(start, through):
    worker = start("worker", "--model", "synthetic:tiny", "--step-us", "2000")
    endpoint = worker.endpoint
    if through == "router":
        endpoint = start("router", "--workers", worker.endpoint, "--keepalive-ms", "200",
                         "--dead-after-ms", "600").endpoint
    with fmwire.Client(endpoint) as client:
        stream = client.generate(PROMPT, max_tokens=1500)
        received = 0
        with pytest.raises(fmwire.WorkerLost) as raised:
            for chunk in stream:
                received += len(chunk.token_ids)
                if received == 3:
                    worker.kill()  # SIGKILL: no GoAway, no Error frame
        assert raised.value.retryable and raised.value.code == "worker_lost"
        assert isinstance(raised.value, fmwire.Error)
        assert received < 1500 and stream.completion is None


def test_timeout_raises_deadline_exceeded(slow_worker):
    with fmwire.Client(slow_worker.endpoint) as client:
        stream = client.generate(PROMPT, max_tokens=1500, timeout=0.2)
        received = []
        with pytest.raises(fmwire.DeadlineExceeded) as raised:
            for chunk in stream:
                received.append(chunk)
        assert not raised.value.retryable
        assert stream.completion.reason == "deadline_exceeded"
        assert stream.completion.completion_tokens == sum(len(c.token_ids) for c in received) < 1500


def test_peer_refusal_is_invalid_request(worker):
    with fmwire.Client(worker.endpoint) as client:
        with pytest.raises(fmwire.InvalidRequest) as raised:
            list(client.generate(PROMPT, max_tokens=5000))  # past the built-in model's context
        assert raised.value.code == "bad_request" and not raised.value.retryable
        assert "context" in str(raised.value)
        assert isinstance(raised.value, ValueError)


def test_nothing_listening_raises_no_worker():
    import socket
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(fmwire.NoWorker) as raised:
        fmwire.Client(f"127.0.0.1:{port}", connect_timeout=2)
    assert raised.value.retryable and "refused" in str(raised.value).lower()


def test_list_of_endpoints_fails_over_to_one_that_accepts(worker):
    import socket
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    with fmwire.Client([dead, worker.endpoint]) as client:
        assert client.endpoint == worker.endpoint
        assert len(list(client.generate("hi", max_tokens=2))) >= 1


def test_close_ends_open_streams_with_cancelled(slow_worker):
    client = fmwire.Client(slow_worker.endpoint)
    stream = client.generate(PROMPT, max_tokens=1500)
    next(stream)
    client.close()
    with pytest.raises(fmwire.Cancelled):
        list(stream)
    with pytest.raises(fmwire.Cancelled):
        client.generate("after close", max_tokens=2)


def test_threads_stream_at_once(worker, binary):
    expected = cli_text(binary, worker.endpoint, 24, 3)
    texts = [None] * 8
    with fmwire.Client(worker.endpoint) as client:
        def read(i):
            texts[i] = "".join(chunk.text for chunk in client.generate(PROMPT, max_tokens=24, seed=3)) + "\n"
        threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LIMIT_S)
    assert texts == [expected] * 8


# ---------------------------------------------------------------- asyncio

def test_async_streams_match_the_sync_ones(binary, endpoint):
    expected = cli_text(binary, endpoint, 32, 5)

    async def main():
        with fmwire.Client(endpoint) as client:
            async def one():
                stream = client.agenerate(PROMPT, max_tokens=32, seed=5)
                text = "".join([chunk.text async for chunk in stream])
                assert stream.completion.completion_tokens == 32
                return text + "\n"
            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(16))), 3 * LIMIT_S)

    assert asyncio.run(main()) == [expected] * 16


def test_async_break_and_task_cancel_free_the_streams(slow_worker):
    before = cancelled_streams(slow_worker)

    async def main():
        with fmwire.Client(slow_worker.endpoint) as client:
            async for chunk in client.agenerate(PROMPT, max_tokens=1500):
                break

            async def read_all():
                async for chunk in client.agenerate(PROMPT, max_tokens=1500):
                    pass
            task = asyncio.create_task(read_all())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            stream = client.agenerate(PROMPT, max_tokens=1500)
            async for chunk in stream:
                stream.cancel()
            assert stream.cancelled

    asyncio.run(main())
    until(lambda: cancelled_streams(slow_worker) == before + 3, "the worker to count 3 streams cancelled")
    until(lambda: open_streams(slow_worker) == 0, "the worker to free the streams")


def test_async_worker_killed_raises_worker_lost(start):
    worker = start("worker", "--model", "synthetic:tiny", "--step-us", "2000")

    async def main():
        with fmwire.Client(worker.endpoint) as client:
            with pytest.raises(fmwire.WorkerLost) as raised:
                async for chunk in client.agenerate(PROMPT, max_tokens=1500):
                    worker.kill()
            assert raised.value.retryable

    asyncio.run(main())


def test_agenerate_needs_a_running_loop(worker):
    with fmwire.Client(worker.endpoint) as client:
        with pytest.raises(RuntimeError):
            client.agenerate("hi")


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("arguments, error, words", [
    ((123,), TypeError, "prompt must be a str"),
    (("",), ValueError, "prompt is empty"),
    (([],), ValueError, "empty list of token ids"),
    (([1, -2],), ValueError, "prompt token id"),
    ((["a"],), TypeError, "prompt token id must be an int"),
])
def test_bad_prompts_are_refused(worker, arguments, error, words):
    with fmwire.Client(worker.endpoint) as client:
        with pytest.raises(error, match=words):
            client.generate(*arguments)


@pytest.mark.parametrize("options, error, words", [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens="5"), TypeError, "max_tokens must be an int"),
    (dict(max_tokens=2**32), ValueError, "max_tokens"),
    (dict(max_tokens=True), TypeError, "max_tokens"),
    (dict(temperature=-1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(top_p=0), ValueError, "top_p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(stop=[1]), TypeError, "stop"),
    (dict(stop=5), TypeError, "stop"),
    (dict(stop=""), ValueError, "empty string"),
    (dict(timeout=0), ValueError, "timeout"),
    (dict(timeout="1s"), TypeError, "timeout"),
    (dict(priority=1000), ValueError, "priority"),
    (dict(request_id=5), TypeError, "request_id"),
    (dict(no_such_option=1), TypeError, "no_such_option"),
])
def test_bad_options_are_refused(worker, options, error, words):
    with fmwire.Client(worker.endpoint) as client:
        with pytest.raises(error, match=words):
            client.generate("hi", **options)

        async def main():
            client.agenerate("hi", **options)
        with pytest.raises(error, match=words):
            asyncio.run(main())


@pytest.mark.parametrize("endpoints, error, words", [
    (123, TypeError, "endpoints must be"),
    ("", ValueError, "no endpoint"),
    ([], ValueError, "no endpoint"),
    ([7], TypeError, "each endpoint must be"),
    ("::1:80", ValueError, "brackets"),
    ("127.0.0.1", ValueError, "bad endpoint"),
])
def test_bad_endpoints_are_refused(endpoints, error, words):
    with pytest.raises(error, match=words):
        fmwire.Client(endpoints)


def test_bad_client_options_are_refused(worker):
    with pytest.raises(ValueError, match="connect_timeout"):
        fmwire.Client(worker.endpoint, connect_timeout=0)
    with pytest.raises(ValueError, match="backend"):
        fmwire.Client(worker.endpoint, backend="kqueue")


def test_many_asyncio_rounds_never_stall(start):
    """64 streams at once from a worker with no step time, round after
    round on new event loops: every stream ends (a lost eventfd wake-up
    once left all of a loop's streams waiting after ~75 such rounds)."""
    fast = start("worker", "--model", "synthetic:tiny", "--step-us", "0")

    async def round_of(client):
        async def one(i):
            return sum([len(chunk.token_ids) async for chunk in client.agenerate(PROMPT, max_tokens=300, seed=i)])
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 3 * LIMIT_S)

    with fmwire.Client(fast.endpoint) as client:
        for _ in range(40):
            assert asyncio.run(round_of(client)) == [300] * 64


def test_async_group_reads_many_streams_in_one_task(binary, worker):
    expected = cli_text(binary, worker.endpoint, 24, 9)

    async def main():
        with fmwire.Client(worker.endpoint) as client:
            group = client.agenerate_many([PROMPT] * 12, max_tokens=24, seed=9)
            texts = [""] * 12
            async for index, chunk in group:
                texts[index] += chunk.text
            assert [stream.completion.completion_tokens for stream in group.streams] == [24] * 12
            return [text + "\n" for text in texts]

    assert asyncio.run(main()) == [expected] * 12


def test_async_group_break_cancels_every_stream(slow_worker):
    before = cancelled_streams(slow_worker)

    async def main():
        with fmwire.Client(slow_worker.endpoint) as client:
            group = client.agenerate_many([PROMPT] * 4, max_tokens=1500)
            async for index, chunk in group:
                break
            await group.aclose()

    asyncio.run(main())
    until(lambda: cancelled_streams(slow_worker) == before + 4, "the worker to count 4 streams cancelled")
    until(lambda: open_streams(slow_worker) == 0, "the worker to free the streams")


def test_async_group_refuses_bad_prompts(worker):
    async def main():
        with fmwire.Client(worker.endpoint) as client:
            with pytest.raises(TypeError, match="prompts must be a list"):
                client.agenerate_many("one prompt")
            with pytest.raises(ValueError, match="prompts is empty"):
                client.agenerate_many([])
    asyncio.run(main())


def make_certificate(folder, name, ca=None):
    """A P-256 certificate `name` made now with openssl (never committed):
    self-signed (a CA) without `ca`, else signed by `ca`; (cert, key)."""
    key, cert = os.path.join(folder, name + ".key"), os.path.join(folder, name + ".pem")
    request = ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
               "-subj", f"/CN={name}", "-days", "1"]
    subprocess.run(request + (["-x509", "-out", cert] if ca is None else ["-out", cert + ".csr"]), check=True,
                   capture_output=True, timeout=20)
    if ca is not None:
        subprocess.run(["openssl", "x509", "-req", "-in", cert + ".csr", "-CA", ca[0], "-CAkey", ca[1],
                        "-CAcreateserial", "-days", "1", "-out", cert], check=True, capture_output=True, timeout=20)
    return cert, key


def test_tls_client_streams_and_one_from_another_ca_is_unauthorized(start, tmp_path):
    folder = str(tmp_path)
    ca, other_ca = make_certificate(folder, "ca"), make_certificate(folder, "other-ca")
    worker_cert, worker_key = make_certificate(folder, "worker", ca)
    tls_worker = start("worker", "--model", "builtin", "--tls-ca", ca[0], "--tls-cert", worker_cert,
                       "--tls-key", worker_key)
    with fmwire.Client(tls_worker.endpoint, tls=(ca[0], *make_certificate(folder, "client", ca))) as client:
        text = "".join(chunk.text for chunk in client.generate("Hello", max_tokens=8))
        assert text
    rogue = (ca[0], *make_certificate(folder, "rogue", other_ca))
    with pytest.raises(fmwire.Unauthorized, match="our certificate does not chain to its CA"):
        fmwire.Client(tls_worker.endpoint, tls=rogue, connect_timeout=5)
    with pytest.raises(TypeError, match="tls must be"):
        fmwire.Client(tls_worker.endpoint, tls=(ca[0],))


def test_auth_token_file_is_proved_and_a_wrong_or_missing_one_is_unauthorized(start, tmp_path):
    secret, wrong = tmp_path / "token", tmp_path / "wrong"
    secret.write_text("a shared secret of 32 bytes ....\n")
    wrong.write_text("another secret, of 32 bytes ....\n")
    guarded = start("worker", "--model", "builtin", "--auth-token-file", str(secret))
    with fmwire.Client(guarded.endpoint, auth_token_file=secret) as client:
        assert "".join(chunk.text for chunk in client.generate("Hello", max_tokens=8))
    with pytest.raises(fmwire.Unauthorized, match="auth refused"):
        fmwire.Client(guarded.endpoint, auth_token_file=str(wrong), connect_timeout=5)
    with pytest.raises(fmwire.Unauthorized, match="auth refused"):
        fmwire.Client(guarded.endpoint, connect_timeout=5)
    # The worker served the right token after refusing the others.
    with fmwire.Client(guarded.endpoint, auth_token_file=str(secret)) as client:
        assert "".join(chunk.text for chunk in client.generate("Hello", max_tokens=8))


def test_bad_auth_token_files_are_refused(worker, tmp_path):
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least 16"):
        fmwire.Client(worker.endpoint, auth_token_file=short)
    with pytest.raises(ValueError, match="auth_token_file: .*missing"):
        fmwire.Client(worker.endpoint, auth_token_file=tmp_path / "missing")
    with pytest.raises(TypeError, match="auth_token_file must be"):
        fmwire.Client(worker.endpoint, auth_token_file=42)
