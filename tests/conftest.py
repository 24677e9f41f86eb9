"""What the tests share: the seed, the `gpu` marker, the one tiny-BERT builder and the small text,
task and dataset files the pipeline, CLI and fine-tuning tests train on (no hub access).

Builders reach tests as session fixtures that return the function (`write_tiny_bert(path, ...)`),
so module-scoped fixtures can call them too."""

import collections
import csv
import json
import os
import random
import re

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any kernel module
# is imported. On a CPU-only machine every Triton kernel runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def eager_optimizer(monkeypatch):
    """The optimizer step runs eagerly: compiling it costs more than these tiny runs; same maths."""
    monkeypatch.setenv("RPP_TRITON_COMPILE", "0")


@pytest.fixture
def eager_single_thread(eager_optimizer):
    """Eager optimizer on one thread: a hidden-32 BERT gains nothing from threads, and on a shared
    2-core machine two OpenMP threads run ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fails(capsys):
    """`fails(argv, *needles)`: run the CLI, expect exit 2 and a single error line containing every
    needle; returns the line."""
    from rpp_triton.cli import main

    def check(argv, *needles) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"rpp-triton {argv[0]}: error:"), err
        for needle in needles:
            assert needle in err, err
        return err

    return check


# ------------------------------------------------------------------ the tiny BERT
def prune_tiles(weight: torch.Tensor, block, sparsity: float) -> torch.Tensor:
    """Zero a random `sparsity` fraction of `weight`'s tiles in place; returns the tile mask."""
    bh, bw = block
    rows, cols = weight.shape[0] // bh, weight.shape[1] // bw
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols)[: round(sparsity * rows * cols)]] = False
    keep = keep.view(rows, cols)
    with torch.no_grad():
        weight.mul_(keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1).to(weight.dtype))
    return keep


def build_tiny_bert(cls_name: str = "BertModel", *, tile_sparsity: float = 0.0, **config):
    """A random 2-layer, 2-head BERT (hidden 32, 60 tokens, 32 positions unless `config` says
    otherwise, in BertConfig's names) of transformers class `cls_name`, in eval mode. With
    `tile_sparsity`, that share of each encoder linear's 16x16 tiles is zero."""
    import transformers

    sizes = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    sizes.update(intermediate_size=64, max_position_embeddings=32)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**{**sizes, **config})).eval()
    if tile_sparsity:
        for layer in model.base_model.encoder.layer:
            attention = layer.attention
            for lin in (attention.self.query, attention.self.key, attention.self.value,
                        attention.output.dense, layer.intermediate.dense, layer.output.dense):  # fmt: skip
                prune_tiles(lin.weight, (16, 16), tile_sparsity)
    return model


WORDS = (
    "the a an of to in is it for on with as by at from that this be are was or not and list dict "
    "string number value object class function method module import return yield loop while for "
    "if else try except raise error type name call argument keyword default attribute index slice "
    "key item set tuple float int bool none true false print file path read write open close"
).split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), ".", ",", ":", "(", ")"]
VOCAB += [*LETTERS, *(f"##{c}" for c in LETTERS)]


