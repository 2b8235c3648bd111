"""`edgelm chat` as a chat: Ctrl-C stops a reply and keeps the conversation, Ctrl-C at the prompt
quits, replies run to the end of the turn or of the context, /save, --resume and /stats."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, invoke

LONG = "a{4000}"  # the constraint makes the tiny random model write 4000 tokens (about two seconds)


@pytest.fixture(scope="module")
def long_context_gguf(tmp_path_factory) -> Path:
    from test_llama_runtime import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "ctx4k.gguf", context=4096)


@pytest.fixture(scope="module")
def short_context_gguf(tmp_path_factory) -> Path:
    from test_llama_runtime import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "ctx128.gguf", context=128)


class Pipe:
    """Everything a child writes on one stream, collected by a thread, so a test can wait for text."""

    def __init__(self, stream):
        self.chunks: queue.Queue[bytes] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            self.chunks.put(chunk)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            try:
                self.text += self.chunks.get(timeout=max(0.0, deadline - time.monotonic())).decode(errors="replace")
            except queue.Empty:
                raise AssertionError(f"timed out; so far: {self.text[-500:]!r}") from None
        return self.text


def start_chat(gguf: Path, *flags) -> tuple[subprocess.Popen, Pipe, Pipe]:
    child = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "chat", str(gguf), "--threads", "1",
                              "--temperature", "0", *map(str, flags)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return child, Pipe(child.stdout), Pipe(child.stderr)


def quit_with_ctrl_c(interrupt, exit_code, timeout: float = 30.0) -> int:
    """Ctrl-C at the prompt, pressed again each second as a person would until the chat exits.

    The prompt is printed just before the blocking read starts; a SIGINT landing in that gap
    is only acted on when the read returns (CPython checks signals between reads), so one press
    right at the prompt can go unseen. A person's press comes long after; a test's may not."""
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while time.monotonic() < deadline:
        interrupt(signal.SIGINT)
        for _ in range(20):
            code = exit_code()
            if code is not None:
                return code
            time.sleep(0.05)
    raise AssertionError("the chat did not quit on Ctrl-C at the prompt")


def say(child: subprocess.Popen, line: str) -> None:
    child.stdin.write(line.encode() + b"\n")
    child.stdin.flush()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_the_reply_keeps_the_conversation_and_a_second_at_the_prompt_quits(long_context_gguf,
                                                                                         tmp_path):
    child, out, err = start_chat(long_context_gguf, "--regex", LONG)
    try:
        out.wait_for(lambda t: t.endswith("> "))
        say(child, "hi")
        out.wait_for(lambda t: "a" in t.partition("> ")[2])  # the reply is streaming
        child.send_signal(signal.SIGINT)
        err.wait_for(lambda t: "(reply stopped; what was written is kept)" in t)
        out.wait_for(lambda t: t.count("> ") == 2)  # back at the prompt, still running
        saved = tmp_path / "talk.json"
        say(child, f"/save {saved}")
        err.wait_for(lambda t: "(saved 2 messages" in t)
        out.wait_for(lambda t: t.count("> ") == 3)
        assert quit_with_ctrl_c(child.send_signal, child.poll) == 0  # at the prompt: quit
    finally:
        child.kill()
        child.wait()
    talk = json.loads(saved.read_text())
    assert [m["role"] for m in talk] == ["user", "assistant"] and talk[0]["content"] == "hi"
    partial = talk[1]["content"]
    assert partial and set(partial) == {"a"} and len(partial) < 4000  # stopped well before the end
    assert "interrupted" not in err.text and "Traceback" not in err.text


def test_a_reply_runs_past_128_tokens_without_a_cap_and_stops_at_a_full_context(short_context_gguf):
    result = invoke("chat", short_context_gguf, "--threads", 1, "--temperature", 0, "--regex", "a{1000}",
                    input="hi\n/stats\nhi again\n")
    assert result.exit_code == 0, result.output
    assert "(reply cut: the context of 128 tokens is full; /reset starts over)" in result.stderr
    assert "--max-tokens" not in result.stderr
    replies = [line.removeprefix("> ") for line in result.stdout.split("\n") if "aaa" in line]
    assert len(replies) == 2 and len(replies[0]) > 100  # the whole context's room, not a default cap
    assert "dropped the 2 oldest messages" in result.stderr  # the second turn needed the room
    assert "tokens, " in result.stderr and "tok/s" in result.stderr  # /stats after the second reply


def test_max_tokens_still_caps_a_reply(short_context_gguf):
    result = invoke("chat", short_context_gguf, "--threads", 1, "--temperature", 0, "--regex", "a{1000}",
                    "--max-tokens", 5, input="hi\n")
    assert result.exit_code == 0 and "(reply cut at --max-tokens 5)" in result.stderr
    assert "aaaaa" in result.stdout and "aaaaaa" not in result.stdout


def test_save_then_resume_continues_the_conversation(long_context_gguf, tmp_path):
    saved = tmp_path / "talk.json"
    first = invoke("chat", long_context_gguf, "--threads", 1, "--temperature", 0, "--max-tokens", 4,
                   "--system", "Be brief.", input=f"hello\n/save {saved}\n")
    assert first.exit_code == 0, first.output
    talk = json.loads(saved.read_text())
    assert [m["role"] for m in talk] == ["system", "user", "assistant"] and talk[0]["content"] == "Be brief."
    again = invoke("chat", long_context_gguf, "--threads", 1, "--temperature", 0, "--max-tokens", 4,
                   "--resume", saved, input=f"more\n/save {saved}\n")
    assert again.exit_code == 0 and "(resumed 3 messages" in again.stderr
    assert [m["content"] for m in json.loads(saved.read_text())][:4] == ["Be brief.", "hello", talk[2]["content"],
                                                                          "more"]
    replaced = invoke("chat", long_context_gguf, "--threads", 1, "--max-tokens", 2, "--resume", saved,
                      "--system", "Be long.", input=f"/save {saved}\n")
    assert replaced.exit_code == 0 and json.loads(saved.read_text())[0]["content"] == "Be long."


def test_save_before_any_message_writes_nothing_resume_would_refuse(long_context_gguf, tmp_path):
    result = invoke("chat", long_context_gguf, "--threads", 1, input=f"/save {tmp_path / 'talk.json'}\n")
    assert result.exit_code == 0 and "(nothing to save yet)" in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content, fragment", [
    (b"[1, 2]", "message 0 is not an object"),
    (b'[{"role": "wizard", "content": "x"}]', "has role 'wizard'"),
    (b'[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]', "only the first"),
    (b'[{"role": "user", "content": 5}]', "no 'content' string"),
    (b"[]", "non-empty JSON list"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b"[" * 50_000, "not a JSON conversation"),
])
def test_a_hostile_conversation_file_is_one_line(long_context_gguf, tmp_path, content, fragment):
    path = tmp_path / "talk.json"
    path.write_bytes(content)
    assert_one_line_error(invoke("chat", long_context_gguf, "--resume", path, input="/exit\n"), 1, fragment)


@pytest.mark.parametrize("name", ["no/such.json", "a\x00b.json"])  # a missing folder; a NUL piped in
def test_save_to_a_path_that_cannot_be_is_one_line_and_the_chat_goes_on(long_context_gguf, tmp_path, name):
    result = invoke("chat", long_context_gguf, "--threads", 1, "--max-tokens", 2, "--system", "Be brief.",
                    input=f"/save {tmp_path / name}\n/stats\n")
    assert result.exit_code == 0 and "error: cannot save to" in result.stderr, result.output
    assert "(speed of each reply shown)" in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
def test_ctrl_c_typed_in_a_terminal_stops_the_reply_then_quits_at_the_prompt(long_context_gguf):
    """The same through a pseudo-terminal: click's prompt with line editing, and ^C as the terminal sends it."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on the terminal's side
        os.execv(sys.executable, [sys.executable, "-m", "edgelm.cli", "chat", str(long_context_gguf), "--threads",
                                  "1", "--temperature", "0", "--regex", LONG])
    seen = b""

    def read_until(predicate, timeout: float = 60.0) -> bytes:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not predicate(seen):
            assert time.monotonic() < deadline, f"timed out; so far: {seen[-400:]!r}"
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 4096)
        return seen

    try:
        read_until(lambda b: b.rstrip().endswith(b">"))
        os.write(fd, b"hi\r")
        read_until(lambda b: b"aaa" in b.partition(b"hi")[2])  # echoed, then the reply streams
        os.write(fd, b"\x03")
        read_until(lambda b: b"(reply stopped; what was written is kept)" in b)
        read_until(lambda b: b.rstrip().endswith(b">"))

        def exit_code() -> int | None:
            nonlocal pid
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                return None
            pid = 0
            return os.waitstatus_to_exitcode(status)

        assert quit_with_ctrl_c(lambda _: os.write(fd, b"\x03"), exit_code) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert b"Traceback" not in seen and b"interrupted" not in seen
