"""The run directory: what a prune or fine-tune run writes, under which names, and how it is read
back. A run writes into `OUT.partial` and is renamed to `OUT` once complete, so a crash never leaves
a half-written model where a finished one is expected (docs/design.md, "Run directories")."""

from __future__ import annotations

import json
import os
import shutil

import torch

from rpp_triton.errors import UsageError
from rpp_triton.tiles import as_block, tile_mask

REPORT_FILE = "rpp_report.json"
MASKS_FILE = "rpp_masks.safetensors"
LOG_FILE = "training_log.json"
CONTROLLER_FILE = "rpp_controller.json"
FINETUNE_REPORT_FILE = "finetune_report.json"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------
# Writing a run: OUT.partial, then OUT


def check_output_dir(out: str, overwrite: bool, resume: str | None) -> str:
    """Refuse a directory holding another run unless told to overwrite or resume. Returns the
    working directory `<out>.partial` the run writes to before it is renamed to `out`."""
    partial = out.rstrip(os.sep) + ".partial"
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"output path {out!r} is a file, not a directory")
    check_writable(os.path.dirname(os.path.abspath(partial)), out)
    if os.path.isdir(out) and os.listdir(out) and not (overwrite or resume):
        raise UsageError(f"output directory {out!r} holds another run; pass --overwrite to replace it")
    if os.path.isdir(partial) and os.listdir(partial) and not (overwrite or resume):
        raise UsageError(
            f"{partial!r} holds an interrupted run; pass --resume-from-checkpoint {partial}/checkpoint-N "
            "or --overwrite"
        )
    return partial


def check_writable(directory: str, out: str) -> None:
    """The nearest existing folder at or above `directory` can take something new for `out` (a
    folder is made there and removed); a UsageError otherwise."""
    import tempfile

    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise UsageError(f"output path {out!r} is under {directory!r}, which is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".rpp-write-check-"))
    except OSError as exc:
        raise UsageError(f"cannot write the output under {directory!r}: {exc.strerror}") from None


def start_partial(partial: str, resume: str | None) -> None:
    """Rank 0: an empty `partial` (kept when the run resumes from a checkpoint inside it)."""
    if not is_main_process():
        return
    inside = resume and os.path.abspath(resume).startswith(os.path.abspath(partial) + os.sep)
    if os.path.isdir(partial) and not inside:
        shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)


def write_json(directory: str, name: str, obj) -> None:
    with open(os.path.join(directory, name), "w") as f:
        json.dump(obj, f, indent=1)


def publish(partial: str, out: str, keep_checkpoints: bool) -> None:
    """Move the finished run into place: the old output is only removed once the new one is in."""
    if not keep_checkpoints:
        for name in os.listdir(partial):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(partial, name))
    old = None
    if os.path.exists(out):
        old = f"{out.rstrip(os.sep)}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(partial, out)
    if old:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Masks


def save_masks(path: str, named: list[tuple[str, torch.Tensor]], block) -> None:
    """Tile-level masks of `named` weights as uint8 safetensors, one entry per weight name."""
    from safetensors.torch import save_file

    save_file({name: tile_mask(w, block).to(torch.uint8).contiguous() for name, w in named}, path)


def load_masks(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(path).items()}


# ---------------------------------------------------------------------------------------------
# Reading a run


def report_block(report: dict, where: str) -> tuple[int, int]:
    """The `block_size` of an rpp_report.json as (bh, bw); a UsageError naming `where` if invalid."""
    value = report.get("block_size", [1, 1])
    try:
        return as_block(value if isinstance(value, int) else tuple(value))
    except (TypeError, ValueError):
        raise UsageError(f"{where}: block_size must be two positive integers, got {value!r}") from None


def read_report(model_dir: str) -> dict | None:
    """rpp_report.json of a run directory (None where there is none), with its `block_size`
    checked; a UsageError for a file that is not a JSON object."""
    path = os.path.join(model_dir, REPORT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        raise UsageError(f"{path!r} is not valid JSON") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path!r} is not a JSON object")
    report["block_size"] = list(report_block(report, path))
    return report


def read_masks(model_dir: str) -> dict[str, torch.Tensor] | None:
    """rpp_masks.safetensors of a run directory, or None where there is none."""
    path = os.path.join(model_dir, MASKS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return load_masks(path)
    except Exception:
        raise UsageError(f"{path!r} is corrupt") from None


def source_pruning(model_dir: str) -> tuple[dict | None, dict | None]:
    """(rpp_report.json, masks) of a pruned model directory, or (None, None) for a plain model."""
    if not os.path.isdir(model_dir):
        return None, None
    return read_report(model_dir), read_masks(model_dir)


def check_checkpoint(path: str) -> dict | None:
    """Validate a Trainer checkpoint before Trainer touches it; returns the controller state if
    present."""
    if not os.path.isdir(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    needed = ["trainer_state.json", "optimizer.pt"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(path, n))]
    weights = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
    if missing or not weights:
        raise UsageError(
            f"checkpoint {path!r} is incomplete (missing {', '.join(missing) or 'model weights'})"
        )
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("global_step"), int):
            raise ValueError("trainer_state.json has no global_step")
        torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
        for name in sorted(os.listdir(path)):
            if name.startswith("rng_state") and name.endswith(".pth"):
                # The user's own checkpoint, which Trainer unpickles the same way on resume.
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
        if weights[0].endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(os.path.join(path, weights[0]))
        controller = None
        if os.path.isfile(os.path.join(path, CONTROLLER_FILE)):
            with open(os.path.join(path, CONTROLLER_FILE)) as f:
                controller = json.load(f)
            if not isinstance(controller, dict):
                raise ValueError(f"{CONTROLLER_FILE} is not a JSON object")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"checkpoint {path!r} is corrupt: {first}") from None
    return controller
