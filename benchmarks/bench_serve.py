"""Serving speed: `edgelm serve` against in-process streaming, and against llama-cpp-python's server.

1. Overhead, one client: time to first token and decode tokens/s of a streamed /v1/completions
   request through `edgelm serve`, against `model.stream()` in-process on the same GGUF file and
   thread count (targets: at most 10 ms added to the first token, at most 5% off decode speed).
   The two alternate, order swapped every repetition; medians are shown.
2. Aggregate tokens/s with 1, 4 and 8 concurrent clients (non-streamed greedy requests, distinct
   prompts), `edgelm serve` against `python -m llama_cpp.server` on the same file (targets: at
   least equal at 1 client, at least 2x at 4 where batching decode steps pays).

3. `--compare-parallel`: aggregate tokens/s and time to first token of STREAMED requests at
   1 and 4 clients (`--clients`), `edgelm serve --parallel 1` (one slot: requests take turns)
   against `--parallel 4` (the scheduler steps the four sequences together), side by side; with
   `--llama-server BIN`, also llama.cpp's own server with 4 slots (`-np 4`) on the same file.
   llama-cpp-python's sdist vendors llama.cpp: `pip download --no-binary :all: --no-deps
   llama-cpp-python==<installed>`, then `cmake -B build -DLLAMA_CURL=OFF && cmake --build build
   --target llama-server` in its vendor/llama.cpp (about 10 minutes on 2 cores; keep it outside
   the repository).

Only one server runs at a time, in its own process; the client is this process.

    .venv/bin/python benchmarks/bench_serve.py [--gguf FILE] [--threads 2] [--tokens 64] [--reps 5]
    .venv/bin/python benchmarks/bench_serve.py --compare-parallel --clients 1,4 [--gguf FILE] [--llama-server BIN]

Without --gguf it builds bench_llama.py's random 300M LLaMA in Q4_K_M (in bench_llama's workdir).
The machines this runs on are shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

MODEL_ID = "bench"


def prompt(index: int) -> str:
    """Distinct prompts, so no request reuses another's cached prefix beyond a word or two."""
    return f"Report {index}: the results of experiment {index * 7919 % 1000} were"


