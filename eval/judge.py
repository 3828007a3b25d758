"""An optional LLM judge for open answers, through any OpenAI-compatible chat endpoint.

Deterministic requests (temperature 0), retried with exponential backoff, and verdicts cached on disk
by a hash of the whole request, so reruns cost nothing and give the same scores.

The judge is an untrusted server. Whatever it sends, one row gets one outcome and the run goes on:

- a verdict (``Correctness: 0|1``, parsed by the protocol's rule);
- unparseable: a well-formed reply without a verdict, counted and reported (never cached);
- failed: anything else, counted, reported and never cached. That covers a reply that is not UTF-8,
  not JSON, a JSON list or string, ``choices`` missing or null, a ``content`` that is not text, a
  dropped connection, an HTTP error, a reply over ``max_reply_bytes`` (1 MB), and no complete reply
  within ``deadline_s`` (120 s for one row, retries included, however slowly the bytes arrive).
- Redirects: only a 307/308 to the same origin (scheme, host, port) is followed. Any other redirect
  fails the row, so a server cannot send the key or the question elsewhere, and no verdict comes
  from another host.

The API key goes in the Authorization header only: it is kept out of ``repr``, logs, errors and every
file written. A server can echo it (in a reply, an error body, a redirect's address), so everything the
server sends is redacted (the key becomes ``[redacted]``) before it is parsed, logged, cached or returned. The cache (JSONL: key, verdict, reply cut to 2000 characters) survives a cut last line,
and each process appends only to its own cache file (``cache_path``); others are read (``read_paths``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from medmax.errors import UserError
from medmax.jsonl import append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

PROMPT = (
    "Given a question about a medical image, a correct answer and an answer to be judged: if the answer to be judged "
    "matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0.\n\n"
    "Question: {question}\nCorrect answer: {answer}\nAnswer to be judged: {output}\n\n"
    "Output format:\nCorrectness: <0 or 1>"
)
PLACEHOLDERS = ("{question}", "{answer}", "{output}")
_VERDICT = re.compile(r"correctness\s*[:=]\s*\**\s*([01])\b", re.IGNORECASE)
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_MAX_REDIRECTS = 3
_CACHED_REPLY_CHARS = 2000
REDACTED = "[redacted]"


def parse_verdict(reply: str) -> int | None:
    """The toolkit's reading of a reply: ``Correctness: 0|1`` in any case, ``=`` or Markdown bold allowed."""
    match = _VERDICT.search(reply or "")
    return int(match.group(1)) if match else None


@dataclass
class JudgeConfig:
    base_url: str  # e.g. https://api.openai.com/v1 (the /chat/completions route is appended)
    model: str
    api_key: str | None = field(default=None, repr=False)
    cache_path: Path | None = None  # this process's cache file (appended to)
    read_paths: tuple[Path, ...] = ()  # other processes' cache files (read only)
    max_retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0  # connecting, and any one wait for bytes
    deadline_s: float = 120.0  # one row's verdict, every try included
    max_reply_bytes: int = 1_000_000
    prompt: str = PROMPT  # a template with {question}, {answer} and {output}
    parse: Callable[[str], int | None] = field(default=parse_verdict, repr=False)

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"--judge-url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise UserError("--judge-model is required with --judge-url")
        missing = [p for p in PLACEHOLDERS if p not in self.prompt]
        if missing:
            raise UserError(f"the judge prompt lacks the placeholders {missing}")


@dataclass(frozen=True)
class Verdict:
    correct: int | None  # None: unparseable reply or failed request
    reply: str | None
    error: str | None = None


class JudgeFailure(Exception):
    """One request's failure; ``retry`` says whether another try may succeed."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


def _origin(url) -> tuple:
    return url.scheme.lower(), (url.hostname or "").lower(), url.port or (443 if url.scheme == "https" else 80)


def _content(data: bytes) -> str:
    """choices[0].message.content of an OpenAI-style reply, or JudgeFailure saying what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JudgeFailure("reply is not UTF-8", retry=False) from None
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise JudgeFailure("reply is not JSON", retry=False) from None
    if not isinstance(payload, dict):
        raise JudgeFailure(f"reply is a JSON {type(payload).__name__}, not an object", retry=False)
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise JudgeFailure(f"reply's choices is {type(choices).__name__}, not a list of objects", retry=False)
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise JudgeFailure(f"reply's choices[0].message is {type(message).__name__}, not an object", retry=False)
    content = message.get("content")
    if not isinstance(content, str):
        raise JudgeFailure(f"reply's message content is {type(content).__name__}, not text", retry=False)
    return content


