"""The OpenAI API's request and response shapes: request bodies checked field by field and mapped onto offspec's
settings, and the JSON of completions, chunks, log-probabilities and errors.

Every field the OpenAI API (and llama-server) accepts either maps onto a setting or is refused with a 400 that
names it; none is silently ignored except `user` (an end-user id that does not change the answer).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from offspec.generate import GenerationConfig, TokenLogprob

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, and the offending parameter and code when known."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------- field checks
def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a number, not {v!r}", "invalid_type")
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
        span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad(name, f"'{name}' must be in {span}, not {v}")
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, not {v!r}", "invalid_type")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise bad(name, f"'{name}' must be {'at least ' + str(lo) if hi is None else f'between {lo} and {hi}'}, "
                        f"not {v}")
    return v


def _boolean(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, not {v!r}", "invalid_type")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"'stop' takes at most {MAX_STOPS} strings, not {len(stops)}")
    return tuple(s for s in stops if s)


def _refuse_unless(body: dict, name: str, ok) -> None:
    """A field offspec does not implement: accepted only at a value that asks for nothing (ok(value))."""
    if name in body and body[name] is not None and not ok(body[name]):
        raise bad(name, f"'{name}' is not supported by this server", "unsupported_parameter")


SAMPLING_FIELDS = {"model", "stream", "stream_options", "max_tokens", "n_predict", "temperature", "top_p", "top_k",
                   "min_p", "stop", "seed", "presence_penalty", "frequency_penalty", "repeat_penalty",
                   "repeat_last_n", "n", "user", "logit_bias", "logprobs"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                 "tool_choice", "parallel_tool_calls", "functions", "function_call"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "suffix", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Request:
    """A checked request: its model, messages (chat) or prompt (completions), and what it asks of the sampler."""

    model: str
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None: until the context is full
    sampling: dict = field(default_factory=dict)  # GenerationConfig fields the request sets
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; else the number of alternatives per token (0 = the token's own only)

    def config(self, defaults: GenerationConfig, room: int) -> GenerationConfig:
        """The generation settings: the server's defaults, overridden by the request; at most `room` tokens."""
        n = min(self.max_tokens, room) if self.max_tokens is not None else room
        lp = 0 if self.logprobs is None else max(1, self.logprobs)
        return replace(defaults, max_new_tokens=max(1, n), stop=self.stop or defaults.stop, logprobs=lp,
                       **self.sampling)


