"""Block-sparse inference: turn pruned `nn.Linear` layers into BSR layers that skip zero tiles.

`BlockSparseLinear.from_dense(linear)` keeps only the non-zero tiles of the weight;
`sparsify(model)` swaps every suitable `nn.Linear` of a model (any `nn.Module`, including
`transformers` BERT-family models) in place and `densify(model)` undoes it. `choose_layers` keeps a
layer sparse only where that is faster than dense, and `compile_sparse` compiles the model.
`save_sparse` writes only the stored tiles (safetensors) and `load_sparse` reads them back into
either form; `save_pretrained` of a sparsified `transformers` model writes plain dense weights.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rpp_triton.backend import check_backend
from rpp_triton.kernels.bsmm import bsmm_op, bsr_from_dense, bsr_to_dense
from rpp_triton.models import following_gelu
from rpp_triton.tiles import as_block, tile_sparsity

__all__ = [
    "BlockSparseLinear", "sparsify", "densify", "choose_layers", "compile_sparse", "save_sparse",
    "load_sparse", "tile_sparsity",
]  # fmt: skip

SAFETENSORS_NAME = "sparse_model.safetensors"
_META_KEY = "rpp_triton.sparse"
_BSR = ("values", "col_idx", "row_ptr")


class BlockSparseLinear(nn.Module):
    """y = x @ W^T + b (then exact GELU when `gelu`) with W stored as its non-zero tiles (BSR).

    For inference: the tiles, indices and bias are buffers that follow `.to()`, and no gradient flows
    through the layer; use `densify` to train again. Its state dict holds the dense `weight` and
    `bias` of an `nn.Linear` (densified on save, re-packed into tiles on load), so `state_dict`,
    `load_state_dict` and `save_pretrained` see an ordinary linear layer; `save_sparse` writes the
    tiles themselves.
    """

    def __init__(self, in_features, out_features, block_size, values, col_idx, row_ptr, bias=None,
                 backend="auto", gelu=False):  # fmt: skip
        super().__init__()
        bh, bw = as_block(block_size)
        if out_features % bh or in_features % bw:
            raise ValueError(
                f"weight of shape ({out_features}, {in_features}) does not divide into {bh}x{bw} tiles"
            )
        if tuple(values.shape[1:]) != (bh, bw) or row_ptr.numel() != out_features // bh + 1:
            raise ValueError("values must be [nnz, bh, bw] and row_ptr have out_features // bh + 1 entries")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (bh, bw)
        self.backend = check_backend(backend)
        self.gelu = bool(gelu)
        self.register_buffer("values", values.detach())
        self.register_buffer("col_idx", col_idx.detach().to(torch.int32))
        self.register_buffer("row_ptr", row_ptr.detach().to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size=32, backend="auto", gelu=False) -> BlockSparseLinear:
        """The block-sparse equivalent of `linear` (tiles of `block_size`, an int or (bh, bw))."""
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"from_dense needs a module with a 2-D weight, got {type(linear).__name__}")
        if not weight.is_floating_point():
            raise ValueError(f"weight must be floating point, got {weight.dtype}")
        bh, bw = as_block(block_size)
        out_f, in_f = weight.shape
        if out_f % bh or in_f % bw:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not divide into {bh}x{bw} tiles")
        values, col_idx, row_ptr = bsr_from_dense(weight, (bh, bw))
        bias = getattr(linear, "bias", None)
        return cls(in_f, out_f, (bh, bw), values, col_idx, row_ptr, bias, backend=backend, gelu=gelu)

    @property
    def nnz_tiles(self) -> int:
        return self.values.shape[0]

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's tiles that are not stored (all zero)."""
        bh, bw = self.block_size
        return 1.0 - self.nnz_tiles / ((self.out_features // bh) * (self.in_features // bw))

    def dense_weight(self) -> torch.Tensor:
        return bsr_to_dense(self.values, self.col_idx, self.row_ptr, self.in_features)

    def to_linear(self) -> nn.Linear:
        """An `nn.Linear` with the same weight and bias (the GELU, if fused, is not part of it)."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`torch.ops.rpp_triton.bsmm` after checks that raise ValueError, not a kernel error."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"input must be floating point, got {x.dtype}")
        if x.dtype != self.values.dtype:
            raise ValueError(
                f"input is {x.dtype} but the layer's weights are {self.values.dtype}; "
                "cast the input or call .to(dtype) on the model"
            )
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {self.values.device}")
        return bsmm_op(x, self.values, self.col_idx, self.row_ptr, self.bias, self.gelu, self.backend)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key in ("weight", "bias") if self.bias is not None else ("weight",):
            if prefix + key not in state_dict:
                missing.append(prefix + key)
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            if tuple(weight.shape) != (self.out_features, self.in_features):
                errors.append(
                    f"size mismatch for {prefix}weight: checkpoint {tuple(weight.shape)}, "
                    f"layer ({self.out_features}, {self.in_features})"
                )
            else:
                weight = weight.to(device=self.values.device, dtype=self.values.dtype)
                for name, t in zip(_BSR, bsr_from_dense(weight, self.block_size)):
                    setattr(self, name, t)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])
        if strict:
            unexpected.extend(
                k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in ("weight", "bias")
            )

    def extra_repr(self) -> str:
        bh, bw = self.block_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size=({bh}, {bw}), "
            f"sparsity={self.sparsity:.3f}, bias={self.bias is not None}, gelu={self.gelu}, "
            f"backend={self.backend!r}"
        )


class FusedActivation(nn.Identity):
    """Stands where an activation was fused into the sibling BlockSparseLinear named `layer`; keeps
    the original so `densify` can put it back."""

    def __init__(self, original: nn.Module, layer: str):
        super().__init__()
        self.original = original
        self.layer = layer

    def extra_repr(self) -> str:
        return f"fused into {self.layer!r}"


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under several names (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def sparsify(model: nn.Module, block_size=32, min_sparsity=0.0, backend="auto", fuse_gelu=True):
    """Swap, in place, each `nn.Linear` whose tile sparsity is >= `min_sparsity` for a BlockSparseLinear.

    Layers whose weight does not divide into tiles, tied weights, and the projections inside
    `nn.MultiheadAttention` (which reads their weights directly) are left dense. With `fuse_gelu`,
    an exact GELU right after a swapped layer (BERT's intermediate block, or the next module of an
    `nn.Sequential`) runs in the layer's epilogue. Returns the model (the new layer if `model` is
    itself an `nn.Linear`).
    """
    bh, bw = as_block(block_size)
    check_backend(backend)
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")

    def eligible(linear):
        out_f, in_f = linear.weight.shape
        return (
            not out_f % bh
            and not in_f % bw
            and linear.weight.is_floating_point()
            and id(linear.weight) not in shared
            and tile_sparsity(linear.weight, (bh, bw)) >= min_sparsity
        )

    shared = _shared_weights(model)
    if isinstance(model, nn.Linear):
        return BlockSparseLinear.from_dense(model, (bh, bw), backend) if eligible(model) else model
    for parent in list(model.modules()):
        if isinstance(parent, (nn.MultiheadAttention, BlockSparseLinear)):
            continue
        for name, child in list(parent._modules.items()):
            if type(child) is not nn.Linear or not eligible(child):
                continue
            act_name = following_gelu(parent, name) if fuse_gelu else None
            layer = BlockSparseLinear.from_dense(child, (bh, bw), backend, gelu=act_name is not None)
            setattr(parent, name, layer)
            if act_name is not None:
                setattr(parent, act_name, FusedActivation(getattr(parent, act_name), name))
    return model


def densify(model: nn.Module, layers=None) -> nn.Module:
    """Inverse of `sparsify`: each BlockSparseLinear (only those named in `layers`, if given) back to
    an `nn.Linear`, its fused GELU restored. Returns the model (for a BlockSparseLinear itself, the
    `nn.Linear`, followed by `nn.GELU` in an `nn.Sequential` where one was fused)."""
    if isinstance(model, BlockSparseLinear):
        if model.gelu:
            return nn.Sequential(model.to_linear(), nn.GELU())
        return model.to_linear()
    for path, parent in list(model.named_modules()):
        undone = set()
        for name, child in list(parent._modules.items()):
            full = f"{path}.{name}" if path else name
            if isinstance(child, BlockSparseLinear) and (layers is None or full in layers):
                setattr(parent, name, child.to_linear())
                undone.add(name)
        for name, child in list(parent._modules.items()):
            if isinstance(child, FusedActivation) and child.layer in undone:
                setattr(parent, name, child.original)
    return model


# ----------------------------------------------------------------------------------------------
# Sparse where it pays, compiled
# ----------------------------------------------------------------------------------------------
def best_time(fn, repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one warm-up call (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _dense_forward(x, weight, bias, gelu):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


@torch.no_grad()
def choose_layers(model: nn.Module, example_input, timer=best_time) -> dict[str, dict]:
    """Keep each BlockSparseLinear of `model` only where it is faster than dense; densify the others
    in place.

    Each layer is timed, sparse and as a dense `F.linear` (plus its fused GELU), on the input it
    receives when `model` runs `example_input` (a dict of keyword arguments, a tuple of positional
    ones, or one tensor), so pass the batch shape the model will serve. `timer(fn) -> seconds` times
    a call without arguments. Returns {layer name: {"sparse_s", "dense_s", "sparse"}}.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
    inputs = {}

    def keep_input(name, _, args):
        inputs.setdefault(name, args[0])

    hooks = [m.register_forward_pre_hook(functools.partial(keep_input, n)) for n, m in layers.items()]
    try:
        if isinstance(example_input, Mapping):
            model(**example_input)
        elif isinstance(example_input, tuple):
            model(*example_input)
        else:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    report = {}
    for name, layer in layers.items():
        if name not in inputs:
            continue  # not reached by this input: left as it is
        x = inputs[name]
        dense = functools.partial(_dense_forward, x, layer.dense_weight(), layer.bias, layer.gelu)
        sparse_s, dense_s = timer(functools.partial(layer, x)), timer(dense)
        report[name] = {"sparse_s": sparse_s, "dense_s": dense_s, "sparse": sparse_s < dense_s}
    densify(model, {n for n, r in report.items() if not r["sparse"]})
    return report


def compile_sparse(model: nn.Module, mode: str | None = None, dynamic: bool | None = None) -> nn.Module:
    """`torch.compile(model, fullgraph=True, mode=mode, dynamic=dynamic)` for inference: the model is
    put in eval mode with gradients off first (the block-sparse op has no backward). On a GPU,
    `mode="reduce-overhead"` captures the forward in CUDA graphs."""
    model.eval().requires_grad_(False)
    return torch.compile(model, fullgraph=True, mode=mode, dynamic=dynamic)


# ----------------------------------------------------------------------------------------------
# Compact save / load
# ----------------------------------------------------------------------------------------------
def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent), name, module)


