"""Input-feature scales for activation-aware pruning scores (docs/design.md, "Pruning scores").

A weight's effect on its layer's output is its size times the size of the input it multiplies:
w_ij contributes w_ij * x_j. `input_rms` measures ||x_j|| (as an RMS over tokens) for every pruned
linear layer on a few training blocks, once, on the starting model, so that pruning ranks the
weights by |w_ij| * rms(x_j) (Wanda, Sun et al. 2023) rather than by |w_ij| alone.
"""

from __future__ import annotations

import torch

CALIBRATION_BLOCKS = 64


@torch.no_grad()
def input_rms(model, names: dict, blocks: list[dict], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{parameter name: RMS over the calibration tokens of each of its layer's input features,
    `[in]` fp32} for every `nn.Linear` whose weight is a key of `names` ({id(weight): name}).
    `blocks` are training blocks (input_ids, attention_mask lists); at most CALIBRATION_BLOCKS of
    them, evenly spread, are run through the model in eval mode. Deterministic: every process of a
    distributed run measures the same scales."""
    if not blocks:
        raise ValueError("input_rms needs at least one calibration block")
    step = max(1, len(blocks) // CALIBRATION_BLOCKS)
    chosen = blocks[::step][:CALIBRATION_BLOCKS]
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = 0.0
    weights = {}  # the current batch's token mask, flattened

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x.square() * weights["mask"][:, None]).sum(0)

        return record

    handles = [
        module.register_forward_hook(hook(names[id(module.weight)]))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and id(module.weight) in names
    ]
    base = getattr(model, "base_model", model)  # the encoder: a masked-LM head is not pruned
    was_training = base.training
    base.eval()
    try:
        for start in range(0, len(chosen), batch_size):
            rows = chosen[start : start + batch_size]
            batch = {
                k: torch.tensor([r[k] for r in rows], device=device) for k in ("input_ids", "attention_mask")
            }
            weights["mask"] = batch["attention_mask"].reshape(-1).float()
            count += float(weights["mask"].sum())
            with torch.autocast(device.type, enabled=False):
                base(**batch)
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    missing = sorted(set(names.values()) - sums.keys())
    if missing:
        raise ValueError(f"input_rms: no input reached {missing[0]} (not an nn.Linear of the model?)")
    return {name: (s / max(count, 1.0)).sqrt().cpu() for name, s in sums.items()}
