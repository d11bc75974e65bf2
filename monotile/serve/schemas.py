"""The request bodies of `monotile serve`, as OpenAI defines them (plus `top_k` and
`repetition_penalty`, as llama.cpp's server adds them). FastAPI validates every request
against these and lists them in /openapi.json; a value out of range is a 400."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8            # choices per request
MAX_LOGPROBS = 5     # alternatives per token (completions; OpenAI's own cap)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's cap)
MAX_STOPS = 4


class _Body(BaseModel):
    # clients send fields we do not use (user, ...); a value of the wrong JSON type is refused
    # rather than coerced ("3" is not an integer)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="one more chunk before [DONE]: empty "
                                "choices and the request's usage (every other chunk then "
                                "carries usage: null)")


class _Sampling(_Body):
    model: str = Field(description="a served model's name, as GET /v1/models lists it")
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="an extension: keep the k likeliest")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} strings")
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="an extension")
    stream_options: StreamOptions | None = Field(None, description="with stream: true only")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="a prompt, or a list of prompts")
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] = Field(description="a text, or a list of up to 2048 texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ForecastRequest(_Body):
    model: str
    csv: str | None = Field(None, description="a history as CSV text: a time column (optional) "
                            "and one column per series")
    series: dict[str, list[float | None]] | None = Field(
        None, description="or the history as {name: [values, oldest first]}")
    timestamps: list[str] | None = Field(None, description="with `series`: one per value")
    horizon: int | None = Field(None, ge=1, le=10_000,
                                description="steps to forecast (default: the model's horizon)")
    quantiles: list[float] | None = Field(None, description="a subset of the model's quantiles")


class PredictionRequest(_Body):
    model: str
    input: Any = Field(description="one input as JSON, as the run's task reads it (e.g. "
                       "{\"prompt\": text} for text, {\"csv\": text} for a series), or a "
                       "file's bytes as {\"base64\": ...} (an image, a recording)")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the task's "
                                    "predict, e.g. {\"top_k\": 3} or {\"horizon\": 24}")
