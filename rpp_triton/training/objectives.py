"""Training objectives of `prune`: masked LM, distillation from a frozen teacher, or both
(docs/design.md, "Objectives").

Distillation matches the teacher where the model's knowledge lives: the hidden states layer by layer
(relative squared error; a layer map where depths differ), the mean-pooled embedding (cosine), and
the masked-LM logits at the masked positions (temperature KL) where both models have a head. The
teacher runs under `no_grad` in eval mode and is never written to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rpp_triton.models import mean_pool, mlm_head

OBJECTIVES = ("mlm", "distill", "mlm+distill")


class MaskedPositions:
    """Forward pre-hook on a masked-LM head: while `select` is set, only the positions it marks
    (the ~15% that carry a label) reach the head. MiniLM's head projects 384 features onto 30522
    words, more arithmetic than the whole encoder when it runs on every position."""

    def __init__(self, head):
        self.select = None
        head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.select is None:
            return None
        return (args[0][self.select], *args[1:])


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer matched to each student layer 1..Ls (hidden_states index; 0 is embeddings):
    evenly spaced, the last to the last."""
    return [round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


class Objective:
    """The loss of one training step and the held-out evaluation, for `mlm`, `distill` or
    `mlm+distill`. `student` is the model being trained (a `*ForMaskedLM` when the objective
    has masked LM), `teacher` a frozen model or None."""

    def __init__(
        self, name: str, student, teacher=None, temperature: float = 2.0, tokenizer=None, mlm_probability=0.15
    ):
        if name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
        self.name = name
        self.mlm = "mlm" in name
        self.tokenizer, self.mlm_probability = tokenizer, mlm_probability
        self.teacher = teacher if "distill" in name else None
        self.temperature = temperature
        self.student_head = self._hook(student) if self.mlm else None
        self.teacher_head = None
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
            if self.mlm and mlm_head(self.teacher) is not None:
                self.teacher_head = self._hook(self.teacher)
            self.layers = layer_map(student.config.num_hidden_layers, self.teacher.config.num_hidden_layers)

    @staticmethod
    def _hook(model):
        head = mlm_head(model)
        return MaskedPositions(head) if head is not None else None

    @staticmethod
    def _forward(model, hook, inputs, select):
        if hook is not None:
            hook.select = select
        try:
            return model(**inputs, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.select = None

    def parts(self, model, inputs) -> dict[str, torch.Tensor]:
        """Each loss term of one batch: `mlm`, `hidden`, `pooled`, `logits` (those that apply), plus
        the masked-LM predictions and labels and the pooled embeddings for evaluation."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        select = labels != -100 if (labels is not None and self.student_head is not None) else None
        out = self._forward(model, self.student_head, inputs, select)
        parts: dict[str, torch.Tensor] = {}
        if select is not None:
            target = labels[select]
            logits = out.logits.float()
            parts["mlm"] = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0.0
            parts["_preds"], parts["_labels"] = logits.argmax(-1), target
        if self.teacher is None:
            return parts
        with torch.no_grad():
            ref = self._forward(self.teacher, self.teacher_head, inputs, select)
        keep = inputs["attention_mask"].unsqueeze(-1).float()
        hidden = []
        for i, j in enumerate(self.layers, start=1):
            s, t = out.hidden_states[i].float(), ref.hidden_states[j].float()
            hidden.append(((s - t).square() * keep).sum() / ((t.square() * keep).sum() + 1e-12))
        parts["hidden"] = torch.stack(hidden).mean()
        s_emb = mean_pool(out.hidden_states[-1], inputs["attention_mask"])
        t_emb = mean_pool(ref.hidden_states[-1], inputs["attention_mask"])
        cosine = F.cosine_similarity(s_emb, t_emb, dim=-1)
        parts["pooled"] = (1 - cosine).mean()
        parts["_cosine"] = cosine.detach()
        if select is not None and self.teacher_head is not None and parts["_labels"].numel():
            T = self.temperature
            parts["logits"] = F.kl_div(
                F.log_softmax(out.logits.float() / T, -1),
                F.log_softmax(ref.logits.float() / T, -1),
                log_target=True,
                reduction="batchmean",
            ) * (T * T)
        return parts

    def mask(self, inputs: dict, seed: int) -> dict:
        """BERT's masking of a training batch that has no labels yet, drawn from its own generator
        seeded by `seed`: a resumed run masks each step exactly as the uninterrupted one did,
        whatever the global random state was when the batch was collated."""
        from rpp_triton.data.text import mask_tokens

        if not self.mlm or "labels" in inputs:
            return inputs
        ids = inputs["input_ids"]
        generator = torch.Generator().manual_seed(seed)
        masked, labels = mask_tokens(ids.cpu(), self.tokenizer, self.mlm_probability, generator)
        return {**inputs, "input_ids": masked.to(ids.device), "labels": labels.to(ids.device)}

    def loss(self, model, inputs) -> torch.Tensor:
        parts = self.parts(model, inputs)
        return sum(v for k, v in parts.items() if not k.startswith("_"))

    @torch.no_grad()
    def evaluate(self, model, blocks: list[dict], batch_size: int) -> dict[str, float]:
        """On held-out blocks: the loss, masked-LM accuracy where it applies, and for distillation
        the embedding fidelity (mean cosine to the teacher's pooled embedding)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        correct = count = cos_sum = n_cos = n_batches = 0
        try:
            for start in range(0, len(blocks), batch_size):
                rows = blocks[start : start + batch_size]
                batch = {k: torch.tensor([r[k] for r in rows], device=device) for k in rows[0]}
                parts = self.parts(model, batch)
                n_batches += 1
                for k, v in parts.items():
                    if not k.startswith("_"):
                        sums[k] = sums.get(k, 0.0) + float(v)
                if "_labels" in parts:
                    correct += int((parts["_preds"] == parts["_labels"]).sum())
                    count += parts["_labels"].numel()
                if "_cosine" in parts:
                    cos_sum += float(parts["_cosine"].sum())
                    n_cos += parts["_cosine"].numel()
        finally:
            model.train(was_training)
        metrics = {f"{k}_loss": v / max(n_batches, 1) for k, v in sums.items()}
        metrics["loss"] = sum(metrics.values())
        if self.mlm and count:
            metrics["mlm_accuracy"] = correct / count
        if n_cos:
            metrics["embedding_fidelity"] = cos_sum / n_cos
        return metrics
