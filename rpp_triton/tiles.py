"""The one tile geometry: how a 2-D weight `[out, in]` splits into `bh x bw` tiles, their RMS, the
tile-level mask, sparsity counts, tile scores and the hard prune (docs/design.md, "Tiles").

Everything here is plain PyTorch with no dependency inside the package, so the kernels' reference
functions, the optimizer, the training loop, the sparse modules and the server all share it.
"""

from __future__ import annotations

import hashlib

import torch

Block = tuple[int, int]


def as_block(block_size) -> Block:
    """Normalise an int or (bh, bw) pair to a (bh, bw) tuple of positive ints."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block = (block_size, block_size)
    else:
        try:
            block = tuple(block_size)
        except TypeError:
            block = ()
    if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise ValueError(f"block_size must be a positive int or a (bh, bw) pair, got {block_size!r}")
    return block


def divides(shape, block: Block) -> bool:
    """True when a 2-D `shape` splits into whole `block` tiles."""
    return len(shape) == 2 and shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def tiles_4d(x: torch.Tensor, block: Block) -> torch.Tensor:
    """View a 2-D `x[out, in]` as `[out/bh, bh, in/bw, bw]` so tile reductions are over dims (1, 3)."""
    bh, bw = block
    return x.view(x.shape[0] // bh, bh, x.shape[1] // bw, bw)


def tile_rows(x: torch.Tensor, block) -> torch.Tensor:
    """`x[out, in]` as `[out/bh, in/bw, bh*bw]`: one row per tile (a copy where x is not tiled in
    memory)."""
    bh, bw = as_block(block)
    o, i = x.shape
    return x.reshape(o // bh, bh, i // bw, bw).permute(0, 2, 1, 3).reshape(o // bh, i // bw, bh * bw)


def tile_rms(x: torch.Tensor, block: Block) -> torch.Tensor:
    """rms(x_B) = sqrt(mean(x_B ** 2)) per tile, shape [out/bh, in/bw]; |x| for 1x1 tiles."""
    if block == (1, 1):
        return x.abs()
    bh, bw = block
    # Row segments first (contiguous, no temporary), then the bh rows of each tile: on the CPU this
    # ran ~8x faster than one reduction over the strided tile view.
    segments = torch.linalg.vector_norm(x.reshape(x.shape[0], x.shape[1] // bw, bw), dim=-1)
    return (segments.square().view(x.shape[0] // bh, bh, -1).sum(dim=1) / (bh * bw)).sqrt()


SCORES = ("rms", "magnitude", "activation")
SCOPES = ("global", "layer", "row")


def column_tiles(scale: torch.Tensor, bw: int) -> torch.Tensor:
    """Per-input-feature `scale[in]` as one value per tile column, `[in/bw]`: the RMS over the
    tile's columns (the scale itself for 1-wide tiles)."""
    scale = scale.detach().float()
    return scale if bw == 1 else scale.view(-1, bw).square().mean(-1).sqrt()


def tile_scores(
    w: torch.Tensor, block, score: str = "rms", column_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-tile score `[out/bh, in/bw]`: RMS (`rms`), mean absolute value (`magnitude`), or the RMS
    times the RMS of the tile's input features (`activation`; `column_scale[in]` is each input
    feature's RMS on calibration text, so for 1x1 tiles the score is |w_ij| * ||x_j||). For 1x1
    tiles `rms` and `magnitude` are both |w|."""
    block = as_block(block)
    w = w.detach().float()
    if score == "rms":
        return tile_rms(w, block)
    if score == "magnitude":
        return tile_rows(w, block).abs().mean(-1)
    if score == "activation":
        if column_scale is None or column_scale.numel() != w.shape[1]:
            raise ValueError(f"score 'activation' needs a column_scale of {w.shape[1]} input features")
        return tile_rms(w, block) * column_tiles(column_scale.to(w.device), block[1])[None, :]
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def scope_normalizers(scores: list[torch.Tensor], target: float, scope: str) -> list[torch.Tensor]:
    """What each tile score is divided by before one global selection, so that the selection
    prunes about `target` of every weight (`layer`) or every tile-row (`row`) rather than the
    lowest scores overall (`global`): the group's own `target` quantile of `scores`, taken once on
    the dense weights and kept for every later prune of the run. Broadcastable to each score."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    out = []
    for s in scores:
        if scope == "global" or target <= 0:
            out.append(torch.ones((), device=s.device))
            continue
        rows = s.reshape(1, -1) if scope == "layer" else s
        k = min(rows.shape[1], max(1, round(target * rows.shape[1])))
        q = rows.float().kthvalue(k, dim=1, keepdim=True).values
        # a group whose quantile is 0 (mostly zero already) falls back to its largest score
        q = torch.where(q > 0, q, rows.float().amax(dim=1, keepdim=True)).clamp_min(1e-30)
        out.append(q.reshape(()) if scope == "layer" else q)
    return out


def expand_tiles(t: torch.Tensor, block) -> torch.Tensor:
    """Broadcast a per-tile `[R, C]` tensor back to the element shape `[R*bh, C*bw]`."""
    bh, bw = as_block(block)
    if (bh, bw) == (1, 1):
        return t
    return t.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)


