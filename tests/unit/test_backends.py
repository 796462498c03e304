"""Model backends: the tiny local model counts tokens with its tokenizer; the OpenAI-compatible
client talks to a real HTTP server (this test's own, wrapping the tiny model) and turns every
failure into ModelError."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from confide.agents.backends import (
    CountingChat,
    OpenAIChat,
    TransformersChat,
    backend_from_spec,
    estimate_tokens,
)
from confide.agents.model import ChatModel, ModelError

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny() -> TransformersChat:
    model = backend_from_spec("tiny", device="cpu")
    assert isinstance(model, TransformersChat)
    return model


def test_tiny_model_counts_tokens_with_its_tokenizer(tiny):
    assert isinstance(tiny, ChatModel)
    out = tiny.chat(MESSAGES, max_tokens=12)
    assert out.usage.prompt_tokens == tiny.count_tokens(tiny.prompt_text(MESSAGES))
    assert 1 <= out.usage.completion_tokens <= 12
    assert isinstance(out.text, str)
    again = tiny.chat(MESSAGES, max_tokens=12)  # greedy: deterministic
    assert again == out


def test_spec_parsing_and_sharing(tiny):
    assert backend_from_spec("tiny", device="cpu") is tiny  # loaded once per process
    remote = backend_from_spec("openai:http://127.0.0.1:9/v1#my-model", api_key="k")
    assert isinstance(remote, OpenAIChat)
    assert (remote.url, remote.model) == ("http://127.0.0.1:9/v1/chat/completions", "my-model")
    with pytest.raises(ModelError, match="unknown model spec"):
        backend_from_spec("path:/definitely/not/here")
    with pytest.raises(ModelError, match="http"):
        backend_from_spec("openai:ftp://x#m")


def test_counting_wrapper(tiny):
    counted = CountingChat(tiny)
    counted.chat(MESSAGES, max_tokens=4)
    counted.chat(MESSAGES, max_tokens=4)
    assert counted.calls == 2 and counted.usage.completion_tokens <= 8


@contextlib.contextmanager
def _serve(handler: Callable[[BaseHTTPRequestHandler, dict], None]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            handler(self, json.loads(self.rfile.read(length)))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def openai_server(tiny) -> Iterator[tuple[str, list]]:
    """A minimal OpenAI-compatible server answering with the tiny model."""
    seen: list = []

    def handle(handler, request):
        seen.append((handler.headers.get("Authorization"), request))
        out = tiny.chat(request["messages"], max_tokens=request.get("max_tokens", 16))
        body = {"id": "x", "object": "chat.completion", "model": request.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": out.text}}],
                "usage": {"prompt_tokens": out.usage.prompt_tokens,
                          "completion_tokens": out.usage.completion_tokens,
                          "total_tokens": out.usage.total}}
        _reply(handler, 200, json.dumps(body).encode())

    with _serve(handle) as url:
        yield url, seen


def test_openai_client_against_a_local_server(tiny, openai_server):
    url, seen = openai_server
    remote = OpenAIChat(url, "tiny-llama", api_key="secret", timeout=30)
    out = remote.chat(MESSAGES, max_tokens=8)
    local = tiny.chat(MESSAGES, max_tokens=8)
    assert out.text == local.text and out.usage == local.usage and not remote.estimated
    auth, request = seen[0]
    assert auth == "Bearer secret"
    assert request["model"] == "tiny-llama" and request["messages"] == MESSAGES


def test_usage_is_estimated_when_the_server_omits_it():
    def handle(handler, request):
        body = {"choices": [{"message": {"role": "assistant", "content": "sunny, 21 C"}}]}
        _reply(handler, 200, json.dumps(body).encode())

    with _serve(handle) as url:
        remote = OpenAIChat(url, "m", api_key="")
        out = remote.chat(MESSAGES)
        assert out.text == "sunny, 21 C" and remote.estimated
        assert out.usage.completion_tokens == estimate_tokens("sunny, 21 C")


@pytest.mark.parametrize(("status", "body", "match"), [
    (500, b'{"error": "boom"}', "HTTP 500"),
    (200, b"not json at all", "not an OpenAI chat completion"),
    (200, b'{"choices": []}', "not an OpenAI chat completion"),
])
def test_server_errors_become_model_errors(status, body, match):
    def handle(handler, request):
        _reply(handler, status, body)

    with _serve(handle) as url, pytest.raises(ModelError, match=match):
        OpenAIChat(url, "m", timeout=10).chat(MESSAGES)


def test_server_down_is_a_model_error():
    with _serve(lambda handler, request: None) as url:
        dead = url  # shut down on leaving the block
    with pytest.raises(ModelError, match="cannot reach"):
        OpenAIChat(dead, "m", timeout=5).chat(MESSAGES)
