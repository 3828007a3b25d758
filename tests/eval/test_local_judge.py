"""A locally served open judge (issue 28): vLLM's and llama.cpp's OpenAI-compatible servers, no key needed.

The stub answers with each server's reply shape as they send it: vLLM's ChatCompletionResponse (choices with
index, message {role, reasoning_content, content, tool_calls}, logprobs, finish_reason, stop_reason; usage;
prompt_logprobs) and llama.cpp's llama-server (choices with finish_reason, index, message {role, content,
reasoning_content with --reasoning-format}; created, model, system_fingerprint, object, usage, id, timings)."""

import json

import eval.run as run
from eval.judge import Judge, JudgeConfig


def _vllm(content):
    return {"id": "chatcmpl-8d1f", "object": "chat.completion", "created": 1733563200, "model": "Qwen/Qwen2.5-7B-Instruct",
            "choices": [{"index": 0, "message": {"role": "assistant", "reasoning_content": None, "content": content,
                                                 "tool_calls": []},
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
            "usage": {"prompt_tokens": 80, "total_tokens": 85, "completion_tokens": 5, "prompt_tokens_details": None},
            "prompt_logprobs": None}


def _llama_cpp(content, reasoning=None):
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"choices": [{"finish_reason": "stop", "index": 0, "message": message}], "created": 1733563200,
            "model": "gpt-3.5-turbo", "system_fingerprint": "b4273-2b4f6b4a", "object": "chat.completion",
            "usage": {"completion_tokens": 5, "prompt_tokens": 80, "total_tokens": 85},
            "id": "chatcmpl-uZGBuFoS2ERodT4KilStxDwhySLQBTN9",
            "timings": {"prompt_n": 80, "prompt_ms": 32.3, "prompt_per_token_ms": 0.4, "prompt_per_second": 2475.2,
                        "predicted_n": 5, "predicted_ms": 46.9, "predicted_per_token_ms": 9.4, "predicted_per_second": 106.6}}


def _judge(stub, tmp_path):
    return Judge(JudgeConfig(stub["url"], "local-model", api_key=None, cache_path=tmp_path / "c.jsonl", backoff_s=0.01,
                             timeout_s=5, max_retries=1))


def test_vllm_and_llama_cpp_replies_give_verdicts_with_no_key_sent(stub, tmp_path):
    stub["script"] = [(200, _vllm("Correctness: 1")), (200, _llama_cpp("Correctness: 0")),
                      (200, _llama_cpp("Correctness: 1", reasoning="The answer could be Correctness: 0 or 1..."))]
    judge = _judge(stub, tmp_path)
    assert [judge.judge(f"q{i}", "a", "b").correct for i in range(3)] == [1, 0, 1]  # the thinking is never read
    assert [r["auth"] for r in stub["requests"]] == [None, None, None]


def test_a_server_that_wants_a_key_says_so_when_none_was_given(stub, tmp_path):
    stub["script"] = [(401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}})]
    verdict = _judge(stub, tmp_path).judge("q", "a", "b")
    assert verdict.correct is None and "wants a key and none was sent" in verdict.error


def test_eval_run_with_a_local_judge_and_no_key_in_the_environment(stub, tiny_model_dir, tmp_path, open_questions,
                                                                   monkeypatch):
    stub["script"] = [(200, _llama_cpp("Correctness: 1")), (200, _vllm("Correctness: 0"))]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(open_questions(2)), "--output", str(out),
                     "--tasks", "slake_open", "--max-new-tokens", "2", "--device", "cpu",
                     "--judge-url", stub["url"], "--judge-model", "local-model"]) == 0
    entry = json.loads((out / "results.json").read_text())["slake_open"]
    assert entry["metrics"]["judge_accuracy"]["n"] == 2 and entry["judge_failed"] == 0
    assert [r["auth"] for r in stub["requests"]] == [None, None]
