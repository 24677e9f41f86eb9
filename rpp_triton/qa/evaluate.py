"""Scoring a question-answering model: start and end logits of every window, post-processed into
answers and scored with the official SQuAD metric."""

from __future__ import annotations

import collections

import torch

from rpp_triton.qa.features import apply_null_threshold, postprocess, prepare_eval_features
from rpp_triton.qa.metric import squad_metrics


def predict_logits(model, tokenizer, features: list[dict], batch_size: int = 32):
    """Start and end logits of every window (lists of 1-D numpy arrays, one per window)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for at in range(0, len(features), batch_size):
            batch = tokenizer.pad([f["inputs"] for f in features[at : at + batch_size]], return_tensors="pt")
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for i, f in enumerate(features[at : at + batch_size]):
                n = len(f["inputs"]["input_ids"])
                starts.append(out.start_logits[i, :n].float().cpu().numpy())
                ends.append(out.end_logits[i, :n].float().cpu().numpy())
    model.train(was_training)
    return starts, ends


def evaluate_qa(
    model,
    tokenizer,
    examples: list[dict],
    version_2: bool,
    max_length: int = 384,
    stride: int = 128,
    batch_size: int = 32,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict, dict[str, str], dict[str, int]]:
    """(metrics, answers, null margins, skipped) for `examples`. The metrics are the official ones
    of the version, v2.0's computed from each question's best span with its null margin as the
    no-answer score and `null_threshold` as the threshold; the answers are empty where the null
    answer wins. Questions skipped here (too long for the window) have no answer and score 0."""
    skipped = collections.Counter()
    kept, features = prepare_eval_features(tokenizer, examples, max_length, stride, skipped)
    starts, ends = predict_logits(model, tokenizer, features, batch_size)
    spans, margins = postprocess(kept, features, starts, ends, max_answer_length=max_answer_length)
    metrics = squad_metrics(spans, examples, version_2, margins if version_2 else None, null_threshold)
    answers = apply_null_threshold(spans, margins, null_threshold) if version_2 else spans
    return metrics, answers, margins, dict(skipped)
