"""Time the full-default `edgelm demo` and check its promises: every family, under 12 minutes on an
idle 2-core machine, generators' text at least 70% real corpus words, BERT's top-1 a real word.

    OMP_NUM_THREADS=2 python benchmarks/run_demo.py --out /tmp/edgelm-demo     # the real run (minutes)
    python benchmarks/run_demo.py --quick --out /tmp/edgelm-demo-quick         # checks the script
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 12 * 60
MIN_REAL_WORDS = 0.70


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".edgelm-demo"))
    parser.add_argument("--quick", action="store_true", help="Tiny models (the demo's test setting).")
    args = parser.parse_args()
    command = [sys.executable, "-m", "edgelm.cli", "demo", "--out", str(args.out), *(["--quick"] if args.quick else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(done.stdout)
    if done.returncode != 0:
        sys.exit(f"demo failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    table = done.stdout[done.stdout.index("family  format"):].splitlines()[2:]
    shares = [int(m.group(1)) / 100 for row in table if (m := re.search(r"\s(\d+)%\s*$", row))]
    bert_word = any("top-1" in row and "a corpus word" in row and "not a corpus word" not in row for row in table)
    print(f"wall time {seconds:.0f}s (target {TARGET_SECONDS}s on an idle 2-core machine)")
    print(f"real-word shares {', '.join(f'{s:.0%}' for s in shares)} (target >= {MIN_REAL_WORDS:.0%} each)")
    print(f"BERT's top-1 fill-mask is a corpus word: {bert_word}")
    if not args.quick:
        ok = seconds <= TARGET_SECONDS and all(s >= MIN_REAL_WORDS for s in shares) and bert_word
        print("verdict:", "meets the targets" if ok else "MISSES a target")


if __name__ == "__main__":
    main()
