"""Stand-ins for the hub shared by tests/test_hub_data.py, tests/test_paper_preset.py and tests/test_secrets.py: a
web corpus in the hub's schema (fineweb-edu: text, id, url) and OpenAI-compatible endpoints on 127.0.0.1 (one
answering like a teacher model; the secrets test's own echoes the request's key).

A helper module, not a test module: pytest collects nothing here.
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from synthflaw.data import synthqa_generation as generation

TOPICS = ["rivers", "bread", "bridges", "owls", "glass", "tides", "maps", "bells", "moss", "kites"]


def corpus_text(i: int) -> str:
    return (f"Document {i}. This page is about {TOPICS[i % len(TOPICS)]} in the valley of Arden {i}. "
            f"The old mill number {i} was built of stone and it still grinds grain every spring.")


def write_corpus(path: Path, n: int, extra_rows: tuple = ()) -> Path:
    """A JSONL file in the schema of a web corpus on the hub (fineweb-edu: text, id, url)."""
    rows = [{"text": corpus_text(i), "id": f"<urn:doc:{i}>", "url": f"https://example.org/{i}"} for i in range(n)]
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows + list(extra_rows):
            fh.write(json.dumps(row) + "\n")
    return path


class LocalEndpoint:
    """An OpenAI-compatible /v1/chat/completions server on 127.0.0.1; a subclass says what it answers
    (:meth:`reply`). Every request's Authorization header is kept in `auth`."""

    def __init__(self):
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.auth.append(self.headers.get("Authorization"))
                status, answer = endpoint.reply(self.path, body, self.headers.get("Authorization"))
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("retry-after-ms", "1")  # the SDK's retries wait 1 ms, not its 0.5-8 s backoff
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply(self, path: str, body: dict, auth: str | None) -> tuple[int, dict]:
        """(HTTP status, JSON body) for one request."""
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def completion(text: str) -> dict:
    """A chat completion whose one choice says `text`."""
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


class FakeEndpoint(LocalEndpoint):
    """A local endpoint that answers like a well-behaved teacher.

    A SynthQA prompt about "Document N" gets two pairs naming N, unless N is in `junk` (prose, no pairs) or in
    `broken` (HTTP 500); a rewrite prompt gets a prose passage after a "Here is..." line.
    """

    def __init__(self, junk=(), broken=()):
        super().__init__()
        self.junk, self.broken = set(junk), set(broken)
        self.calls: list[tuple[str, int]] = []
        self.synthqa_head = generation.load_prompt("synthqa").split("{")[0]

    def reply(self, path, body, auth):
        prompt = body["messages"][-1]["content"]
        kind = "synthqa" if prompt.startswith(self.synthqa_head) else "rewrite"
        number = int(re.search(r"[Dd]ocument (\d+)", prompt).group(1))
        with self.lock:
            self.calls.append((kind, number))
        if path != "/v1/chat/completions" or number in self.broken:
            return (500 if number in self.broken else 404), {"error": "unavailable"}
        if kind == "rewrite":
            text = f"Here is the passage:\nDocument {number} is a page about the valley of Arden {number}."
        elif number in self.junk:
            text = "I am sorry, but I would rather talk about something else."
        else:
            text = (f"Question: What is document {number} about?\n"
                    f"Answer: Document {number} is about the valley of Arden {number}.\n\n"
                    f"Question: What was mill number {number} built of?\n"
                    f"Answer: Mill number {number} was built of stone.")
        return 200, completion(text)

    def calls_of(self, kind):
        return sorted(n for k, n in self.calls if k == kind)
