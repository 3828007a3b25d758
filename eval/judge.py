"""An optional LLM judge for open answers, through any OpenAI-compatible chat endpoint.

Deterministic (temperature 0), retried with exponential backoff, every reply cached on disk by a hash
of the request (so reruns cost nothing and give the same scores). A reply without a readable
``Correctness: 0|1`` is counted as unparseable and reported, never dropped. The API key is sent in the
Authorization header only: it is kept out of ``repr``, logs, errors and every file written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPT = (
    "Given a question about a medical image, a correct answer and an answer to be judged: if the answer to be judged "
    "matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0.\n\n"
    "Question: {question}\nCorrect answer: {answer}\nAnswer to be judged: {output}\n\n"
    "Output format:\nCorrectness: <0 or 1>"
)
_VERDICT = re.compile(r"correctness\s*[:=]\s*\**\s*([01])\b", re.IGNORECASE)


@dataclass
class JudgeConfig:
    base_url: str  # e.g. https://api.openai.com/v1 (the /chat/completions route is appended)
    model: str
    api_key: str | None = field(default=None, repr=False)
    cache_path: Path | None = None
    max_retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("--judge-model is required with --judge-url")


@dataclass(frozen=True)
class Verdict:
    correct: int | None  # None: unparseable reply or failed request
    reply: str | None
    error: str | None = None


def parse_verdict(reply: str) -> int | None:
    match = _VERDICT.search(reply or "")
    return int(match.group(1)) if match else None


class Judge:
    def __init__(self, config: JudgeConfig):
        self.config = config
        self.cache: dict[str, str] = {}
        self.unparseable = 0
        self.failed = 0
        if config.cache_path and config.cache_path.is_file():
            for line in config.cache_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]

    def _request_body(self, question: str, answer: str, output: str) -> dict:
        content = PROMPT.format(question=question, answer=answer, output=output)
        return {"model": self.config.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            payload = json.loads(response.read().decode())
        return payload["choices"][0]["message"]["content"]

    def _post_with_retries(self, body: dict) -> str:
        delay = self.config.backoff_s
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post(body)
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
                reason = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else type(e).__name__
                if attempt == self.config.max_retries:
                    raise RuntimeError(f"judge request failed after {attempt + 1} tries ({reason})") from None
                logger.warning("judge request failed (%s); retry %d in %.1fs", reason, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _remember(self, key: str, reply: str) -> None:
        self.cache[key] = reply
        if self.config.cache_path:
            self.config.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")

    def judge(self, question: str, answer: str, output: str) -> Verdict:
        body = self._request_body(question, answer, output)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        reply = self.cache.get(key)
        if reply is None:
            try:
                reply = self._post_with_retries(body)
            except RuntimeError as e:
                self.failed += 1
                return Verdict(None, None, str(e))
            self._remember(key, reply)
        verdict = parse_verdict(reply)
        if verdict is None:
            self.unparseable += 1
            logger.warning("judge reply has no 'Correctness: 0|1': %.80r", reply)
        return Verdict(verdict, reply)
