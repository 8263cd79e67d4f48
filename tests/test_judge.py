"""The judge: reply parsing, the OpenAI backend against a real local HTTP server, a local
transformers backend, top contexts, and the purity proxy."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.evaluation.judge import (
    JudgeError,
    OpenAIJudge,
    TransformersJudge,
    build_messages,
    judge_latents,
    parse_verdict,
    purity_scores,
    sample_alive,
)
from pipeline.evaluation.latent_details import Context
from pipeline.evaluation.top_contexts import (
    TokenView,
    TopContexts,
    format_context,
    window_rows,
)
from tests.helpers import QuietHTTPServer
from tests.test_reconstruction_metrics import LinearReluCoder


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Rating: 4\nExplanation: US state names", 4),
        ('{"rating": 5, "explanation": "years"}', 5),
        ('Sure! ```json\n{"score": "2", "reason": "mixed"}\n```', 2),
        ("I'd give it 4/5 - mostly city names.", 4),
        ("3 out of 5", 3),
        ("**Rating:** 1", 1),
        ("Score (1-5): 4", 4),
        ("5", 5),
        ("Rating: 7", None),
        ("Rating: 4.5", None),
        ('{"rating": 9}', None),
        ('{"rating": null}', None),
        ('{"rating": true}', None),
        ("I cannot tell.", None),
        ("", None),
        ("{{{{ not json", None),
        ("[" * 100_000 + "{" * 1000, None),
    ],
)
def test_parse_verdict(reply: str, rating: int | None) -> None:
    assert parse_verdict(reply).rating == rating


def test_parse_verdict_explanations_and_non_text() -> None:
    assert parse_verdict("Rating: 4\nExplanation: US state names").explanation == "US state names"
    assert parse_verdict('{"rating": 5, "explanation": "years\\nmore"}').explanation == "years"
    verdict = parse_verdict(None)
    assert verdict.rating is None and verdict.error


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, dict(self.headers), request))
        model = request["model"]
        reply = {"choices": [{"message": {"role": "assistant", "content": "Rating: 4"}}]}
        if model == "flaky" and len(self.server.seen) == 1:
            return self._send(503, b'{"error": {"message": "busy"}}')
        if model == "json":
            content = '{"rating": 5, "explanation": "years"}'
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        if model == "error":
            return self._send(400, b'{"error": {"message": "unknown model"}}')
        if model == "malformed":
            return self._send(200, b"{not json at all")
        if model == "empty":
            return self._send(200, b'{"choices": []}')
        if model == "huge":
            return self._send(200, b" " * 5000)
        if model == "slow":
            time.sleep(1.0)
        return self._send(200, json.dumps(reply).encode())


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = QuietHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _judge(server: ThreadingHTTPServer, model: str, **kwargs) -> OpenAIJudge:
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    options = {"timeout": 5.0, "backoff": 0.01, "retries": 1, **kwargs}
    return OpenAIJudge(base, model, api_key="sk-test", **options)


def test_openai_backend_round_trip(server: ThreadingHTTPServer) -> None:
    report = judge_latents(_judge(server, "json"), {7: ["a <<1998>> b"], 9: ["c <<d>>"]})
    assert report.n_rated == 2 and report.n_good == 2 and report.mean_rating == 5.0
    assert report.verdicts[7].explanation == "years"
    path, headers, request = server.seen[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert request["model"] == "json" and request["temperature"] == 0.0
    assert "<<1998>>" in request["messages"][-1]["content"]


def test_openai_backend_retries_a_503(server: ThreadingHTTPServer) -> None:
    assert _judge(server, "flaky").complete(build_messages(["x"])) == "Rating: 4"
    assert len(server.seen) == 2


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("error", "HTTP 400"),
        ("malformed", "malformed"),
        ("empty", "malformed"),
        ("huge", "exceeds"),
    ],
)
def test_openai_backend_errors(server: ThreadingHTTPServer, model: str, message: str) -> None:
    judge = _judge(server, model, max_response_bytes=1000)
    with pytest.raises(JudgeError, match=message):
        judge.complete(build_messages(["x"]))
    with pytest.raises(JudgeError, match=message):  # raised: never a silent 0/0
        judge_latents(judge, {1: ["x"]})


def test_openai_backend_timeout(server: ThreadingHTTPServer) -> None:
    start = time.monotonic()
    with pytest.raises(JudgeError, match="no reply"):
        _judge(server, "slow", timeout=0.2, retries=0).complete(build_messages(["x"]))
    assert time.monotonic() - start < 0.9


def test_openai_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMX_JUDGE_MODEL", raising=False)
    monkeypatch.setenv("FMX_JUDGE_BASE_URL", "http://127.0.0.1:1/v1/")
    with pytest.raises(JudgeError, match="FMX_JUDGE_MODEL"):
        OpenAIJudge.from_env()
    monkeypatch.setenv("FMX_JUDGE_MODEL", "m")
    judge = OpenAIJudge.from_env(timeout=1.0)
    assert judge.url == "http://127.0.0.1:1/v1/chat/completions" and judge.model == "m"


class _ScriptedLM:
    """A stand-in causal LM that always continues with a fixed reply."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, reply: str) -> None:
        self.reply = torch.tensor([tokenizer(reply)["input_ids"]])

    def generate(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([ids, self.reply], dim=1)


def test_transformers_backend() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.harvest.tiny_model import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    scripted = TransformersJudge(
        _ScriptedLM(tokenizer, '{"rating": 4, "explanation": "x"}'), tokenizer
    )
    assert judge_latents(scripted, {0: ["a <<b>>"]}).n_good == 1
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=256, eos_token_id=257,
    )  # fmt: skip
    judge = TransformersJudge(LlamaForCausalLM(config).eval(), tokenizer, max_new_tokens=4)
    assert isinstance(judge.complete(build_messages(["a <<b>>"])), str)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    try:  # random weights: any reply; a reply without a rating is a loud JudgeError
        assert set(judge_latents(judge, {3: ["a <<b>>"]}).verdicts) == {3}
    except JudgeError as err:
        assert "no reply held a rating" in str(err)


