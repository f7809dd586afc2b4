#!/usr/bin/env python3
"""Writes the checked-in seed corpora of the gateway's fuzz targets
(tests/fuzz/corpus/<target>/), from request bodies and requests the tests
send (tests/gateway/*_test.cpp, tests/system/gateway_cli_test.py,
openai_client_test.mjs). Run again after changing a seed here:
    python3 tests/fuzz/corpus/make_seeds.py
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

CHAT = {"model": "builtin", "messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 12}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
BODIES = [
    {"prompt": "Once upon a time", "max_tokens": 12, "stream": True},
    {"prompt": ["x"], "max_tokens": 200, "temperature": 0.7, "top_p": 0.9, "seed": 7, "stop": ["\n", "."]},
    CHAT,
    dict(CHAT, stream_options={"include_usage": True}, fmwire={"resumable": True}),
    dict(CHAT, tools=TOOLS, tool_choice="auto"),
    dict(CHAT, response_format={"type": "json_object"}, logprobs=True, top_logprobs=2, n=2),
    dict(CHAT, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u",
         response_format={"type": "text"}, tools=None, max_completion_tokens=8, parallel_tool_calls=True),
    {"prompt": "x", "max_tokens": -3, "echo": False, "best_of": 1, "suffix": ""},
    {"model": "gpt-9", "prompt": "x"},
    {"max_tokens": 3},
    {"prompt": "x", "top_p": 1e-50},  # above 0, but 0 as a float: was accepted as 0
]
# What Boost.JSON reads as NaN: top_p and temperature took it (found by openai_request_fuzz).
RAW_BODIES = [b'{"prompt": "x", "top_p":0e350}', b'{"prompt": ', b"[]", b'"x"']


def write(target, name, data):
    folder = os.path.join(HERE, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as file:
        file.write(data)


def masked_frame(opcode, payload, fin=True):
    """A client's frame (RFC 6455 5.2): masked, with a fixed key."""
    key = b"\x01\x02\x03\x04"
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def http_request(method, target, headers=(), body=b""):
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Steps:
    """Input for kv_session_fuzz, which reads it with libFuzzer's
    FuzzedDataProvider: integers from the end of the input backwards, one
    byte per 8 bits of a range, the first byte the most significant."""

    def __init__(self):
        self.consumed = []

    def pick(self, value, low, high):
        span, size = high - low, 0
        while size < 8 and span >> (8 * size) > 0:
            size += 1
        self.consumed += list((value - low).to_bytes(size, "big")) if size else []
        return self

    def bytes(self):
        return bytes(reversed(self.consumed))

    # The steps of kv_session_fuzz.cpp, with the values that keep to the protocol.
    def expect(self, key, prompt=20, max_tokens=4):
        return self.pick(0, 0, 8).pick(prompt, 1, 80).pick(max_tokens, 1, 8).pick(key, 0, 2)

    def offer(self, key, tokens=20, first=True, streams=1):
        self.pick(1, 0, 8)
        if not first:
            self.pick(0, 0, 7)  # a new stream
        return self.pick(tokens, 0, 90).pick(1, 0, 7).pick(1, 0, 5).pick(key, 0, 2).pick(2, 1, 4)

    def chunk(self, first_block, blocks, stream=0, streams=1, corrupt=False):
        self.pick(2, 0, 8).pick(1, 0, 7).pick(stream, 0, streams - 1).pick(1, 0, 15)
        self.pick(first_block, 0, 6).pick(blocks, 1, 3).pick(1, 0, 15).pick(0, 0, 1)
        if corrupt:
            return self.pick(0, 0, 15).pick(0, 0, (1 << 64) - 1)
        return self.pick(1, 0, 15)

    def commit(self, blocks, chunks, stream=0, streams=1):
        return self.pick(4, 0, 8).pick(1, 0, 7).pick(stream, 0, streams - 1).pick(1, 0, 15) \
            .pick(blocks, 0, 8).pick(chunks, 0, 8).pick(1, 0, 2)

    def abort(self, stream=0, streams=1):
        return self.pick(5, 0, 8).pick(1, 0, 7).pick(stream, 0, streams - 1).pick(1, 0, 15)

    def cancel(self, sequence, sequences):
        return self.pick(7, 0, 8).pick(sequence, 0, sequences - 1)

    def settle(self):
        return self.pick(8, 0, 8)


def kv_session_seeds():
    window = lambda: Steps().pick(1 << 20, 1, 1 << 20)
    return {
        # The decode request first, then a whole transfer in one chunk.
        "committed": window().expect(0).offer(0).settle().chunk(0, 2).settle().commit(2, 1).settle(),
        # The Offer first, waiting for its request; two chunks.
        "offer-first": window().offer(1).settle().expect(1).settle().chunk(0, 1).chunk(1, 1).settle()
        .commit(2, 2).settle(),
        "aborted": window().expect(2).offer(2).settle().chunk(0, 1).abort().settle(),
        "cancelled": window().expect(0).offer(0).settle().cancel(0, 1).settle(),
        "corrupt-chunk": window().expect(0).offer(0).settle().chunk(0, 2, corrupt=True).settle(),
        "commit-short": window().expect(0).offer(0).settle().chunk(0, 1).commit(1, 1).settle(),
    }


def main():
    for target in ("openai_request", "http_request", "websocket_message", "kv_session"):
        shutil.rmtree(os.path.join(HERE, target), ignore_errors=True)
    bodies = [json.dumps(body).encode() for body in BODIES] + RAW_BODIES
    for number, body in enumerate(bodies):
        write("openai_request", f"body-{number:02}.json", body)

    requests = [
        http_request("POST", "/v1/completions", body=bodies[0]),
        http_request("POST", "/v1/chat/completions?x=1", ["Authorization: Bearer sk-test-1", "X-Fmwire-Resumable: 1"],
                     bodies[3]),
        http_request("POST", "/v1/completions", ["Expect: 100-continue", "Transfer-Encoding: chunked"]) +
        b"5\r\nhello\r\n0\r\n\r\n",
        http_request("GET", "/v1/streams/chatcmpl-0123456789abcdef01234567", ["Last-Event-ID: 17"]),
        http_request("GET", "/v1/streams/cmpl-1", ["Last-Event-ID: -1"]),
        http_request("GET", "/v1/stream", ["Upgrade: websocket", "Connection: Upgrade",
                                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]),
        http_request("GET", "/metrics"),
        b"18446744073709551615",
    ]
    for number, request in enumerate(requests):
        write("http_request", f"request-{number:02}", request)

    frames = [
        masked_frame(1, bodies[0]) + masked_frame(8, struct.pack(">H", 1000)),
        masked_frame(1, bodies[2]),
        masked_frame(1, bodies[4][:20], fin=False) + masked_frame(9, b"ping") + masked_frame(0, bodies[4][20:]),
        masked_frame(2, b"\x00\x01binary"),
        masked_frame(10, b"") + masked_frame(1, b"[]"),
    ]
    for number, frame in enumerate(frames):
        write("websocket_message", f"frames-{number:02}", frame)
    for name, steps in kv_session_seeds().items():
        write("kv_session", name, steps.bytes())
    total = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(HERE) for name in names)
    print(f"seeds written under {HERE}: {total} bytes")


if __name__ == "__main__":
    main()
