"""Quality against sparsity on the embedded default (all-MiniLM-L6-v2 + Python's documentation text):
RPP against gradual magnitude pruning and one-shot magnitude pruning, same objective, same steps.

For each (method, target sparsity, tile, seed) it runs `rpp-triton prune` and reads the quality the
run measured with no training in between: embedding fidelity (mean cosine to the dense model's
mean-pooled embeddings of held-out passages) and topic accuracy (nearest-centroid accuracy on the
offline topic task). It also times the saved model's encoder forward on this CPU, dense against
sparsified (block-sparse layers where the tiles allow). Results go to a JSON file (runs already
there are skipped, so an interrupted table resumes), a Markdown table with mean and spread over the
seeds, and a plot of topic accuracy against sparsity.

    OMP_NUM_THREADS=1 python bench/quality.py                 # the whole table
    python bench/quality.py --rows 0.7x1 --seeds 0 1 2         # one row, three seeds
    python bench/quality.py --render-only                      # table and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import machine_info

METHODS = ("rpp", "gmp", "oneshot")
ROWS = ("0.7x1", "0.5x1", "0.9x1", "0.5x32", "0.7x32")
DENSE_TOPIC_NOTE = "the dense model's own score, no training"


def parse_row(row: str) -> tuple[float, int]:
    sparsity, block = row.split("x")
    return float(sparsity), int(block)


def run_key(method: str, row: str, seed: int) -> str:
    return f"{method}-{row}-seed{seed}"


def encoder_speed(model_dir: str, block: int, batch: int = 32, seq: int = 64, repeats: int = 3) -> dict:
    """Median seconds of the saved encoder's forward, dense and sparsified, on this CPU."""
    import torch
    from transformers import AutoModel

    import rpp_triton as rpp

    torch.set_num_threads(1)
    ids = torch.randint(1000, 2000, (batch, seq))
    times = {}
    for kind in ("dense", "sparse"):
        model = AutoModel.from_pretrained(model_dir).eval()
        if kind == "sparse":
            rpp.sparsify(model, block_size=max(block, 32), min_sparsity=0.5)
        with torch.inference_mode():
            model(input_ids=ids)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=ids)
                samples.append(time.perf_counter() - start)
        times[kind] = statistics.median(samples)
    return {
        "dense_s": times["dense"],
        "sparse_s": times["sparse"],
        "speedup": times["dense"] / times["sparse"],
    }


