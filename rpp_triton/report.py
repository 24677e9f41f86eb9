"""Per-layer sparsity of a saved model: a terminal table and a picture of the kept tiles."""

from __future__ import annotations

import os

import torch

from rpp_triton.artifacts import REPORT_FILE, read_report, report_block
from rpp_triton.errors import UsageError
from rpp_triton.tiles import as_block, divides, layer_table, tile_rows


def load_layers(model_dir: str, block=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(report dict, {name: weight}) for the pruned weights of a saved model. The layer list comes
    from rpp_report.json when present, else from the default pruning split of the model."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir!r} does not exist")
    report = read_report(model_dir) or {}
    weights = _read_weights(model_dir)
    if report.get("layers"):
        names = [row["name"] for row in report["layers"]]
    else:
        names = _default_pruned(model_dir, weights)
    missing = [n for n in names if n not in weights]
    if missing:
        raise UsageError(f"{model_dir!r}: weight {missing[0]!r} named in {REPORT_FILE} is not in the model")
    if not names:
        raise UsageError(f"{model_dir!r} has no encoder attention/feed-forward weights to report on")
    block = as_block(block) if block else report_block(report, model_dir)
    for name in names:
        if not divides(weights[name].shape, block):
            shape = "x".join(map(str, weights[name].shape))
            raise UsageError(f"{block[0]}x{block[1]} tiles do not divide {name} ({shape})")
    return {**report, "block_size": list(block)}, {n: weights[n] for n in names}


def _default_pruned(model_dir: str, weights: dict) -> list[str]:
    """Names in `weights` that `rpp_triton.param_groups` prunes by default, found by building the
    model's base architecture from its config on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModel

    from rpp_triton import param_groups

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            base = AutoModel.from_config(config)
        pruned = set(param_groups(base)[0]["param_names"])
    except Exception:
        return []
    # Saved task models prefix the base model's names (`bert.encoder...`).
    return [n for n in weights if n in pruned or n.partition(".")[2] in pruned]


def _read_weights(model_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f.startswith("model"))
    if not files:
        raise UsageError(f"{model_dir!r} holds no model*.safetensors weights")
    from safetensors.torch import load_file

    out = {}
    try:
        for f in files:
            out.update({k: v for k, v in load_file(os.path.join(model_dir, f)).items() if v.dim() == 2})
    except Exception:
        raise UsageError(f"{model_dir!r}: cannot read its weights (corrupt safetensors file?)") from None
    return out


def table(weights: dict[str, torch.Tensor], block) -> tuple[list[dict], str]:
    rows = layer_table(list(weights.items()), block)
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  {'tiles kept':>16}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['name']:<{width}}  {shape:>11}  {r['sparsity']:>8.2%}  {r['tiles_kept']:>7}/{r['tiles']:<8}"
        )
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in rows)
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    bh, bw = as_block(block)
    lines.append(f"{'total':<{width}}  {'':>11}  {zeros / total:>8.2%}  ({bh}x{bw} tiles)")
    return rows, "\n".join(lines)


def picture(weights: dict[str, torch.Tensor], block, path: str, max_cells: int = 96) -> None:
    """One panel per weight: white = kept tile, black = pruned. Maps with more than `max_cells`
    tiles per side are pooled, so a pixel shows the kept share of a group of tiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    cols = _panels_per_row(names)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        kept = tile_rows(weights[name], block).ne(0).any(-1).float()
        pool = max(1, -(-max(kept.shape) // max_cells))
        if pool > 1:
            kept = torch.nn.functional.avg_pool2d(kept[None, None], pool, ceil_mode=True)[0, 0]
        ax.imshow(kept.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(
            f"{_short(name)}\n{1 - float((weights[name] != 0).float().mean()):.0%} sparse", fontsize=7
        )
    bh, bw = as_block(block)
    fig.suptitle(f"kept {bh}x{bw} tiles (white) per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panels_per_row(names: list[str]) -> int:
    import re

    layers = {m.group(0) for n in names if (m := re.search(r"layer\.\d+", n))}
    per_layer = len(names) // len(layers) if layers and len(names) % len(layers) == 0 else 6
    return max(1, min(per_layer, 8))


def _short(name: str) -> str:
    import re

    name = re.sub(r"^.*?layer\.(\d+)\.", r"L\1 ", name).removesuffix(".weight")
    return name.replace("attention.self.", "attn.").replace("attention.output.dense", "attn.out")


def quality_lines(report: dict) -> list[str]:
    """A prune run's quality in a few lines: the method, then dense beside pruned on every measure
    its rpp_report.json holds (none for reports without one)."""
    quality = report.get("quality") or {}
    pruned, dense = quality.get("pruned") or {}, quality.get("dense") or {}
    names = [k for k in ("embedding_fidelity", "topic_accuracy", "mlm_accuracy") if k in pruned]
    if not names:
        return []
    bh, bw = report.get("block_size", (1, 1))
    lines = [
        f"{report.get('method', '?')} on {report.get('objective', '?')}: {report.get('sparsity', 0):.1%} "
        f"of the encoder weights zero ({bh}x{bw} tiles, target {report.get('target_sparsity', 0):.0%})",
        f"  {'':10}" + "".join(f"{n:>20}" for n in names),
    ]
    for label, row in (("dense", dense), ("pruned", pruned)):
        lines.append(f"  {label:10}" + "".join(f"{row.get(n, float('nan')):>20.4f}" for n in names))
    if report.get("dense_reference"):
        lines.append(f"  dense reference: {report['dense_reference']}")
    return lines
