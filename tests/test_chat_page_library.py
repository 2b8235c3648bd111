"""The laptop user's path, end to end in a real browser: `edgelm add` a tiny chat model and the
real SmolLM2-135M-Instruct, run `edgelm serve` with no arguments (the whole library), and chat
with SmolLM2 by name on the page. Skipped, saying why, without chromium or the real model.

EDGELM_CHAT_SCREENSHOT=PATH keeps the page's screenshot there (the README's docs/chat-page.png
comes from this test).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
from smollm2 import smollm2_path
from test_chat_page_browser import BROWSER, MODELS_LISTED, REPLIED, Watched

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (apt-get install chromium)")
QUESTION = "What is the capital of France?"
# with SmolLM2's own default system prompt its greedy answer to QUESTION wanders off (a 135M model);
# with this one it answers in one sentence and ends its turn
SYSTEM = "You are a helpful assistant."


def edgelm(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def library_server(tmp_path, tiny_gguf_256):
    env = {**os.environ, "EDGELM_HOME": str(tmp_path / "home")}
    for path, name in ((tiny_gguf_256, "tiny"), (smollm2_path(), "smollm2")):
        added = edgelm("add", str(path), "--name", name, env=env)
        assert added.returncode == 0, added.stderr
    listed = edgelm("list", env=env).stdout
    assert re.search(r"^smollm2\s", listed, re.M) and re.search(r"^tiny\s", listed, re.M), listed
    process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", "--port", "0", "--threads", "2"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            if line.startswith("chat page: "):
                url = line.removeprefix("chat page: ").strip().rstrip("/")
                break
        assert url, "edgelm serve printed no chat page address"
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_serve_with_no_arguments_chats_with_a_library_model_by_name(library_server, tmp_path):
    models = {m["id"] for m in httpx.get(f"{library_server}/v1/models").json()["data"]}
    assert models == {"tiny", "smollm2"}  # the whole library, under its names
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 720})
            watched = Watched(context, library_server).open()
            page = watched.page
            page.wait_for_function(MODELS_LISTED)
            assert sorted(page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")) == \
                ["smollm2", "tiny"]
            page.select_option("#model", "smollm2")
            page.fill("#system", SYSTEM)
            page.fill("#temperature", "0")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            page.wait_for_selector(REPLIED, timeout=120_000)
            reply = page.text_content("article.message.assistant .body")
            page.screenshot(path=os.environ.get("EDGELM_CHAT_SCREENSHOT") or str(tmp_path / "chat-page.png"))
        finally:
            browser.close()
    assert "Paris" in reply, reply  # the real model answers, through the page, by name
    assert watched.foreign_requests() == [] and watched.problems == []
