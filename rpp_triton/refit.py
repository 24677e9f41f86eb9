"""Least-squares refit of the weights a prune keeps (docs/design.md, "Refit at the hard prune").

Zeroing part of a linear layer's weight changes its output by the pruned weights times their inputs.
The kept weights of each output row can absorb much of that change: with the layer's input
second-moment matrix H = E[x x^T] over calibration tokens, the kept weights that best reproduce the
output of a reference weight w0 (in the least-squares sense over those tokens) solve, row by row,

    H[K, K] w[K] = (H w0)[K]        (K: the row's kept inputs; w is zero elsewhere)

This is the reconstruction step of SparseGPT (Frantar & Alistarh 2023) for a mask that is already
chosen, solved exactly per row instead of column by column. Plain PyTorch, no dependency inside the
package.
"""

from __future__ import annotations

import torch

DAMP = 0.01  # ridge added to H's diagonal, as a share of its mean diagonal


@torch.no_grad()
def refit_kept(
    w0: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, damp: float = DAMP, rows_per_solve: int = 32
) -> torch.Tensor:
    """The weight `[out, in]` that is zero where `mask` (bool, w0's shape) is False and whose kept
    entries minimise sum over calibration tokens of ||w x - w0 x||^2, given `gram` = E[x x^T]
    `[in, in]`, with `damp` x mean(diag(gram)) added to the diagonal (which also keeps the system
    solvable when an input never varies). Returned in w0's dtype, on w0's device.

    Rows are solved in batches of similar kept counts, each as a Cholesky solve of its kept block of
    H (padded with identity rows to the batch's largest count), so the cost is about
    out x kept^3 / 3 rather than out x in^3."""
    if w0.dim() != 2 or mask.shape != w0.shape or gram.shape != (w0.shape[1], w0.shape[1]):
        raise ValueError(
            f"refit_kept needs w0 [out, in], a mask of its shape and gram [in, in]; got "
            f"{tuple(w0.shape)}, {tuple(mask.shape)}, {tuple(gram.shape)}"
        )
    device = w0.device
    h = gram.to(device=device, dtype=torch.float32)
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    target = w0.float() @ h  # row r: (H w0_r)
    counts = mask.sum(1)
    # each row's kept columns first, in order (a stable sort of "not kept")
    order_in_row = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    out = torch.zeros(w0.shape, device=device, dtype=torch.float32)
    rows_by_count = torch.argsort(counts)
    for start in range(0, w0.shape[0], rows_per_solve):
        rows = rows_by_count[start : start + rows_per_solve]
        k = int(counts[rows].max())
        if k == 0:
            continue
        cols = order_in_row[rows, :k]
        valid = (torch.arange(k, device=device)[None, :] < counts[rows, None]).float()
        block = h[cols[:, :, None], cols[:, None, :]] * valid[:, :, None] * valid[:, None, :]
        block = block + torch.diag_embed(1 - valid)  # padding rows solve to 0
        rhs = target[rows].gather(1, cols) * valid
        solution = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(block))[..., 0] * valid
        out[rows[:, None], cols] = solution  # padding columns are pruned ones: they get 0
    return out.to(w0.dtype)
