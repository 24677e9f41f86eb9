"""Request and response bodies of the HTTP API (pydantic), which FastAPI checks and documents.

Types are strict where JSON would otherwise be coerced: a boolean is `true` or `false` (not `1`,
`"yes"`), a number is not a boolean, a text is a string. A list of inputs has at least one item.
Limits set by the server's flags (inputs per request, characters per text) are checked by the
service and answered 413; the served OpenAPI document states them (`LIMIT`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictStr

# Marks a schema node with the server limit that bounds it; the served OpenAPI document turns
# the mark into maxLength (a text) or maxItems (a list of inputs) with the running server's value.
LIMIT = "x-rpp-limit"
Text = Annotated[StrictStr, Field(json_schema_extra={LIMIT: "max_chars"})]
NonBlank = Annotated[Text, Field(pattern=r"\S")]


def inputs_list(item) -> type:
    """A list of at least one and at most max_inputs `item`s."""
    return Annotated[list[item], Field(min_length=1, json_schema_extra={LIMIT: "max_inputs"})]


Texts = inputs_list(Text)
TextOrPair = Text | tuple[Text, Text]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    type: str = Field(description="the error kind, e.g. input_too_long")
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


# ------------------------------------------------------------------ native API
class EmbedRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | Texts = Field(description="one text or a list of texts")
    normalize: StrictBool = Field(False, description="scale each embedding to unit length")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    truncated: list[bool]


class ClassifyRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | inputs_list(
        TextOrPair
    ) = Field(description="one text, or a list of texts and [text, text] pairs")


class Classification(BaseModel):
    label: str
    score: float
    probabilities: list[float] | None = None


class ClassifyResponse(BaseModel):
    labels: list[str]
    scores: list[float]
    predictions: list[Classification]
    label_names: list[str]
    truncated: list[bool]


class QAItem(Strict):
    question: NonBlank
    context: NonBlank = Field(description="a long context is read in overlapping windows")


class QARequest(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"inputs": {"question": "Who?", "context": "Ada wrote it."}}]},
    )
    inputs: QAItem | inputs_list(QAItem)
    allow_no_answer: StrictBool = Field(
        False,
        description="answer empty (no_answer: true) when the null score beats the best span by more "
        "than null_threshold (SQuAD v2.0); otherwise the best span is always returned",
    )
    null_threshold: StrictFloat = Field(
        0.0,
        allow_inf_nan=False,
        description="with allow_no_answer: the null_margin above which the answer is empty "
        "(`finetune` on SQuAD v2.0 reports the best one as best_f1_thresh)",
    )


class Answer(BaseModel):
    answer: str
    score: float = Field(description="start probability x end probability in the span's window")
    start: int = Field(description="character offset of the answer in the context (0 when empty)")
    end: int = Field(description="character offset just past the answer (0 when empty)")
    null_margin: float | None = Field(
        None, description="null score minus the best span's score, in logits (null when no span fits)"
    )
    no_answer: bool = Field(False, description="the null answer won (only with allow_no_answer)")


class QAResponse(BaseModel):
    answers: list[Answer]
    truncated: list[bool] = Field(description="always false: long contexts are windowed, never cut")


# ------------------------------------------------- OpenAI: POST /v1/embeddings
class OpenAIEmbeddingsRequest(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "minilm", "input": ["A sentence."]}]},
    )
    input: Text | Texts = Field(description="one text or a list of texts")
    model: StrictStr | None = Field(None, description="accepted and ignored: the server has one model")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding as little-endian float32 bytes, base64-encoded"
    )
    user: StrictStr | None = Field(None, description="accepted and ignored")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="unit length; a base64 string with encoding_format=base64"
    )


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


# ------------------------------------- text-embeddings-inference: POST /embed
class TEIEmbedRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": "A sentence."}]})
    inputs: Text | Texts = Field(description="one text or a list of texts")
    normalize: StrictBool = Field(True, description="scale each embedding to unit length")
    truncate: StrictBool | None = Field(
        None,
        description="cut inputs over the token limit (true) or refuse them with 413 (false); "
        "null: the server's --on-long setting",
    )


# ----------------------------------------------------------- GET /info, /health
class Limits(BaseModel):
    max_inputs: int = Field(description="inputs per request (a text pair or question + context is one)")
    max_chars: int = Field(description="characters per text")
    max_tokens: int = Field(description="tokens per input (per window for question answering)")
    on_long: Literal["truncate", "refuse"] = Field(description="what happens to inputs over max_tokens")
    max_body_bytes: int
    max_batch_size: int
    max_batch_tokens: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float


class LayerTiming(BaseModel):
    sparse: bool = Field(description="runs block-sparse: it measured faster than dense")
    sparse_s: float = Field(description="seconds per call, block-sparse")
    dense_s: float = Field(description="seconds per call, dense F.linear")


class LayerChoice(BaseModel):
    shape: list[int] = Field(description="[sequences, tokens] of the batch the layers were timed on")
    layers: dict[str, LayerTiming]


class Info(BaseModel):
    model_id: str = Field(description="the model directory's name")
    architecture: str
    tasks: list[str]
    routes: list[str] = Field(description="inference routes this model serves")
    device: str
    dtype: str
    hidden_size: int
    block_size: list[int] = Field(description="tile size [rows, columns] of the block-sparse layers")
    weight_tile_sparsity: float = Field(description="fraction of all-zero tiles over the Linear weights")
    pruning: dict | None = Field(description="sparsity, target_sparsity and block_size from rpp_report.json")
    sparse_layers: list[str] = Field(description="Linear layers running block-sparse")
    linear_layers: int
    sparse_error: str | None = Field(description="why no layer runs block-sparse, when sparse serving failed")
    layer_choice: LayerChoice | None = Field(
        description="the warm-up's timing of each block-sparse layer against dense (null: not run)"
    )
    compiled: bool = Field(description="the model runs under torch.compile")
    compile_mode: str | None = Field(description="reduce-overhead (CUDA graphs) or default; null: eager")
    batch_buckets: list[int] = Field(description="batch sizes a batch is padded up to (empty: no padding)")
    length_buckets: list[int] = Field(description="token lengths a batch is padded up to (empty: no padding)")
    doc_stride: int = Field(description="tokens of overlap between question-answering windows")
    load_seconds: float
    warmup_seconds: float
    limits: Limits


class Health(BaseModel):
    status: Literal["loading", "ready", "draining", "failed"]
    model_id: str | None = None
