"""The chat page in a real browser: Debian's chromium, driven by Playwright (pointed at the system's
browser; Playwright's own browser download is never used). Skipped, saying why, where either is missing.

The server is a real `edgelm serve` app on the tiny GGUF chat model, its decoding slowed so a reply
can be watched and stopped. Hostile replies come from a stub of /v1/chat/completions in the browser.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_fixtures import running

import edgelm
from conftest import fuzz_examples
from edgelm.serve import create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
BROWSER = os.environ.get("EDGELM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (apt-get install chromium)")
KEY = "browser-test-key"
MODELS_LISTED = "() => document.querySelector('#model').options.length > 0"  # a function: the CSP forbids eval
REPLIED = "article.message.assistant:not(.streaming)"  # the last reply has ended
STEP_DELAY_S = 0.03  # per decoded token: a reply of 200 tokens streams for about 6 s


@pytest.fixture(scope="module")
def model(tiny_gguf_256):
    loaded = edgelm.load(tiny_gguf_256, threads=1, parallel=2)
    step = loaded.decoder.step
    loaded.decoder.step = lambda *a, **k: time.sleep(STEP_DELAY_S) or step(*a, **k)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def base_url(model):
    with running(create_app({"tiny": model})) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A page with everything it requested, printed, and every CSP violation or script error."""

    def __init__(self, context, origin: str):
        self.origin = origin
        self.page = context.new_page()
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        self.page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type == "error" or "Content Security Policy" in message.text:
            self.problems.append(f"console {message.type}: {message.text}")

    def open(self) -> Watched:
        self.page.goto(self.origin + "/")
        self.page.wait_for_function(MODELS_LISTED, timeout=15_000)
        return self

    def foreign_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(self.origin + "/")]


@pytest.fixture
def context(browser):
    context = browser.new_context()
    yield context
    context.close()


