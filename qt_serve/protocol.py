"""Request and response bodies of the OpenAI-style API, as Pydantic models.

Declared here so `/docs` and `/openapi.json` document them. Unknown request fields are
accepted and ignored (clients send many). Sampling fields map onto `SamplingParams`,
including the vLLM extensions that benchmark and eval tools send (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qt_serve.errors import QtError


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Lenient):
    include_usage: bool = False


class SamplingFields(Lenient):
    """Sampling values of a request. Unset (None) ones take the model's defaults from its
    generation_config.json, then `SamplingParams`' own (as vLLM does)."""

    model: str | None = None
    max_tokens: int | None = Field(None, description="new tokens at most; default: the rest of the context")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="vLLM extension; 0 or -1 disables")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_values(self, logprobs: int | None) -> dict[str, Any]:
        """`SamplingParams` keyword values of this request (None where unset), max_tokens aside."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        try:
            bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        except ValueError:
            raise QtError("logit_bias keys must be token ids (integers as strings)") from None
        top_k = None if self.top_k is None else max(self.top_k, 0)
        return dict(temperature=self.temperature, top_k=top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stop,
                    stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                    logit_bias=bias, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


def plain(messages: list[ChatMessage]) -> list[dict]:
    """Messages as dicts: role, text content, and the tool fields where set (`tools.Plan.render`
    turns them into what the chat template takes)."""
    return [{"role": m.role, "content": m.text(), "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id}
            for m in messages]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}')
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, description='"none" | "auto" | "required" | a function')
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = 16


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qt"
    max_model_len: int
    root: str | None = None  # a LoRA adapter's directory (vLLM's field)
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
