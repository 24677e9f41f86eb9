"""What a pruned encoder still knows, measured where an embedding model's knowledge lives and with
no training in between (docs/design.md, "Quality"):
- `embedding_fidelity`: mean cosine between the model's and the dense model's mean-pooled
  embeddings of the same held-out passages;
- `topic_accuracy`: nearest-centroid accuracy of the embeddings on the offline topic task (which
  documentation topic a passage comes from): class centroids from the training passages,
  accuracy on the held-out ones.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rpp_triton.models import mean_pool


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states `[len(texts), hidden]` in fp32, of any BERT-family model
    (a task model is read through its base model)."""
    base = getattr(model, "base_model", model)
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            hidden = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out.append(mean_pool(hidden, enc["attention_mask"]).cpu())
    finally:
        base.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def embedding_fidelity(emb: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine between matching rows of `emb` and `reference`."""
    if emb.shape != reference.shape or emb.shape[0] == 0:
        raise ValueError(f"need two non-empty embedding sets of one shape: {emb.shape}, {reference.shape}")
    return float(F.cosine_similarity(emb.float(), reference.float(), dim=-1).mean())


def centroid_accuracy(train: torch.Tensor, train_labels, held: torch.Tensor, held_labels) -> float:
    """Nearest-centroid accuracy by cosine: each held-out row takes the label of the most similar
    class centroid (the mean of that class's normalised training rows)."""
    train_labels, held_labels = torch.as_tensor(train_labels), torch.as_tensor(held_labels)
    classes = torch.unique(train_labels)
    if held.shape[0] == 0 or len(classes) == 0:
        raise ValueError("need training rows of at least one class and some held-out rows")
    train_n = F.normalize(train.float(), dim=-1)
    centroids = torch.stack([train_n[train_labels == c].mean(0) for c in classes])
    scores = F.normalize(held.float(), dim=-1) @ F.normalize(centroids, dim=-1).T
    return float((classes[scores.argmax(-1)] == held_labels).float().mean())


class QualityProbe:
    """The fixed inputs of the quality measures, embedded once by the dense model: held-out
    passages for fidelity and the topic task for accuracy."""

    def __init__(self, tokenizer, passages: list[str], dense_model, max_length: int = 128):
        from rpp_triton.data.tasks import pydoc_topic_task

        task = pydoc_topic_task()
        positions = getattr(dense_model.config, "max_position_embeddings", None) or max_length
        self.tokenizer, self.max_length = tokenizer, min(max_length, positions)
        self.passages = passages
        self.train = [r["text"] for r in task.train]
        self.train_labels = [r["label"] for r in task.train]
        self.held = [r["text"] for r in task.eval]
        self.held_labels = [r["label"] for r in task.eval]
        self.dense_model = dense_model
        self.reference = self._embed(dense_model, self.passages)

    def _embed(self, model, texts):
        return embed(model, self.tokenizer, texts, self.max_length)

    def _topic_accuracy(self, model) -> float:
        train, held = self._embed(model, self.train), self._embed(model, self.held)
        return centroid_accuracy(train, self.train_labels, held, self.held_labels)

    def measure(self, model) -> dict[str, float]:
        """{"embedding_fidelity", "topic_accuracy"} of `model`."""
        return {
            "embedding_fidelity": embedding_fidelity(self._embed(model, self.passages), self.reference),
            "topic_accuracy": self._topic_accuracy(model),
        }

    @functools.cached_property
    def dense(self) -> dict[str, float]:
        """`measure` of the dense model itself, reusing the reference embeddings."""
        return {
            "embedding_fidelity": embedding_fidelity(self.reference, self.reference),
            "topic_accuracy": self._topic_accuracy(self.dense_model),
        }
