"""Model side of the inference server: load a model directory, swap its sparse Linear layers for
block-sparse ones, tokenize, and run one padded batch forward.

Before serving, `Predictor.prepare` keeps a layer block-sparse only where it measures faster than
dense on a representative batch, and compiles the model (CUDA graphs on a GPU); a compiled model
sees a few bucket shapes only, each batch padded up to the smallest that holds it.

Every route shares one forward: a batch holds tokenized sequences, the encoder runs once, and each
sequence gets back its mean-pooled embedding plus whatever head the model has (classification
logits, or question-answering start/end logits). Routes only differ in tokenization (single text,
text pair, question + context windows) and in post-processing, so requests of different routes can
share a batch. Question answering reuses `rpp_triton.qa.features`: a long context becomes overlapping
windows (`prepare_eval_features`), each window is one batch sequence, and the best span over a
context's windows is picked as evaluation picks it (`best_spans`). A new task head is one `_HEADS`
entry, one `encode_*` method and one post-processing method.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rpp_triton.artifacts import read_report
from rpp_triton.errors import UsageError
from rpp_triton.models import has_vocabulary, mean_pool
from rpp_triton.serve.config import LoadConfig
from rpp_triton.serve.errors import Kind, ServeError
from rpp_triton.tiles import divides, tile_sparsity

log = logging.getLogger("rpp_triton.serve")

# Architecture suffix (config.architectures) -> task route served by that head.
_HEADS = {
    "ForSequenceClassification": "classify",
    "ForQuestionAnswering": "qa",
}


class InputTooLong(ServeError):
    """An input has more tokens than `max_tokens` and the predictor is set to refuse, not truncate."""

    kind = Kind.INPUT_TOO_LONG

    def __init__(self, index: int, n_tokens: int, max_tokens: int):
        super().__init__(
            f"input {index} has {n_tokens} tokens, more than the limit of {max_tokens} "
            "(the server is set to refuse over-long inputs, not truncate them)"
        )
        self.index, self.n_tokens, self.max_tokens = index, n_tokens, max_tokens


class QuestionTooLong(ServeError):
    """A question leaves no more than `doc_stride` tokens of its window for the context."""

    kind = Kind.INPUT_TOO_LONG

    def __init__(self, index: int, max_tokens: int, doc_stride: int):
        super().__init__(
            f"question {index} is too long: with the special tokens it leaves no more than "
            f"{doc_stride} of the {max_tokens} tokens of a window for the context (the window overlap)"
        )
        self.index, self.max_tokens, self.doc_stride = index, max_tokens, doc_stride


@dataclass
class Encoded:
    """One tokenized sequence, ready to be padded into a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    truncated: bool = False
    # Question answering only: character span of each token in the context (None outside it),
    # and which (question, context) pair of the request this window belongs to.
    context_offsets: list[tuple[int, int] | None] | None = None
    example: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SequenceOutput:
    """What one forward gives back for one sequence."""

    embedding: list[float]
    logits: list[float] | None = None
    start_logits: list[float] | None = None
    end_logits: list[float] | None = None


@dataclass
class ModelInfo:
    """What a loaded model is: shown by GET /info (never the directory's absolute path)."""

    model_id: str  # the model directory's name
    architecture: str
    tasks: list[str]
    device: str
    dtype: str
    hidden_size: int
    max_tokens: int
    block_size: list[int]
    doc_stride: int = 0  # tokens of overlap between question-answering windows
    sparse_layers: list[str] = field(default_factory=list)  # names of the block-sparse Linear layers
    linear_layers: int = 0
    weight_tile_sparsity: float = 0.0
    sparse_error: str | None = None
    pruning: dict | None = None  # sparsity, target and block size from rpp_report.json
    # choose_layers at warm-up: {"shape": [sequences, tokens], "layers": {name: {sparse, sparse_s, dense_s}}}
    layer_choice: dict | None = None
    compiled: bool = False
    compile_mode: str | None = None
    batch_buckets: list[int] = field(default_factory=list)  # empty: batches are not padded
    length_buckets: list[int] = field(default_factory=list)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


