"""Input statistics of the pruned layers on calibration text (docs/design.md, "Pruning scores" and
"Refit at the hard prune").

A weight's effect on its layer's output is its size times the size of the input it multiplies:
w_ij contributes w_ij * x_j. `input_rms` measures ||x_j|| (as an RMS over tokens) for every pruned
linear layer on a few training blocks, once, on the starting model, so that pruning ranks the
weights by |w_ij| * rms(x_j) (Wanda, Sun et al. 2023) rather than by |w_ij| alone. `input_gram`
measures the whole second-moment matrix E[x x^T] on the same tokens, which the least-squares refit
of the kept weights needs.
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
    sums, count = _accumulate(model, names, blocks, batch_size, lambda x: x.square().sum(0))
    return {name: (s / max(count, 1.0)).sqrt().cpu() for name, s in sums.items()}


@torch.no_grad()
def input_gram(model, names: dict, blocks: list[dict], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{parameter name: E[x x^T] over the calibration tokens, `[in, in]` fp32 on the CPU}: the
    second-moment matrix of each pruned layer's input, for the least-squares refit at the hard
    prune (`rpp_triton.refit`); its diagonal is `input_rms` squared. Same tokens and arguments as
    `input_rms`. Layers fed the same input (a query, key and value) share one matrix."""
    sums, count = _accumulate(model, names, blocks, batch_size, lambda x: x.T @ x, share_inputs=True)
    shared: dict[int, torch.Tensor] = {}
    out = {}
    for name, s in sums.items():
        key = id(s)
        if key not in shared:
            shared[key] = (s / max(count, 1.0)).cpu()
        out[name] = shared[key]
    return out


def _accumulate(model, names: dict, blocks: list[dict], batch_size: int, stat, share_inputs: bool = False):
    """({name: sum over the calibration tokens of stat(x)}, token count) for the input x `[tokens,
    in]` (padding rows zeroed) of every `nn.Linear` whose weight is in `names`. With `share_inputs`,
    layers that receive the very same input tensor in a forward pass accumulate into one sum (the
    same object under each name) and `stat` runs once for them."""
    if not blocks:
        raise ValueError("calibration needs at least one training block")
    step = max(1, len(blocks) // CALIBRATION_BLOCKS)
    chosen = blocks[::step][:CALIBRATION_BLOCKS]
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # name -> the layer whose sum it shares
    batch: dict = {}  # the current batch's flattened token mask and the inputs seen in it

    def hook(name):
        def record(module, args, output):
            x = args[0]
            # the tensor is kept in `seen` for the batch, so its id cannot be reused meanwhile
            first = batch["seen"].setdefault(id(x), (x, name))[1] if share_inputs else name
            owner.setdefault(name, first)
            if owner[name] != name:
                return  # accumulated under the layer that saw this input first
            rows = x.detach().float().reshape(-1, x.shape[-1]) * batch["mask"][:, None]
            sums[name] = sums.get(name, 0) + stat(rows)

        return record

    handles = [
        module.register_forward_hook(hook(names[id(module.weight)]))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and id(module.weight) in names
    ]
    base = getattr(model, "base_model", model)  # the encoder: a masked-LM head is not pruned
    was_training = base.training
    base.eval()
    count = 0.0
    try:
        for start in range(0, len(chosen), batch_size):
            rows = chosen[start : start + batch_size]
            inputs = {
                k: torch.tensor([r[k] for r in rows], device=device) for k in ("input_ids", "attention_mask")
            }
            batch["mask"] = inputs["attention_mask"].reshape(-1).float()
            batch["seen"] = {}
            count += float(batch["mask"].sum())
            with torch.autocast(device.type, enabled=False):
                base(**inputs)
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    missing = sorted(set(names.values()) - owner.keys())
    if missing:
        raise ValueError(f"calibration: no input reached {missing[0]} (not an nn.Linear of the model?)")
    return {name: sums[owner[name]] for name in owner}, count
