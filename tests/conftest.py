"""What the tests share: the seed, the `gpu` marker, the one tiny-BERT builder, the small text,
task and dataset files the pipeline, CLI and fine-tuning tests train on (no hub access), and the
serve tests' models and helpers (a real server on a loopback port, its metrics).

Builders reach tests as session fixtures that return the function (`write_tiny_bert(path, ...)`),
so module-scoped fixtures can call them too."""

import collections
import csv
import json
import os
import random
import re
import socket
import threading
import time
from contextlib import contextmanager

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


# ------------------------------------------------------------------ the inference server
# The serve tests import nothing from the serving extras at collection: bench/gpu_check.sh collects
# test_serve_compile.py without them, so the helpers below import fastapi, uvicorn and httpx inside.
SERVE_WORDS = (
    "the a an of to in is it for on with as by at from that this be are was model sparse pruning "
    "server batch text question answer who wrote what where when weight tile block dense layer"
).split()
SERVE_TEXTS = [
    "the model is sparse",
    "a",
    "pruning the weight of a dense layer with a tile of block sparse text",
    "who wrote the server",
    "",
]
SERVE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SERVE_WORDS, ".", ",", "?"]
SERVE_VOCAB += [*LETTERS, *(f"##{c}" for c in LETTERS)]
SERVE_HEADS = {
    "base": "BertModel",
    "classify": "BertForSequenceClassification",
    "qa": "BertForQuestionAnswering",
}
SERVE_LABELS = {0: "neg", 1: "neu", 2: "pos"}


def write_serve_model(path, head: str = "base") -> str:
    """A `write_tiny_bert` (64 positions) with the serve vocabulary of SERVE_WORDS; `head` is base,
    classify (labels neg, neu, pos) or qa."""
    labels = {}
    if head == "classify":
        labels = {"id2label": SERVE_LABELS, "label2id": {v: k for k, v in SERVE_LABELS.items()}}
    return write_tiny_bert(path, SERVE_VOCAB, SERVE_HEADS[head], max_position_embeddings=64, **labels)


def random_serve_words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(SERVE_WORDS) for _ in range(n))


class Running:
    def __init__(self, server, thread, url, service):
        self.server, self.thread, self.url, self.service = server, thread, url, service

    def stop(self, timeout=30):
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


@contextmanager
def running(load, wait_ready=True, http=None, **config):
    """Start the real app under uvicorn, with the HTTP limits `rpp-triton serve` sets, in a thread
    on a free loopback port; yields a `Running` (url, service, server, thread)."""
    import uvicorn

    from rpp_triton.serve.app import ServerConfig, create_app
    from rpp_triton.serve.config import HttpConfig
    from rpp_triton.serve.server import uvicorn_config

    app, service = create_app(load, ServerConfig(**config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    options = uvicorn_config(app, service.config, http or HttpConfig(), log_level="warning")
    server = uvicorn.Server(options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    srv = Running(server, thread, url, service)
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        while wait_ready and service.state != "ready":
            assert service.state != "failed", "the model failed to load (see the log)"
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.01)
        yield srv
    finally:
        if thread.is_alive():
            srv.stop()
        sock.close()


def loader(model_dir, **options):
    """What `running` loads: a dense `Predictor` of `model_dir` unless `options` say sparse."""
    from rpp_triton.serve.predictor import Predictor

    options.setdefault("sparse", False)
    return lambda: Predictor.from_pretrained(model_dir, **options)


def metric(url, name, **labels):
    """The sum of the samples `name` with `labels` at `url`/metrics; None when there is none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0) + sample.value
    return total


@contextmanager
def gated_forward(predictor):
    """Make `predictor.forward` wait on a gate; yields (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    forward = predictor.forward

    def gated(batch):
        entered.set()
        release.wait(30)
        return forward(batch)

    predictor.forward = gated
    try:
        yield entered, release
    finally:
        release.set()


@pytest.fixture(scope="session")
def serve_words() -> list[str]:
    """The serve vocabulary's words, in vocabulary order."""
    return SERVE_WORDS


@pytest.fixture(scope="session")
def serve_texts() -> list[str]:
    """Five texts of serve words: 4, 1, 14 and 4 words and an empty one."""
    return SERVE_TEXTS


@pytest.fixture(scope="session", name="random_serve_words")
def random_serve_words_fixture():
    """`random_serve_words(n, seed)`: `n` words drawn from the serve words, space-separated."""
    return random_serve_words


@pytest.fixture(scope="session", name="write_serve_model")
def write_serve_model_fixture():
    """`write_serve_model(path, head="base")`: see `write_serve_model`."""
    return write_serve_model


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict[str, str]:
    """One `write_serve_model` per head (base, classify, qa) for the whole session, each in a
    directory named after its head (the served model_id); tests only read them."""
    root = tmp_path_factory.mktemp("serve-models")
    return {head: write_serve_model(root / head, head) for head in SERVE_HEADS}


@pytest.fixture(scope="session", name="running")
def running_fixture():
    """`with running(load, wait_ready=True, http=None, **server_config) as srv`: see `running`."""
    return running


@pytest.fixture(scope="session", name="loader")
def loader_fixture():
    """`loader(model_dir, **load_options)`: see `loader`."""
    return loader


@pytest.fixture(scope="session", name="metric")
def metric_fixture():
    """`metric(url, name, **labels)`: see `metric`."""
    return metric


@pytest.fixture(scope="session", name="gated_forward")
def gated_forward_fixture():
    """`with gated_forward(predictor) as (entered, release)`: see `gated_forward`."""
    return gated_forward