def write_tiny_bert(path, vocab=VOCAB, cls_name="BertForMaskedLM", seed: int = 0, **config) -> str:
    """Save a `build_tiny_bert` (64 positions unless `config` says) with a WordPiece tokenizer of
    `vocab` (a list of tokens; a vocabulary of WORDS unless given) to `path`; returns `path` as str."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = {"max_position_embeddings": 64, **config, "vocab_size": len(vocab)}
    build_tiny_bert(cls_name, **config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_qa_bert(path, words: int = 1500, hidden: int = 32, seed: int = 0) -> str:
    """A tiny BERT whose WordPiece vocabulary is the offline QA text's `words` most frequent words
    (plus single characters, so nothing is unknown), 128 positions."""
    from rpp_triton.qa.data import pydoc_qa

    train, _ = pydoc_qa()
    text = " ".join([*dict.fromkeys(r["context"] for r in train), *(r["question"] for r in train)]).lower()
    counts = collections.Counter(re.findall(r"[a-z0-9]+", text))
    chars = sorted({c for c in text if not c.isspace()})
    top = sorted(counts, key=lambda w: (-counts[w], w))[:words]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars if c.isalnum())]
    vocab += [w for w in top if w not in set(vocab)]
    return write_tiny_bert(
        path, vocab, seed=seed, hidden_size=hidden, intermediate_size=2 * hidden, max_position_embeddings=128
    )


@pytest.fixture(scope="session")
def tiny_bert():
    """`tiny_bert(cls_name="BertModel", *, tile_sparsity=0.0, **config)`: see `build_tiny_bert`."""
    return build_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert_inputs():
    """`tiny_bert_inputs(device="cpu")`: two sequences of 9 tokens, the second padded after 6."""

    def inputs(device="cpu"):
        ids = torch.randint(0, 60, (2, 9), device=device)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return inputs


@pytest.fixture(scope="session", name="prune_tiles")
def prune_tiles_fixture():
    """`prune_tiles(weight, block, sparsity)`: see `prune_tiles`."""
    return prune_tiles


@pytest.fixture(scope="session", name="write_tiny_bert")
def write_tiny_bert_fixture():
    """`write_tiny_bert(path, vocab=VOCAB, cls_name="BertForMaskedLM", seed=0, **config)`."""
    return write_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """One `write_tiny_bert` with the defaults for the whole session; tests only read it."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def qa_bert_dir(tmp_path_factory) -> str:
    """One `write_qa_bert` with the defaults for the whole session; tests only read it."""
    return write_qa_bert(tmp_path_factory.mktemp("qa-bert") / "model")


# ------------------------------------------------------------------ text, task and dataset files
def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


def write_text(path, n: int = 200, seed: int = 0) -> str:
    path.write_text("\n".join(sentences(n, seed)) + "\n")
    return str(path)


def write_rows(path, rows) -> str:
    """`rows` (dicts) as a CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
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
    return write_rows(path, rows)


def write_task_jsonl(path, n: int = 60, seed: int = 0) -> str:
    rows = [{"text": s, "label": ["yes", "no"][i % 2]} for i, s in enumerate(sentences(n, seed))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


GLUE_CARD = """---
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


def write_glue_repo(root) -> str:
    """A dataset repository laid out as on the hub: a README dataset card declaring two
    configurations, sst2 (train and validation splits) and stsb (train only)."""
    for split, n in (("train", 20), ("validation", 6)):
        write_rows(root / "sst2" / f"{split}.csv", [{"sentence": f"s{i}", "label": i % 2} for i in range(n)])
    pairs = [{"sentence1": f"a{i}", "sentence2": "b", "label": i / 4} for i in range(15)]
    write_rows(root / "stsb" / "train.csv", pairs)
    (root / "README.md").write_text(GLUE_CARD)
    return str(root)


@pytest.fixture(scope="session", name="write_text")
def write_text_fixture():
    """`write_text(path, n=200, seed=0)`: `n` random sentences of WORDS, one a line."""
    return write_text


@pytest.fixture(scope="session", name="write_rows")
def write_rows_fixture():
    """`write_rows(path, rows)`: dicts as a CSV file."""
    return write_rows


@pytest.fixture(scope="session", name="write_task_csv")
def write_task_csv_fixture():
    """`write_task_csv(path, n=80, seed=0, text_col="sentence", label_col="label")`: 0/1 labels."""
    return write_task_csv


@pytest.fixture(scope="session", name="write_task_jsonl")
def write_task_jsonl_fixture():
    """`write_task_jsonl(path, n=60, seed=0)`: `text` and a string `label` (yes / no) a line."""
    return write_task_jsonl


@pytest.fixture(scope="session", name="write_glue_repo")
def write_glue_repo_fixture():
    """`write_glue_repo(root)`: see `write_glue_repo`."""
    return write_glue_repo
