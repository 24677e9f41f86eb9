"""What the package knows about BERT-family models: which `nn.Linear` layers are pruned, where the
masked-LM head is, which activation follows a layer, and how a sentence embedding is pooled.

Plain PyTorch and module names only: `transformers` is never imported here, so the optimizer, the
sparse modules and the server can all use it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

# Encoder stacks of BERT-family models: BERT/RoBERTa/ELECTRA (`encoder.layer.N`), DistilBERT
# (`transformer.layer.N`), ALBERT (`encoder.albert_layer_groups.N`), and generic `layers.N`.
ENCODER_LAYER = re.compile(r"(^|\.)(encoder|transformer)\.(layer|layers|albert_layer_groups)\.\d+\.")


def pruned_weight_ids(model: nn.Module) -> set[int]:
    """ids of the encoder's attention and feed-forward `nn.Linear` weights: what RPP prunes."""
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ENCODER_LAYER.search(name + ".")
    }


def find_parameter(model: nn.Module, name: str) -> torch.nn.Parameter | None:
    """The parameter `name` refers to, with or without the model's base prefix (`bert.`)."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") + "."
    for candidate in (name, prefix + name, name.removeprefix(prefix)):
        if candidate in params:
            return params[candidate]
    return None


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The masked-LM head module of a `*ForMaskedLM` model (BERT's `cls`, RoBERTa's `lm_head`), or
    None where the model has neither."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def is_exact_gelu(module) -> bool:
    """True for the erf GELU (`nn.GELU()` or transformers' "gelu"), which the sparse kernel fuses."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    # transformers' GELUActivation (BERT's "gelu"): F.gelu or its erf formula in Python.
    if type(module).__name__ == "GELUActivation":
        act = getattr(module, "act", None)
        return act is F.gelu or getattr(act, "__name__", "") == "_gelu_python"
    return False


def following_gelu(parent: nn.Module, name: str) -> str | None:
    """Name of the exact GELU that `parent.<name>`'s output goes into, if the structure says so."""
    # BERT-family intermediate block: hidden = act(dense(hidden)).
    if name == "dense" and is_exact_gelu(getattr(parent, "intermediate_act_fn", None)):
        return "intermediate_act_fn"
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        i = names.index(name)
        if i + 1 < len(names) and is_exact_gelu(parent._modules[names[i + 1]]):
            return names[i + 1]
    return None


def has_vocabulary(tokenizer) -> bool:
    """False for what transformers builds from a directory without tokenizer files: a vocabulary of
    special tokens only, which would turn every word into [UNK] without an error."""
    return bool(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask-weighted mean of `hidden[B, L, H]` over the sequence: `[B, H]`, in fp32."""
    hidden = hidden.float()  # pool in fp32 even when the model runs in bf16 or fp16
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
