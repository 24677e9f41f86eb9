"""The served model's speed settings: block-sparse only where faster (`choose_layers` at warm-up),
batches padded to bucket shapes, and torch.compile (CUDA graphs on a GPU).

Every answer is checked against the model itself run on one unpadded sequence at a time, so the
padding rows and columns a bucket adds are shown to change nothing. Compiling takes seconds on a CPU,
so only one test here compiles."""

import logging

import pytest
import torch

# bench/gpu_check.sh collects this file for its GPU test and does not need the serving extras.
for _name in ("fastapi", "httpx", "uvicorn"):
    pytest.importorskip(_name, reason="needs the serve extra: pip install 'rpp_triton[serve]'")

import httpx  # noqa: E402

from rpp_triton.serve.config import LoadConfig  # noqa: E402
from rpp_triton.serve.predictor import Predictor  # noqa: E402

TEXTS = ["the list of a dict", "a", "import the module and call the function with a keyword argument", "x y"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, write_tiny_bert):
    """Tiny BERTs (32 positions) with half of each encoder weight's 16x16 tiles zero, per head."""
    root = tmp_path_factory.mktemp("compile-models")
    heads = {
        "base": "BertModel",
        "classify": "BertForSequenceClassification",
        "qa": "BertForQuestionAnswering",
    }
    return {
        head: write_tiny_bert(root / head, cls_name=cls, tile_sparsity=0.5, max_position_embeddings=32)
        for head, cls in heads.items()
    }


def sparse_predictor(model_dir, **options) -> Predictor:
    return Predictor.from_pretrained(model_dir, block_size=16, min_sparsity=0.5, **options)


