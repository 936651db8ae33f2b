"""Benchmark of clearflow's activation extraction (issue 4, item 7); run by hand, never in CI.

On the same fact sentences, in one process, it times three extractors and prints sentences/s and ratios:

  (a) clearflow: `clearflow_extract` below, the activation store's extraction (hooks on the requested
      decoder blocks, early exit, length-bucketed batches, sharded Parquet written atomically, checked);
  (b) a plain Hugging Face forward, `model(**batch, output_hidden_states=True)` over all layers, same
      batch size, input order, right padding, keeping the last real token of every layer;
  (c) the reference extractor, `model.generate(max_new_tokens=1, output_hidden_states=True)` on batches
      of 8 sentences in input order (left padding), keeping the last token of the last layer.

(a) is timed twice: all layers requested, and only layers 0..--layers-cut; (b) and (c) always run all
layers (they cannot stop early), so one measurement of each serves both. Every method gets a warm-up
batch, then runs twice, in interleaved rounds, and keeps its faster run (the machine is noisy). It then
checks parity of (a) against (b) and measures the peak RSS of (a) in fresh subprocesses for N and 4N
sentences: the whole child's peak (its VmHWM) and the extraction phase's own peak (VmHWM reset after
loading the model and one warm-up batch; Linux only, else use --skip-rss).

Layer mapping: clearflow layer L (0-based decoder block) == Hugging Face `hidden_states[L + 1]`
(`hidden_states[0]` is the embedding output; the last entry is after the final norm).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/activations.py [--n 400] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from timing import interleaved_rates  # benchmarks/timing.py (the script's own folder is on sys.path)
from tasks.core.activation_store import ActivationStore, StoreInputs, plan_shards
from tasks.activations.stage import extract_shards, fed_text
from tasks.core.config import ActivationConfig, ModelConfig, RunConfig
from tasks.ingest.stage import ingest
from tasks.core.models import load_model, load_tokenizer

PARITY_ABS, PARITY_REL = 1e-5, 1e-6  # fp32: |diff| <= max(1e-5, 1e-6 x the largest |hidden value|); (a) and (b)
# pad different batches, so the sums run in another order: float32 rounding, a few ulps of the values' scale
REFERENCE_BATCH = 8  # the reference extractor's batch size
# (name, numerator, denominator, minimum ratio) of issue 4's Done-when
TARGETS = [
    ("all layers: (a)/(b)", "a_all", "b", 0.9),
    ("all layers: (a)/(c)", "a_all", "c", 1.3),
    ("layers <= cut: (a)/(b)", "a_cut", "b", 1.8),
    ("layers <= cut: (a)/(c)", "a_cut", "c", 2.5),
]
RSS_TARGET = 1.1


# --- clearflow extraction: the one place to swap for the activation store API ----------------------------


def clearflow_extract(model, tokenizer, texts: Sequence[str], layers: Sequence[int], batch_size: int,
                      out_dir: Path) -> None:
    """What (a) times: clearflow's store extraction of `layers` (shards, atomic files, final check) into `out_dir`.

    The same calls the activations stage makes after its cache lookup: `plan_shards`, `extract_shards`
    (length-bucketed batches, hooks on the requested layers only, early exit), `ActivationStore.verify` and
    `finish` (meta.json, so the store's reader opens it). Keys are the input positions, so
    `read_clearflow_vectors` can ask for them in input order.
    """
    act = ActivationConfig(layers=list(layers), batch_size=batch_size)
    inputs = StoreInputs(keys=[f"{i:08d}" for i in range(len(texts))], texts=list(texts),
                         sources=["statements"] * len(texts))
    store = ActivationStore(Path(out_dir), "bench")
    shards = plan_shards(inputs, act.positions, act.shard_rows)
    extract_shards(model, tokenizer, store, inputs, shards, list(layers), act, progress=False)
    rows = inputs.n_rows(act.positions)
    store.verify(list(layers), shards, rows)
    store.finish({"layers": list(layers), "dim": model.config.hidden_size, "positions": list(act.positions),
                  "rows_by_position": rows, "storage_dtype": act.storage_dtype, "n_keys": len(inputs.keys)})


def read_clearflow_vectors(out_dir: Path, layer: int, n: int) -> np.ndarray:
    """float32 (n, d) of one layer as `clearflow_extract` stored it, in input order (the store's own reader)."""
    return ActivationStore.open(Path(out_dir) / "bench").vectors(layer, [f"{i:08d}" for i in range(n)])


# --- inputs and the two baselines ------------------------------------------------------------------------


def fact_sentences(n: int) -> list[str]:
    """N bundled known-fact statements as the model reads them (cycled with a suffix past the end)."""
    base = [row["text"] for row in ingest(RunConfig()).statements]
    texts = []
    for i in range(n):
        text, cycle = base[i % len(base)], i // len(base)
        texts.append(text if cycle == 0 else f"{text.rstrip('.!? ')} (repeat {cycle}).")
    return [fed_text(t, True) for t in texts]


def hf_forward_extract(model, tokenizer, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """(b): plain forward with all hidden states, right padding; float32 (n, layers, d) of the last real token."""
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              padding_side="right").to(model.device)
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:]  # drop the embeddings
            last = batch["attention_mask"].sum(-1) - 1
            rows = torch.arange(len(last), device=last.device)
            stacked = torch.stack([h[rows, last] for h in hidden], dim=1).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), *stacked.shape[1:]), dtype=np.float32)
            out[start:start + len(last)] = stacked
    return out


