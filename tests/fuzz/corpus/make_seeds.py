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
]


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


def main():
    for target in ("openai_request", "http_request", "websocket_message"):
        shutil.rmtree(os.path.join(HERE, target), ignore_errors=True)
    bodies = [json.dumps(body).encode() for body in BODIES] + [b'{"prompt": ', b"[]", b'"x"']
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
    total = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(HERE) for name in names)
    print(f"seeds written under {HERE}: {total} bytes")


if __name__ == "__main__":
    main()