def one_run(method: str, row: str, seed: int, opts, log) -> dict:
    sparsity, block = parse_row(row)
    out = os.path.join(opts.work_dir, run_key(method, row, seed))
    cmd = [sys.executable, "-m", "rpp_triton.cli", "prune", "--output-dir", out, "--overwrite"]
    cmd += ["--method", method, "--target-sparsity", str(sparsity), "--block-size", str(block)]
    cmd += ["--seed", str(seed), *opts.prune_args]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    started = time.time()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:9])} ... failed with exit code {proc.returncode}")
    seconds = time.time() - started
    with open(os.path.join(out, "rpp_report.json")) as f:
        report = json.load(f)
    speed = encoder_speed(out, block)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "method": method,
        "row": row,
        "seed": seed,
        "sparsity": report["sparsity"],
        "steps": report["steps"],
        "objective": report["objective"],
        "score": f"{report.get('prune_by', 'rms')} score, {report.get('prune_scope', 'global')} scope",
        "debias": report.get("debias"),
        "lr_schedule": report.get("lr_scheduler_type"),
        "dense": report["quality"]["dense"],
        "pruned": report["quality"]["pruned"],
        "speed": speed,
        "seconds": round(seconds, 1),
    }


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def markdown(results: dict, settings: dict, meta: dict) -> str:
    runs = list(results.values())
    scores = ", ".join(sorted({r.get("score", "rms score, global scope") for r in runs}))
    dense = runs[0]["dense"] if runs else {}
    debias = ", ".join(
        f"{m} {d}" for m in METHODS for d in sorted({str(r.get("debias")) for r in runs if r["method"] == m})
    )
    schedules = ", ".join(sorted({str(r.get("lr_schedule")) for r in runs}))
    lines = [
        "# Quality against sparsity: embedded default on CPU",
        "",
        f"Date: {meta['date']}. Machine: {meta['machine']}, one torch thread, shared with other jobs "
        f"(seconds are wall time, not benchmarks). torch {meta['torch']}.",
        "",
        "Model: all-MiniLM-L6-v2 (no masked-LM head, so the objective is distillation from the dense "
        "model: hidden states layer by layer and the mean-pooled embedding). Text: "
        "`pydoc_data.topics`, every 10th paragraph held out. Every method gets the same command, "
        f"objective and number of steps: `rpp-triton prune {' '.join(settings['prune_args'])}` "
        "with `--method`, `--target-sparsity`, `--block-size` and `--seed`; every method ranks tiles "
        f"by the same score ({scores}).",
        "",
        "- fidelity: mean cosine between the pruned and the dense model's mean-pooled embeddings "
        "of 128 held-out passages (dense: 1).",
        f"- topic: nearest-centroid accuracy on the offline topic task (dense: "
        f"{dense.get('topic_accuracy', float('nan')):.3f}, {DENSE_TOPIC_NOTE}).",
        "- encoder speed: forward of the saved encoder on this CPU (batch 32 x 64 tokens, one thread), "
        "dense over sparsified (layers with at least half of their 32x32 tiles zero run block-sparse; "
        "1x1 sparsity leaves no zero tiles, so those models run dense).",
        f"- kept weights at the hard prune (`--debias`): {debias}; learning-rate schedule: {schedules}.",
        "- mean ± standard deviation over the seeds (n = number of seeds).",
        "",
        "| sparsity | tiles | method | n | fidelity | topic | encoder speedup | seconds per run |",
        "| ---: | :---: | :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in settings["rows"]:
        sparsity, block = parse_row(row)
        for method in METHODS:
            chosen = [r for r in runs if r["row"] == row and r["method"] == method]
            if not chosen:
                continue
            lines.append(
                f"| {sparsity:.0%} | {block}x{block} | {method} | {len(chosen)} "
                f"| {spread([r['pruned']['embedding_fidelity'] for r in chosen])} "
                f"| {spread([r['pruned']['topic_accuracy'] for r in chosen])} "
                f"| {spread([r['speed']['speedup'] for r in chosen])} "
                f"| {statistics.fmean(r['seconds'] for r in chosen):.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, settings: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, block in zip(axes, (1, 32)):
        for method, marker in zip(METHODS, "osd"):
            xs, ys, es = [], [], []
            for row in settings["rows"]:
                sparsity, b = parse_row(row)
                values = [
                    r["pruned"]["topic_accuracy"] for r in runs if r["row"] == row and r["method"] == method
                ]
                if b == block and values:
                    xs.append(sparsity)
                    ys.append(statistics.fmean(values))
                    es.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            if xs:
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.errorbar(
                    [xs[i] for i in order], [ys[i] for i in order], [es[i] for i in order], marker=marker,
                    capsize=3, label=method,
                )  # fmt: skip
        if runs:
            ax.axhline(runs[0]["dense"]["topic_accuracy"], color="gray", linestyle="--", label="dense")
        ax.set_title(f"{block}x{block} tiles")
        ax.set_xlabel("sparsity")
        ax.legend()
    axes[0].set_ylabel("topic accuracy (nearest centroid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="bench/results/quality_cpu.json")
    p.add_argument("--markdown", default="bench/results/quality_cpu.md")
    p.add_argument("--png", default="bench/results/quality_cpu.png")
    p.add_argument("--work-dir", default="runs/quality")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="SPARSITYxTILE, e.g. 0.7x1 0.5x32")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-minutes", type=float, default=240.0)
    p.add_argument(
        "--prune-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="more `rpp-triton prune` flags, shared by every run (last on the line)",
    )
    p.add_argument("--render-only", action="store_true", help="rewrite the table and plot from the JSON")
    opts = p.parse_args()

    saved = {}
    if os.path.isfile(opts.output):
        with open(opts.output) as f:
            saved = json.load(f)
    results = saved.get("results", {})
    if saved and saved["settings"]["prune_args"] != opts.prune_args and not opts.render_only:
        raise SystemExit(f"{opts.output} holds runs made with other prune flags; use another --output")
    settings = {"rows": sorted({*opts.rows, *saved.get("settings", {}).get("rows", [])}, key=ROWS.index)}
    settings["prune_args"] = saved.get("settings", {}).get("prune_args", opts.prune_args)
    meta = saved.get("meta") or machine_info()
    if not opts.render_only:
        os.makedirs(opts.work_dir, exist_ok=True)
        started = time.time()
        with open(os.path.join(opts.work_dir, "quality.log"), "a") as log:
            for seed in opts.seeds:
                for row in opts.rows:
                    for method in opts.methods:
                        key = run_key(method, row, seed)
                        if key in results:
                            continue
                        if time.time() - started > opts.budget_minutes * 60:
                            print("stopping: time budget spent")
                            break
                        print(f"[{(time.time() - started) / 60:5.1f} min] {key} ...", flush=True)
                        results[key] = r = one_run(method, row, seed, opts, log)
                        q = r["pruned"]
                        print(f"    fidelity {q['embedding_fidelity']:.4f}, topic {q['topic_accuracy']:.4f}")
                        with open(opts.output + ".tmp", "w") as f:
                            json.dump({"settings": settings, "meta": meta, "results": results}, f, indent=1)
                        os.replace(opts.output + ".tmp", opts.output)
    text = markdown(results, settings, meta)
    with open(opts.markdown, "w") as f:
        f.write(text)
    plot(results, settings, opts.png)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
