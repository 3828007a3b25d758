"""Fixtures shared by the evaluation tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image


@pytest.fixture
def stub():
    """An OpenAI-compatible judge on 127.0.0.1 answering from a script: each entry is (status, reply text), or
    (status, a whole reply object sent as it is); every request is recorded as {"path", "auth", "body"}."""
    state = {"script": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, text = state["script"].pop(0) if state["script"] else (200, "Correctness: 1")
            reply = text if isinstance(text, dict) else {"choices": [{"message": {"content": text}}]}
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def open_questions(tmp_path):
    """-> make(n): a MedMax-schema data folder with one image and n open SLAKE questions (gold "left lung")."""

    def make(n: int):
        folder = tmp_path / "data"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (10, 90, 200)).save(folder / "a.png")
        rows = [{"task_name": "slake", "question_type": "open", "prompt": f"Where is lesion {i}?", "answer": "left lung",
                 "image_path": "a.png"} for i in range(n)]
        (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    return make
