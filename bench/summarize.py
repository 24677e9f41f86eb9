"""Print a short table from pytest-benchmark JSON files: median, baseline, ratio, rate; then the
block-sparse matmul against its roofline.

    python bench/summarize.py bench/results/gpu/*.json [--copy-gbps 3000]

The baseline of a group is the entry with extra_info baseline=True, else impl "dense" or
"adamw_fused". ratio = baseline median / median (above 1: faster than the baseline).

Roofline (DESIGN.md, performance targets): a layer at tile sparsity s cannot beat dense by more than
dense time / max(compute floor, memory floor), where the compute floor is (1 - s) x the dense FLOPs
at cuBLAS's measured rate (so (1 - s) x the dense time) and the memory floor is the bytes of x, y
and the stored tiles at the card's copy bandwidth. The bandwidth is `--copy-gbps`, else the fastest
"copy" entry of the same device in the files (bench_adam_prox.py measures it in the same run).
"""

import argparse
import json
import sys
from collections import defaultdict

BASELINE_IMPLS = ("dense", "adamw_fused")
RATE_KEYS = ("gbps", "dense_equiv_tflops", "useful_tflops", "sequences_per_s", "requests_per_s")
ITEM_BYTES = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2}


def load(paths):
    groups = defaultdict(list)
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            print(f"{path}: no benchmark data (nothing ran, or the run was cut short)")
            continue
        for b in data.get("benchmarks", []):
            groups[b.get("group") or b["name"]].append(b)
    return groups


def baseline_of(entries):
    for e in entries:
        if e.get("extra_info", {}).get("baseline"):
            return e
    for impl in BASELINE_IMPLS:
        for e in entries:
            if e.get("extra_info", {}).get("impl") == impl:
                return e
    return None


def print_table(groups) -> None:
    print(f"{'group / impl':<78} {'median ms':>10} {'base ms':>10} {'ratio':>7}  rate")
    for group, entries in groups.items():
        base = baseline_of(entries)
        print(group)
        for e in sorted(entries, key=lambda e: e["stats"]["median"]):
            info = e.get("extra_info", {})
            median = e["stats"]["median"] * 1e3
            base_ms = base["stats"]["median"] * 1e3 if base else float("nan")
            rates = ", ".join(
                f"{k}={info[k]:.3g}" for k in RATE_KEYS if isinstance(info.get(k), (int, float))
            )
            name = "  " + str(info.get("impl", e["name"]))
            print(f"{name:<78} {median:>10.3f} {base_ms:>10.3f} {base_ms / median:>7.2f}  {rates}")


def copy_bandwidths(groups) -> dict[str, float]:
    """The fastest measured copy, in GB/s, per device name."""
    best = {}
    for entries in groups.values():
        for e in entries:
            info = e.get("extra_info", {})
            if info.get("impl") == "copy" and isinstance(info.get("gbps"), (int, float)):
                best[info.get("device")] = max(best.get(info.get("device"), 0.0), info["gbps"])
    return best


def floor_bytes(info) -> int | None:
    """Bytes of x, y and the stored tiles: recorded by bench_bsmm.py, else (older files) counted from
    the shape, dtype, tile and sparsity (the benchmark zeroes round(sparsity x tiles) tiles)."""
    if "floor_bytes" in info:
        return info["floor_bytes"]
    item = ITEM_BYTES.get(info.get("dtype"))
    if item is None or not {"shape", "tile", "sparsity"} <= info.keys():
        return None
    (m, k, n), (bh, bw) = info["shape"], info["tile"]
    tiles = (n // bh) * (k // bw)
    stored = tiles - round(info["sparsity"] * tiles)
    return (m * k + m * n + stored * bh * bw) * item


def print_roofline(groups, copy_gbps: float | None) -> None:
    measured = copy_bandwidths(groups)
    rows = []
    for group, entries in groups.items():
        by_impl = {e.get("extra_info", {}).get("impl"): e for e in entries}
        if "bsmm" not in by_impl or "dense" not in by_impl:
            continue
        info = by_impl["bsmm"]["extra_info"]
        dense, bsmm = by_impl["dense"]["stats"]["median"], by_impl["bsmm"]["stats"]["median"]
        compute = (1 - info["sparsity"]) * dense
        gbps = copy_gbps or measured.get(info.get("device"))
        size = floor_bytes(info)
        memory = size / (gbps * 1e9) if gbps and size is not None else None
        limit = dense / max(compute, memory or 0.0)
        rows.append((group, dense, bsmm, compute, memory, limit, dense / bsmm / limit))
    if not rows:
        return
    if copy_gbps:
        source = f"{copy_gbps:.0f} GB/s (--copy-gbps)"
    else:
        source = ", ".join(f"{g:.0f} GB/s on {d}" for d, g in measured.items()) or "none: compute floor only"
    print(f"\nbsmm roofline: limit = dense / max(compute floor, memory floor); copy bandwidth {source}")
    print(
        f"{'group':<78} {'dense ms':>9} {'bsmm ms':>9} {'speedup':>8} {'compute ms':>10} "
        f"{'memory ms':>10} {'limit':>7} {'reached':>8}"
    )
    for group, dense, bsmm, compute, memory, limit, reached in rows:
        memory_ms = f"{memory * 1e3:10.3f}" if memory is not None else f"{'n/a':>10}"
        print(
            f"{group:<78} {dense * 1e3:9.3f} {bsmm * 1e3:9.3f} {dense / bsmm:7.2f}x {compute * 1e3:10.3f} "
            f"{memory_ms} {limit:6.2f}x {reached:8.0%}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="FILE.json")
    p.add_argument("--copy-gbps", type=float, help="the card's copy bandwidth (default: measured in FILEs)")
    args = p.parse_args(argv)
    groups = load(args.paths)
    if not groups:
        print("no benchmarks found")
        return 1
    print_table(groups)
    print_roofline(groups, args.copy_gbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
