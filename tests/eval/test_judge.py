"""The LLM judge against a loopback stub of an OpenAI-compatible endpoint."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.judge import Judge, JudgeConfig, parse_verdict

SECRET = "sk-test-secret-123"


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


def test_judge_inside_a_run_counts_unparseable_and_never_writes_the_key(stub, tiny_model_dir, tmp_path, monkeypatch, caplog,
                                                                      open_questions):
    import eval.run as run

    data = open_questions(3)
    # replies that echo the key (issue 23): it must reach no file and no log line
    stub["script"] = [(200, f"Correctness: 1, said to {SECRET}"), (200, f"no idea, {SECRET}"), (200, "Correctness: 0")]
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


# ------------------------------------------------------------------------ the judge is an untrusted server (issue 12)
class _Hostile:
    """A real HTTP server on 127.0.0.1 whose replies come from a script of raw behaviours."""

    def __init__(self):
        self.script, self.requests, self.stop = [], [], threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                hostile.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                behaviour = hostile.script.pop(0) if hostile.script else _json_reply("Correctness: 1")
                try:
                    behaviour(self, hostile)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + "/v1"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _raw(status: int, body: bytes, headers=()):
    def behave(handler, _):
        handler.send_response(status)
        for k, v in headers:
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return behave


def _json_reply(content):
    return _raw(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())


def _drop(handler, _):
    """Read the request, then close the connection without a reply."""
    handler.close_connection = True
    handler.connection.shutdown(2)


def _drip(handler, hostile):
    """Headers, then the body one byte at a time, one byte every 0.4 s (100 bytes would take 40 s)."""
    body = json.dumps({"choices": [{"message": {"content": "Correctness: 1" + " " * 60}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        if hostile.stop.wait(0.4):
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()


@pytest.fixture
def hostile():
    server = _Hostile()
    yield server
    server.close()


def _hjudge(server, tmp_path, **kw):
    options = dict(backoff_s=0.01, timeout_s=5, max_retries=1)
    options.update(kw)
    return Judge(JudgeConfig(server.url, "judge-model", api_key=SECRET, cache_path=tmp_path / "cache.jsonl", **options))


@pytest.mark.parametrize("behaviour, reason", [
    (_raw(200, b'\xff\xfe{"choices": []}'), "not UTF-8"),
    (_raw(200, b"[1, 2, 3]"), "JSON list"),
    (_raw(200, b'"Correctness: 1"'), "JSON str"),
    (_raw(200, b'{"choices": null}'), "choices"),
    (_json_reply(5), "int"),
    (_json_reply(None), "NoneType"),
    (_raw(200, b'{"choices": [{"message": "Correctness: 1"}]}'), "message"),
    (_raw(200, b"<html>busy</html>"), "not JSON"),
], ids=["not-utf8", "json-list", "json-string", "choices-null", "numeric-content", "null-content", "message-string", "html"])
def test_a_malformed_reply_is_a_counted_uncached_failure(hostile, tmp_path, behaviour, reason):
    hostile.script = [behaviour]
    judge = _hjudge(hostile, tmp_path)
    verdict = judge.judge("q", "a", "b")
    assert verdict.correct is None and reason in verdict.error and judge.failed == 1
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""
    # a healthy judge afterwards: the failure was not cached, so the row gets its verdict
    assert _hjudge(hostile, tmp_path).judge("q", "a", "b").correct == 1


def test_a_dropped_connection_is_retried_then_counted(hostile, tmp_path):
    hostile.script = [_drop, _drop]
    judge = _hjudge(hostile, tmp_path, max_retries=1)
    verdict = judge.judge("q", "a", "b")
    assert verdict.correct is None and "failed after 2 tries" in verdict.error and judge.failed == 1
    hostile.script = [_drop]
    assert judge.judge("q", "a", "b").correct == 1  # a retry after one drop succeeds
    assert len(hostile.requests) == 4


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(hostile, tmp_path):
    other = _Hostile()
    try:
        for status in (302, 307, 308):
            hostile.script = [_raw(status, b"", [("Location", other.url + "/chat/completions")])]
            judge = _hjudge(hostile, tmp_path, max_retries=3)
            verdict = judge.judge(f"q{status}", "a", "b")
            assert verdict.correct is None and "another origin" in verdict.error
        assert other.requests == []  # never contacted: neither the key nor the question went there
        assert all(r["auth"] == f"Bearer {SECRET}" for r in hostile.requests) and len(hostile.requests) == 3
        assert SECRET not in "".join(str(v.error) for v in [verdict])
    finally:
        other.close()


def test_the_key_echoed_by_the_judge_is_redacted_before_anything_is_written(hostile, tmp_path, caplog):
    """Issue 23: a reply echoing the API key was cached to judge_cache.*.jsonl; the README says it is never written."""
    hostile.script = [_json_reply(f"Correctness: 1 (Bearer {SECRET})"), _json_reply(f"who is {SECRET}?" * 40),
                      _raw(302, b"", [("Location", f"http://{SECRET}@elsewhere.example/v1")]),
                      _raw(503, SECRET.encode()), _raw(200, f'{{"choices": "{SECRET}"}}'.encode())]
    judge = _hjudge(hostile, tmp_path, max_retries=0)
    verdicts = [judge.judge(f"q{i}", "a", "b") for i in range(5)]
    assert verdicts[0].correct == 1 and "[redacted]" in verdicts[0].reply
    assert verdicts[1].correct is None and verdicts[2].correct is None and "another origin" in verdicts[2].error
    cache = (tmp_path / "cache.jsonl").read_text()
    assert "[redacted]" in cache and SECRET not in cache
    said = [str(v.reply) + str(v.error) for v in verdicts]
    assert all(SECRET not in text for text in said) and SECRET not in caplog.text
    assert "judge reply has no verdict" in caplog.text  # the unparseable reply was logged, redacted


def test_a_same_origin_307_is_followed(hostile, tmp_path):
    hostile.script = [_raw(307, b"", [("Location", "/v2/chat/completions")])]
    assert _hjudge(hostile, tmp_path).judge("q", "a", "b").correct == 1
    assert [r["path"] for r in hostile.requests] == ["/v1/chat/completions", "/v2/chat/completions"]


def test_a_dripped_reply_stops_at_the_deadline(hostile, tmp_path):
    hostile.script = [_drip, _drip, _drip]
    judge = _hjudge(hostile, tmp_path, deadline_s=1.5, timeout_s=5, max_retries=2)
    start = time.monotonic()
    verdict = judge.judge("q", "a", "b")
    elapsed = time.monotonic() - start
    assert verdict.correct is None and "deadline" in verdict.error and elapsed < 3.0, elapsed


def test_a_huge_reply_is_capped_and_not_cached(hostile, tmp_path):
    big = json.dumps({"choices": [{"message": {"content": "Correctness: 1" + "x" * 300_000}}]}).encode()
    hostile.script = [_raw(200, big)]
    judge = _hjudge(hostile, tmp_path, max_reply_bytes=64_000)
    verdict = judge.judge("q", "a", "b")
    assert verdict.correct is None and "larger than" in verdict.error
    assert not (tmp_path / "cache.jsonl").exists()


def test_the_cache_holds_parsed_verdicts_only_and_survives_a_cut_last_line(hostile, tmp_path, caplog):
    hostile.script = [_json_reply("Correctness: 0"), _json_reply("no idea")]
    judge = _hjudge(hostile, tmp_path)
    assert judge.judge("q1", "a", "b").correct == 0
    assert judge.judge("q2", "a", "b").correct is None and judge.unparseable == 1
    cache = tmp_path / "cache.jsonl"
    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["correct"] == 0  # the unparseable reply is not cached
    with open(cache, "a") as f:
        f.write('{"key": "abc", "corr')  # a kill mid-write
    again = _hjudge(hostile, tmp_path)
    assert "unfinished last line" in caplog.text
    assert again.judge("q1", "a", "b").correct == 0 and len(hostile.requests) == 2  # from the cache
    assert again.judge("q3", "a", "b").correct == 1  # appended after the repaired cut
    assert [json.loads(line)["correct"] for line in cache.read_text().splitlines()] == [0, 1]


def test_a_row_whose_judge_failed_is_judged_again_on_rerun(stub, tiny_model_dir, tmp_path, open_questions):
    """A failure is not cached, in the judge's cache or in the predictions: the rerun asks again."""
    import eval.run as run

    data = open_questions(2)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--device", "cpu", "--tasks", "slake_open",
            "--max-new-tokens", "3", "--judge-url", stub["url"], "--judge-model", "m"]
    stub["script"] = [(200, "Correctness: 1"), (400, "bad request")]
    assert run.main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["slake_open"]
    assert entry["judge_failed"] == 1 and entry["metrics"]["judge_accuracy"]["n"] == 1
    stub["script"] = [(200, "Correctness: 0")]
    assert run.main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["slake_open"]
    assert entry["judge_failed"] == 0 and entry["metrics"]["judge_accuracy"] == {"n": 2, "score": 0.5, "stderr": 0.5}
    assert len(stub["requests"]) == 3  # the first verdict came from the cache
    merged = (out / "predictions" / "slake_open.jsonl").read_text().splitlines()
    assert len(merged) == 2