def _tile_sparsity(weight: torch.Tensor, block: tuple[int, int]) -> float | None:
    """Fraction of all-zero `bh x bw` tiles, or None when the shape does not tile."""
    return tile_sparsity(weight, block) if divides(weight.shape, block) else None


@dataclass
class ModelSource:
    """A model directory as read before its weights load: everything `Predictor.load` needs
    besides them, with the options already checked against the model."""

    model_dir: str
    config: Any  # the transformers config
    tokenizer: Any
    report: dict
    task: str | None  # the head's route, None for a bare encoder
    block: tuple[int, int]
    max_tokens: int
    doc_stride: int


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def inspect_model(model_dir: str, options: LoadConfig) -> ModelSource:
    """Read `model_dir`'s config, tokenizer and rpp_report.json and check `options` against them,
    without loading any weights: a UsageError (one line) says what is wrong.

    Question answering splits a context into windows of `max_tokens` tokens that overlap by
    `doc_stride` tokens (default `max_tokens // 3`, as `finetune` trains them)."""
    from transformers import AutoConfig, AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir!r} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable config.json
        raise UsageError(f"{model_dir!r}: cannot read config.json: {_first_line(exc)}") from None
    report = read_report(model_dir) or {}
    # The tiles the model was pruned with, else 32.
    block = options.block_size or (tuple(report["block_size"]) if report.get("block_size") else (32, 32))
    task = None
    for arch in getattr(config, "architectures", None) or []:
        for suffix, name in _HEADS.items():
            if arch.endswith(suffix):
                task = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means the directory lacks one
        raise UsageError(f"cannot load a tokenizer from {model_dir!r}: {_first_line(exc)}") from None

    limit = getattr(config, "max_position_embeddings", None) or 512
    limit = min(limit, tokenizer.model_max_length or limit)
    max_tokens = options.max_tokens or limit
    if max_tokens > limit:
        raise UsageError(f"max_tokens={max_tokens} is above the model's {limit} positions")
    doc_stride = max_tokens // 3 if options.doc_stride is None else options.doc_stride
    if not 0 <= doc_stride < max_tokens // 2:
        raise UsageError(
            f"doc_stride must be in [0, max_tokens / 2) = [0, {max_tokens // 2}), got {doc_stride}"
        )
    if not has_vocabulary(tokenizer):
        raise UsageError(
            f"{model_dir!r} has no tokenizer files (its vocabulary would be only {len(tokenizer)} "
            "special tokens); save the tokenizer into the model directory (tokenizer.save_pretrained)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{model_dir!r} has a slow tokenizer; the server needs a fast one (tokenizer.json)")
    return ModelSource(model_dir, config, tokenizer, report, task, block, max_tokens, doc_stride)