def artifact_dir(tmp_path: Path) -> Path:
    """Where screenshots go: EDGELM_TEST_ARTIFACTS when set (CI keeps it), else the test's temporary folder."""
    folder = Path(os.environ.get("EDGELM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health").json()["models"]["tiny"]


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


# -- a conversation ------------------------------------------------------------------------------
def test_send_stream_stop_reload_and_regenerate(context, base_url, model, tmp_path):
    watched = Watched(context, base_url).open()
    page = watched.page
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny"]
    page.fill("#temperature", "0")  # greedy: the tiny model's reply is the same every run
    page.fill("#max-tokens", "200")
    page.fill("#input", "tell me a long story")
    page.press("#input", "Enter")

    reply = page.locator("article.message.assistant .body").last
    page.wait_for_function(
        "() => document.querySelector('article.message.assistant .body')?.textContent.length > 0", timeout=15_000)
    assert page.is_visible("#stop") and not page.is_visible("#send")  # still streaming
    streamed = reply.text_content()
    assert health(base_url)["active"] == 1
    page.keyboard.press("Escape")  # Esc stops, as the stop button does
    page.wait_for_selector("article.message.assistant .note:text('stopped')", timeout=5_000)
    wait_for(lambda: health(base_url)["active"] == 0, timeout=3.0)  # the server freed the slot
    decodes = model.decoder.decodes
    time.sleep(0.3)
    assert model.decoder.decodes == decodes  # and decodes nothing more for the stopped reply
    partial = reply.text_content()
    assert partial.startswith(streamed[:1]) and len(partial) >= len(streamed)
    page.screenshot(path=str(artifact_dir(tmp_path) / "chat-page-stopped.png"))

    page.reload()
    page.wait_for_function(MODELS_LISTED)
    assert page.text_content("#chat-list .current .open") == "tell me a long story"
    assert page.text_content("article.message.user .body") == "tell me a long story"
    assert page.text_content("article.message.assistant .body") == partial
    assert page.input_value("#temperature") == "0" and page.input_value("#max-tokens") == "200"

    page.fill("#max-tokens", "6")
    page.dispatch_event("#max-tokens", "change")
    page.click("#regenerate")
    page.wait_for_selector("article.message.assistant .note:text('tokens')", timeout=15_000)
    assert page.locator("article.message.assistant").count() == 1  # the stopped reply was replaced
    note = page.text_content("article.message.assistant .note")
    assert "6 tokens" in note and "cut at the token limit" in note
    page.screenshot(path=str(artifact_dir(tmp_path) / "chat-page.png"))
    assert watched.foreign_requests() == []
    assert watched.problems == []


def test_new_chat_shift_enter_and_delete(context, base_url):
    watched = Watched(context, base_url).open()
    page = watched.page
    page.fill("#max-tokens", "3")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert page.locator("article.message").count() == 0
    page.press("#input", "Enter")
    page.wait_for_selector(REPLIED, timeout=15_000)
    assert page.text_content("article.message.user .body") == "first line\nsecond line"

    page.click("#new-chat")
    assert page.locator("#chat-list li").count() == 2 and page.locator("article.message").count() == 0
    page.fill("#input", "another")
    page.press("#input", "Enter")
    page.wait_for_selector(REPLIED, timeout=15_000)
    titles = page.eval_on_selector_all("#chat-list .open", "bs => bs.map(b => b.textContent)")
    assert titles == ["another", "first line"]

    page.on("dialog", lambda dialog: dialog.accept())  # "Delete ...?"
    page.click("#chat-list li.current .delete")
    assert page.eval_on_selector_all("#chat-list .open", "bs => bs.map(b => b.textContent)") == ["first line"]
    stored = json.loads(page.evaluate("localStorage.getItem('edgelm.chats.v1')"))
    assert [c["title"] for c in stored] == ["first line"]
    assert watched.problems == []


def test_dark_mode_follows_the_system_and_the_toggle(browser, base_url):
    context = browser.new_context(color_scheme="dark")
    try:
        page = Watched(context, base_url).open().page
        background = "getComputedStyle(document.body).backgroundColor"
        dark = page.evaluate(background)
        page.click("#theme")  # to light
        assert page.evaluate("document.documentElement.dataset.theme") == "light"
        light = page.evaluate(background)
        assert dark != light and dark == "rgb(23, 25, 27)"
        page.reload()
        page.wait_for_function(MODELS_LISTED)
        assert page.evaluate(background) == light  # the choice is kept
    finally:
        context.close()


def test_the_toggle_turns_a_light_system_dark_and_back(browser, base_url):
    context = browser.new_context(color_scheme="light")
    try:
        page = Watched(context, base_url).open().page
        background = "getComputedStyle(document.body).backgroundColor"
        assert page.evaluate(background) == "rgb(247, 247, 245)"
        page.click("#theme")  # to dark
        assert page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert page.evaluate(background) == "rgb(23, 25, 27)"
        page.click("#theme")  # back to light
        assert page.evaluate(background) == "rgb(247, 247, 245)"
    finally:
        context.close()


def test_the_key_is_asked_once_and_kept_for_the_tab(context, model):
    with running(create_app({"tiny": model}, api_key=KEY)) as url:
        watched = Watched(context, url)
        page = watched.page
        page.goto(url + "/")
        page.wait_for_selector("#key-dialog[open]", timeout=15_000)  # /v1/models answered 401
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-dialog[open]", timeout=5_000)
        assert "refused" in page.text_content("#key-reason")
        page.fill("#key-input", KEY)
        page.click("#key-save")
        page.wait_for_function(MODELS_LISTED, timeout=5_000)
        page.reload()
        page.wait_for_function(MODELS_LISTED, timeout=5_000)
        assert not page.is_visible("#key-dialog")  # asked once
        assert page.evaluate("sessionStorage.getItem('edgelm.apiKey')") == KEY
        assert page.evaluate("localStorage.getItem('edgelm.apiKey')") is None  # "remember" was not ticked
        # the page's own 401s are expected console errors here; nothing else is
        assert [p for p in watched.problems if "401" not in p] == []


# -- hostile replies and names -------------------------------------------------------------------
HOSTILE_REPLY = "\n".join([
    "Here you go <img src=x onerror=\"window.__pwned='img'\"> and <script>window.__pwned='script'</script>",
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe><svg onload=\"window.__pwned='svg'\"></svg>",
    "[click me](javascript:window.__pwned='link') [data](data:text/html,<b>x</b>) [rel](/v1/models)",
    "![beacon](http://127.0.0.1:9/beacon.png) <img src=\"http://127.0.0.1:9/pixel.gif\">",
    "<a href=\"javascript:alert(1)\">raw link</a> [fine](https://example.com/docs) **bold** `<b>code</b>`",
    "```html",
    "<script>window.__pwned='code'</script>",
    "```",
])


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def stub_reply(page, text: str, model_id: str = "tiny") -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": text[i:i + 40]}, "finish_reason": None}]}
               for i in range(0, len(text), 40)]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]"]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse(*chunks)))


