"""Benchmark of the evaluation's generation (issue 10, item 7); run by hand, never in CI.

On the same prompts (the `full_context` prompts of known-facts test items, as the evaluate stage renders them),
in one process, it times three ways of answering and prints prompts/s and ratios:

  (a) clearflow: `tasks.evaluate.decoding_loop.generate` (shortest prompts first, left padding, the prompts'
      shared prefix fed once, a row leaving once it holds a complete first line or EOS and new prompts joining the
      rows still answering, the KV cache written in place, answers cut at EOS);
  (b) a plain `model.generate` loop at batch 1 (greedy, max_new_tokens, stops at EOS only);
  (c) a plain `model.generate` loop at the same batch size, in input order, left padding, no early stopping
      beyond EOS.

Each gets a warm-up call; then (a) and (c) run back to back in each of `--rounds` rounds, order alternating, and
(b), the slowest, in the first round only (`--batch1-every-round` for all). A ratio is the median of its per-round
ratios: on this shared machine the load moves between rounds by more than (a) and (c) differ, while two runs back
to back see much the same load. It then checks that (a)'s answers are (b)'s first lines: speed must not change an answer.
By default the prompts are every test item's: what one method's generation in a default evaluation answers.

Fine-tuning (`--part finetune` or `both`): on the same N train examples (the CLEAR prompt, the conflicting
sentence marked), tokens/s of (d) the arms' shared loop `tasks.finetune.training.train` (lambda 0.1, its
attention hook and loss) against (e) a plain peft loop with the same LoRA settings, learning rate, order and
batch 1 (`model(input_ids, labels=labels).loss.backward()`, default attention), each from fresh LoRA weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py [--part both] [--n N] [--rounds 3] [--examples 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch

from tasks.core.chat import encode
from tasks.core.config import FinetuneConfig, RunConfig
from tasks.core.prompts import mark_context
from tasks.core.models import load_model, load_tokenizer
from tasks.evaluate.methods import REGISTRY
from tasks.evaluate.decoding_loop import first_line, generate
from tasks.evaluate.stage import build_prompts
from tasks.ingest.stage import ingest
# benchmarks/timing.py (the script's own folder is on sys.path)
from timing import interleaved_rates, machine_note, paired_rounds, round_ratios

TARGETS = [("(a)/(b) batch-1 loop", "a", "b", 4.0), ("(a)/(c) same-batch loop", "a", "c", 1.5)]
FINETUNE_TARGET = 1.0  # (d)/(e) tokens/s


def benchmark_prompts(n: int | None, tok) -> list[str]:
    """N full-context prompts of known-facts items: test items first, then dev (enough for any N up to ~300); by
    default every test item, which is what one method's generation in a default evaluation answers."""
    items = pl.DataFrame(ingest(RunConfig()).items)
    test = items.filter(pl.col("split") == "test").height
    n = test if n is None else n
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


def train_examples(n: int, tok) -> list:
    """N counterfactual train items as CLEAR trains on them: the conflicting (relevant, false) sentence marked."""
    from tasks.finetune.examples import build_example

    items = [r for r in ingest(RunConfig()).items if r["split"] == "train"][:n]
    out = []
    for r in items:
        units = r["sentence_labels"]
        flags = [bool(u["relevant"]) and not u["truthful"] for u in units]
        context = mark_context([u["text"] for u in units], flags)
        out.append(build_example(tok, r["question"], context, r["answers"], FinetuneConfig().max_length))
    return out