def test_sample_alive() -> None:
    alive = np.array([True, False, True, True, False, True])
    picked = sample_alive(alive, 3, seed=1)
    assert len(picked) == 3 and alive[picked].all()
    assert np.array_equal(picked, sample_alive(alive, 3, seed=1))
    assert sample_alive(alive, 10).tolist() == [0, 2, 3, 5]


def test_purity_pure_and_mixed() -> None:
    row_class = np.array(["sport", "music", "film", "food"] * 250 + [""] * 10, dtype=object)
    pure = np.flatnonzero(row_class == "music")[:20]
    mixed = np.arange(20)  # five of each class: the base rates exactly
    top = np.stack([pure, mixed, np.full(20, -1)])
    out = purity_scores(top, row_class)
    assert out.score[0] == pytest.approx(1.0) and out.best_class[0] == "music"
    assert out.score[1] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(out.score[2])
    assert out.base_rates == pytest.approx(
        {"film": 0.25, "food": 0.25, "music": 0.25, "sport": 0.25}
    )
    assert out.mean == pytest.approx(0.5)


def test_top_contexts_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(500, 12, generator=g))
    f[:, 11] = 0  # a dead latent
    acc = TopContexts(12, n_top=5)
    for start in range(0, 500, 64):
        acc.update(f[start : start + 64], np.arange(start, min(start + 64, 500)))
    values, rows = acc.result()
    expected = f[:, :11].topk(5, dim=0)
    assert np.allclose(values[:11], expected.values.T.numpy())
    assert np.array_equal(rows[:11], expected.indices.T.numpy())
    assert (rows[11] == -1).all()
    subset = TopContexts(12, n_top=3, latents=torch.tensor([4]))
    subset.update(f, np.arange(500) + 1000)
    assert np.array_equal(subset.result()[1][0], expected.indices[:3, 4].numpy() + 1000)


def _view() -> TokenView:
    texts = ["<bos>", "The", " city", " of", " Paris", "<eos>", "In", " 1998", "<bos>", ",", " we"]
    doc = [-1, 0, 0, 0, 0, -1, 1, 1, -1, 1, 1]
    position = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]  # a context window of 8
    table = pa.table(
        {
            "token_text": texts,
            "doc_id": pa.array(doc, pa.int32()),
            "position": pa.array(position, pa.int32()),
            "is_special": [t.startswith("<") for t in texts],
        }
    )
    return TokenView.from_table(table)


def test_windows_stop_at_documents_and_context_windows() -> None:
    view = _view()
    assert window_rows(view, 4, before=10, after=10).tolist() == [1, 2, 3, 4]
    assert window_rows(view, 7, before=10, after=10).tolist() == [6, 7]
    assert window_rows(view, 9, before=10, after=10).tolist() == [9, 10]
    assert format_context(["The", " big", " city"], np.array([False, True, True])) == (
        "The <<big>> <<city>>"
    )
    assert marked(view, 4, np.zeros(len(view.text)), before=2) == "city of <<Paris>>"


def marked(view: TokenView, row: int, acts: np.ndarray, before: int = 12) -> str:
    """The report's marking (``latent_details.Context``) of the window around ``row``."""
    rows = window_rows(view, row, before, 4)
    context = Context(rows, [view.text[r] for r in rows], acts[rows], row, 1.0)
    return context.marked()


def test_contexts_marked_from_coder_activations() -> None:
    view = _view()
    x = torch.zeros(len(view.text), 1, 2)
    x[[2, 4], 0, 0] = 1.0  # latent 0 fires on " city" and " Paris"
    coder = LinearReluCoder(torch.eye(2).view(1, 2, 2), torch.eye(2).view(2, 1, 2))
    with torch.no_grad():
        acts = coder.encode(x)[:, 0].numpy()
    assert marked(view, 4, acts) == "The <<city>> of <<Paris>>"