def kept_tiles(w: torch.Tensor, block) -> torch.Tensor:
    """Bool `[out/bh, in/bw]`: True where the tile holds any non-zero element."""
    block = as_block(block)
    return tiles_4d(w.detach() != 0, block).any(dim=3).any(dim=1)


def tile_mask(w: torch.Tensor, block) -> torch.Tensor:
    """Bool mask of w's shape: True where w's tile holds any non-zero element (element-wise for
    1x1 tiles and for tensors that are not 2-D)."""
    block = as_block(block)
    if block == (1, 1) or w.dim() != 2:
        return w.detach() != 0
    return expand_tiles(kept_tiles(w, block), block)


def tile_sparsity(w: torch.Tensor, block) -> float:
    """Fraction of the tiles of a 2-D `w` that are entirely zero; ValueError when it does not tile."""
    block = as_block(block)
    if not divides(w.shape, block):
        raise ValueError(f"weight of shape {tuple(w.shape)} does not divide into {block[0]}x{block[1]} tiles")
    return 1.0 - kept_tiles(w, block).float().mean().item()


def count_nonzero(w: torch.Tensor) -> int:
    """Non-zero elements. On the CPU numpy's `count_nonzero` took ~10 ms for MiniLM's 10.6M pruned
    weights where `(w != 0).sum()` took ~1 s on a shared 2-core machine."""
    w = w.detach()
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64, torch.float16):
        import numpy as np

        return int(np.count_nonzero(w.contiguous().numpy()))
    return int(torch.count_nonzero(w))


def sparsity_of(tensors) -> float:
    """Share of zero elements over all `tensors`."""
    zeros = total = 0
    for w in tensors:
        zeros += w.numel() - count_nonzero(w)
        total += w.numel()
    return zeros / total if total else 0.0


def layer_table(named: list[tuple[str, torch.Tensor]], block) -> list[dict]:
    """One row per weight: name, shape, element sparsity, kept and total tiles."""
    rows = []
    for name, w in named:
        tiles = kept_tiles(w, block)
        rows.append(
            {
                "name": name,
                "shape": list(w.shape),
                "sparsity": 1.0 - count_nonzero(w) / w.numel() if w.numel() else 0.0,
                "tiles_kept": int(tiles.sum()),
                "tiles": tiles.numel(),
            }
        )
    return rows


def mask_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of every weight's non-zero pattern, in order: equal digests, equal masks."""
    h = hashlib.sha256()
    for name, w in named:
        h.update(name.encode())
        h.update(w.detach().ne(0).cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def hard_prune(
    named: list[tuple[str, torch.Tensor]],
    target: float,
    block,
    score: str = "rms",
    column_scales: dict | None = None,
    normalizers: dict | None = None,
) -> dict:
    """Zero the lowest-scoring tiles over all `named` weights in one selection, so that exactly
    round(target * tiles) tiles are pruned; returns {name: bool mask}. Scores are `tile_scores`
    (with `column_scales[name]` for `activation`) divided by `normalizers[name]` where given (see
    `scope_normalizers`). Tiles pruned already score 0 and go first."""
    block = as_block(block)
    column_scales, normalizers = column_scales or {}, normalizers or {}
    scores = []
    for name, w in named:
        s = tile_scores(w, block, score, column_scales.get(name))
        if name in normalizers:
            s = s / normalizers[name].to(s.device)
        scores.append(s)
    flat = torch.cat([s.flatten() for s in scores])
    n_prune = round(target * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune:
        # sort is stable, so equal scores resolve the same way on every rank
        keep[torch.sort(flat, stable=True).indices[:n_prune]] = False
    masks, start = {}, 0
    for (name, w), s in zip(named, scores):
        tiles = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
        mask = expand_tiles(tiles, block)
        w.mul_(mask.to(w.dtype))
        masks[name] = mask
    return masks
