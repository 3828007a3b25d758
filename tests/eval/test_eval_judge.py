"""The LLM judge against a loopback stub of an OpenAI-compatible endpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.judge import Judge, JudgeConfig, parse_verdict

SECRET = "sk-test-secret-123"


@pytest.fixture
def stub():
    """A loopback server answering from a script: each entry is (status, reply text)."""
    state = {"script": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, text = state["script"].pop(0) if state["script"] else (200, "Correctness: 1")
            payload = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def _judge(stub, tmp_path, **kw):
    config = JudgeConfig(stub["url"], "judge-model", api_key=SECRET, cache_path=tmp_path / "cache.jsonl",
                         backoff_s=0.01, timeout_s=5, **kw)
    return Judge(config)


def test_verdicts_are_deterministic_requests_and_cached(stub, tmp_path, caplog):
    stub["script"] = [(200, "Correctness: 1"), (200, "Correctness: 0")]
    judge = _judge(stub, tmp_path)
    assert judge.judge("Where?", "left lung", "the left lung").correct == 1
    assert judge.judge("Where?", "left lung", "right kidney").correct == 0
    req = stub["requests"][0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    assert req["body"]["temperature"] == 0 and req["body"]["model"] == "judge-model"
    # same question again, in this judge and in a fresh one reading the cache file: no new request
    assert judge.judge("Where?", "left lung", "the left lung").correct == 1
    assert _judge(stub, tmp_path).judge("Where?", "left lung", "right kidney").correct == 0
    assert len(stub["requests"]) == 2
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()
    assert SECRET not in repr(judge.config) and SECRET not in caplog.text


def test_unparseable_reply_is_counted(stub, tmp_path):
    stub["script"] = [(200, "I think it is probably fine.")]
    judge = _judge(stub, tmp_path)
    verdict = judge.judge("q", "a", "b")
    assert verdict.correct is None and verdict.error is None and judge.unparseable == 1
    assert parse_verdict("**Correctness:** 1") == 1 and parse_verdict("correctness = 0") == 0


def test_retries_with_backoff_then_gives_up(stub, tmp_path, caplog):
    stub["script"] = [(500, "busy"), (429, "slow down"), (200, "Correctness: 1")]
    judge = _judge(stub, tmp_path, max_retries=3)
    assert judge.judge("q", "a", "b").correct == 1 and len(stub["requests"]) == 3
    stub["script"] = [(500, "x")] * 4  # max_retries 3: four tries in all
    verdict = judge.judge("q2", "a", "b")
    assert verdict.correct is None and "failed after 4 tries (HTTP 500)" in verdict.error
    assert judge.failed == 1 and SECRET not in caplog.text


def test_config_validation():
    with pytest.raises(ValueError, match="judge-url"):
        JudgeConfig("ftp://x", "m")
