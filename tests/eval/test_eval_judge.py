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


def test_judge_inside_a_run_counts_unparseable_and_never_writes_the_key(stub, tiny_model_dir, tmp_path, monkeypatch, caplog):
    import eval.run as run
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(data / "a.png")
    rows = [{"task_name": "slake", "question_type": "open", "prompt": f"Where is lesion {i}?", "answer": "left lung",
             "image_path": "a.png"} for i in range(3)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stub["script"] = [(200, "Correctness: 1"), (200, "no idea"), (200, "Correctness: 0")]
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--device", "cpu", "--tasks", "slake_open",
            "--max-new-tokens", "3", "--judge-url", stub["url"], "--judge-model", "m", "--judge-key-env", "MY_JUDGE_KEY"]
    assert run.main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["slake_open"]
    assert entry["judge_unparseable"] == 1 and entry["judge_failed"] == 0
    assert entry["metrics"]["judge_accuracy"] == {"n": 2, "score": 0.5, "stderr": 0.5}
    assert all(r["auth"] == f"Bearer {SECRET}" for r in stub["requests"])
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix != ".png")
    assert SECRET not in written and SECRET not in caplog.text
