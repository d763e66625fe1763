"""The endpoint's API key never reaches a file, a log line or an exception, even from an endpoint that echoes it.

A fake OpenAI-compatible endpoint on 127.0.0.1 echoes the request's Authorization header ("Bearer <key>") back: in
an error body (HTTP 400, 401, 500) or as the completion itself (HTTP 200). The key is in the environment variable
the config names, as a user would set it. Then every file written (run folders, step folders, generation logs,
failures, the export), every log line and every exception raised to the caller (its message, its formatted
traceback with the frames' local variables, and the exceptions chained to it) is searched for the key and for its
first 20 characters (a cut could leave part of it).
"""

import contextlib
import json
import traceback
from pathlib import Path

import pytest
from fakes import LocalEndpoint, completion, write_corpus

from synthflaw import records
from synthflaw.config import resolve
from synthflaw.data import schema
from synthflaw.data import synthqa_generation as generation
from synthflaw.models.chat_client import EndpointChat

pytestmark = pytest.mark.usefixtures("no_network")

KEY_ENV = "SYNTHFLAW_TEST_SECRET_KEY"
KEY = "sk-proj-Zq7Lm2Xv9Rt4Wp1Ks8Dn3Hf6Jc0Bg5YaE2uT"
SECRETS = (KEY, KEY[:20])


class EchoEndpoint(LocalEndpoint):
    """A local endpoint answering every request with its own Authorization header in it.

    `mode`: "echo" (200, the header in the completion, in Q-A pairs a SynthQA parser keeps), "no_choices" (200, the
    header in an answer without a completion), or an HTTP error status (400, 401, 500) whose body echoes the header.
    """

    def __init__(self, mode="echo"):
        super().__init__()
        self.mode = mode

    def reply(self, path, body, auth):
        if self.mode == "echo":
            return 200, completion(f"Question: Which header came with the request?\nAnswer: The header {auth} came."
                                   f"\n\nQuestion: What was the key?\nAnswer: The key was {auth.split()[-1]} exactly.")
        if self.mode == "no_choices":
            return 200, {"id": auth, "object": "chat.completion", "model": auth, "choices": []}
        return self.mode, {"error": {"message": f"bad request; you sent Authorization: {auth}",
                                     "type": "invalid_request_error", "param": auth}}


def files_holding_the_key(*folders: Path) -> list[str]:
    """Every file under `folders` (any kind, read as bytes) holding the key or its first 20 characters."""
    found = []
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path} holds {secret[:12]}..." for secret in SECRETS if secret.encode() in data]
    return found


def exception_texts(error: BaseException) -> list[str]:
    """What a caller can see of `error`: its message and repr, its traceback as printed and with every frame's local
    variables, and the same of every exception chained to it (cause or context, shown or not)."""
    texts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error), repr(error.args), "".join(traceback.format_exception(error)),
                  "".join(traceback.TracebackException.from_exception(error, capture_locals=True).format())]
        error = error.__cause__ or error.__context__
    return texts