class _Exchange:
    """One HTTP request and its reply, within a deadline: a watchdog shuts the socket when it passes."""

    def __init__(self, config: JudgeConfig, deadline: float):
        self.config, self.deadline = config, deadline
        self.expired = False

    def expired_failure(self) -> JudgeFailure:
        return JudgeFailure(f"no complete reply within the {self.config.deadline_s:g} s deadline", retry=False)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.expired:
            raise self.expired_failure()
        return left

    def _abort(self, conn) -> None:
        self.expired = True
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def post(self, url, body: bytes, headers: dict) -> tuple[int, object, bytes]:
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname, url.port, timeout=min(self.config.timeout_s, self.remaining()))
        watchdog = threading.Timer(self.remaining(), self._abort, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            path = url.path + (f"?{url.query}" if url.query else "")
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            reply = self._read(response)
        except (OSError, http.client.HTTPException) as e:
            if self.expired:
                raise self.expired_failure() from None
            raise JudgeFailure(f"connection failed ({type(e).__name__})", retry=True) from None
        finally:
            watchdog.cancel()
            conn.close()
        if self.expired:
            raise self.expired_failure()
        if response.length:  # the server closed the connection before the length it announced
            raise JudgeFailure("connection closed in the middle of the reply", retry=True)
        return response.status, response.headers, reply

    def _read(self, response) -> bytes:
        cap = self.config.max_reply_bytes
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise JudgeFailure(f"reply of {int(declared)} bytes is larger than the {cap}-byte cap", retry=False)
        chunks, total = [], 0
        while chunk := response.read1(65536):
            total += len(chunk)
            if total > cap:
                raise JudgeFailure(f"reply is larger than the {cap}-byte cap", retry=False)
            chunks.append(chunk)
            self.remaining()
        return b"".join(chunks)


class Judge:
    def __init__(self, config: JudgeConfig):
        self.config = config
        self.cache: dict[str, tuple[int, str]] = {}
        self.unparseable = 0
        self.failed = 0
        for path in config.read_paths:
            self._load(path, repair=False)
        if config.cache_path:
            self._load(config.cache_path, repair=True)

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``[redacted]``."""
        key = self.config.api_key
        return text.replace(key, REDACTED) if key and text else text

    def _load(self, path: Path, repair: bool) -> None:
        for entry in read_jsonl(path, repair=repair):
            key, correct = entry.get("key"), entry.get("correct")
            if isinstance(key, str) and correct in (0, 1) and not isinstance(correct, bool):
                self.cache[key] = (correct, self.redact(str(entry.get("reply", ""))))  # a cache an older version wrote

    def _request_body(self, question: str, answer: str, output: str) -> dict:
        content = self.config.prompt.replace("{question}", str(question)).replace("{answer}", str(answer))
        content = content.replace("{output}", str(output))
        return {"model": self.config.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}

    def _headers(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _post(self, body: dict, deadline: float) -> str:
        """The reply's text, or JudgeFailure; both with the key redacted, whatever the server echoed."""
        try:
            return self.redact(self._exchange(body, deadline))
        except JudgeFailure as e:
            raise JudgeFailure(self.redact(str(e)), e.retry) from None

    def _exchange(self, body: dict, deadline: float) -> str:
        """The reply's text, following only same-origin 307/308 redirects; JudgeFailure otherwise."""
        data = json.dumps(body).encode()
        url = urlsplit(self.config.base_url.rstrip("/") + "/chat/completions")
        for _ in range(_MAX_REDIRECTS + 1):
            status, headers, reply = _Exchange(self.config, deadline).post(url, data, self._headers(data))
            if status in (301, 302, 303, 307, 308):
                url = self._redirect(url, status, headers.get("Location"))
                continue
            if status != 200:
                raise JudgeFailure(f"HTTP {status}", retry=status in _RETRY_STATUS)
            return _content(reply)
        raise JudgeFailure(f"more than {_MAX_REDIRECTS} redirects", retry=False)

    @staticmethod
    def _redirect(url, status: int, location: str | None):
        if not location:
            raise JudgeFailure(f"HTTP {status} redirect without a Location", retry=False)
        target = urlsplit(urljoin(url.geturl(), location))
        if _origin(target) != _origin(url):
            raise JudgeFailure(f"HTTP {status} redirect to another origin ({target.scheme}://{target.netloc}) not "
                               f"followed: the key and the question are not sent there", retry=False)
        if status not in (307, 308):
            raise JudgeFailure(f"HTTP {status} redirect would turn the POST into a GET; not followed", retry=False)
        return target

    def _post_with_retries(self, body: dict) -> str:
        deadline = time.monotonic() + self.config.deadline_s
        delay = self.config.backoff_s
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post(body, deadline)
            except JudgeFailure as e:
                if not e.retry:
                    raise
                if attempt == self.config.max_retries or time.monotonic() + delay >= deadline:
                    raise JudgeFailure(f"judge request failed after {attempt + 1} tries ({e})", retry=False) from None
                logger.warning("judge request failed (%s); retry %d in %.1fs", e, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _remember(self, key: str, correct: int, reply: str) -> None:
        self.cache[key] = (correct, reply)
        if self.config.cache_path:
            self.config.cache_path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.config.cache_path, [{"key": key, "correct": correct, "reply": reply[:_CACHED_REPLY_CHARS]}])

    def judge(self, question: str, answer: str, output: str) -> Verdict:
        body = self._request_body(question, answer, output)
        rule = getattr(self.config.parse, "__qualname__", "parse")  # the same reply reads differently per protocol
        key = hashlib.sha256(json.dumps([body, rule], sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            correct, reply = self.cache[key]
            return Verdict(correct, reply)
        try:
            reply = self._post_with_retries(body)
        except JudgeFailure as e:
            self.failed += 1
            logger.warning("judge failed for one row: %s", e)
            return Verdict(None, None, str(e))
        verdict = self.config.parse(reply)
        if verdict is None:
            self.unparseable += 1
            logger.warning("judge reply has no verdict: %.80r", reply)
            return Verdict(None, reply[:_CACHED_REPLY_CHARS])
        self._remember(key, verdict, reply)
        return Verdict(verdict, reply[:_CACHED_REPLY_CHARS])