def plain_peft_loop(model_cfg, fcfg: FinetuneConfig, examples: Sequence, seed: int) -> None:
    """The loop a peft tutorial writes: same LoRA, AdamW, seeded order, batch 1, the model's own labelled loss."""
    import random

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_cfg), LoraConfig(
        r=fcfg.lora_r, lora_alpha=fcfg.lora_alpha, lora_dropout=fcfg.lora_dropout,
        target_modules=list(fcfg.target_modules), task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=fcfg.lr)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for i in order:
        loss = model(input_ids=torch.tensor([examples[i].input_ids]), labels=torch.tensor([examples[i].labels])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def clearflow_train(model_cfg, fcfg: FinetuneConfig, examples: Sequence, seed: int) -> None:
    """The arms' shared loop on fresh LoRA weights, with CLEAR's attention loss (compiled blocks as `fcfg` says;
    the timed run traces them again for its fresh model, from the compiler's cache)."""
    from tasks.finetune.training import lora_model, train

    model, _ = lora_model(model_cfg, fcfg, seed)
    train(model, examples, fcfg, fcfg.attn_lambda, seed, desc="(d)")


def finetune_part(args: argparse.Namespace) -> dict:
    """Tokens/s of (d) and (e) on the same examples; model loading is inside each run for both."""
    cfg, fcfg = RunConfig(), FinetuneConfig()
    examples = train_examples(args.examples, load_tokenizer(cfg.model))
    tokens = sum(len(e.input_ids) for e in examples)
    few = examples[:2]
    eager = fcfg.model_copy(update={"compile": False})
    methods = {"d": (lambda: clearflow_train(cfg.model, fcfg, examples, 0), lambda: clearflow_train(cfg.model, fcfg, few, 0)),
               "d0": (lambda: clearflow_train(cfg.model, eager, examples, 0),
                      lambda: clearflow_train(cfg.model, eager, few, 0)),
               "e": (lambda: plain_peft_loop(cfg.model, fcfg, examples, 0), lambda: plain_peft_loop(cfg.model, fcfg, few, 0))}
    rates, _ = interleaved_rates(methods, tokens, repeats=args.repeats)
    ratio = rates["d"] / rates["e"]
    print(f"\n| fine-tuning, {len(examples)} examples, {tokens} tokens | tokens/s | vs (e) |\n| --- | --- | --- |")
    print(f"| (d) clearflow loop (attention loss on, compile {fcfg.compile}) | {rates['d']:.1f} | {ratio:.2f}x |")
    print(f"| (d0) the same loop, eager | {rates['d0']:.1f} | {rates['d0'] / rates['e']:.2f}x |")
    print(f"| (e) plain peft loop | {rates['e']:.1f} | 1.00x |")
    print(f"{'PASS' if ratio >= FINETUNE_TARGET else 'FAIL'} (d)/(e): {ratio:.2f}x (target >= {FINETUNE_TARGET}x)")
    return {"tokens_per_s": rates, "ratio": ratio, "pass": ratio >= FINETUNE_TARGET, "tokens": tokens}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("generation", "finetune", "both"), default="both")
    p.add_argument("--n", type=int, help="prompts (default: every test item of the default benchmark, 159)")
    p.add_argument("--examples", type=int, default=96, help="fine-tuning examples (default 96)")
    p.add_argument("--batch-size", type=int, default=RunConfig().evaluate.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=RunConfig().evaluate.max_new_tokens)
    p.add_argument("--prompt-lookup", type=int, default=0,
                   help="draft tokens per step of (a+), (a) with prompt-lookup drafts (evaluate.prompt_lookup; (a) runs"
                   " with the option's default); 0 (the default) leaves (a+) out")
    p.add_argument("--rounds", type=int, default=3,
                   help="generation: rounds of (a), (c) (and (a+)) back to back; the ratios are per-round medians")
    p.add_argument("--batch1-every-round", action="store_true",
                   help="time (b) in every round too (by default only in the first: it takes longer than the rest)")
    p.add_argument("--repeats", type=int, default=2, help="fine-tuning: timed runs per method; the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p.parse_args(argv)


def generation_part(args: argparse.Namespace) -> dict:
    """Prompts/s of (a), (b), (c) on the same prompts in paired rounds, the issue's ratios and answer parity."""
    cfg = RunConfig()
    tok, model = load_tokenizer(cfg.model), load_model(cfg.model)
    prompts = benchmark_prompts(args.n, tok)
    few = prompts[: args.batch_size]
    k, bs, d, d0 = args.max_new_tokens, args.batch_size, args.prompt_lookup, cfg.evaluate.prompt_lookup
    drafted = {"a+": (lambda: generate(model, tok, prompts, k, bs, desc="(a+)", draft_tokens=d),
                      lambda: generate(model, tok, few, k, bs, draft_tokens=d))} if d else {}
    methods = {
        "a": (lambda: generate(model, tok, prompts, k, bs, desc="(a)", draft_tokens=d0),
              lambda: generate(model, tok, few, k, bs, draft_tokens=d0)),
        **drafted,
        "c": (lambda: plain_loop(model, tok, prompts, k, bs), lambda: plain_loop(model, tok, few, k, bs)),
        "b": (lambda: plain_loop(model, tok, prompts, k, 1), lambda: plain_loop(model, tok, few[:2], k, 1)),
    }  # (b) last: in the first round (a) and (c) still run back to back
    times, answers = paired_rounds(methods, args.rounds, once=() if args.batch1_every_round else ("b",))
    rates = {key: len(prompts) / min(t) for key, t in times.items()}
    names = {"a": "clearflow generate", **({"a+": f"(a) with {d} prompt-lookup draft tokens"} if d else {}),
             "b": "plain loop, batch 1", "c": f"plain loop, batch {bs}, input order"}  # the table's order
    print(f"\n| method ({len(prompts)} prompts) | prompts/s, fastest round | seconds per round |\n| --- | --- | --- |")
    for key, name in names.items():
        print(f"| ({key}) {name} | {rates[key]:.2f} | {', '.join(f'{t:.1f}' for t in times[key])} |")
    checks = []
    for label, a, b, target in TARGETS:
        per_round = round_ratios(times[a], times[b])
        ratio = statistics.median(per_round)
        checks.append({"check": label, "ratio": ratio, "rounds": per_round, "target": target, "pass": ratio >= target})
        print(f"{'PASS' if ratio >= target else 'FAIL'} {label}: median {ratio:.2f}x over {len(per_round)} round(s) "
              f"({', '.join(f'{r:.2f}' for r in per_round)}; target >= {target}x)")
    same = sum(x == y for x, y in zip(answers["a"], answers["b"]))
    print(f"answers of (a) equal to (b)'s first lines: {same}/{len(prompts)}" + (
        f"; (a+)'s: {sum(x == y for x, y in zip(answers['a+'], answers['b']))}/{len(prompts)}" if d else ""))
    return {"prompts_per_s": rates, "seconds": times, "checks": checks, "same_answers": same}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen parts and print what else the machine was doing at start and end."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_note = machine_note()
    print(f"prompts={args.n or 'every test item'} examples={args.examples} batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"torch threads={torch.get_num_threads()}; {start_note}")
    report: dict = {"n": args.n, "examples": args.examples, "rounds": args.rounds, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if args.part in ("generation", "both"):
        report["generation"] = generation_part(args)
    if args.part in ("finetune", "both"):
        report["finetune"] = finetune_part(args)
    report["machine_start"], report["machine_end"] = start_note, machine_note()
    print(f"at start: {start_note}\nat end:   {report['machine_end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
