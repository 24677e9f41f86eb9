"""Print a short table from pytest-benchmark JSON files: median, baseline, ratio, rate.

    python bench/summarize.py bench/results/gpu/*.json

The baseline of a group is the entry with extra_info baseline=True, else impl "dense" or
"adamw_fused". ratio = baseline median / median (above 1: faster than the baseline).
"""

import json
import sys
from collections import defaultdict

BASELINE_IMPLS = ("dense", "adamw_fused")
RATE_KEYS = ("gbps", "dense_equiv_tflops", "useful_tflops", "sequences_per_s", "requests_per_s")


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


def main(paths) -> int:
    groups = load(paths)
    if not groups:
        print("no benchmarks found")
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