def save_sparse(model: nn.Module, directory) -> str:
    """Write a sparsified model compactly: only the stored tiles of each BlockSparseLinear.

    Creates `directory/sparse_model.safetensors` (plus `config.json` for `transformers` models) and
    returns the file's path. Tied tensors are written once.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    layers, fused = {}, {}
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseLinear):
            layers[name] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "block_size": list(module.block_size),
                "gelu": module.gelu,
            }
            del state[f"{name}.weight"]  # the dense form of the state dict: store the tiles instead
            state.update({f"{name}.{k}": getattr(module, k) for k in _BSR})
        elif isinstance(module, FusedActivation):
            fused[name] = module.layer
    tensors, aliases, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    meta = {"format": "pt", _META_KEY: json.dumps({"layers": layers, "fused": fused, "aliases": aliases})}
    path = os.path.join(directory, SAFETENSORS_NAME)
    save_file(tensors, path, metadata=meta)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]  # what load_sparse rebuilds
        config.save_pretrained(directory)
    return path


def _model_from_config(directory) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def load_sparse(directory, model: nn.Module | None = None, dense=False, backend="auto") -> nn.Module:
    """Load what `save_sparse` wrote, into `model` or (for `transformers` models) one built from the
    saved config. `dense=False` gives the sparse model back; `dense=True` a plain dense model with
    `nn.Linear` layers (for `transformers`, ready for `save_pretrained` / `from_pretrained`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} in {directory}")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "null") or "null")
    if meta is None:
        raise ValueError(f"{path} was not written by save_sparse (no {_META_KEY} metadata)")
    tensors = load_file(path)
    for key, source in meta["aliases"].items():
        tensors[key] = tensors[source]
    if model is None:
        model = _model_from_config(directory)
    model = densify(model)  # start from the plain form, whatever the caller handed in

    for name, info in meta["layers"].items():
        linear = _get(model, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"{name} in the checkpoint is a sparse linear layer but the model has {linear!r}"
            )
        values, col_idx, row_ptr = (tensors.pop(f"{name}.{k}") for k in _BSR)
        bias = tensors.pop(f"{name}.bias", None)
        if dense:
            with torch.no_grad():
                linear.weight.copy_(bsr_to_dense(values, col_idx, row_ptr, info["in_features"]))
                if bias is not None:
                    linear.bias.copy_(bias)
        else:
            layer = BlockSparseLinear(
                info["in_features"], info["out_features"], info["block_size"], values, col_idx, row_ptr,
                bias, backend=backend, gelu=info["gelu"],
            )  # fmt: skip
            _set(model, name, layer.to(device=linear.weight.device, dtype=linear.weight.dtype))
    for name, layer_name in meta["fused"].items():
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.original.")}
        if not dense:
            _set(model, name, FusedActivation(_get(model, name), layer_name))

    sparse_prefixes = tuple(f"{n}." for n in meta["layers"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(sparse_prefixes)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
