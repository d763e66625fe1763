"""Stand-ins for the hub shared by tests/test_hub_data.py and tests/test_paper_preset.py: a web corpus in the hub's
schema (fineweb-edu: text, id, url) and an OpenAI-compatible endpoint on 127.0.0.1 answering like a teacher model.

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


class FakeEndpoint:
    """An OpenAI-compatible /v1/chat/completions server on 127.0.0.1 that answers like a well-behaved teacher.

    A SynthQA prompt about "Document N" gets two pairs naming N, unless N is in `junk` (prose, no pairs) or in
    `broken` (HTTP 500); a rewrite prompt gets a prose passage after a "Here is..." line.
    """

    def __init__(self, junk=(), broken=()):
        self.junk, self.broken = set(junk), set(broken)
        self.calls: list[tuple[str, int]] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        synthqa_head = generation.load_prompt("synthqa").split("{")[0]
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                kind = "synthqa" if prompt.startswith(synthqa_head) else "rewrite"
                number = int(re.search(r"[Dd]ocument (\d+)", prompt).group(1))
                with endpoint.lock:
                    endpoint.calls.append((kind, number))
                    endpoint.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions" or number in endpoint.broken:
                    self.send_response(500 if number in endpoint.broken else 404)
                    self.send_header("retry-after-ms", "1")  # the SDK's retries wait 1 ms, not its 0.5-8 s backoff
                    self.end_headers()
                    self.wfile.write(b'{"error": "unavailable"}')
                    return
                if kind == "rewrite":
                    text = f"Here is the passage:\nDocument {number} is a page about the valley of Arden {number}."
                elif number in endpoint.junk:
                    text = "I am sorry, but I would rather talk about something else."
                else:
                    text = (f"Question: What is document {number} about?\n"
                            f"Answer: Document {number} is about the valley of Arden {number}.\n\n"
                            f"Question: What was mill number {number} built of?\n"
                            f"Answer: Mill number {number} was built of stone.")
                payload = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": text}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def calls_of(self, kind):
        return sorted(n for k, n in self.calls if k == kind)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
