"""The pruning pipeline end to end on a tiny random BERT: every method reaches the exact target and
saves a plain-transformers model, the objectives and quality measures behave, resume equals an
uninterrupted run, and two torchrun processes agree on the masks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rpp_triton import tiles
from rpp_triton.cli import main
from rpp_triton.training import controller as C
from rpp_triton.training import quality as Q
from rpp_triton.training.objectives import Objective, layer_map

# torch.compile of the optimizer step costs more than these tiny runs; the maths is the same.
pytestmark = pytest.mark.usefixtures("eager_optimizer")

# Small enough for ~1-2 s per run on two cores; the same-budget dense reference (a second run) is
# tested on its own.
FAST = ["--seq-len", "32", "--batch-size", "8", "--logging-steps", "5", "--dense-reference", "none"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_bert_dir, write_text, write_task_csv):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "root": root,
        "model": tiny_bert_dir,
        "text": write_text(root / "text.txt", 240),
        "task": write_task_csv(root / "task.csv", 80),
    }


def prune(files, out, *extra, steps=30, target=0.5):
    argv = ["prune", "--model", files["model"], "--dataset", files["text"], "--output-dir", str(out)]
    argv += ["--max-steps", str(steps), "--target-sparsity", str(target), *FAST, *extra]
    assert main(argv) == 0
    with open(Path(out) / "rpp_report.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pruned(files):
    mp = pytest.MonkeyPatch()
    mp.setenv("RPP_TRITON_COMPILE", "0")
    out = files["root"] / "pruned"
    report = prune(files, out, "--block-size", "8x8", target=0.6)
    mp.undo()
    return out, report


def encoder_weights(model):
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if ".layer." in n and n.endswith(".weight") and p.dim() == 2
    }


@pytest.mark.parametrize("block", ["1", "8x8"], ids=lambda b: f"block={b}")
def test_prune_reaches_exact_target_and_loads_in_plain_transformers(files, tmp_path, block):
    from transformers import AutoModel

    out = tmp_path / "out"
    report = prune(files, out, "--block-size", block, target=0.5)
    model = AutoModel.from_pretrained(out)  # a plain BertModel, no rpp_triton needed
    weights = encoder_weights(model)
    assert len(weights) == 12  # 2 layers x (q, k, v, attn out, intermediate, output)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    bh, bw = (1, 1) if block == "1" else (8, 8)
    assert zeros == round(0.5 * total / (bh * bw)) * bh * bw
    assert report["sparsity"] == pytest.approx(zeros / total, abs=0)
    assert report["target_sparsity"] == 0.5
    assert report["block_size"] == [bh, bw]
    assert {r["name"].removeprefix("bert.") for r in report["layers"]} == set(weights)
    # Every tile is all zero or kept; the masks file says which.
    masks = load_file(out / "rpp_masks.safetensors")
    for name, w in weights.items():
        mask = masks["bert." + name].bool()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert torch.equal(tiles.tile_mask(w, (bh, bw)), mask)
    # The tiny model has a masked-LM head: by default it distils from itself on masked LM too.
    assert (report["method"], report["objective"]) == ("rpp", "mlm+distill")
    for key in ("dense", "pruned"):
        quality = report["quality"][key]
        assert 0.0 <= quality["topic_accuracy"] <= 1.0 and -1.0 <= quality["embedding_fidelity"] <= 1.0
    assert report["quality"]["dense"]["embedding_fidelity"] == pytest.approx(1.0)
    assert 0.0 <= report["quality"]["pruned"]["mlm_accuracy"] <= 1.0
    assert np.isfinite(report["quality"]["pruned"]["mlm_loss"])
    log = json.loads((out / "training_log.json").read_text())
    steps = [e for e in log if "rpp_lambda" in e]
    assert steps and max(e["rpp_lambda"] for e in steps) > 0
    assert any(k.startswith("sparsity/bert.encoder.layer.0") for k in steps[-1])
    assert not (tmp_path / "out.partial").exists()


def test_dense_reference_is_a_dense_run_with_the_same_budget(files, tmp_path):
    mlm = ("--objective", "mlm")
    pruned = prune(files, tmp_path / "pruned", *mlm, "--dense-reference", "same-budget", steps=20, target=0.5)
    dense = prune(files, tmp_path / "dense", *mlm, steps=20, target=0.0)
    assert pruned["steps"]["total"] == dense["steps"]["total"] == 20
    assert dense["sparsity"] == 0.0
    # the reference inside the pruned run is exactly what a target-0 run of the same length reaches
    for k in ("mlm_accuracy", "mlm_loss", "topic_accuracy", "embedding_fidelity"):
        assert pruned["quality"]["dense"][k] == pytest.approx(dense["quality"]["pruned"][k], abs=1e-6)
    assert pruned["quality"]["dense"] != pruned["phases"]["dense"]  # trained on beyond the dense phase
    assert "same budget" in pruned["dense_reference"] and "target 0" in dense["dense_reference"]
    assert dense["quality"]["dense"] == dense["quality"]["pruned"]
    assert not (tmp_path / "pruned" / "dense-reference").exists()


def test_masked_lm_loss_on_labelled_positions_matches_the_full_head(files):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(files["model"])
    objective = Objective("mlm", model)
    ids = torch.randint(5, model.config.vocab_size, (3, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    parts = objective.parts(model, batch)
    full = model(**batch)
    torch.testing.assert_close(parts["mlm"], full.loss)
    assert torch.equal(parts["_preds"], full.logits.argmax(-1)[labels != -100])
    assert torch.equal(parts["_labels"], labels[labels != -100])
    assert model(input_ids=ids).logits.shape == (3, 16, model.config.vocab_size)  # hook is off again


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(files):
    from transformers import AutoModelForMaskedLM

    student = AutoModelForMaskedLM.from_pretrained(files["model"])
    teacher = AutoModelForMaskedLM.from_pretrained(files["model"])
    objective = Objective("mlm+distill", student, teacher)
    ids = torch.randint(5, student.config.vocab_size, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 1::3] = ids[:, 1::3]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    student.eval()
    parts = objective.parts(student, batch)
    assert {"mlm", "hidden", "pooled", "logits"} <= parts.keys()
    for key in ("hidden", "logits"):
        assert float(parts[key]) == 0.0, key
    assert float(parts["pooled"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student.bert.encoder.layer[-1].output.dense.weight.normal_(0.0, 1.0)
    parts = objective.parts(student, batch)
    for key in ("hidden", "pooled", "logits"):
        assert float(parts[key]) > 0.0, key
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_layer_map_spreads_student_layers_over_the_teacher():
    assert layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert layer_map(3, 12) == [4, 8, 12]
    assert layer_map(4, 2) == [0, 1, 2, 2]


def test_quality_measures_on_hand_made_embeddings():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert Q.embedding_fidelity(a, b) == pytest.approx((1.0 - 1.0 + 2**-0.5) / 3)
    train = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    held = torch.tensor([[5.0, 1.0], [1.0, 5.0], [1.0, 0.9]])
    assert Q.centroid_accuracy(train, [0, 0, 1, 1], held, [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        Q.embedding_fidelity(a, b[:2])


@pytest.mark.parametrize("method", ["rpp", "gmp", "oneshot"])
def test_every_method_ends_at_exactly_the_target(files, tmp_path, method):
    report = prune(files, tmp_path / method, "--method", method, steps=24, target=0.7)
    assert report["method"] == method
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3)
    if method == "oneshot":
        assert report["steps"] == {"dense": 0, "prune": 0, "recovery": 24, "total": 24}
    else:  # the schedule brought the weights near the target before the hard prune
        assert abs(report["sparsity_before_hard_prune"] - 0.7) < 0.05


def test_gmp_follows_its_schedule(files, tmp_path):
    report = prune(
        files, tmp_path / "gmp", "--method", "gmp", "--mask-every", "2", "--logging-steps", "1", steps=30
    )
    log = json.loads((tmp_path / "gmp" / "training_log.json").read_text())
    steps = report["steps"]
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ramp = C.PruningController(sgd, 0.5, 1, steps["dense"], steps["prune"], steps["recovery"])
    end = steps["dense"] + steps["prune"]
    seen = [(e["step"], e["sparsity"]) for e in log if "sparsity" in e and e["step"] <= end]
    assert len(seen) > 10 and seen[-1][1] == pytest.approx(0.5, abs=0.01)
    for step, sparsity in seen:
        # masks are set every 2 steps for the step after: never ahead of the ramp by more than a step
        assert ramp.scheduled(step - 2) - 0.02 <= sparsity <= ramp.scheduled(step + 1) + 0.02, step


def test_resume_equals_uninterrupted(files, tmp_path):
    full = tmp_path / "full"
    prune(files, full, "--save-steps", "10", "--keep-checkpoints", steps=30)  # mid-epoch
    ckpt = full / "checkpoint-10"
    assert (ckpt / "rpp_controller.json").is_file() and (ckpt / "optimizer.pt").is_file()
    resumed = tmp_path / "resumed"
    prune(files, resumed, "--resume-from-checkpoint", str(ckpt), steps=30)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    ra = json.loads((full / "rpp_report.json").read_text())
    rb = json.loads((resumed / "rpp_report.json").read_text())
    assert ra["mask_digest"] == rb["mask_digest"]
    # the controller state (its evaluations) came back too
    assert ra["phases"] == rb["phases"] and ra["quality"] == rb["quality"]


@pytest.mark.slow
def test_torchrun_two_processes_agree_on_masks(files, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    cmd += ["-m", "rpp_triton.cli", "prune", "--model", files["model"], "--dataset", files["text"]]
    cmd += ["--output-dir", str(out), "--max-steps", "16", "--target-sparsity", "0.5", *FAST]
    env = {**os.environ, "RPP_TRITON_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "rpp_report.json").read_text())
    assert report["world_size"] == 2
    assert report["masks_identical_on_all_ranks"] is True
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_report_command_prints_table_and_png(pruned, tmp_path, capsys):
    src, report = pruned
    png = tmp_path / "tiles.png"
    assert main(["report", str(src), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "bert.encoder.layer.1.output.dense.weight" in text and "60.16%" in text
    # dense beside pruned, on the measures the run wrote
    assert "rpp on mlm+distill" in text and "embedding_fidelity" in text and "topic_accuracy" in text
    pruned_row = next(line for line in text.splitlines() if line.strip().startswith("pruned"))
    assert f"{report['quality']['pruned']['topic_accuracy']:.4f}" in pruned_row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(1, 1), (2, 4)], ids=lambda b: f"block={b[0]}x{b[1]}")
@pytest.mark.parametrize("target", [0.0, 0.3, 0.75])
def test_hard_prune_is_exact_and_global(block, target):
    ws = [("a", torch.randn(8, 16)), ("b", torch.randn(4, 8) * 10)]  # b's tiles score higher
    masks = tiles.hard_prune(ws, target, block)
    n_tiles = sum(w.numel() for _, w in ws) // (block[0] * block[1])
    pruned_tiles = sum(int((~tiles.tile_rows(m, block).all(-1)).sum()) for m in masks.values())
    assert pruned_tiles == round(target * n_tiles)
    for (_, w), m in zip(ws, masks.values()):
        assert torch.equal(w[~m], torch.zeros_like(w[~m]))
    if target == 0.3:
        assert masks["b"].all()  # global, not per layer: the large weights all survive


def test_controller_schedule_is_a_ramp_to_target():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    c = C.RPPController(opt, 0.8, 1, dense_steps=10, prune_steps=100, recovery_steps=5)
    assert c.scheduled(10) == 0.0
    values = [c.scheduled(s) for s in range(10, 111)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert c.scheduled(80) == pytest.approx(0.8) and c.scheduled(110) == pytest.approx(0.8)


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=lambda b: f"block={b[0]}x{b[1]}")
def test_rpp_lambda_zeroes_the_scheduled_share_and_sampling_keeps_it(block):
    import rpp_triton as rpp

    weights = [torch.nn.Parameter(torch.randn(64, 96)), torch.nn.Parameter(torch.randn(128, 32) * 3)]
    opt = rpp.RPPAdamW(weights, lr=0.01, block_size=block, backend="torch")
    full = C.RPPController(opt, 0.6, block, 0, 10, 0)
    lam = full._lambda_for(0.6)
    # with lambda at that value a proximal step from the current weights zeroes ~60% of the tiles
    scores = torch.cat([tiles.tile_rms(w.detach(), block).flatten() for w in weights])
    assert (scores <= 0.01 * lam).float().mean() == pytest.approx(0.6, abs=0.01)
    sampled = C.RPPController(opt, 0.6, block, 0, 10, 0)
    sampled.SAMPLE = scores.numel() // 4  # every 4th tile-row
    assert sampled._lambda_for(0.6) == pytest.approx(lam, rel=0.15)


def test_lamb_with_accumulation_and_bf16_standard_flags(files, tmp_path):
    report = prune(
        files,
        tmp_path / "lamb",
        "--optimizer",
        "lamb",
        "--gradient_accumulation_steps",
        "2",
        "--bf16",
        "--warmup_ratio",
        "0.2",
        steps=12,
        target=0.5,
    )
    assert (report["optimizer"], report["precision"], report["gradient_accumulation_steps"]) == (
        "lamb",
        "bf16",
        2,
    )
    assert report["lr_scheduler_type"] == "polynomial"
    # LAMB's default rate grows with the square root of the total batch: 8 blocks x 2 accumulated,
    # against the reference batch of 32 of a run off the embedded default
    assert report["lr"] == pytest.approx(1e-4 * (16 / 32) ** 0.5)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(np.isfinite(v) for v in report["quality"]["pruned"].values())


@pytest.mark.parametrize("objective", [None, "mlm+distill"], ids=lambda o: f"objective={o}")
def test_model_without_masked_lm_head_says_what_happens(files, tmp_path, caplog, write_tiny_bert, objective):
    bare = write_tiny_bert(tmp_path / "encoder", cls_name="BertModel")
    extra = ["--model", bare] + (["--objective", objective] if objective else [])
    with caplog.at_level("WARNING", logger="rpp_triton"):
        report = prune(files, tmp_path / "out", *extra, steps=12)
    err = caplog.text  # one warning line (on stderr outside pytest)
    if objective is None:  # the default for a head-less model: distillation of the bare encoder
        assert report["objective"] == "distill" and "by distillation from the dense model" in err
        assert "mlm_accuracy" not in report["quality"]["pruned"]
    else:  # a fresh head learns masked LM; there are no teacher logits to match
        assert report["objective"] == "mlm+distill" and "a fresh one is initialised" in err
        assert "logits are not distilled" in err and report["newly_initialised"]
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
