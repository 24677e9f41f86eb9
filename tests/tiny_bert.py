"""A tiny random BERT with a hand-written WordPiece vocabulary, plus small text and task files,
for the pipeline and CLI tests (no hub access)."""

import csv
import json
import random

WORDS = (
    "the a an of to in is it for on with as by at from that this be are was or not and list dict "
    "string number value object class function method module import return yield loop while for "
    "if else try except raise error type name call argument keyword default attribute index slice "
    "key item set tuple float int bool none true false print file path read write open close"
).split()


def write_tiny_bert(path, seed: int = 0, hidden_size: int = 32):
    """Save a 2-layer BERT (hidden 32 unless said) with its tokenizer to `path`; returns `path` as str."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), ".", ",", ":", "(", ")"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)
    ]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


def write_text(path, n: int = 200, seed: int = 0):
    path.write_text("\n".join(sentences(n, seed)) + "\n")
    return str(path)


def write_task_csv(path, n: int = 80, seed: int = 0, text_col: str = "sentence", label_col: str = "label"):
    """Binary task a tiny model can learn: does the sentence contain the word 'error'?"""
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(sentences(n, seed)):
        words = [w for w in s.rstrip(".").split() if w != "error"]
        label = i % 2
        if label:
            words.insert(rng.randrange(len(words) + 1), "error")
        rows.append({text_col: " ".join(words), label_col: label})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[text_col, label_col])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_task_jsonl(path, n: int = 60, seed: int = 0):
    rows = [{"text": s, "label": ["yes", "no"][i % 2]} for i, s in enumerate(sentences(n, seed))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)
