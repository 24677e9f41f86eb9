"""Request and response bodies of the HTTP API (pydantic), which FastAPI checks and documents."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Text = str
TextOrPair = str | tuple[str, str]


class ErrorDetail(BaseModel):
    type: str = Field(description="the error kind, e.g. input_too_long")
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | list[Text] = Field(description="one text or a list of texts")
    normalize: bool = Field(False, description="scale each embedding to unit length")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    truncated: list[bool]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | list[TextOrPair] = Field(description="one text, or a list of texts and [text, text] pairs")


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


class QAItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    context: str = Field(description="any length: a long context is read in overlapping windows")


class QARequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": {"question": "Who?", "context": "Ada wrote it."}}]},
    )
    inputs: QAItem | list[QAItem]
    allow_no_answer: bool = Field(
        False,
        description="answer empty (no_answer: true) when the null score beats the best span by more "
        "than null_threshold (SQuAD v2.0); otherwise the best span is always returned",
    )
    null_threshold: float = Field(
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
