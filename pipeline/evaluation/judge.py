"""LLM judge of latent coherence, and an offline purity proxy that needs no LLM.

The judge sees a latent's top-activating contexts (active tokens marked ``<<like this>>``)
and rates coherence 1-5 with a one-line explanation; the headline is the count rated >= 4.
Replies are free text from models of any quality, so the parser accepts JSON, "Rating: 4",
"4/5", "4 out of 5" or a bare digit, and anything else gives ``rating=None`` rather than an
exception. Backends: any OpenAI-compatible endpoint over httpx (bounded reads, timeouts,
retries with exponential backoff on connection errors, 429 and 5xx) or a local transformers
model. An endpoint that still fails raises ``JudgeError``: the evaluation stops with one
line, or (``--judge-fallback``) falls back to the purity proxy and says so in its table.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

Messages = list[dict[str, str]]
GOOD_RATING = 4
MAX_PARSE_CHARS, MAX_JSON_TRIES = 20_000, 20  # bound the parser's work on runaway replies
SYSTEM_PROMPT = (
    "You rate features of a language model. You are shown text snippets where one feature "
    "fires most strongly; tokens where it fires are marked <<like this>>. Rate how coherent "
    "the feature is: 5 = one clear, specific concept in every snippet; 4 = one concept with "
    "minor exceptions; 3 = a loose theme; 2 = mostly unrelated; 1 = no pattern. "
    'Reply with JSON only: {"rating": <1-5>, "explanation": "<one line>"}'
)


def build_messages(contexts: Sequence[str]) -> Messages:
    """The chat prompt for one latent."""
    snippets = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Snippets:\n{snippets}\n\nRate this feature."},
    ]


@dataclass(frozen=True)
class Verdict:
    rating: int | None
    explanation: str
    raw: str
    error: str | None = None


_RATING_PATTERNS = [
    re.compile(
        r"\b(?:rating|score|coherence)\b(?:\s*\(?1\s*(?:-|to)\s*5\)?)?"
        r"\W{0,4}(?:is|of)?\W{0,4}([1-5])(?![.,]?\d)",
        re.I,
    ),
    re.compile(r"\brate (?:it|this(?: feature)?) (?:an? )?([1-5])(?![.,]?\d)", re.I),
    re.compile(r"(?<![\d.])([1-5])\s*/\s*5\b"),
    re.compile(r"(?<![\d.])([1-5])\s+out\s+of\s+(?:5|five)\b", re.I),
    re.compile(r"^\W{0,3}([1-5])\W{0,3}$", re.M),
]
_EXPLANATION = re.compile(r"\b(?:explanation|reason|rationale)\b\W{0,4}(.+)", re.I)


def _json_verdict(text: str) -> tuple[int | None, str] | None:
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"\{", text[:MAX_PARSE_CHARS])][:MAX_JSON_TRIES]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, dict):
            continue
        fields = {str(k).lower(): v for k, v in value.items()}
        rating = next((fields[k] for k in ("rating", "score", "coherence") if k in fields), None)
        if rating is None:
            continue
        explain = next(
            (fields[k] for k in ("explanation", "reason", "rationale") if k in fields), ""
        )
        if isinstance(rating, bool):
            return None, str(explain)
        try:
            number = float(rating)
        except (TypeError, ValueError):
            return None, str(explain)
        valid = number.is_integer() and 1 <= number <= 5
        return (int(number) if valid else None), str(explain)
    return None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip()[:300] if lines else ""


def parse_verdict(reply: object) -> Verdict:
    """A rating in 1..5 or None, and a one-line explanation; never raises."""
    if not isinstance(reply, str):
        return Verdict(None, "", repr(reply), "reply is not text")
    reply = reply[:MAX_PARSE_CHARS]
    from_json = _json_verdict(reply)
    if from_json is not None:
        return Verdict(from_json[0], _first_line(from_json[1]), reply)
    rating = None
    for pattern in _RATING_PATTERNS:
        match = pattern.search(reply)
        if match:
            rating = int(match.group(1))
            break
    found = _EXPLANATION.search(reply)
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    explanation = found.group(1) if found else (lines[-1] if lines else "")
    return Verdict(rating, _first_line(explanation), reply)


class JudgeError(RuntimeError):
    """The judge could not rate (endpoint unreachable or erroring after retries, malformed
    replies, no usable rating at all); ends the evaluation unless a fallback was asked for."""


class ChatBackend(Protocol):
    def complete(self, messages: Messages) -> str: ...


class OpenAIJudge:
    """``POST {base_url}/chat/completions`` over httpx (base_url ends in /v1, as for openai).

    Connection errors, timeouts, 429 and 5xx are retried ``retries`` times with exponential
    backoff (``backoff * 2**attempt`` s, capped at ``max_backoff``); then, like any other
    HTTP error or a reply that is not a chat completion, it raises ``JudgeError``."""

    RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 200,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_response_bytes: int = 1 << 20,
        transport: Any = None,
    ) -> None:
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_tokens, self.retries, self.backoff = max_tokens, retries, backoff
        self.max_backoff, self.max_response_bytes = max_backoff, max_response_bytes
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    @classmethod
    def from_env(cls, **kwargs: Any) -> OpenAIJudge:
        """FMX_JUDGE_BASE_URL, FMX_JUDGE_MODEL (required) and FMX_JUDGE_API_KEY (optional)."""
        missing = [v for v in ("FMX_JUDGE_BASE_URL", "FMX_JUDGE_MODEL") if not os.environ.get(v)]
        if missing:
            raise JudgeError(f"set {' and '.join(missing)} to use the OpenAI-compatible judge")
        return cls(
            os.environ["FMX_JUDGE_BASE_URL"],
            os.environ["FMX_JUDGE_MODEL"],
            os.environ.get("FMX_JUDGE_API_KEY") or None,
            **kwargs,
        )

    def _post_once(self, body: dict[str, Any]) -> bytes:
        """One request; raises ``_Retryable`` for what a retry may fix, else ``JudgeError``."""
        import httpx

        try:
            with self._client.stream("POST", self.url, json=body) as response:
                payload = b""
                for chunk in response.iter_bytes():
                    payload += chunk
                    if len(payload) > self.max_response_bytes:
                        raise JudgeError(
                            f"response from {self.url} exceeds {self.max_response_bytes} bytes"
                        )
        except (httpx.TransportError, httpx.StreamError) as err:  # refused, reset, timeout
            raise _Retryable(f"no reply from {self.url}: {type(err).__name__}: {err}") from err
        if response.status_code >= 400:
            detail = " ".join(payload[:300].decode(errors="replace").split())
            message = f"HTTP {response.status_code} from {self.url}: {detail}"
            if response.status_code in self.RETRY_STATUS:
                raise _Retryable(message)
            raise JudgeError(message)
        return payload

    def complete(self, messages: Messages) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        for attempt in range(self.retries + 1):
            try:
                payload = self._post_once(body)
                break
            except _Retryable as err:
                if attempt == self.retries:
                    raise JudgeError(f"{err} (gave up after {self.retries + 1} tries)") from None
            time.sleep(min(self.backoff * 2**attempt, self.max_backoff))
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"malformed reply from {self.url}: {payload[:200]!r}") from err
        if not isinstance(content, str):
            raise JudgeError(f"reply content from {self.url} is not text: {content!r}"[:300])
        return content

    def close(self) -> None:
        self._client.close()


class _Retryable(Exception):
    """A failure a later attempt may not repeat (connection, timeout, 429, 5xx)."""


class TransformersJudge:
    """A local causal LM; greedy decoding; the tokenizer's chat template when it has one."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 128) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def _input_ids(self, messages: Messages) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            return ids["input_ids"] if isinstance(ids, Mapping) else ids
        text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
        return tok(text, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def complete(self, messages: Messages) -> str:
        ids = self._input_ids(messages).to(self.model.device)
        pad = self.tokenizer.pad_token_id
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass(frozen=True)
class JudgeReport:
    verdicts: dict[int, Verdict]
    n_rated: int  # latents with a parsed rating
    n_good: int  # rated >= GOOD_RATING
    mean_rating: float


def judge_latents(
    backend: ChatBackend, contexts: Mapping[int, Sequence[str]], good: int = GOOD_RATING
) -> JudgeReport:
    """Rate each latent. A backend failure (after the backend's own retries) raises
    ``JudgeError``, as does a judge whose replies never contain a rating: a count of 0
    rated latents would read as a result."""
    verdicts: dict[int, Verdict] = {}
    for latent, snippets in contexts.items():
        verdicts[latent] = parse_verdict(backend.complete(build_messages(snippets)))
    ratings = [v.rating for v in verdicts.values() if v.rating is not None]
    if verdicts and not ratings:
        first = " ".join(next(iter(verdicts.values())).raw.split())[:120]
        raise JudgeError(
            f"the judge answered {len(verdicts)} latents but no reply held a rating "
            f"(first: {first!r})"
        )
    return JudgeReport(
        verdicts,
        len(ratings),
        sum(r >= good for r in ratings),
        float(np.mean(ratings)) if ratings else float("nan"),
    )


def sample_alive(alive: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` alive latent ids, sorted, reproducible from ``seed``."""
    ids = np.flatnonzero(alive)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=min(n, ids.size), replace=False))


@dataclass(frozen=True)
class PurityResult:
    score: np.ndarray  # [k]: max_c (share_c - base_c) / (1 - base_c); NaN with no contexts
    best_class: np.ndarray  # [k]
    base_rates: dict[str, float]
    mean: float


def purity_scores(
    top_rows: np.ndarray,
    row_class: np.ndarray,
    eligible: np.ndarray | None = None,
    ignore: tuple[str, ...] = ("",),
) -> PurityResult:
    """Purity of each latent's top rows (``-1`` = empty slot) by class, against base rates
    over ``eligible`` rows (default: all rows not in ``ignore``). Ignored classes (no label,
    special tokens) count in the shares but never win the max."""
    row_class = np.asarray(row_class, dtype=object)
    if eligible is None:
        eligible = ~np.isin(row_class, ignore)
    names, codes = np.unique(row_class.astype(str), return_inverse=True)
    base = np.bincount(codes[eligible], minlength=names.size) / max(1, int(eligible.sum()))
    valid = top_rows >= 0
    counts = np.zeros((top_rows.shape[0], names.size))
    latent = np.broadcast_to(np.arange(top_rows.shape[0])[:, None], top_rows.shape)
    np.add.at(counts, (latent[valid], codes[top_rows[valid]]), 1.0)
    n = valid.sum(1, keepdims=True)
    share = counts / np.maximum(n, 1)
    scored = ~np.isin(names, ignore) & (base < 1) & (base > 0)
    gain = np.where(scored, (share - base) / np.where(scored, 1 - base, 1), -np.inf)
    best = gain.argmax(1)
    score = np.where(n[:, 0] > 0, gain[np.arange(len(best)), best], np.nan)
    finite = score[np.isfinite(score)]
    return PurityResult(
        score,
        names[best].astype(object),
        {str(c): float(b) for c, b, s in zip(names, base, scored, strict=True) if s},
        float(finite.mean()) if finite.size else float("nan"),
    )