# -- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def start_edgelm(gguf: Path, threads: int, parallel: int = 4) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", "--name", f"{MODEL_ID}={gguf}",
                                "--port", str(port), "--threads", str(threads), "--parallel", str(parallel)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def start_llama_cpp(gguf: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as err:
        print(f"llama_cpp.server is not installed ({err.name}); pip install 'llama-cpp-python[server]'")
        return None
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                                MODEL_ID, "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                "--n_ctx", str(n_ctx), "--port", str(port), "--interrupt_requests", "False"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def start_llama_server(binary: Path, gguf: Path, threads: int, slots: int, n_ctx: int
                       ) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server, `slots` sequences over one cache holding n_ctx tokens for each."""
    port = free_port()
    process = subprocess.Popen([str(binary), "-m", str(gguf), "--alias", MODEL_ID, "-t", str(threads),
                                "-tb", str(threads), "-np", str(slots), "-c", str(n_ctx * slots),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.send_signal(2)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- one client ---------------------------------------------------------------------------------
def timing(first: float, last: float, started: float, tokens: int) -> dict[str, float]:
    return {"ttft_ms": (first - started) * 1000, "tg": (tokens - 1) / (last - first) if last > first else 0.0,
            "tokens": tokens}


def streamed_over_http(client: httpx.Client, url: str, index: int, tokens: int) -> dict[str, float]:
    body = {"model": MODEL_ID, "prompt": prompt(index), "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = 0.0
    count = 0
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return timing(first, last, started, count)


def streamed_in_process(model, index: int, tokens: int) -> dict[str, float]:
    first = last = 0.0
    started = time.perf_counter()
    stream = model.stream(prompt(index), max_tokens=tokens, temperature=0)
    for piece in stream:
        if piece:
            last = time.perf_counter()
            first = first or last
    return timing(first, last, started, stream.completion.completion_tokens)


def overhead(gguf: Path, url: str, threads: int, tokens: int, reps: int) -> dict[str, dict[str, float]]:
    import edgelm

    model = edgelm.load(gguf, threads=threads)
    runs: dict[str, list[dict]] = {"in-process": [], "edgelm serve": []}
    with httpx.Client(timeout=600) as client:
        for rep in range(reps + 1):  # the first round warms both up
            pair = [("in-process", lambda i: streamed_in_process(model, i, tokens)),
                    ("edgelm serve", lambda i: streamed_over_http(client, url, i, tokens))]
            for name, run in pair if rep % 2 else pair[::-1]:
                result = run(1000 + rep)  # the same prompt for both within a round
                if rep:
                    runs[name].append(result)
    model.close()
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


# -- many clients -------------------------------------------------------------------------------
def aggregate(url: str, clients: int, per_client: int, tokens: int) -> tuple[float, int]:
    """Completion tokens per second of wall time with `clients` clients sending requests in turn,
    and how many requests failed (they count no tokens)."""
    def client_run(c: int) -> tuple[int, int]:
        done = failed = 0
        with httpx.Client(timeout=600) as client:
            for r in range(per_client):
                body = {"model": MODEL_ID, "prompt": prompt(100 * c + r), "max_tokens": tokens, "temperature": 0}
                response = client.post(f"{url}/v1/completions", json=body)
                if response.status_code != 200:
                    failed += 1
                    continue
                done += response.json()["usage"]["completion_tokens"]
        return done, failed

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_run, range(clients)))
    elapsed = time.perf_counter() - started
    return sum(r[0] for r in results) / elapsed, sum(r[1] for r in results)


def aggregates(url: str, levels: list[int], per_client: int, tokens: int) -> dict[int, tuple[float, int]]:
    aggregate(url, 1, 1, tokens)  # warm-up
    return {n: aggregate(url, n, per_client, tokens) for n in levels}


def streamed_aggregate(url: str, clients: int, per_client: int, tokens: int) -> dict[str, float]:
    """Streamed requests, `clients` at once, each client sending `per_client` in turn: completion
    tokens per second of wall time, and the p50/p95 time to first token."""
    def one(client: httpx.Client, index: int) -> dict[str, float] | None:
        try:
            return streamed_over_http(client, url, index, tokens)
        except httpx.HTTPError:  # a server that drops the connection: counted, not fatal to the run
            return None

    def client_run(c: int) -> list[dict[str, float] | None]:
        # a new connection per request: llama-server closes idle keep-alive connections, and a
        # request sent on one it has just closed fails with no response
        with httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            return [one(client, 100 * c + r) for r in range(per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [run for runs in pool.map(client_run, range(clients)) for run in runs]
    elapsed = time.perf_counter() - started
    runs = [run for run in results if run is not None]
    ttfts = sorted(run["ttft_ms"] for run in runs) or [float("nan")]
    return {"tok_s": sum(run["tokens"] for run in runs) / elapsed, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "failed": len(results) - len(runs)}


def compare_parallel(gguf: Path, threads: int, levels: list[int], per_client: int, tokens: int,
                     n_ctx: int, llama_server: Path | None) -> None:
    """`--parallel 1` against `--parallel 4` (and llama-server -np 4), each server alone in its turn."""
    starters = {"--parallel 1": lambda: start_edgelm(gguf, threads, 1),
                "--parallel 4": lambda: start_edgelm(gguf, threads, 4)}
    if llama_server is not None:
        starters["llama-server -np 4"] = lambda: start_llama_server(llama_server, gguf, threads, 4, n_ctx)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for name, start in starters.items():
        process, url = start()
        try:
            streamed_aggregate(url, 1, 1, tokens)  # warm-up
            rows[name] = {n: streamed_aggregate(url, n, per_client, tokens) for n in levels}
        finally:
            stop(process)
    print(f"\n{gguf}, {threads} threads, {tokens} tokens per streamed request, {per_client} per client")
    print(f"{'server':<20} {'clients':>7} {'tok/s':>8} {'ttft p50/p95 ms':>17} {'vs --parallel 1':>16}"
          + (f" {'vs llama-server':>16}" if llama_server else ""))
    for name, by_level in rows.items():
        for n in levels:
            row, one = by_level[n], rows["--parallel 1"][n]
            line = (f"{name:<20} {n:7} {row['tok_s']:8.1f} {row['ttft_p50']:8.0f}/{row['ttft_p95']:<8.0f} "
                    f"{row['tok_s'] / one['tok_s']:16.2f}")
            if row["failed"]:
                line += f"  ({row['failed']} requests dropped by the server)"
            if llama_server is not None:
                line += f" {row['tok_s'] / rows['llama-server -np 4'][n]['tok_s']:16.2f}"
            print(line)


# -- the run --------------------------------------------------------------------------------------
def default_gguf() -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_llama import prepare

    return prepare(Path("/tmp/edgelm-bench-llama"))["Q4_K_M"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="A GGUF file or artifact [default: bench_llama's].")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="Tokens generated per request.")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", default="1,4,8", help="Concurrency levels for the aggregate.")
    parser.add_argument("--per-client", type=int, default=2, help="Requests each client sends in turn.")
    parser.add_argument("--n-ctx", type=int, default=2048, help="llama_cpp.server's context size.")
    parser.add_argument("--compare-parallel", action="store_true",
                        help="Only streamed load against edgelm serve --parallel 1 and --parallel 4.")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="With --compare-parallel: a llama-server binary to run with 4 slots too.")
    args = parser.parse_args()
    gguf = args.gguf or default_gguf()
    levels = [int(n) for n in args.clients.split(",")]
    if args.compare_parallel:
        compare_parallel(gguf, args.threads, levels, args.per_client, args.tokens, args.n_ctx, args.llama_server)
        return

    process, url = start_edgelm(gguf, args.threads)
    try:
        over = overhead(gguf, url, args.threads, args.tokens, args.reps)
        ours = aggregates(url, levels, args.per_client, args.tokens)
    finally:
        stop(process)
    theirs: dict[int, tuple[float, int]] = {}
    started = start_llama_cpp(gguf, args.threads, args.n_ctx)
    if started is not None:
        process, url = started
        try:
            theirs = aggregates(url, levels, args.per_client, args.tokens)
        finally:
            stop(process)

    print(f"\n{gguf}, {args.threads} threads, {args.tokens} tokens per request, medians of {args.reps}")
    print(f"{'one client, streamed':24} {'ttft ms':>9} {'decode tok/s':>13} {'tokens':>7}")
    for name, row in over.items():
        print(f"{name:24} {row['ttft_ms']:9.1f} {row['tg']:13.1f} {row['tokens']:7.0f}")
    base, served = over["in-process"], over["edgelm serve"]
    added = served["ttft_ms"] - base["ttft_ms"]
    slower = 100 * (1 - served["tg"] / base["tg"]) if base["tg"] else float("nan")
    print(f"added to the first token: {added:+.1f} ms (target <= 10); decode slower by {slower:.1f}% (target <= 5)")
    print(f"\n{'clients':>7} {'edgelm tok/s':>13} {'failed':>6} {'llama_cpp.server':>17} {'failed':>6} {'ratio':>6}"
          "   (target: >= 1 at 1, >= 2 at 4)")
    for n in levels:
        rate, failed = ours[n]
        other, other_failed = theirs.get(n, (float("nan"), 0))
        ratio = rate / other if other == other and other > 0 else float("nan")
        print(f"{n:7} {rate:13.1f} {failed:6} {other:17.1f} {other_failed:6} {ratio:6.2f}")

if __name__ == "__main__":
    main()