def _common(body: Any, allowed: set[str]) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required: the id that GET /v1/models lists", "missing_required_parameter")
    req = Request(model)
    req.stream = bool(_boolean(body, "stream"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise bad("stream_options", "'stream_options' takes only {\"include_usage\": true|false}")
        req.include_usage = bool(_boolean(opts, "include_usage"))
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("n", "'n' > 1 is not supported: ask once per answer", "unsupported_parameter")
    _refuse_unless(body, "logit_bias", lambda v: v == {})
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "'user' must be a string", "invalid_type")
    max_tokens = _integer(body, "max_tokens", 1)
    predict = _integer(body, "n_predict", -1)  # llama-server's name; -1 = no limit
    req.max_tokens = max_tokens if max_tokens is not None else (predict if predict not in (None, -1) else None)
    if req.max_tokens == 0:
        raise bad("n_predict", "'n_predict' must be -1 (no limit) or at least 1")
    s = req.sampling
    if (t := _number(body, "temperature", 0.0)) is not None:
        s["temperature"] = t
    if (k := _integer(body, "top_k", 0)) is not None:
        s["top_k"] = k
    if (p := _number(body, "top_p", 0.0, 1.0)) is not None:
        if p == 0.0:  # only the likeliest token: what top_k 1 does
            s["top_k"], s["top_p"] = 1, 1.0
        else:
            s["top_p"] = p
    if (m := _number(body, "min_p", 0.0, 1.0)) is not None:
        if m >= 1.0:
            raise bad("min_p", "'min_p' must be below 1")
        s["min_p"] = m
    if (seed := _integer(body, "seed", -(1 << 63), (1 << 64) - 1)) is not None:
        s["seed"] = seed & ((1 << 64) - 1)
    for name in ("presence_penalty", "frequency_penalty"):
        if (v := _number(body, name, -2.0, 2.0)) is not None:
            s[name] = v
    if (r := _number(body, "repeat_penalty", 0.0, lo_open=True)) is not None:
        s["repeat_penalty"] = r
    if (last := _integer(body, "repeat_last_n", -1)) is not None:
        s["repeat_last_n"] = last
    req.stop = _stops(body)
    return req


def parse_chat(body: Any) -> Request:
    """POST /v1/chat/completions: a checked Request or an APIError (400) naming the field."""
    req = _common(body, CHAT_FIELDS)
    if body.get("max_completion_tokens") is not None:
        req.max_tokens = _integer(body, "max_completion_tokens", 1)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list of {role, content}", "missing_required_parameter")
    req.messages = [_message(m, i) for i, m in enumerate(msgs)]
    if _boolean(body, "logprobs"):
        req.logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") not in (None, 0):
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    _refuse_unless(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
    for name in ("tools", "functions"):
        _refuse_unless(body, name, lambda v: v == [])
    _refuse_unless(body, "tool_choice", lambda v: v == "none")
    _refuse_unless(body, "function_call", lambda v: v == "none")
    _boolean(body, "parallel_tool_calls")  # only meaningful with tools, which are refused
    return req


def _message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"'{where}' must be an object with 'role' and 'content'", "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}, not {role!r}"
                  + (" (tool calls are not supported)" if role in ("tool", "function") else ""))
    extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, [], ""))
    if extra:
        raise bad(f"{where}.{extra[0]}", f"'{where}.{extra[0]}' is not supported by this server",
                  "unsupported_parameter")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", f"'{where}.content[{j}]': only text parts are supported",
                          "unsupported_parameter")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of text parts", "invalid_type")
    return {"role": ROLES[role], "content": content}


def parse_completion(body: Any) -> Request:
    """POST /v1/completions: a checked Request or an APIError (400) naming the field."""
    req = _common(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt = list(prompt)
    elif isinstance(prompt, str) and prompt:
        req.prompt = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "one prompt per request: batches of prompts are not supported", "unsupported_parameter")
    else:
        raise bad("prompt", "'prompt' must be a non-empty string or a list of token ids", "missing_required_parameter")
    lp = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    req.logprobs = lp
    _refuse_unless(body, "echo", lambda v: v is False)
    _refuse_unless(body, "suffix", lambda v: v == "")
    _refuse_unless(body, "best_of", lambda v: v == 1)
    return req


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else ""


def chat_logprobs(tokenizer, lps: list[TokenLogprob], top: int) -> dict:
    """The chat `logprobs` object: each token's text, log-probability, UTF-8 bytes and `top` alternatives."""
    def one(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [one(lp.token, lp.logprob) | {"top_logprobs": [one(t, v) for t, v in lp.top[:top]]}
                        for lp in lps]}


def completion_logprobs(tokenizer, lps: list[TokenLogprob], top: int, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, their log-probabilities, top alternatives, text offsets."""
    tokens = [_token_text(tokenizer, lp.token) for lp in lps]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top[:top]} for lp in lps],
            "text_offset": offsets}


def finish_reason(finish: str | None) -> str | None:
    """offspec's finish ("stop", "length") as the API names it."""
    return finish if finish in ("stop", "length") else None


@dataclass
class Completion:
    """The response (or the chunks) of one request, built from its text and tokens as they come."""

    chat: bool
    model: str
    fingerprint: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def response(self, text: str, finish: str | None, use: dict, logprobs: dict | None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason(finish)}
            return self._head("chat.completion") | {"choices": [choice], "usage": use}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(finish)}
        return self._head("text_completion") | {"choices": [choice], "usage": use}

    def chunk(self, text: str | None, finish: str | None = None, logprobs: dict | None = None,
              use: dict | None = None, first: bool = False) -> dict:
        """One streamed chunk; `use` adds the usage (to the last chunk); text None gives a chunk without a choice."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = self._head(obj)
        if text is None:
            out["choices"] = []
        elif self.chat:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs,
                               "finish_reason": finish_reason(finish)}]
        else:
            out["choices"] = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(finish)}]
        if use is not None:
            out["usage"] = use
        return out
