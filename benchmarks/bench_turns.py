"""Prefix reuse across interleaved conversations: does a chat's next turn prefill only its new
tokens after other conversations have run in between?

One conversation (A) takes TURNS turns; between two of its turns each of OTHERS other
conversations takes one turn of its own, on the same model loaded with parallel=SLOTS. For each
of A's turns the script prints the prompt's length, how many of its tokens were already in a
slot's cache, and how many were prefilled (counted by the batched decoder itself: tokens passed
to llama_decode during the turn, less the reply's own tokens). With no more conversations than
slots, every turn after the first should prefill only its new tokens.

Counts, not speed: the numbers do not depend on the machine's load.

    python benchmarks/bench_turns.py MODEL.gguf [--turns 10] [--others 3] [--slots 4]
"""

from __future__ import annotations

import argparse
import json

import edgelm

QUESTIONS = [
    "Name a fruit.", "Why is the sky blue?", "Give me a word that rhymes with cat.", "What is 2 + 2?",
    "Say hello in French.", "Name a planet.", "What colour is grass?", "Count to three.",
    "Name an ocean.", "What is the opposite of hot?", "Name a musical instrument.", "What day follows Monday?",
]


def turn(model, history: list[dict], question: str, max_tokens: int) -> dict:
    """One user turn on `history` (extended in place); what the decoder evaluated for it."""
    history.append({"role": "user", "content": question})
    decoder = model.decoder
    before = decoder.evaluated
    completion = model.chat_complete(history, max_tokens=max_tokens, temperature=0)
    evaluated = decoder.evaluated - before
    history.append({"role": "assistant", "content": completion.text})
    fed_reply = max(completion.completion_tokens - 1, 0)  # the last sampled token is never fed back
    prefilled = evaluated - fed_reply
    return {"prompt_tokens": completion.prompt_tokens, "prefilled": prefilled,
            "reused": completion.prompt_tokens - prefilled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--others", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with edgelm.load(args.model, parallel=args.slots, threads=args.threads) as model:
        main_chat: list[dict] = []
        others: list[list[dict]] = [[] for _ in range(args.others)]
        for k in range(args.turns):
            rows.append({"turn": k + 1, **turn(model, main_chat, QUESTIONS[k % len(QUESTIONS)], args.max_tokens)})
            for j, history in enumerate(others):
                turn(model, history, QUESTIONS[(k + j + 1) % len(QUESTIONS)], args.max_tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"conversation A, {args.turns} turns, {args.others} other conversations between its turns, "
          f"{args.slots} slots")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'prefilled':>9}")
    for row in rows:
        print(f"{row['turn']:>4} {row['prompt_tokens']:>7} {row['reused']:>7} {row['prefilled']:>9}")


if __name__ == "__main__":
    main()