def test_a_hostile_reply_renders_as_text_and_loads_nothing(context, base_url):
    watched = Watched(context, base_url).open()
    page = watched.page
    page.on("dialog", lambda dialog: (watched.dialogs.append(dialog.message), dialog.dismiss()))
    stub_reply(page, HOSTILE_REPLY)
    page.fill("#input", "<img src=x onerror=\"window.__pwned='user'\">")  # the user's own text, too
    page.press("#input", "Enter")
    page.wait_for_selector(REPLIED, timeout=10_000)
    page.wait_for_timeout(300)  # time for anything that would load or run

    assert page.evaluate("window.__pwned") is None and watched.dialogs == []
    messages = page.locator("#messages")
    for tag in ("img", "script", "iframe", "svg", "object", "embed", "style", "form", "input"):
        assert messages.locator(tag).count() == 0, tag
    text = messages.text_content()
    assert "<img src=x onerror=" in text and "<script>window.__pwned='script'</script>" in text
    links = page.eval_on_selector_all("#messages a", "as => as.map(a => [a.getAttribute('href'), a.rel, a.text])")
    # links only to http(s), opened without a referrer; a bare URL inside markup is a link, never a load
    assert links == [["http://127.0.0.1:9/pixel.gif", "noopener noreferrer", "http://127.0.0.1:9/pixel.gif"],
                     ["https://example.com/docs", "noopener noreferrer", "fine"]]
    assert page.text_content("#messages .code pre") == "<script>window.__pwned='code'</script>"
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page.click("#messages .code .copy")
    page.wait_for_selector("#messages .code .copy:text-is('Copied')", timeout=5_000)
    assert page.evaluate("navigator.clipboard.readText()") == "<script>window.__pwned='code'</script>"
    assert page.text_content("#messages strong") == "bold"
    assert not any(":9/" in url for url in watched.requests)  # no beacon
    assert watched.foreign_requests() == []
    assert [p for p in watched.problems if "Content Security Policy" in p] == []


def test_a_hostile_model_name_renders_as_text(context, base_url):
    watched = Watched(context, base_url)
    page = watched.page
    name = "<img src=x onerror=\"window.__pwned='name'\">"
    page.route("**/v1/models", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(
        {"object": "list", "data": [{"id": name, "object": "model", "endpoints": ["/v1/chat/completions"]},
                                    {"id": "embedder", "object": "model", "endpoints": ["/v1/embeddings"]}]})))
    watched.open()
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)") == [name]  # chat only
    stub_reply(page, "ok")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(REPLIED, timeout=10_000)
    assert page.text_content("article.message.assistant .who") == name
    assert page.evaluate("window.__pwned") is None and page.locator("img:not(.brand img)").count() == 0


def test_stored_conversations_from_elsewhere_on_this_origin_render_as_text(context, base_url):
    # any other page served from this host and port shares localStorage: what it wrote is untrusted
    watched = Watched(context, base_url).open()
    page = watched.page
    page.evaluate("""localStorage.setItem('edgelm.chats.v1', JSON.stringify([
        {id: 'x', title: '<img src=x onerror="window.__pwned=1">', messages: [
            {role: 'user', content: '<script>window.__pwned=2</script>'},
            {role: 'assistant', content: '<img src=x onerror="window.__pwned=3">', note: '<b>n</b>'},
            {role: 'system', content: 'dropped: not a role the page keeps'}, 'junk', null]},
        {id: 7, title: 'dropped: bad id', messages: []}, 'junk']));
        localStorage.setItem('edgelm.settings.v1', '{not json');""")
    page.reload()
    page.wait_for_function(MODELS_LISTED)
    assert page.locator("#chat-list li").count() == 1
    assert page.locator("article.message").count() == 2
    assert page.evaluate("window.__pwned") is None and page.locator("#messages img, #chat-list img").count() == 0
    assert page.text_content("article.message.assistant .note") == "<b>n</b>"
    assert watched.problems == []


