"""Helpers of the fine-tuning and question-answering tests: a tiny BERT whose vocabulary covers the
offline question-answering text, SQuAD JSON built from rows (no hub access), and the check that a
command fails with one line."""

import collections
import csv
import re

import pytest


def write_qa_bert(path, words: int = 1500, hidden: int = 32, seed: int = 0) -> str:
    """A 2-layer BERT with a WordPiece vocabulary of the offline QA text's most frequent words
    (plus single characters, so nothing is unknown)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from rpp_triton.qa.data import pydoc_qa

    path.mkdir(parents=True, exist_ok=True)
    train, _ = pydoc_qa()
    text = " ".join([*dict.fromkeys(r["context"] for r in train), *(r["question"] for r in train)]).lower()
    counts = collections.Counter(re.findall(r"[a-z0-9]+", text))
    chars = sorted({c for c in text if not c.isspace()})
    top = sorted(counts, key=lambda w: (-counts[w], w))[:words]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars if c.isalnum())]
    vocab += [w for w in top if w not in set(vocab)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def squad_json(rows, extra_paragraphs=()) -> dict:
    """Rows back into SQuAD's nested format (one paragraph per context), plus raw extra entries."""
    by_context = collections.defaultdict(list)
    for r in rows:
        answers = [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
        ]
        qa = {"id": r["id"], "question": r["question"], "answers": answers}
        if not answers:
            qa["is_impossible"] = True
        by_context[r["context"]].append(qa)
    paragraphs = [{"context": c, "qas": qas} for c, qas in by_context.items()]
    paragraphs += list(extra_paragraphs)
    return {"version": "test", "data": [{"title": "t", "paragraphs": paragraphs}]}


def fails(argv, capsys, *needles) -> str:
    """Run the CLI, expect exit 2 and a single error line containing every needle."""
    from rpp_triton.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rpp-triton {argv[0]}: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(autouse=True)
def eager_single_thread(monkeypatch):
    """Tests that import this run the optimizer eagerly (compiling costs more than these tiny runs)
    on one thread: a hidden-32 BERT gains nothing from threads, and on a shared 2-core machine two
    OpenMP threads run ten times slower than one."""
    import torch

    monkeypatch.setenv("RPP_TRITON_COMPILE", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CARD = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train.csv
  - split: validation
    path: sst2/validation.csv
- config_name: stsb
  data_files:
  - split: train
    path: stsb/train.csv
---
A GLUE-shaped dataset repository, kept locally.
"""


def write_rows(path, rows) -> None:
    """`rows` (dicts) as a CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_glue_repo(root) -> str:
    """A dataset repository laid out as on the hub: a README dataset card declaring two
    configurations, sst2 (train and validation splits) and stsb (train only)."""
    for split, n in (("train", 20), ("validation", 6)):
        write_rows(root / "sst2" / f"{split}.csv", [{"sentence": f"s{i}", "label": i % 2} for i in range(n)])
    pairs = [{"sentence1": f"a{i}", "sentence2": "b", "label": i / 4} for i in range(15)]
    write_rows(root / "stsb" / "train.csv", pairs)
    (root / "README.md").write_text(CARD)
    return str(root)