def _tokenizing(method):
    """Run `method` holding the predictor's tokenizer lock."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._tokenizer_lock:
            return method(self, *args, **kwargs)

    return locked


class Predictor:
    """A loaded model plus its tokenizer. Thread use: `encode_*` from any thread, `forward` from one.

    `prepare` gets it ready for the server's batches: block-sparse only where faster, compiled, and
    each batch padded to a bucket shape, which the warm-up runs once (capturing its CUDA graph)."""

    def __init__(self, model, tokenizer, *, info: ModelInfo, device: torch.device, options: LoadConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.options = options
        self.truncate = options.truncate
        self.compile = device.type == "cuda" if options.compile is None else options.compile
        self.cuda_graphs = self.compile and device.type == "cuda"  # mode="reduce-overhead"
        self.batch_buckets: tuple[int, ...] = ()  # set by `prepare`; empty: no padding
        self.length_buckets: tuple[int, ...] = ()
        # CUDA graphs are recorded per thread: every forward of a compiled model runs on this one.
        self._model_thread: ThreadPoolExecutor | None = None
        self.max_tokens = info.max_tokens
        self.tasks = set(info.tasks)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        # Each call of the tokenizer sets truncation on the shared Rust tokenizer first: one at a time.
        self._tokenizer_lock = threading.Lock()
        self._specials = {n: tokenizer.num_special_tokens_to_add(pair=n == 2) for n in (1, 2)}
        config = model.config
        self.problem_type = getattr(config, "problem_type", None)
        num_labels = getattr(config, "num_labels", 0)
        id2label = getattr(config, "id2label", None) or {}
        self.label_names = [
            str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)
        ]

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir: str, options: LoadConfig | None = None, **kwargs) -> Predictor:
        """Load `model_dir` (a `save_pretrained` directory with its tokenizer) for inference, with
        `options` or a LoadConfig made of `kwargs`."""
        options = options or LoadConfig(**kwargs)
        return cls.load(inspect_model(model_dir, options), options)

    @classmethod
    def load(cls, source: ModelSource, options: LoadConfig) -> Predictor:
        """Load the weights of an inspected model directory.

        The head is picked from `config.architectures`: `*ForSequenceClassification` adds the
        classify route, `*ForQuestionAnswering` the qa route, anything else loads the bare encoder
        (`AutoModel`). With `options.sparse`, every Linear whose tile sparsity is at least
        `min_sparsity` becomes a `BlockSparseLinear` (`rpp_triton.sparsify`).
        """
        from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        if options.threads:
            torch.set_num_threads(options.threads)
        start = time.perf_counter()
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if options.dtype == "auto":
            torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, options.dtype)
        loader = {"classify": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering}
        model = loader.get(source.task, AutoModel).from_pretrained(source.model_dir, dtype=torch_dtype)
        model.eval().to(dev)

        block = source.block
        info = ModelInfo(
            model_id=os.path.basename(os.path.abspath(source.model_dir)),
            architecture=type(model).__name__,
            tasks=["embed"] + ([source.task] if source.task else []),
            device=str(dev),
            dtype=str(torch_dtype).replace("torch.", ""),
            hidden_size=source.config.hidden_size,
            max_tokens=source.max_tokens,
            block_size=list(block),
            doc_stride=source.doc_stride,
        )
        if source.report:
            info.pruning = {k: source.report.get(k) for k in ("sparsity", "target_sparsity", "block_size")}
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        info.linear_layers = len(linears)
        tiles = [(s, m.weight.numel()) for m in linears if (s := _tile_sparsity(m.weight, block)) is not None]
        if tiles:
            info.weight_tile_sparsity = sum(s * n for s, n in tiles) / sum(n for _, n in tiles)
        if options.sparse:
            info.sparse_layers, info.sparse_error = _sparsify(
                model, block, options.min_sparsity, options.backend
            )
        info.load_seconds = time.perf_counter() - start
        return cls(model, source.tokenizer, info=info, device=dev, options=options)

    # ----------------------------------------------------------- tokenization
    @_tokenizing
    def encode_texts(
        self, inputs: list[str | tuple[str, str]], truncate: bool | None = None
    ) -> list[Encoded]:
        """Tokenize single texts or text pairs. Over-long inputs are truncated or refused (`truncate`,
        by default the predictor's setting).

        Each text is tokenized alone, without special tokens or truncation, which takes time linear
        in its length (the tokenizer's own pair truncation builds every combination of the two
        texts' overflowing windows: seconds and gigabytes for two long texts). A text is then cut to
        at most one token more than the sequence holds, which keeps which of a pair is longer, all
        that longest-first truncation looks at; the tokenizer truncates the rest and adds the
        special tokens. The result is the tokenizer's own `tokenizer(a, b, truncation=True)`."""
        truncate = self.truncate if truncate is None else truncate
        # tokenizer(a, "") reads a pair with an empty second text as a single text.
        groups = [(x,) if isinstance(x, str) else (x[0],) if not x[1] else tuple(x) for x in inputs]
        backend = self.tokenizer.backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        parts = iter(backend.encode_batch([t for g in groups for t in g], add_special_tokens=False))
        encoded = []
        for i, group in enumerate(groups):
            pieces = [next(parts) for _ in group]
            lengths = [len(p) for p in pieces]
            n_tokens = sum(lengths) + self._specials[len(pieces)]
            if n_tokens > self.max_tokens and not truncate:
                raise InputTooLong(i, n_tokens, self.max_tokens)
            if n_tokens > self.max_tokens:
                room = self.max_tokens - self._specials[len(pieces)]
                for piece, n, other in zip(pieces, lengths, reversed(lengths)):
                    piece.truncate(min(n, room + (n > other)))
                backend.enable_truncation(self.max_tokens, strategy="longest_first")
            else:
                backend.no_truncation()
            out = backend.post_process(pieces[0], pieces[1] if len(pieces) > 1 else None)
            types = out.type_ids if self.uses_token_types else None
            encoded.append(Encoded(out.ids, types, truncated=n_tokens > self.max_tokens))
        return encoded

    @_tokenizing
    def encode_qa(self, pairs: list[tuple[str, str]]) -> list[Encoded]:
        """Tokenize (question, context) pairs into windows of at most `max_tokens` tokens that overlap
        by `doc_stride` context tokens (`qa.prepare_eval_features`); each window's `example` is
        the index of its pair. A question that leaves no room for the context is refused."""
        from rpp_triton.qa import features as qa

        examples = [{"question": q, "context": c} for q, c in pairs]
        stride = self.info.doc_stride
        kept, features = qa.prepare_eval_features(
            self.tokenizer, examples, self.max_tokens, stride, collections.Counter()
        )
        if len(kept) < len(examples):
            kept_ids = {id(e) for e in kept}
            first = next(i for i, e in enumerate(examples) if id(e) not in kept_ids)
            raise QuestionTooLong(first, self.max_tokens, stride)
        encoded = []
        for f in features:
            inputs = f["inputs"]
            types = inputs.get("token_type_ids") if self.uses_token_types else None
            encoded.append(Encoded(inputs["input_ids"], types, False, f["offsets"], f["example_index"]))
        return encoded

    # ---------------------------------------------------------------- forward
    def forward(self, batch: list[Encoded]) -> list[SequenceOutput]:
        """Pad `batch` to its longest sequence, or to the smallest bucket that holds it, run the model
        once, and split the outputs per sequence (padding rows and columns dropped)."""
        if not batch:
            return []
        if self._model_thread is None:
            return self._run(batch)
        return self._model_thread.submit(self._run, batch).result()

    def padded_shape(self, n: int, width: int) -> tuple[int, int]:
        """(sequences, tokens) of the model input for `n` sequences of at most `width` tokens."""
        rows = next((b for b in self.batch_buckets if b >= n), n)
        return rows, next((b for b in self.length_buckets if b >= width), width)

    def _inputs(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        """The padded model input on the device: pad ids, attention mask and token types 0 past each
        sequence and in the padding rows."""
        rows, width = self.padded_shape(len(batch), max(len(e) for e in batch))
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        types = torch.zeros((rows, width), dtype=torch.long) if self.uses_token_types else None
        for i, e in enumerate(batch):
            ids[i, : len(e)] = torch.tensor(e.input_ids)
            mask[i, : len(e)] = 1
            if types is not None and e.token_type_ids is not None:
                types[i, : len(e)] = torch.tensor(e.token_type_ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            inputs["token_type_ids"] = types
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def _run(self, batch: list[Encoded]) -> list[SequenceOutput]:
        inputs = self._inputs(batch)
        n, has_head = len(batch), len(self.tasks) > 1
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous batch's outputs are read
        out = self.model(**inputs, output_hidden_states=has_head, return_dict=True)
        hidden = out.hidden_states[-1] if has_head else out.last_hidden_state
        embeddings = mean_pool(hidden[:n], inputs["attention_mask"][:n]).cpu().tolist()
        results = [SequenceOutput(embedding=emb) for emb in embeddings]
        if "classify" in self.tasks:
            for r, row in zip(results, out.logits[:n].float().cpu().tolist()):
                r.logits = row
        if "qa" in self.tasks:
            starts, ends = out.start_logits[:n].float().cpu(), out.end_logits[:n].float().cpu()
            for i, (r, e) in enumerate(zip(results, batch)):
                r.start_logits = starts[i, : len(e)].tolist()
                r.end_logits = ends[i, : len(e)].tolist()
        return results

    def _filler(self, n: int, length: int) -> list[Encoded]:
        """`n` sequences of `length` tokens for warm-up and timing (the shape is all that matters)."""
        token = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else self.pad_id
        return [Encoded([token] * length, [0] * length if self.uses_token_types else None)] * n

    # ------------------------------------------------------------ warm-up
    def prepare(self, max_batch_size: int, warmup: bool = True, timer=None) -> float:
        """Get ready for batches of up to `max_batch_size` sequences; returns the seconds it took.

        Batches are padded to buckets when the model is compiled or buckets are given. With
        `warmup`: each block-sparse layer stays only where it is faster than dense on a
        representative batch (`choose_layers`, timed by `timer`); then, once compiled, the model runs
        at every bucket shape (twice with CUDA graphs: warm-up, then capture), or at two typical
        shapes without buckets. Call it once."""
        start = time.perf_counter()
        options, info = self.options, self.info
        if self.compile or options.batch_buckets or options.length_buckets:
            self.batch_buckets = _buckets(options.batch_buckets or (1, 8), max_batch_size)
            self.length_buckets = _buckets(options.length_buckets or (32, 64, 128), self.max_tokens)
            info.batch_buckets, info.length_buckets = list(self.batch_buckets), list(self.length_buckets)
        if warmup and options.choose_layers and info.sparse_layers:
            self._choose_layers(max_batch_size, timer)
        if self.compile:
            from rpp_triton.sparse import compile_sparse

            if len(self.tasks) > 1:
                # transformers installs its hidden-state hooks on the first call that asks for hidden
                # states, under a lock that torch.compile cannot trace: make that call eagerly.
                self._run(self._filler(1, 2))
            mode = "reduce-overhead" if self.cuda_graphs else None
            # Dynamic shapes: one compiled graph serves every bucket (batch 1 gets its own), while
            # CUDA graphs are still recorded per bucket shape.
            self.model = compile_sparse(self.model, mode=mode, dynamic=True)
            self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="rpp-model")
            info.compiled, info.compile_mode = True, mode or "default"
        if warmup:
            if self.batch_buckets:
                shapes = [(b, n) for b in self.batch_buckets for n in self.length_buckets]
            else:
                shapes = [(1, min(16, self.max_tokens)), (min(8, max_batch_size), min(64, self.max_tokens))]
            for n, length in shapes:
                for _ in range(2 if self.cuda_graphs else 1):
                    self.forward(self._filler(n, length))
            info.warmup_seconds = time.perf_counter() - start
        return time.perf_counter() - start

    def _choose_layers(self, max_batch_size: int, timer) -> None:
        """Densify the block-sparse layers that are slower than dense on a representative batch: max
        batch size x 128 tokens on a GPU, a modest 8 x 64 on a CPU (a warm-up of a few seconds)."""
        from rpp_triton.sparse import best_time, choose_layers

        on_gpu = self.device.type == "cuda"
        n = max_batch_size if on_gpu else min(8, max_batch_size)
        length = min(128 if on_gpu else 64, self.max_tokens)
        timer = timer or (_graph_time if self.cuda_graphs else best_time)
        report = choose_layers(self.model, self._inputs(self._filler(n, length)), timer=timer)
        self.info.sparse_layers = _sparse_layers(self.model)
        self.info.layer_choice = {"shape": [n, length], "layers": report}
        log.info(
            "choose_layers: %d of %d layers sparse (faster than dense on %d sequences x %d tokens)",
            sum(r["sparse"] for r in report.values()),
            len(report),
            n,
            length,
        )

    # -------------------------------------------------------- post-processing
    def classification(self, out: SequenceOutput) -> dict:
        """Label, score and per-label probabilities for one sequence's logits."""
        logits = torch.tensor(out.logits)
        if self.problem_type == "regression" or logits.numel() == 1:
            return {"label": self.label_names[0] if self.label_names else "score", "score": logits[0].item()}
        if self.problem_type == "multi_label_classification":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        best = int(probs.argmax())
        return {"label": self.label_names[best], "score": probs[best].item(), "probabilities": probs.tolist()}

    def answers(
        self,
        pairs: list[tuple[str, str]],
        windows: list[Encoded],
        outputs: list[SequenceOutput],
        null_threshold: float | None = None,
        max_answer_tokens: int = 30,
    ) -> list[dict]:
        """Per (question, context) pair, the best span over its windows (`qa.best_spans`): the
        answer text, its character offsets into the context, `score` (its start probability times
        its end probability, softmax over its window) and `null_margin` (null score minus the best
        span's start + end logits). With `null_threshold`, the answer is empty (start = end = 0,
        score: the [CLS] probability of the window with the lowest null score) when the margin
        exceeds it, as SQuAD v2.0 scores it."""
        from rpp_triton.qa import features as qa

        examples = [{"question": q, "context": c} for q, c in pairs]
        features = [{"example_index": w.example, "offsets": w.context_offsets} for w in windows]
        starts = [torch.tensor(o.start_logits) for o in outputs]
        ends = [torch.tensor(o.end_logits) for o in outputs]
        spans = qa.best_spans(
            examples,
            features,
            [s.numpy() for s in starts],
            [e.numpy() for e in ends],
            max_answer_length=max_answer_tokens,
        )

        def probability(window: int, start: int, end: int) -> float:
            s, e = starts[window], ends[window]
            return math.exp(float(s[start] + e[end] - torch.logsumexp(s, 0) - torch.logsumexp(e, 0)))

        results = []
        for span in spans:
            margin = span.null_margin
            answer = {
                "answer": span.text,
                "score": 0.0,
                "start": span.start,
                "end": span.end,
                "null_margin": margin if math.isfinite(margin) else None,
                "no_answer": False,
            }
            if null_threshold is not None and margin > null_threshold and span.null_window >= 0:
                answer.update(
                    answer="", start=0, end=0, no_answer=True, score=probability(span.null_window, 0, 0)
                )
            elif span.window >= 0:
                answer["score"] = probability(span.window, span.start_token, span.end_token)
            results.append(answer)
        return results


def _buckets(given: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """`given` below `limit`, and `limit` itself, in order."""
    return tuple(sorted({b for b in given if b < limit} | {limit}))


def _graph_time(fn) -> float:
    """`best_time` of replaying `fn` from a CUDA graph: a layer's cost inside a captured model, with
    no launch overhead (eager timing if capture fails)."""
    from rpp_triton.sparse import best_time

    fn()  # compile and autotune before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        log.warning("timing eagerly, CUDA graph capture failed: %s", _first_line(exc))
        return best_time(fn)
    return best_time(graph.replay)


def _sparse_layers(model) -> list[str]:
    from rpp_triton.sparse import BlockSparseLinear

    return [name for name, m in model.named_modules() if isinstance(m, BlockSparseLinear)]


def _sparsify(
    model, block_size: tuple[int, int], min_sparsity: float, backend: str
) -> tuple[list, str | None]:
    """Swap sparse Linear layers for BlockSparseLinear. Returns (names of the swapped layers, why
    none were or None)."""
    try:
        from rpp_triton.sparse import sparsify
    except ImportError as exc:
        reason = f"rpp_triton.sparse is not available ({exc}); serving the dense model"
        log.warning(reason)
        return [], reason
    sparsify(model, block_size=block_size, min_sparsity=min_sparsity, backend=backend)
    swapped = _sparse_layers(model)
    log.info(
        "sparsified %d Linear layers (block %s, min tile sparsity %.2f)",
        len(swapped),
        block_size,
        min_sparsity,
    )
    return swapped, None
