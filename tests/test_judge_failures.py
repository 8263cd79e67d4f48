"""A judge that fails loudly: retries with backoff, then one line and exit 1; or, when asked
(--judge-fallback), the purity proxy, labelled as such. Never "0/0" with exit 0."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluation.judge import JudgeError, OpenAIJudge, build_messages, judge_latents
from tests.helpers import QuietHTTPServer
from tests.trained_runs import TrainedRuns, train_tiny_runs

GOOD = {"choices": [{"message": {"role": "assistant", "content": '{"rating": 4}'}}]}


def mocked(responses: list) -> tuple[OpenAIJudge, list]:
    """A judge on an httpx MockTransport that plays ``responses`` (status, body) in order."""
    calls: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        status, body = responses[min(len(calls), len(responses)) - 1]
        if isinstance(status, Exception):
            raise status
        return httpx.Response(status, content=body)

    judge = OpenAIJudge(
        "http://judge.test/v1",
        "m",
        retries=3,
        backoff=0.001,
        transport=httpx.MockTransport(handler),
    )
    return judge, calls


def test_500s_then_success_is_retried() -> None:
    judge, calls = mocked([(500, b"oops"), (503, b"busy"), (200, json.dumps(GOOD).encode())])
    assert judge.complete(build_messages(["x"])) == '{"rating": 4}'
    assert len(calls) == 3


def test_persistent_500_gives_up_with_the_reason() -> None:
    judge, calls = mocked([(500, b'{"error": "down"}')])
    with pytest.raises(JudgeError, match=r"HTTP 500 .*down.* \(gave up after 4 tries\)"):
        judge.complete(build_messages(["x"]))
    assert len(calls) == 4


def test_malformed_reply_and_client_errors_are_not_retried() -> None:
    judge, calls = mocked([(200, b"<html>not json</html>")])
    with pytest.raises(JudgeError, match="malformed reply"):
        judge.complete(build_messages(["x"]))
    judge, calls = mocked([(401, b"bad key")])
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_latents(judge, {0: ["x"]})
    assert len(calls) == 1


def test_replies_without_any_rating_are_an_error() -> None:
    text = {"choices": [{"message": {"content": "I am not sure what these have in common."}}]}
    judge, _ = mocked([(200, json.dumps(text).encode())])
    with pytest.raises(JudgeError, match="no reply held a rating"):
        judge_latents(judge, {0: ["x"], 1: ["y"]})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_backs_off_then_fails() -> None:
    judge = OpenAIJudge(f"http://127.0.0.1:{closed_port()}/v1", "m", retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"no reply from .*gave up after 3 tries"):
        judge.complete(build_messages(["x"]))
    assert 0.15 <= time.monotonic() - start < 5  # backoff 0.05 + 0.1 s, then stop


class _Flaky(BaseHTTPRequestHandler):
    """Always 503 (bounded: the server thread stops with the test)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"busy")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def failing_server(monkeypatch) -> Iterator[str]:
    server = QuietHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv("FMX_JUDGE_BASE_URL", url)
    monkeypatch.setenv("FMX_JUDGE_MODEL", "m")
    monkeypatch.setattr(OpenAIJudge.__init__, "__defaults__", _fast_defaults())
    yield url
    server.shutdown()
    server.server_close()


def _fast_defaults() -> tuple:
    """OpenAIJudge's defaults with retries=1 and a 10 ms backoff (keeps the CLI test fast)."""
    defaults = list(OpenAIJudge.__init__.__defaults__)
    names = OpenAIJudge.__init__.__code__.co_varnames[3 : 3 + len(defaults)]
    values = dict(zip(names, defaults, strict=True)) | {"retries": 1, "backoff": 0.01}
    return tuple(values[n] for n in names)


@pytest.fixture(scope="module")
def trained_runs(tiny_cache_root, tmp_path_factory) -> TrainedRuns:
    return train_tiny_runs(tiny_cache_root, tmp_path_factory.mktemp("runs"))


def test_evaluate_stops_in_one_line_or_falls_back_when_asked(
    trained_runs: TrainedRuns, failing_server: str, tmp_path
) -> None:
    args = ["-q", "evaluate", str(trained_runs.fmx), "--judge", "openai", "--no-splice"]
    args += ["--max-tokens", "512", "--latents-sampled", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: judge: HTTP 503 from ")
    assert result.output.count("\n") == 1 and "gave up after 2 tries" in result.output

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--judge-fallback"])
    assert result.exit_code == 0, result.output
    assert (
        "note: tiny-fmx: 'coherent' is the purity (fallback: openai judge failed" in result.output
    )
    (row,) = json.loads((tmp_path / "b" / "results.json").read_text())["variants"]
    assert row["judge"].startswith("purity (fallback: openai judge failed: HTTP 503")
    assert row["judge_rated"] > 0  # the proxy rated them: not 0/0