# -- the renderer on its own ---------------------------------------------------------------------
MARKDOWN_CASES = {
    "# Title\n\nsome *em* and **strong** and ~~gone~~": [("h3", "Title"), ("em", "em"), ("strong", "strong"),
                                                          ("del", "gone")],
    "- a\n- b\n  - nested\n1. one\n2. two": [("ul", None), ("li", "a"), ("ol", None)],
    "> quoted\n> more": [("blockquote", None)],
    "```py\nprint('<b>')\n```": [("pre", "print('<b>')"), ("span", "py")],
    "see https://example.com/x. and [t](http://a.example/) and snake_case_name": [("a", "https://example.com/x"),
                                                                                  ("a", "t")],
}


def render_in_page(page, texts: list[str]) -> list[dict]:
    """Each text rendered by the page's own markdown.js: its elements, attributes, links and text."""
    return page.evaluate("""async (texts) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        return texts.map((text) => {
            const box = document.createElement('div');
            box.append(renderMarkdown(text));
            const elements = [...box.querySelectorAll('*')];
            return {
                tags: elements.map((e) => [e.tagName.toLowerCase(), e.textContent]),
                attributes: [...new Set(elements.flatMap((e) => e.getAttributeNames()))],
                hrefs: elements.filter((e) => e.hasAttribute('href')).map((e) => e.getAttribute('href')),
                text: box.textContent,
            };
        });
    }""", texts)


def test_the_renderer_makes_the_expected_elements(context, base_url):
    page = Watched(context, base_url).open().page
    for (text, expected), rendered in zip(MARKDOWN_CASES.items(), render_in_page(page, list(MARKDOWN_CASES))):
        for tag, content in expected:
            assert any(t == tag and (content is None or c == content) for t, c in rendered["tags"]), (text, tag)
    snake = render_in_page(page, ["snake_case_name and 2 * 3 * 4"])[0]
    assert snake["tags"] == [["p", "snake_case_name and 2 * 3 * 4"]]


ALLOWED_TAGS = {"p", "br", "h3", "h4", "h5", "h6", "hr", "blockquote", "ul", "ol", "li", "a", "strong", "em", "del",
                "code", "pre", "div", "span", "button"}
ALLOWED_ATTRIBUTES = {"href", "rel", "target", "title", "class", "type", "start"}
PIECES = ["<", ">", "img", "script", " src=x", " onerror=alert(1)", "javascript:", "http://h.example/", "https://",
          "data:", "[", "]", "(", ")", "!", "*", "**", "_", "`", "```", "~~", "#", "> ", "- ", "1. ", "\n", "\n\n",
          "\\", "\"", "'", "&lt;", "a", " ", "\t", "vbscript:", "%6a", "&#106;"]


@settings(max_examples=fuzz_examples(10), deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), min_size=20, max_size=20))
def test_any_reply_renders_to_plain_elements_and_http_links_only(browser, base_url, texts):
    context = browser.new_context()
    try:
        page = Watched(context, base_url).open().page
        for text, rendered in zip(texts, render_in_page(page, texts)):
            assert {tag for tag, _ in rendered["tags"]} <= ALLOWED_TAGS, text
            assert set(rendered["attributes"]) <= ALLOWED_ATTRIBUTES, text
            assert all(href.startswith(("http://", "https://")) for href in rendered["hrefs"]), text
            if "img" in text or "script" in text:  # whatever the markup, its characters are all still there
                assert "img" in rendered["text"] or "script" in rendered["text"]
    finally:
        context.close()


def test_pathological_replies_render_quickly(context, base_url):
    # every pattern is bounded: unclosed markers by the thousand stay linear (a few ms here)
    page = Watched(context, base_url).open().page
    cases = ["*a " * 15000, "_a " * 15000, "`a " * 15000, "[a](" * 10000, "# " + " " * 50000 + "x",
             "> " * 20000 + "x", "".join("  " * i + "- a\n" for i in range(300)), "http://a" * 5000,
             "**a _b `c [d](e ~~f " * 3000, "```\n" * 10000, "\n".join(">" * i + " q" for i in range(500))]
    took = page.evaluate("""async (cases) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        return cases.map((text) => { const start = performance.now(); renderMarkdown(text);
                                     return performance.now() - start; });
    }""", cases)
    assert max(took) < 2000, took  # milliseconds; a quadratic pattern takes minutes on these