@torch.inference_mode()
def check_unpadded(predictor: Predictor, model_dir: str, batch, outputs, atol=1e-5, rtol=1e-4) -> None:
    """`outputs` of `batch` are the dense model's, run on each sequence alone without padding."""
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    cls = {"classify": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering}
    task = next(iter(predictor.tasks - {"embed"}), None)
    model = cls.get(task, AutoModel).from_pretrained(model_dir).eval()
    for e, got in zip(batch, outputs, strict=True):
        inputs = {"input_ids": torch.tensor([e.input_ids])}
        if e.token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([e.token_type_ids])
        out = model(**inputs, output_hidden_states=True)
        want = {"embedding": out.hidden_states[-1][0].mean(0)}
        if task == "classify":
            want["logits"] = out.logits[0]
        if task == "qa":
            want.update(start_logits=out.start_logits[0], end_logits=out.end_logits[0])
        for name, value in want.items():
            torch.testing.assert_close(torch.tensor(getattr(got, name)), value, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("head", ["base", "classify", "qa"])
def test_bucket_padding_gives_the_unpadded_answers(model_dirs, head):
    predictor = sparse_predictor(
        model_dirs[head], choose_layers=False, batch_buckets=(3, 64), length_buckets=(8, 16)
    )
    predictor.prepare(max_batch_size=5)
    # Buckets above the limits (5 sequences, 32 tokens) are dropped; the limits are buckets.
    assert (predictor.info.batch_buckets, predictor.info.length_buckets) == ([3, 5], [8, 16, 32])
    assert predictor.padded_shape(1, 5) == (3, 8) and predictor.padded_shape(4, 9) == (5, 16)
    assert predictor.padded_shape(5, 32) == (5, 32)
    if head == "qa":
        batch = predictor.encode_qa([("who wrote the list", text) for text in TEXTS])
    else:
        batch = predictor.encode_texts([*TEXTS, ("a dict", "the list")])
    for chunk in (batch[:1], batch[1:3], batch):
        check_unpadded(predictor, model_dirs[head], chunk, predictor.forward(chunk))


def test_buckets_through_the_server_and_info(model_dirs, running, loader):
    load = loader(model_dirs["classify"], sparse=True, block_size=16, batch_buckets=(2,), length_buckets=(8,))
    with running(load, max_batch_size=4) as srv:
        info = httpx.get(srv.url + "/info").json()
        assert info["compiled"] is False and info["compile_mode"] is None
        assert (info["batch_buckets"], info["length_buckets"]) == ([2, 4], [8, 32])
        predictor = srv.service.predictor
        body = httpx.post(srv.url + "/v1/classify", json={"inputs": TEXTS[:3]}).json()
        embedded = httpx.post(srv.url + "/v1/embed", json={"inputs": TEXTS[:3]}).json()["embeddings"]
    batch = predictor.encode_texts(TEXTS[:3])
    outputs = predictor.forward(batch)
    check_unpadded(predictor, model_dirs["classify"], batch, outputs)
    for o, got, embedding in zip(outputs, body["predictions"], embedded):
        want = predictor.classification(o)
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert embedding == pytest.approx(o.embedding, abs=1e-6)


def test_no_buckets_without_compile(model_dirs):
    predictor = Predictor.from_pretrained(model_dirs["base"], sparse=False)
    predictor.prepare(max_batch_size=8, warmup=False)
    assert not predictor.info.compiled and predictor.info.batch_buckets == []
    assert predictor.padded_shape(3, 7) == (3, 7)


# ---------------------------------------------------------------------------- choose_layers
def test_choose_layers_keeps_the_faster_layers(model_dirs, caplog, running):
    from rpp_triton.sparse import BlockSparseLinear

    def timer(fn):
        """Block-sparse is faster for the feed-forward layers (64 wide) and slower for attention."""
        layer = getattr(fn, "func", None)
        if isinstance(layer, BlockSparseLinear):
            return 1.0 if 64 in (layer.in_features, layer.out_features) else 3.0
        return 2.0

    predictor = sparse_predictor(model_dirs["base"])
    assert len(predictor.info.sparse_layers) == 12
    with caplog.at_level(logging.INFO, logger="rpp_triton.serve"):
        predictor.prepare(max_batch_size=4, timer=timer)
    feed_forward = [f"encoder.layer.{i}.{n}.dense" for i in range(2) for n in ("intermediate", "output")]
    assert predictor.info.sparse_layers == feed_forward
    choice = predictor.info.layer_choice
    assert choice["shape"] == [4, 32] and len(choice["layers"]) == 12
    for name, row in choice["layers"].items():
        sparse_s, kept = (1.0, True) if name in feed_forward else (3.0, False)
        assert row == {"sparse_s": sparse_s, "dense_s": 2.0, "sparse": kept}
    assert [r.message for r in caplog.records if "choose_layers" in r.message] == [
        "choose_layers: 4 of 12 layers sparse (faster than dense on 4 sequences x 32 tokens)"
    ]
    batch = predictor.encode_texts(TEXTS)
    check_unpadded(predictor, model_dirs["base"], batch, predictor.forward(batch))

    # GET /info shows the choice; the server's own prepare without warm-up leaves it as it is.
    with running(lambda: predictor, warmup=False) as srv:
        info = httpx.get(srv.url + "/info").json()
    assert info["sparse_layers"] == feed_forward and info["layer_choice"] == choice


def test_served_layer_choice_is_shown(model_dirs, running, loader):
    with running(loader(model_dirs["base"], sparse=True, block_size=16), max_batch_size=2) as srv:
        info = httpx.get(srv.url + "/info").json()
    choice = info["layer_choice"]
    assert choice["shape"] == [2, 32] and len(choice["layers"]) == 12
    kept = sorted(name for name, row in choice["layers"].items() if row["sparse"])
    assert sorted(info["sparse_layers"]) == kept
    assert all(row["sparse"] == (row["sparse_s"] < row["dense_s"]) for row in choice["layers"].values())


# --------------------------------------------------------------------------------- compile
def test_compiled_buckets_give_the_unpadded_answers_without_recompiling(model_dirs):
    from torch._dynamo.utils import counters

    predictor = sparse_predictor(
        model_dirs["classify"], choose_layers=False, compile=True, batch_buckets=(2,), length_buckets=(16,)
    )
    counters.clear()
    predictor.prepare(max_batch_size=4)  # compiles at the first bucket; four bucket shapes
    info = predictor.info
    assert info.compiled and info.compile_mode == "default" and len(info.sparse_layers) == 12
    assert (info.batch_buckets, info.length_buckets) == ([2, 4], [16, 32])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    batch = predictor.encode_texts([*TEXTS, ("a dict", "the list")])
    for chunk in (batch[:1], batch[1:4], batch[:4]):
        check_unpadded(predictor, model_dirs["classify"], chunk, predictor.forward(chunk), atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a bucketed batch was compiled again"


@pytest.mark.gpu
def test_cuda_graphs_per_bucket(model_dirs):
    from torch._dynamo.utils import counters

    predictor = sparse_predictor(model_dirs["classify"], dtype="float32")
    counters.clear()
    predictor.prepare(max_batch_size=8)  # choose_layers on CUDA-graph replays, compile, capture
    info = predictor.info
    assert info.compiled and info.compile_mode == "reduce-overhead" and info.layer_choice is not None
    assert (info.batch_buckets, info.length_buckets) == ([1, 8], [32])
    batch = predictor.encode_texts([*TEXTS, ("a dict", "the list")])
    for chunk in (batch[:1], batch[1:4], batch):
        outputs = predictor.forward(chunk)
        check_unpadded(predictor, model_dirs["classify"], chunk, outputs, atol=1e-4, rtol=1e-3)
    assert counters["inductor"]["cudagraph_skips"] == 0


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options",
    [
        dict(batch_buckets=(0, 2)),
        dict(batch_buckets=()),
        dict(length_buckets=(1,)),
        dict(length_buckets="32"),
    ],
    ids=str,
)
def test_bad_buckets_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        LoadConfig(**options)


def test_buckets_are_sorted_and_unique():
    assert LoadConfig(batch_buckets=[8, 1, 8], length_buckets=(64, 32)).batch_buckets == (1, 8)
    assert LoadConfig(length_buckets=[64, 32]).length_buckets == (32, 64)


def test_cli_flags(tmp_path, fails, capsys):
    from rpp_triton.cli import build_parser, main
    from rpp_triton.commands.serve import configs

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--choose-layers, --no-choose-layers", "--compile, --no-compile", "--batch-buckets"):
        assert flag in shown
    fails(["serve", str(tmp_path), "--batch-buckets", "0,8"], "batch_buckets must be")
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--length-buckets", "32,x"])
    assert "expected integers separated by commas" in capsys.readouterr().err
    args = build_parser().parse_args(
        [
            "serve",
            str(tmp_path),
            "--no-choose-layers",
            "--compile",
            "--batch-buckets",
            "1,4",
            "--length-buckets",
            "64",
        ]
    )
    load = configs(args)[0]
    assert (load.choose_layers, load.compile, load.batch_buckets, load.length_buckets) == (
        False,
        True,
        (1, 4),
        (64,),
    )
    defaults = configs(build_parser().parse_args(["serve", str(tmp_path)]))[0]
    assert defaults.choose_layers and defaults.compile is None and defaults.batch_buckets is None
