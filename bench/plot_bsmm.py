"""Plot speedup over dense F.linear against tile sparsity from a bench_bsmm.py benchmark JSON.

python bench/plot_bsmm.py bench/results/bsmm_cpu.json bench/results/bsmm_cpu.png
"""

import argparse
import json
from collections import defaultdict


def speedups(path, stat="median"):
    """{(device, dtype, shape, tile): {impl: [(sparsity, dense time / impl time)]}} from `stat` times."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    by_group = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "sparsity" in info and "impl" in info and "tile" in info and "encoder" not in b["group"]:
            by_group[b["group"]][info["impl"]] = (info, b["stats"][stat])
    series = defaultdict(lambda: defaultdict(list))
    for impls in by_group.values():
        if "dense" not in impls:
            continue
        info, dense_t = impls["dense"]
        key = (info["device"], info["dtype"], tuple(info["shape"]), info["tile"][0])
        for impl, (other, t) in impls.items():
            if impl != "dense":
                series[key][impl].append((other["sparsity"], dense_t / t))
    return series


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("png_path")
    parser.add_argument("--stat", default="median", choices=["median", "min", "mean"], help="time statistic")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = speedups(args.json_path, args.stat)
    if not series:
        raise SystemExit(f"no linear-layer benchmarks with a dense baseline in {args.json_path}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"bsmm": "-o", "torch_bsr": "--s"}
    for (_device, _dtype, shape, tile), impls in sorted(series.items()):
        m, k, n = shape
        for impl, points in sorted(impls.items()):
            points.sort()
            label = f"{impl} x[{m},{k}]·W[{n},{k}]ᵀ tile {tile}"
            ax.plot(*zip(*points), styles.get(impl, "-x"), label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("tile sparsity (fraction of all-zero tiles)")
    ax.set_ylabel(f"speedup over dense F.linear ({args.stat} times)")
    ax.set_yscale("log", base=2)
    devices = sorted({(d, t) for d, t, *_ in series})
    ax.set_title("block-sparse linear: " + ", ".join(f"{d} {t.replace('torch.', '')}" for d, t in devices))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png_path, dpi=120)
    print(f"wrote {args.png_path}")


if __name__ == "__main__":
    main()
