"""The chat page at `/` of `edgelm serve`, from the server's side: what it serves, with which headers,
and that no request path reaches any file but the page's own (the browser test is test_chat_page_browser.py).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import running

import edgelm
from conftest import fuzz_examples
from edgelm.serve import create_app
from edgelm.serve.page import CONTENT_SECURITY_POLICY, INDEX, PAGE_PATHS, STATIC_FILES

STATIC = Path(edgelm.__file__).parent / "serve" / "static"
ROOT = Path(__file__).resolve().parent.parent
KEY = "page-test-key"


@pytest.fixture(scope="module")
def model(tiny_gguf_256):
    loaded = edgelm.load(tiny_gguf_256, threads=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def base_url(model):
    with running(create_app({"tiny": model})) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(model):
    with running(create_app({"tiny": model}, api_key=KEY)) as url:
        yield url


def packaged(path: str) -> bytes:
    return (STATIC / (INDEX if path == "/" else path.removeprefix("/static/"))).read_bytes()


def assert_page_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


# -- what is served ------------------------------------------------------------------------------
def test_the_page_and_each_of_its_files_are_served_with_their_type_and_the_security_headers(base_url):
    expected = {"/": "text/html; charset=utf-8"} | {
        f"/static/{name}": kind for name, kind in STATIC_FILES.items()}
    assert set(expected) == set(PAGE_PATHS)
    for path, kind in expected.items():
        response = httpx.get(base_url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == kind
        assert response.content == packaged(path)
        assert_page_headers(response)


def test_the_csp_allows_this_origin_only_and_no_inline_code():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {"default-src": "'none'", "script-src": "'self'", "style-src": "'self'",
                          "connect-src": "'self'", "img-src": "'self'", "frame-ancestors": "'none'",
                          "base-uri": "'none'", "form-action": "'none'"}


def test_the_static_folder_holds_exactly_the_served_files_and_the_wheel_ships_them():
    assert {p.name for p in STATIC.iterdir()} == {INDEX, *STATIC_FILES}
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["edgelm"]
    for name in (INDEX, *STATIC_FILES):
        assert any(fnmatch(f"serve/static/{name}", p) for p in patterns), name


def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_code():
    html = (STATIC / INDEX).read_text()
    assert "<style" not in html and not re.search(r"<[^>]*\sstyle\s*=", html)  # no inline style
    assert not re.search(r"<[^>]*\son\w+\s*=", html)  # no inline event handler
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all(body.strip() == "" and 'src="/static/' in attrs for attrs, body in scripts)
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith("/static/"), url


def test_no_script_writes_markup_or_evaluates_code():
    # the renderer's guarantee rests on never parsing text as HTML or code anywhere in the page
    for name in STATIC_FILES:
        if not name.endswith(".js"):
            continue
        source = (STATIC / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "setAttribute(\"on", "srcdoc", "createContextualFragment", "DOMParser"):
            assert sink not in source, f"{name} uses {sink}"
        assert not re.search(r"fetch\(\s*[\"'`]https?:", source), name


def test_head_and_other_methods(base_url):
    head = httpx.head(base_url + "/")
    assert head.status_code == 200 and head.content == b""
    post = httpx.post(base_url + "/", content=b"{}")
    assert post.status_code == 405 and "POST" in post.json()["error"]["message"]


def test_an_unknown_page_file_is_a_404_in_the_api_error_shape(base_url):
    for path in ("/static/nope.js", "/static/", "/static/index.html", "/index.html", "/static/APP.JS"):
        response = httpx.get(base_url + path)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- the server's checks still apply -------------------------------------------------------------
def test_the_host_check_applies_to_the_page(base_url):
    for path in ("/", "/static/app.js"):
        response = httpx.get(base_url + path, headers={"Host": "attacker.example"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed"
        assert b"<html" not in response.content


def test_the_page_loads_without_the_key_but_the_api_needs_it(keyed_url):
    for path in PAGE_PATHS:
        response = httpx.get(keyed_url + path)
        assert response.status_code == 200, path
        assert_page_headers(response)
    assert httpx.get(keyed_url + "/v1/models").status_code == 401
    assert httpx.get(keyed_url + "/static/nope.js").status_code == 401  # only the page's own files are open
    listed = httpx.get(keyed_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == ["tiny"]
    assert "/v1/chat/completions" in listed.json()["data"][0]["endpoints"]  # how the page tells chat models


# -- no path reaches another file ----------------------------------------------------------------
def raw_get(base_url: str, target: bytes) -> tuple[int, bytes]:
    """GET `target` exactly as given (no client normalises it): the status and the body."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


SEGMENTS = ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%252e%252e", "..%2f", "..%5c", "%2f", "%5c", "\\", "..\\",
            "%00", "\x00", "%c0%ae%c0%ae", "static", "app.js", "index.html", "page.py", "__init__.py", "etc",
            "passwd", "", "~", "%20", ";", "serve", "edgelm", "..;", "%2e", "pyproject.toml"]
SECRETS = [(Path(edgelm.__file__).parent / "serve" / "page.py").read_bytes()[:200], b"root:x:0:0",
           (ROOT / "pyproject.toml").read_bytes()[:200]]


@settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8), under_static=st.booleans(),
       query=st.sampled_from(["", "?x=1", "?../../etc/passwd", "#frag"]))
def test_no_hostile_path_serves_anything_but_a_page_file(base_url, segments, under_static, query):
    target = ("/static/" if under_static else "/") + "/".join(segments) + query
    status, body = raw_get(base_url, target.encode("latin-1"))
    assert status in (200, 400, 404, 405), (target, status)
    if status == 200:
        # only an exact page path after the server's own percent-decoding, answered with that file
        served = {packaged(p) for p in PAGE_PATHS}
        assert body in served, target
    for secret in SECRETS:
        assert secret not in body, target


def test_edgelm_serve_announces_the_page_and_serves_it(tiny_gguf_256):
    process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", str(tiny_gguf_256), "--port", "0",
                                "--threads", "1", "--api-key", KEY], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            if line.startswith("chat page: "):
                url = line.removeprefix("chat page: ").strip()
                break
        assert url and re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        page = httpx.get(url)
        assert page.status_code == 200 and page.content == packaged("/")
        assert_page_headers(page)
        assert httpx.get(url + "v1/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
