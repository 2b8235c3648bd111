"""`edgelm serve`: a real uvicorn server driven by the official `openai` SDK and by raw HTTP.

Models: a tiny GGUF chat model (written with the gguf writer, no torch), the tiny LSTM artifact
and a tiny BERT embedder. Equality with in-process calls is checked greedily; the LSTM carries
the concurrency check because its decoder starts every prompt from a zero state, so an output
cannot depend on what ran before it (llama.cpp reuses a cached prompt prefix, which moves logits
by rounding).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from serve_fixtures import running, slowed
from test_bert import write_tiny_bert
from test_llama_runtime import write_tiny_gguf

import edgelm
from conftest import export_to
from edgelm.cli import main
from edgelm.serve import create_app
from edgelm.serve.errors import ApiError
from edgelm.serve.worker import Job, ModelWorker

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on the mat"}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny-chat.gguf")


@pytest.fixture(scope="module")
def embed_artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-bert")
    return export_to(write_tiny_bert(root / "src", "base"), root / "minibert", task="embed")


@pytest.fixture(scope="module")
def models(gguf_path, lstm_artifact, embed_artifact):
    loaded = {"chat": edgelm.load(gguf_path, threads=1), "lstm": edgelm.load(lstm_artifact, threads=1),
              "embed": edgelm.load(embed_artifact, threads=1)}
    yield loaded
    for model in loaded.values():
        model.close()


@pytest.fixture(scope="module")
def base_url(models):
    with running(create_app(models)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def post(base_url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base_url}{path}", content=data, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# -- every endpoint ---------------------------------------------------------------------------
def test_models_health_and_retrieve(client, base_url):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["chat", "lstm", "embed"]
    assert client.models.retrieve("embed").id == "embed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("../../etc/passwd")
    health = httpx.get(f"{base_url}/health").json()
    # text generators are served through their scheduler (one slot each here), encoders by a worker
    idle = {"active": 0, "queued": 0}
    expected = {m: {**idle, "slots": 1, "cached_tokens": 0} if m in ("chat", "lstm") else idle for m in ids}
    assert health == {"status": "ok", "models": expected}


def test_chat_streamed_text_equals_whole_and_in_process(client, models):
    whole = client.chat.completions.create(model="chat", messages=CHAT, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    expected = models["chat"].chat_complete(CHAT, **GREEDY)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == {"eos": "stop"}.get(expected.finish_reason, expected.finish_reason)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected.prompt_tokens,
                                                                           expected.completion_tokens)
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_equal_in_process_generate(client, models):
    for prompt in ("The ", "class A:"):
        whole = client.completions.create(model="lstm", prompt=prompt, **GREEDY)
        assert whole.choices[0].text == models["lstm"].generate(prompt, **GREEDY)
        streamed = client.completions.create(model="lstm", prompt=prompt, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    chat_model = client.completions.create(model="chat", prompt="the cat", **GREEDY)  # a chat model completes too
    assert chat_model.choices[0].text == models["chat"].generate("the cat", **GREEDY)


def test_edgelm_sampling_fields_and_stop(client, models):
    params = dict(max_tokens=20, temperature=0.9, seed=3, top_k=5, min_p=0.05, repetition_penalty=1.2)
    served = client.completions.create(model="lstm", prompt="The ", stop=["e"],
                                       extra_body={k: params[k] for k in ("top_k", "min_p", "repetition_penalty")},
                                       **{k: params[k] for k in ("max_tokens", "temperature", "seed")})
    assert served.choices[0].text == models["lstm"].generate("The ", stop=["e"], **params)
    assert "e" not in served.choices[0].text


def test_embeddings_equal_in_process_embed(client, models):
    texts = ["the cat sat", "a dog runs over the red house"]
    expected = models["embed"].embed(texts)
    as_floats = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in as_floats.data], np.float32), expected)
    as_base64 = client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64 and decodes it
    np.testing.assert_array_equal(np.array([d.embedding for d in as_base64.data], np.float32), expected)
    one = client.embeddings.create(model="embed", input="the cat sat", encoding_format="float")
    np.testing.assert_array_equal(np.array(one.data[0].embedding, np.float32), expected[0])
    assert as_floats.usage.prompt_tokens > 0


def test_embeddings_base64_is_little_endian_float32(base_url, models):
    data = post(base_url, "/v1/embeddings", {"model": "embed", "input": "the cat", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(data.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vector, models["embed"].embed("the cat")[0])


def test_tokenize_and_detokenize(base_url, models):
    tokens = post(base_url, "/tokenize", {"model": "chat", "content": "hello world"}).json()["tokens"]
    assert tokens == models["chat"].tokenizer.encode("hello world", add_special_tokens=False).ids
    with_bos = post(base_url, "/tokenize", {"model": "chat", "content": "hello world", "add_special": True})
    assert with_bos.json()["tokens"] == models["chat"].encode("hello world")
    text = post(base_url, "/detokenize", {"model": "chat", "tokens": tokens}).json()["content"]
    assert text.strip() == "hello world"
    assert_error(post(base_url, "/detokenize", {"model": "chat", "tokens": [10**6]}), 400, "outside the vocabulary")
    assert_error(post(base_url, "/tokenize", {"content": "x"}), 400, "'model' is required")


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"model": "lstm", "prompt": "a", "temperature": -1}, 400, ["temperature"]),
    ({"model": "lstm", "prompt": "a", "n": 2}, 400, ["'n'"]),
    ({"model": "lstm", "prompt": "a", "logprobs": 3}, 400, ["'logprobs'"]),
    ({"model": "lstm", "prompt": "a", "logit_bias": {"5": 1}}, 400, ["'logit_bias'"]),
    ({"model": "lstm", "prompt": "a", "bogus": 1}, 400, ["bogus"]),
    ({"model": "lstm", "prompt": "a", "max_tokens": True}, 400, ["max_tokens", "integer"]),
    ({"model": "lstm", "prompt": "a", "temperature": "0.5"}, 400, ["temperature", "number"]),
    ({"model": "lstm", "prompt": "a", "stop": ""}, 400, ["stop"]),
    ({"model": "lstm", "prompt": "a", "stream_options": {"include_usage": True}}, 400, ["stream_options"]),
    ({"model": "lstm"}, 400, ["'prompt' is required"]),
    ({"model": "nope", "prompt": "a"}, 404, ['"nope"']),
    ({"model": "embed", "prompt": "a"}, 400, ["embed model", "/v1/embeddings"]),
])
def test_bad_completion_requests(base_url, body, status, words):
    assert_error(post(base_url, "/v1/completions", body), status, *words)


def test_bad_bodies(base_url):
    assert_error(post(base_url, "/v1/completions", b'{"model": "lstm", "prompt": "a", "temperature": NaN}'), 400,
                 "NaN")
    assert_error(post(base_url, "/v1/completions", b'{"model": "lstm", "prompt": "a", "top_p": 1e999}'), 400)
    assert_error(post(base_url, "/v1/completions", b'["model"]'), 400, "JSON object")
    assert_error(post(base_url, "/v1/completions", b"{" * 50_000), 400)
    assert_error(post(base_url, "/v1/completions", b'{"model": "lstm", "prompt": "\\ud800"}'), 400, "surrogate")
    plain = httpx.post(f"{base_url}/v1/completions", content=b'{"model": "lstm", "prompt": "a"}',
                       headers={"content-type": "text/plain"})
    assert_error(plain, 415, "application/json")
    assert_error(httpx.get(f"{base_url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{base_url}/v1/completions"), 405)


def test_oversized_body_is_413_before_it_is_read(base_url):
    host = urlparse(base_url)
    connection = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(64 * 1024 * 1024))
    connection.endheaders()
    connection.send(b'{"model": "lstm", "prompt": "')  # the rest never comes
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]["message"]
    connection.close()
    chunked = httpx.post(f"{base_url}/v1/completions", content=iter([b"x" * 1024 * 1024] * 5),
                         headers={"content-type": "application/json"})  # no length given: counted while read
    assert_error(chunked, 413, "limit")


def raw_exchange(base_url: str, data: bytes) -> bytes:
    address = urlparse(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_malformed_http_is_a_json_400(base_url):
    for data in (b"GARBAGE\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}",
                 b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"):
        head, _, body = raw_exchange(base_url, data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert json.loads(body)["error"]["code"] == "bad_http_request"
    assert httpx.get(f"{base_url}/health").status_code == 200

def test_a_body_that_trickles_in_is_cut_off_with_408(base_url, monkeypatch):
    import edgelm.serve.http

    monkeypatch.setattr(edgelm.serve.http, "BODY_TIMEOUT_S", 0.5)
    address = urlparse(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", "1000")
    connection.endheaders()
    connection.send(b'{"model": ')  # and nothing more
    response = connection.getresponse()
    assert response.status == 408 and json.loads(response.read())["error"]["code"] == "request_timeout"
    connection.close()

def test_prompt_over_the_context_names_both_numbers(client, base_url):
    long_prompt = "the cat sat on the mat " * 40
    for stream in (False, True):
        response = post(base_url, "/v1/completions", {"model": "chat", "prompt": long_prompt, "max_tokens": 8,
                                                      "stream": stream})
        error = assert_error(response, 400, "exceeds the context length 128", "max_tokens 8")
        assert error["code"] == "context_length_exceeded"
    truncated = client.completions.create(model="chat", prompt=long_prompt, max_tokens=8, temperature=0,
                                          extra_body={"truncate": True})
    assert truncated.usage.prompt_tokens == 120 and truncated.usage.model_extra["truncated_prompt_tokens"] > 0


def test_chat_on_a_model_without_template_is_400(base_url):
    error = assert_error(post(base_url, "/v1/chat/completions", {"model": "lstm", "messages": CHAT}), 400,
                         "no chat template", '"lstm"')
    assert error["param"] == "model"
    bad_role = {"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}
    assert_error(post(base_url, "/v1/chat/completions", bad_role), 400, "messages[0].role")
    image = {"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert_error(post(base_url, "/v1/chat/completions", image), 400, "messages[0].content[0]")
    json_mode = {"model": "chat", "messages": CHAT, "response_format": {"type": "xml"}}
    assert_error(post(base_url, "/v1/chat/completions", json_mode), 400, "response_format.type")
    no_tools = {"model": "chat", "messages": CHAT, "tool_choice": "auto"}
    assert_error(post(base_url, "/v1/chat/completions", no_tools), 400, "'tool_choice' needs 'tools'")


def test_text_parts_are_joined_like_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat sat on the mat"}]}]
    as_parts = client.chat.completions.create(model="chat", messages=parts, **GREEDY)
    as_string = client.chat.completions.create(model="chat", messages=[CHAT[1]], **GREEDY)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


# -- constrained output -----------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}}, "required": ["a"],
          "additionalProperties": False}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}]


def test_response_format_json_schema_matches_in_process(client, models):
    fmt = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model="chat", messages=CHAT, response_format=fmt, max_tokens=40,
                                           temperature=0)
    expected = models["chat"].chat_complete(CHAT, json_schema=SCHEMA, max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "stop"
    assert set(json.loads(expected.text)) == {"a"}
    as_object = client.chat.completions.create(model="chat", messages=CHAT, response_format={"type": "json_object"},
                                               max_tokens=40, temperature=0)
    text = as_object.choices[0].message.content
    assert text == models["chat"].chat(CHAT, json_object=True, max_tokens=40, temperature=0) and text.startswith("{")
    completed = client.completions.create(model="lstm", prompt="The ", max_tokens=40, temperature=0,
                                          extra_body={"response_format": fmt})
    assert completed.choices[0].text == models["lstm"].generate("The ", json_schema=SCHEMA, max_tokens=40,
                                                                temperature=0)


def test_tool_calls_whole_and_streamed(client):
    whole = client.chat.completions.create(model="chat", messages=CHAT, tools=WEATHER, tool_choice="required",
                                           max_tokens=90, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, tools=WEATHER, tool_choice="required",
                                                 max_tokens=90, temperature=0, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [("get_weather", call.function.arguments)]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    answered = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    after = client.chat.completions.create(model="chat", messages=answered, tools=WEATHER, tool_choice="none",
                                           max_tokens=5, temperature=0)
    assert after.choices[0].message.tool_calls is None and after.choices[0].message.content

# -- security -----------------------------------------------------------------------------------
def test_host_header_key_and_cors(models, gguf_path):
    guarded = create_app({"chat": edgelm.load(gguf_path, threads=1)}, api_key="s3cret",
                         cors_origins=["http://localhost:3000"])
    with running(guarded) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # open without the key
        assert_error(httpx.get(f"{url}/v1/models"), 401, "API key")
        assert_error(httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(f"{url}/v1/models", headers={"authorization": "s3cret"}), 401)
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["chat"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="s3cre", max_retries=0).models.list()
        for host in ("evil.example", "127.0.0.1.nip.io", "localhost.evil.example:80", "0.0.0.0", "", "2130706433",
                     "localhost:80:80", "[::1", "localhost:http"):
            assert_error(httpx.get(f"{url}/health", headers={"host": host}), 403, "localhost")
        for host in ("localhost", "LocalHost:1234", "localhost.", "127.0.0.1", "127.5.6.7:80", "[::1]:9",
                     "[::ffff:127.0.0.1]"):
            assert httpx.get(f"{url}/health", headers={"host": host}).status_code == 200
        allowed = httpx.get(f"{url}/health", headers={"origin": "http://localhost:3000"})
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(f"{url}/health", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST"})
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"]
        refused = httpx.options(f"{url}/v1/chat/completions", headers={
            "origin": "http://evil.example", "access-control-request-method": "POST"})
        assert_error(refused, 403)
        assert "access-control-allow-origin" not in refused.headers


def test_no_cors_headers_by_default(base_url):
    response = httpx.get(f"{base_url}/v1/models", headers={"origin": "http://localhost:3000"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_remote_bind_needs_a_key_or_an_explicit_flag(gguf_path):
    result = CliRunner().invoke(main, ["serve", str(gguf_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["serve", str(gguf_path), "--name", "oops"])
    assert result.exit_code == 2 and "NAME=ARTIFACT" in result.output


# -- concurrency, cancellation, the queue -------------------------------------------------------
def test_eight_streaming_clients_get_what_each_would_get_alone(client):
    prompts = ["The ", "class ", "def f(", "import ", "Lists ", "A dict", "return ", "The default"]
    params = dict(max_tokens=24, temperature=0.8)

    def run(i: int, seed: int) -> str:
        stream = client.completions.create(model="lstm", prompt=prompts[i], seed=seed, stream=True, **params)
        return "".join(c.choices[0].text for c in stream)

    def chat(i: int) -> str:
        reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": prompts[i]}],
                                               stream=True, max_tokens=8, temperature=0)
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)

    alone = {(i, s): run(i, s) for i in range(8) for s in range(3)}
    with ThreadPoolExecutor(16) as pool:
        together = {(i, s): pool.submit(run, i, s) for i in range(8) for s in range(3)}
        chats = [pool.submit(chat, i) for i in range(8)]  # another model at the same time
        assert {k: f.result() for k, f in together.items()} == alone
        assert all(isinstance(c.result(), str) for c in chats)


def read_events(response: http.client.HTTPResponse, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = response.readline().decode().strip()
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def stream_request(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"content-type": "application/json"})
    return connection, connection.getresponse()


def wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_client_that_leaves_stops_its_generation(gguf_path):
    slow = slowed(edgelm.load(gguf_path, threads=1), delay=0.02)
    with running(create_app({"slow": slow})) as url:
        connection, response = stream_request(url, {"model": "slow", "prompt": "the cat", "max_tokens": 100,
                                                    "temperature": 0})
        assert response.status == 200
        read_events(response, 2)
        health = lambda: httpx.get(f"{url}/health").json()["models"]["slow"]  # noqa: E731
        assert health()["active"] == 1  # /health answers while the model is busy
        connection.close()
        wait_for(lambda: health()["active"] == 0, timeout=1.0)
        steps = slow.decoder.steps
        time.sleep(0.2)
        assert slow.decoder.steps == steps < 50  # nothing more was decoded
        again = post(url, "/v1/completions", {"model": "slow", "prompt": "the cat", "max_tokens": 3,
                                              "temperature": 0})
        assert again.json()["choices"][0]["text"] == slow.generate("the cat", max_tokens=3, temperature=0)
    slow.close()


def test_a_full_queue_answers_503_and_health_does_not_wait(gguf_path):
    slow = slowed(edgelm.load(gguf_path, threads=1), delay=0.05)
    with running(create_app({"slow": slow}, max_queue=1)) as url:
        body = {"model": "slow", "prompt": "the cat", "max_tokens": 100, "temperature": 0}
        running_one = stream_request(url, body)
        assert running_one[1].status == 200
        waiting = threading.Thread(target=lambda: post(url, "/v1/completions", {**body, "max_tokens": 2}))
        waiting.start()
        health = lambda: httpx.get(f"{url}/health").json()["models"]["slow"]  # noqa: E731
        wait_for(lambda: health()["active"] == 1 and health()["queued"] == 1, timeout=2.0)
        started = time.monotonic()
        full = post(url, "/v1/completions", body)
        assert time.monotonic() - started < 1.0
        assert_error(full, 503, "waiting")
        assert full.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/v1/models").status_code == 200
        running_one[0].close()
        waiting.join(10)
        wait_for(lambda: health()["active"] == 0 and health()["queued"] == 0, timeout=2.0)
    slow.close()


def test_shutting_down_stops_a_running_generation(gguf_path):
    slow = slowed(edgelm.load(gguf_path, threads=1), delay=0.05)
    app = create_app({"slow": slow})
    with running(app) as url:  # leaving it shuts uvicorn down (2 s of grace), then the app
        connection, response = stream_request(url, {"model": "slow", "prompt": "the cat", "max_tokens": 120,
                                                    "temperature": 0})
        read_events(response, 2)
    worker = app.models["slow"].worker
    assert not worker.jobs and worker.health()["active"] == 0  # every request's thread has ended
    assert slow.decoder.steps < 100  # 120 tokens would take 6 s
    connection.close()
    slow.close()

def test_the_encoder_worker_queues_refuses_drops_and_stops():
    """An encoder's worker (every text generator has a scheduler instead): one call runs, max_queue
    wait, the next is a 503; a cancelled waiting call leaves the queue; stopping drops the rest."""
    async def scenario() -> None:
        release = threading.Event()
        worker = ModelWorker("enc", max_queue=1)
        ran = []
        blocking = Job(lambda job: release.wait(5) and ran.append("first"))
        waiting = Job(lambda job: ran.append("waiting"))
        worker.submit(blocking)
        wait_for(lambda: worker.health() == {"active": 1, "queued": 0}, timeout=2.0)
        worker.submit(waiting)
        with pytest.raises(ApiError) as full:
            worker.submit(Job(lambda job: None))
        assert full.value.status == 503
        worker.cancel(waiting)
        assert waiting.state == "dropped" and worker.health()["queued"] == 0
        last = Job(lambda job: ran.append("last"))
        worker.submit(last)
        release.set()
        wait_for(lambda: ran == ["first", "last"], timeout=2.0)
        running_job = Job(lambda job: job.cancelled.wait(5))  # ends once stop() flags it
        worker.submit(running_job)
        wait_for(lambda: worker.health()["active"] == 1, timeout=2.0)
        dropped = Job(lambda job: ran.append("dropped"))
        worker.submit(dropped)
        started = time.monotonic()
        assert worker.stop(timeout=5.0) and time.monotonic() - started < 2.0
        assert running_job.cancelled.is_set() and dropped.state == "dropped" and "dropped" not in ran
        kind, error = await dropped.next_event()
        assert kind == "error" and error.status == 503
        with pytest.raises(ApiError):
            worker.submit(Job(lambda job: None))

    asyncio.run(scenario())


def test_cli_serves_until_interrupted(gguf_path, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", str(gguf_path), "--port", "0",
                                "--threads", "1", "--name", f"tiny={gguf_path}"],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            if "base URL" in line:
                url = line.split("base URL: ")[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:")
        listed = openai.OpenAI(base_url=url, api_key="x", max_retries=0).models.list()
        assert [m.id for m in listed.data] == ["tiny"]
    finally:
        process.send_signal(2)  # Ctrl-C: uvicorn shuts down, closes the models, and exits as interrupted
        assert process.wait(15) == 130
    rest = process.stderr.read()
    assert "Traceback" not in rest and rest.strip().endswith("interrupted")


def test_serving_imports_no_torch_and_the_runtime_no_server(gguf_path):
    code = ("import sys, edgelm; assert 'starlette' not in sys.modules and 'uvicorn' not in sys.modules; "
            "from edgelm.serve import create_app; create_app([sys.argv[1]], threads=1); "
            "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code, str(gguf_path)], check=True, timeout=60)


def test_generators_get_their_constraint_vocabulary_at_load(models, base_url):
    from edgelm.runtime.core.constraint_vocab import _CACHE

    assert models["chat"] in _CACHE and models["lstm"] in _CACHE  # built by create_app, not by the first request
    assert models["embed"] not in _CACHE


# -- GGUF through the scheduler (parallel slots) ------------------------------------------------
@pytest.fixture(scope="module")
def scheduled_url(gguf_path):
    model = edgelm.load(gguf_path, threads=1, parallel=4)
    with running(create_app({"chat": model})) as url:
        yield url, model
    model.close()


def test_four_concurrent_streams_on_a_scheduled_model_each_equal_their_solo_answer(scheduled_url, models,
                                                                                  monkeypatch):
    url, model = scheduled_url
    step = model.decoder.step
    # a step as slow as a real model's, so the four requests overlap instead of finishing one by one
    monkeypatch.setattr(model.decoder, "step", lambda *a, **k: time.sleep(0.01) or step(*a, **k))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    talks = [[{"role": "user", "content": f"tell me about item {i}"}] for i in range(4)]

    def chat(i: int) -> str:
        reply = client.chat.completions.create(model="chat", messages=talks[i], stream=True, max_tokens=24,
                                               temperature=0.8, seed=i)
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)

    alone = [models["chat"].chat(talks[i], max_tokens=24, temperature=0.8, seed=i) for i in range(4)]
    decodes = model.decoder.decodes
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(chat, range(4))) == alone
    assert model.decoder.decodes - decodes < 4 * 24  # the four shared steps
    health = httpx.get(f"{url}/health").json()["models"]["chat"]
    assert health["slots"] == 4 and health["active"] == health["queued"] == 0 and health["cached_tokens"] > 0


def test_a_client_that_leaves_frees_its_slot_on_a_scheduled_model(scheduled_url, monkeypatch):
    url, model = scheduled_url
    step = model.decoder.step
    monkeypatch.setattr(model.decoder, "step", lambda *a, **k: time.sleep(0.02) or step(*a, **k))  # watchable
    health = lambda: httpx.get(f"{url}/health").json()["models"]["chat"]  # noqa: E731
    connection, response = stream_request(url, {"model": "chat", "prompt": "the cat", "max_tokens": 100,
                                                "temperature": 0.8, "seed": 3, "stop": []})
    assert response.status == 200
    read_events(response, 2)
    assert health()["active"] == 1
    connection.close()
    wait_for(lambda: health()["active"] == 0, timeout=2.0)
    decodes = model.decoder.decodes
    time.sleep(0.2)
    assert model.decoder.decodes == decodes < 50  # nothing more was decoded


def test_cli_serve_takes_parallel(gguf_path):
    result = CliRunner().invoke(main, ["serve", str(gguf_path), "--parallel", "0"])
    assert result.exit_code == 2 and "--parallel" in result.output
