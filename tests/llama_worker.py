"""A child process that loads GGUF files through edgelm and runs them, one path per stdin line.

A fault inside llama.cpp is a signal that kills the whole process, so fuzz tests never load a
hostile file in the test process itself: they hand it to this worker and look at how it ended.
Each line in gets one line out: "ok", "refused <one-line EdgelmError>" or "other <type>: <message>"
(an exception that is not an EdgelmError: a bug). A worker that dies answers nothing; `LlamaWorker`
reports its signal. Run as `python tests/llama_worker.py`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

MESSAGES = [{"role": "user", "content": "hello"}]
MARK = "@edgelm-worker@ "  # an answer line; ggml's abort handler may print to stdout too


def run_one(path: str) -> str:
    from edgelm.errors import EdgelmError
    from edgelm.runtime import load

    try:
        with load(path, threads=1, n_ctx=64) as model:
            model.generate("hello world", max_tokens=3, temperature=0)
            model.generate("the cat", max_tokens=2, temperature=0.8, seed=1)
            if getattr(model, "chat_template", ""):
                model.chat(MESSAGES, max_tokens=2, temperature=0)
        return "ok"
    except EdgelmError as err:
        message = str(err)
        return "refused " + (message if "\n" not in message else f"MULTILINE {message!r}")
    except BaseException as err:  # noqa: B036  (the point: report anything that is not an EdgelmError)
        return f"other {type(err).__name__}: {err!r}"[:2000].replace("\n", "\\n")


def main() -> None:
    for line in sys.stdin:
        print(MARK + run_one(line.rstrip("\n")), flush=True)


class LlamaWorker:
    """The parent's end: `check(path)` returns the worker's answer, or "signal N" / "timeout"."""

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GGML_NO_BACKTRACE": "1"}
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1)

    def check(self, path: Path) -> str:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        process = self.process
        process.stdin.write(f"{path}\n")
        process.stdin.flush()
        deadline = time.monotonic() + self.timeout_s
        while True:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                return f"timeout after {self.timeout_s} s"
            line = process.stdout.readline()
            if not line:
                break  # the worker died
            if line.startswith(MARK):
                return line[len(MARK):].strip()
        code = process.wait()
        self.process = None
        return f"signal {-code}" if code < 0 else f"exit {code}"

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


if __name__ == "__main__":
    main()
