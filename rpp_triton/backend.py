"""The one place that decides which implementation runs: Triton on CUDA tensors, the Triton
interpreter on CPU tensors when TRITON_INTERPRET=1, PyTorch otherwise."""

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on `device`; raise if "triton" cannot run there."""
    check_backend(backend)
    from rpp_triton.kernels._compat import HAS_TRITON

    device = torch.device(device)
    if backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs Triton installed (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device.type} tensors; "
                "set TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
            )
    return backend
