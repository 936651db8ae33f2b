"""Benchmark of the evaluation's generation (issue 10, item 7); run by hand, never in CI.

On the same prompts (the `full_context` prompts of known-facts test items, as the evaluate stage renders them),
in one process, it times three ways of answering and prints prompts/s and ratios:

  (a) clearflow: `tasks.evaluate.stage.generate` (length-sorted batches, left padding, a stop once every row
      holds a complete first line, answers cut at EOS);
  (b) a plain `model.generate` loop at batch 1 (greedy, max_new_tokens, stops at EOS only);
  (c) a plain `model.generate` loop at the same batch size, in input order, left padding, no early stopping
      beyond EOS.

Each gets a warm-up call, then runs in interleaved rounds and keeps its fastest (the machine is noisy). It
then checks that (a)'s answers are (b)'s first lines: clearflow's speed must not change an answer.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py [--n 96] [--batch-size 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch

from tasks.core.chat import encode
from tasks.core.config import RunConfig
from tasks.core.models import load_model, load_tokenizer
from tasks.evaluate.methods import REGISTRY
from tasks.evaluate.stage import build_prompts, first_line, generate
from tasks.ingest.stage import ingest
from timing import interleaved_rates, machine_note  # benchmarks/timing.py (the script's own folder is on sys.path)

TARGETS = [("(a)/(b) batch-1 loop", "a", "b", 4.0), ("(a)/(c) same-batch loop", "a", "c", 1.5)]


def benchmark_prompts(n: int, tok) -> list[str]:
    """N full-context prompts of known-facts items: test items first, then dev (enough for any N up to ~300)."""
    items = pl.DataFrame(ingest(RunConfig()).items)
    items = pl.concat([items.filter(pl.col("split") == s).sort("item_id") for s in ("test", "dev")]).head(n)
    if items.height < n:
        raise SystemExit(f"only {items.height} test+dev items; ask for --n {items.height} or fewer")
    return build_prompts(REGISTRY["full_context"], items, tok, None)


@torch.inference_mode()
def plain_loop(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """`model.generate` over batches in input order, greedy, left padding: the loop a script would write."""
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = encode(tok, list(prompts[start:start + batch_size]), padding=True, return_tensors="pt").to(model.device)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        out += [first_line(tok.decode(row[width:], skip_special_tokens=True)) for row in gen]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=96, help="prompts (default 96)")
    p.add_argument("--batch-size", type=int, default=RunConfig().evaluate.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=RunConfig().evaluate.max_new_tokens)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Time (a), (b), (c) on the same prompts and print rates, the issue's ratios and answer parity."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_note = machine_note()
    print(f"n={args.n} batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"torch threads={torch.get_num_threads()}; {start_note}")
    cfg = RunConfig()
    tok, model = load_tokenizer(cfg.model), load_model(cfg.model)
    prompts = benchmark_prompts(args.n, tok)
    few = prompts[: args.batch_size]
    k, bs = args.max_new_tokens, args.batch_size
    methods = {
        "a": (lambda: generate(model, tok, prompts, k, bs, desc="(a)"), lambda: generate(model, tok, few, k, bs)),
        "b": (lambda: plain_loop(model, tok, prompts, k, 1), lambda: plain_loop(model, tok, few[:2], k, 1)),
        "c": (lambda: plain_loop(model, tok, prompts, k, bs), lambda: plain_loop(model, tok, few, k, bs)),
    }
    rates, answers = interleaved_rates(methods, len(prompts), repeats=args.repeats)
    names = {"a": "clearflow generate", "b": "plain loop, batch 1", "c": f"plain loop, batch {bs}, input order"}
    print("\n| method | prompts/s | vs (b) | vs (c) |\n| --- | --- | --- | --- |")
    for key, name in names.items():
        print(f"| ({key}) {name} | {rates[key]:.2f} | {rates[key] / rates['b']:.2f}x | {rates[key] / rates['c']:.2f}x |")
    checks = [{"check": label, "ratio": rates[a] / rates[b], "target": t, "pass": rates[a] / rates[b] >= t}
              for label, a, b, t in TARGETS]
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'} {c['check']}: {c['ratio']:.2f}x (target >= {c['target']}x)")
    same = sum(x == y for x, y in zip(answers["a"], answers["b"]))
    print(f"answers of (a) equal to (b)'s first lines: {same}/{len(prompts)}")
    end_note = machine_note()
    print(f"at start: {start_note}\nat end:   {end_note}")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "batch_size": bs, "max_new_tokens": k, "prompts_per_s": rates,
                                         "checks": checks, "same_answers": same, "machine_start": start_note,
                                         "machine_end": end_note}, indent=2))


if __name__ == "__main__":
    main()
