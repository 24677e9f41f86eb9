"""Text for pruning on the masked-LM objective: the embedded default split into training and
held-out text, local or hub datasets, fixed-length blocks, and a held-out set masked once."""

from __future__ import annotations

from rpp_triton.data.sources import HELD_OUT_EVERY, load_splits, pydoc_paragraphs
from rpp_triton.errors import UsageError


def default_text() -> tuple[list[str], list[str]]:
    """The embedded default: documentation paragraphs split into training and held-out text."""
    paras = [p for _, p in pydoc_paragraphs()]
    train = [p for i, p in enumerate(paras) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [p for i, p in enumerate(paras) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def load_text(
    name: str, text_column: str | None = None, config: str | None = None, split: str | None = None
) -> tuple[list[str], list[str]]:
    """Training and held-out text from a local file or folder or a hub dataset: the `split`
    (default train) and the dataset's validation or test split, else every 10th example."""
    train, held_split = load_splits(name, config, split or "train", None)
    column = text_column or ("text" if "text" in train.column_names else None)
    if column is None:
        raise UsageError(
            f"dataset {name!r} has no 'text' column; pass --text-column "
            f"(columns: {', '.join(train.column_names)})"
        )
    if column not in train.column_names:
        raise UsageError(
            f"dataset {name!r} has no column {column!r} (columns: {', '.join(train.column_names)})"
        )
    texts = [t for t in train[column] if isinstance(t, str) and t.strip()]
    if held_split is not None and column in held_split.column_names:
        held = [t for t in held_split[column] if isinstance(t, str) and t.strip()]
    else:
        held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        texts = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not texts or not held:
        raise UsageError(f"dataset {name!r} has too little text in column {column!r}")
    return texts, held


def mlm_blocks(tokenizer, texts: list[str], seq_len: int) -> list[dict]:
    """Tokenise, concatenate and cut into [CLS] ... [SEP] blocks of exactly `seq_len` tokens."""
    body = seq_len - 2
    ids: list[int] = []
    # Long texts are cut into blocks below, so the tokenizer's over-length warning does not apply.
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.sep_token_id)
    blocks = []
    for start in range(0, len(ids) - body + 1, body):
        chunk = [tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id]
        blocks.append({"input_ids": chunk, "attention_mask": [1] * seq_len})
    return blocks


def mask_tokens(input_ids, tokenizer, probability: float, generator):
    """BERT's masking (80% [MASK], 10% random, 10% kept) with an explicit generator; returns
    (masked input_ids, labels with -100 where nothing is predicted)."""
    import torch

    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tok in tokenizer.all_special_ids:
        special |= input_ids == tok
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    ids = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[rand]
    return ids, labels


def static_masked_eval(tokenizer, blocks: list[dict], probability: float = 0.15, seed: int = 1234):
    """Held-out blocks masked once with a fixed seed, so dense and pruned models answer the same
    questions."""
    import torch

    if not blocks:
        return []
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([b["input_ids"] for b in blocks])
    masked, labels = mask_tokens(ids, tokenizer, probability, gen)
    return [
        {"input_ids": m.tolist(), "attention_mask": b["attention_mask"], "labels": y.tolist()}
        for m, y, b in zip(masked, labels, blocks)
    ]
