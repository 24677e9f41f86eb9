"""rpp_triton: Reweighted Proximal Pruning (arXiv 1909.12486) for BERT-family models.

Public API (see docs/design.md): RPPAdamW, RPPLamb, param_groups, BlockSparseLinear, sparsify,
densify, compile_sparse, choose_layers. Heavy pieces (transformers, the server) are imported
lazily, so `import rpp_triton` is cheap and works on machines without a GPU or without Triton.
"""

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _mount_source_kernels() -> None:
    # Installed, `kernels/` lives at rpp_triton/kernels (setup.py's package_dir). Run from a source
    # tree (PYTHONPATH=.), it sits beside the package: register it under the same name.
    if "rpp_triton.kernels" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return
    src = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if not os.path.isfile(src):
        return
    spec = importlib.util.spec_from_file_location(
        "rpp_triton.kernels", src, submodule_search_locations=[os.path.dirname(src)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["rpp_triton.kernels"] = module
    spec.loader.exec_module(module)


_mount_source_kernels()

_LAZY = {
    "RPPAdamW": "rpp_triton.optim",
    "RPPLamb": "rpp_triton.optim",
    "param_groups": "rpp_triton.optim",
    "BlockSparseLinear": "rpp_triton.sparse",
    "sparsify": "rpp_triton.sparse",
    "densify": "rpp_triton.sparse",
    "compile_sparse": "rpp_triton.sparse",
    "choose_layers": "rpp_triton.sparse",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rpp_triton' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