def reference_extract(model, tokenizer, texts: Sequence[str]) -> np.ndarray:
    """(c): the reference's generate() of one token on batches of 8, left padding; float32 (n, d), last layer."""
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(texts), REFERENCE_BATCH):
            batch = tokenizer(list(texts[start:start + REFERENCE_BATCH]), return_tensors="pt", padding=True,
                              padding_side="left").to(model.device)
            gen = model.generate(**batch, max_new_tokens=1, do_sample=False, output_hidden_states=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
            last = gen.hidden_states[0][-1][:, -1, :].float().cpu().numpy()  # prompt step, last layer
            if out is None:
                out = np.empty((len(texts), last.shape[1]), dtype=np.float32)
            out[start:start + len(last)] = last
    return out


# --- timing and parity -----------------------------------------------------------------------------------


def clearflow_method(model, tok, texts: list[str], layers: list[int], batch_size: int, scratch: Path,
                     tag: str) -> tuple[Callable[[], Path], Callable[[], object]]:
    """(a) as a (run, warm-up) pair; every run writes a fresh directory, returned for the parity check."""
    runs = itertools.count()

    def run() -> Path:
        out = scratch / f"{tag}-{next(runs)}"
        clearflow_extract(model, tok, texts, layers, batch_size, out)
        return out

    return run, lambda: clearflow_extract(model, tok, texts[:batch_size], layers, batch_size, scratch / f"{tag}-warm")


def parity(out_dir: Path, hf: np.ndarray, layers: Sequence[int]) -> dict[int, float]:
    """Max |(a) layer L - (b) hidden_states[L + 1]| per checked layer."""
    n = hf.shape[0]
    return {layer: float(np.abs(read_clearflow_vectors(out_dir, layer, n) - hf[:, layer]).max()) for layer in layers}


# --- peak RSS in fresh subprocesses ----------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    """A VmXXX figure of /proc/self/status in KiB (None off Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5): the extraction's own peak, apart from loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_child(n: int, batch_size: int, base: int) -> None:
    """Child mode: extract all layers of n sentences with (a); print RSS figures (KiB) and the elapsed time as JSON.

    The n sentences are the benchmark's `base` sentences repeated (each row its own key), so N and 4N share one
    length distribution: the peak of a forward pass depends on the longest batch, and only the corpus size may
    differ between the two children.
    """
    texts = list(itertools.islice(itertools.cycle(fact_sentences(base)), n))
    tok, model = load_tokenizer(ModelConfig()), load_model(ModelConfig())
    layers = list(range(model.config.num_hidden_layers))
    with tempfile.TemporaryDirectory(prefix="clearflow-bench-rss-") as scratch:
        # one warm-up batch pages in the (memory-mapped) weights and the kernels' workspaces, so the
        # extraction-phase peak below is the working set of extraction, not the cost of loading
        clearflow_extract(model, tok, texts[:batch_size], layers, batch_size, Path(scratch) / "warm")
        gc.collect()
        load_peak, rss_before = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
        reset = _reset_peak_rss()
        start = time.perf_counter()
        clearflow_extract(model, tok, texts, layers, batch_size, Path(scratch) / "run")
        seconds = time.perf_counter() - start
    end_hwm = _proc_status_kib("VmHWM")
    extract_peak = end_hwm if reset else None
    peak = max(load_peak or 0, end_hwm or 0) or None
    print(json.dumps({"n": n, "peak_kib": peak, "load_peak_kib": load_peak, "rss_before_extract_kib": rss_before,
                      "extract_peak_kib": extract_peak, "seconds": round(seconds, 2)}))


def peak_rss(n: int, args: argparse.Namespace) -> dict:
    """Run the child for N sentences; its figures come from its own /proc status.

    Not wait4/RUSAGE_CHILDREN: Linux keeps ru_maxrss across fork and exec, so a child's figure starts
    at the parent's RSS (here over 1 GiB with the model and three extractors' results loaded).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(n), "--batch-size", str(args.batch_size),
           "--n", str(args.n)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child {' '.join(cmd)} exited with {proc.returncode}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    if not child["peak_kib"]:
        raise RuntimeError("peak RSS needs Linux /proc/self/status (VmHWM); use --skip-rss elsewhere")
    return child


def lowest_peak(n: int, args: argparse.Namespace, tries: int = 2) -> dict:
    """The child run with the lowest peak of `tries` (glibc's heap makes one peak vary by ~5%: like the
    timings, each figure keeps its best run)."""
    return min((peak_rss(n, args) for _ in range(tries)), key=lambda child: child["peak_kib"])


# --- report ----------------------------------------------------------------------------------------------


def print_table(rates: dict[str, float], cut: int) -> None:
    """Sentences/s of every method and its ratio against (b) and (c) of the same run."""
    names = {"a_all": "(a) clearflow, all layers", "a_cut": f"(a) clearflow, layers 0..{cut}",
             "b": "(b) HF forward, all hidden states", "c": "(c) reference generate(), batch 8"}
    print(f"\n{'method':<36}{'sent/s':>9}{'x (b)':>8}{'x (c)':>8}")
    for key, name in names.items():
        print(f"{name:<36}{rates[key]:>9.1f}{rates[key] / rates['b']:>8.2f}{rates[key] / rates['c']:>8.2f}")


def check_lines(rates: dict[str, float], cut: int) -> list[dict]:
    """The Done-when ratios with PASS/FAIL."""
    checks = []
    for name, num, den, target in TARGETS:
        ratio = rates[num] / rates[den]
        checks.append({"check": name.replace("cut", str(cut)), "ratio": round(ratio, 3), "target": target,
                       "pass": ratio >= target})
    return checks


def parity_tol(scale: float) -> float:
    """Allowed fp32 difference for hidden values of this magnitude."""
    return max(PARITY_ABS, PARITY_REL * scale)


def print_checks(checks: list[dict], par: dict, scale: float, rss: dict | None) -> None:
    """Done-when lines, parity and RSS, one line each."""
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']:<26} {c['ratio']:>6.2f}x  (target >= {c['target']})")
    for name, diffs in par.items():
        worst = max(diffs.values())
        detail = ", ".join(f"L{k}: {v:.2e}" for k, v in diffs.items())
        tol = parity_tol(scale)
        verdict = "info" if name.startswith("(c)") else ("PASS" if worst <= tol else "FAIL")
        print(f"{verdict:<5} parity {name}: max |diff| {worst:.2e} (tol {tol:.1e}; {detail})")
    print(f"      (fp32 hidden-state values reach |{scale:.0f}|; tol = max({PARITY_ABS:.0e}, {PARITY_REL:.0e} x that):"
          " (a) and (b) pad different batches)")
    if rss:
        print_rss(rss)


def mib(kib: int) -> str:
    """KiB as a short MiB figure."""
    return f"{kib / 1024:.0f} MiB"


def print_rss(rss: dict) -> None:
    """Peak RSS of the whole child (the Done-when figure) and of its extraction phase alone, N vs 4N."""
    small, large = rss["n"], rss["4n"]
    print(f"{'PASS' if rss['ratio'] <= RSS_TARGET else 'FAIL'}  peak RSS 4N/N {rss['ratio']:.3f}x "
          f"(target <= {RSS_TARGET}): N={small['n']} {mib(small['peak_kib'])}, 4N={large['n']} {mib(large['peak_kib'])}"
          f" (load + warm-up batch peaked at {mib(small['load_peak_kib'])} / {mib(large['load_peak_kib'])})")
    if rss.get("extract_ratio") is not None:
        print(f"{'PASS' if rss['extract_ratio'] <= RSS_TARGET else 'FAIL'}  extraction-phase peak RSS 4N/N "
              f"{rss['extract_ratio']:.3f}x: {mib(small['extract_peak_kib'])} vs {mib(large['extract_peak_kib'])} "
              f"(RSS after warm-up {mib(small['rss_before_extract_kib'])} / "
              f"{mib(large['rss_before_extract_kib'])})")


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (nothing else is pinned)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="fact sentences per method (default 400)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of (a) and (b) (default 32)")
    p.add_argument("--layers-cut", type=int, default=15, help="second (a) config requests layers 0..CUT (default 15)")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    """Rates of (a) both configs, (b) and (c) on one model and one input list, plus parity."""
    texts = fact_sentences(args.n)
    tok, model = load_tokenizer(ModelConfig()), load_model(ModelConfig())
    n_layers = model.config.num_hidden_layers
    all_layers, cut_layers = list(range(n_layers)), list(range(args.layers_cut + 1))
    bs = args.batch_size
    methods = {
        "b": (lambda: hf_forward_extract(model, tok, texts, bs),
              lambda: hf_forward_extract(model, tok, texts[:bs], bs)),
        "c": (lambda: reference_extract(model, tok, texts),
              lambda: reference_extract(model, tok, texts[:REFERENCE_BATCH])),
        "a_all": clearflow_method(model, tok, texts, all_layers, bs, scratch, "all"),
        "a_cut": clearflow_method(model, tok, texts, cut_layers, bs, scratch, "cut"),
    }
    rates, results = interleaved_rates(methods, len(texts))
    checked = sorted({0, args.layers_cut // 2, args.layers_cut, n_layers - 1})
    par = {
        "(a) all layers vs (b) hidden_states[L+1]": parity(results["a_all"], results["b"], checked),
        f"(a) layers 0..{args.layers_cut} vs (b) hidden_states[L+1]":
            parity(results["a_cut"], results["b"], [0, args.layers_cut]),
        "(c) last layer vs (a)": {n_layers - 1: float(np.abs(
            read_clearflow_vectors(results["a_all"], n_layers - 1, len(texts)) - results["c"]).max())},
    }
    return {"rates": rates, "parity": par, "value_scale": float(np.abs(results["b"]).max()), "n_layers": n_layers}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with --rss-child, one RSS child) and print the figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        return rss_child(args.rss_child, args.batch_size, args.n)
    load_before = os.getloadavg()
    print(f"n={args.n} batch={args.batch_size} torch threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} load avg {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="clearflow-bench-") as scratch:
        figures = measure(args, Path(scratch))
    rss = None
    if not args.skip_rss:
        small, large = lowest_peak(args.n, args), lowest_peak(4 * args.n, args)
        rss = {"n": small, "4n": large, "ratio": large["peak_kib"] / small["peak_kib"],
               "extract_ratio": large["extract_peak_kib"] / small["extract_peak_kib"]
               if small["extract_peak_kib"] and large["extract_peak_kib"] else None}
    rates = figures["rates"]
    checks = check_lines(rates, args.layers_cut)
    print_table(rates, args.layers_cut)
    print_checks(checks, figures["parity"], figures["value_scale"], rss)
    load_after = os.getloadavg()
    print(f"\nload avg at start {load_before[0]:.2f}, at end {load_after[0]:.2f} (1 min)")
    if args.json:
        report = {"n": args.n, "batch_size": args.batch_size, "layers_cut": args.layers_cut,
                  "torch_threads": torch.get_num_threads(), "loadavg_start": load_before, "loadavg_end": load_after,
                  "sentences_per_s": {k: round(v, 2) for k, v in rates.items()}, "checks": checks,
                  "parity_max_abs_diff": figures["parity"], "parity_tol": parity_tol(figures["value_scale"]),
                  "max_abs_hidden_value": figures["value_scale"], "rss": rss}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