def assert_no_key(texts, what: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{what} holds {secret[:12]}...: {text[-2000:]}"


# --- the SynthQA generator (stage 01 on hub data) ----------------------------------------------------------------

def hub_cfg(corpus: Path, endpoint: str):
    return resolve("smoke", {"data.source": "hub", "data.natural_dataset": str(corpus), "data.generator": "teacher",
                             "data.generator_endpoint": endpoint, "data.generator_api_key_env": KEY_ENV,
                             "data.nonsynth_docs": 10, "data.extra_natural_docs": 4, "data.heldout_docs": 4,
                             "data.source_documents": 4, "data.generator_batch_size": 2,
                             "data.generator_max_new_tokens": 64})


@pytest.mark.parametrize("mode", ["echo", "no_choices", 400, 500, 401])
def test_the_generator_never_writes_or_raises_the_key(tmp_path, monkeypatch, mode):
    monkeypatch.setenv(KEY_ENV, KEY)
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    out = tmp_path / "data"
    with EchoEndpoint(mode) as server:
        generator = EndpointChat(server.url, "teacher", KEY_ENV, 64, max_retries=1)
        if mode == 401:  # a configuration error: raised, with the endpoint's (echoing) body in the message
            with pytest.raises(RuntimeError, match="HTTP 401") as raised:
                generation.build_from_hub(hub_cfg(corpus, server.url), out, generator)
            assert_no_key(exception_texts(raised.value), "the exception")
        else:
            no_pairs = pytest.warns(UserWarning, match="no parseable") if mode != "echo" else contextlib.nullcontext()
            with no_pairs:
                data = generation.build_from_hub(hub_cfg(corpus, server.url), out, generator)
            schema.write_data(data, out)
    assert server.auth and all(a == f"Bearer {KEY}" for a in server.auth)  # the endpoint did get the key
    generated = {p.name for p in (out / "generation").iterdir()}
    if mode == "echo":  # the echo reached the records, redacted
        assert "[redacted]" in (out / "generation" / "synthqa.jsonl").read_text()
        assert any("[redacted]" in r["answer"] for r in records.read_jsonl(out / "synthqa.jsonl"))
    elif mode != 401:  # the echoing error bodies are in failures.jsonl, redacted
        failures = records.read_jsonl(out / "generation" / "failures.jsonl")
        assert failures and all("[redacted]" in f["detail"] for f in failures), failures
    assert generated >= ({"source_documents.jsonl"} if mode == 401 else {"synthqa.jsonl", "failures.jsonl"})
    assert files_holding_the_key(tmp_path) == []
    assert_no_key([repr(generator), repr(vars(generator))], "the generator")


# --- the chat judge (stage 07) through a study, and the export of the finished run ------------------------------

# The smoke study cut to what reaches the judge: one CPT branch, no unlearning, a few evaluation items.
SMALL = {"cpt.branches": ("natural",), "unlearn.methods": (), "evaluate.limit": 4, "evaluate.curve_items": 4,
         "sft.curve_points": 1}


@pytest.mark.slow  # a smoke study (one branch, stages 01-08), stage 07 twice, an export: ~30 s
def test_the_chat_judge_never_writes_or_raises_the_key_in_a_run_or_its_export(tmp_path, monkeypatch):
    from synthflaw.export import export_run
    from synthflaw.runner import StepFailed, run_study

    monkeypatch.setenv(KEY_ENV, KEY)
    runs, lines = tmp_path / "runs", []
    with EchoEndpoint(400) as server:
        overrides = {**SMALL, "evaluate.judge": "judge-model", "evaluate.judge_endpoint": server.url,
                     "evaluate.judge_api_key_env": KEY_ENV}
        with pytest.raises(StepFailed, match="07_evaluate") as raised:  # the judge's 400 fails stage 07
            run_study("smoke", "judged", overrides, runs_root=runs, engine="inprocess", log=lines.append)
        assert "HTTP 400" in str(raised.value) and "[redacted]" in str(raised.value)
        assert_no_key(exception_texts(raised.value), "the exception")
        assert files_holding_the_key(tmp_path) == []
        assert server.auth and all(a == f"Bearer {KEY}" for a in server.auth)
        assert (runs / "judged" / "07_evaluate" / "natural").is_dir()  # the failed step's folder was searched too

        server.mode, rejected = "echo", len(server.auth)  # the same run again: stage 07 resumes, the run finishes
        run_dir = run_study("smoke", "judged", overrides, runs_root=runs, engine="inprocess", log=lines.append)
    assert len(server.auth) > rejected and all(a == f"Bearer {KEY}" for a in server.auth)
    metrics = json.loads((run_dir / "07_evaluate" / "natural" / "metrics.json").read_text())
    assert metrics["settings"]["judge"] == "RatingJudge"
    export = export_run(run_dir, runs / "judged-export", runs_root=runs)
    assert export and (runs / "judged-export" / "study.json").exists()
    assert files_holding_the_key(tmp_path) == []
    assert_no_key(lines, "the run's log")
