"""Fixtures shared by the test modules: a tiny random Llama, a chat tokenizer trained on given texts, one torch
thread for tiny models, the guard that fails a test on any connection beyond this machine, what a sweep's
regenerable tables are, and the smoke study, run once per pytest session in-process and once through its notebooks
for every slow test that reads a finished run.

The fixtures give the machinery, not the numbers: each module passes the vocabulary size, the training texts and the
config fields (initializer_range, max_position_embeddings) its assertions rely on.
"""

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from synthflaw.models.tokenizer import train_tokenizer

# `make test` runs the suite on pytest-xdist workers, one per core. Each worker gets its share of the cores for torch
# and for the kernels and subprocesses it starts (they read OMP_NUM_THREADS): two workers of two threads each on two
# cores spent a third of their time switching.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

# The session fixtures that run a whole study, and the test files that read them: xdist sends these files to one
# worker together, so each study is made once per run (on two workers each was made twice: ~130 s of setup). Every
# other file goes to a worker whole (its module fixtures made once). A custom scheduler, because `--dist loadgroup`
# groups nothing under pytest 9.2: xdist 3.8 marks a group by renaming `item._nodeid`, which pytest no longer reads.
SHARED_STUDIES = ("smoke_study", "smoke_notebooks")

if importlib.util.find_spec("xdist"):
    from xdist.scheduler import LoadScopeScheduling

    class _FilesWithSharedStudies(LoadScopeScheduling):
        """A test file per unit of work, the files that read a shared study as one unit. xdist hands out the
        units with the most tests first; this one is the largest."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.shared = {p.name for p in Path(__file__).parent.glob("test_*.py")
                           if any(name in p.read_text() for name in SHARED_STUDIES)}

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "shared smoke studies" if Path(path).name in self.shared else path

    def pytest_xdist_make_scheduler(config, log):  # the controller only: the workers never read the test files
        return _FilesWithSharedStudies(config, log)

# The shape of every tiny Llama in the tests: 2 layers of width 32 (LlamaConfig fields; the vocabulary comes from the
# tokenizer). tests/test_training.py builds it through the library's build_model, the others through make_tiny_llama.
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256)


def make_tiny_llama(tokenizer, seed=0, *, special_tokens=True, **config_overrides):
    """A randomly initialised tiny Llama (`TINY_LLAMA`, updated by `config_overrides`) over `tokenizer`'s vocabulary.

    With `special_tokens` the bos/eos/pad ids come from the tokenizer (the pad id is the embedding's padding row,
    so it changes the initial weights); without, LlamaConfig's defaults stand. The initialisation draws from a
    forked torch RNG seeded with `seed`: the weights depend on the seed alone and the caller's RNG is left as it was.
    The model is returned as `from_config` gives it (call `.eval()` where it matters).
    """
    fields = {**TINY_LLAMA, **config_overrides, "vocab_size": len(tokenizer)}
    if special_tokens:
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """compute.precision=auto's per-machine timings go to a folder of this session (kernels and subprocesses
    inherit it), not the user's cache."""
    from synthflaw.training.precision import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_llama():
    """The factory `make_tiny_llama(tokenizer, seed=0, *, special_tokens=True, **config_overrides)`."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_config():
    """The tiny Llama's LlamaConfig fields without the vocabulary (a copy: `TINY_LLAMA`), for build_model."""
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def train_chat_tokenizer(tmp_path_factory):
    """The function `train(texts, vocab_size, folder=None)`: the embedded byte-level BPE tokenizer with its chat
    template (synthflaw.models.tokenizer.train_tokenizer), trained on `texts` and saved in `folder` (default: a new
    temporary folder)."""
    def train(texts, vocab_size, folder=None):
        folder = folder if folder is not None else tmp_path_factory.mktemp("tokenizer")
        return train_tokenizer(texts, vocab_size, folder)
    return train


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on shared cores it costs 4-10x in OpenMP waits.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup beyond this machine fails the test: local paths must not touch the hub.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("no_network")`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address)

    def lookup(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise AssertionError(f"name lookup of {host}")
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def _sweep_tables(root: Path) -> dict[str, bytes]:
    """The tables `synthflaw sweep --figures-only` writes: the sweep's figures' CSV and Markdown, and every point's
    cross-seed tables and findings, by path relative to the sweep."""
    paths = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".md")
             and (p.relative_to(root).parts[0] == "figures" or "seeds" in p.parts)]
    paths += sorted(root.glob("points/*/seeds/findings.json"))
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


@pytest.fixture(scope="session")
def sweep_tables():
    """A sweep's regenerable tables (test_sweep's export test and test_reference's committed sweeps compare them)."""
    return _sweep_tables


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The smoke preset's study (stages 01-08), run in-process once per pytest session: its run folder
    (``<root>/s``). The slow tests that read a finished run share it, so a test that changes it works on a copy
    (`shutil.copytree` into its own tmp_path, keeping the name ``s``) or puts back what it changed."""
    from synthflaw.runner import run_study

    return run_study("smoke", "s", runs_root=tmp_path_factory.mktemp("smoke"), engine="inprocess",
                     log=lambda _: None)


@pytest.fixture(scope="session")
def smoke_notebooks(tmp_path_factory):
    """The same study stepped through as a researcher runs it in JupyterLab: every stage notebook executed in order,
    each in a kernel of its own, from ``notebooks/``, with the smoke preset and nothing else set, into one run
    folder. {"run": the folder, "notebooks": {stage name: executed notebook}}. Compared with `smoke_study`, it is
    the notebooks' reproduction of the in-process study."""
    import papermill as pm

    from synthflaw.progress import DEBUG_ENV, TEXT_BARS_ENV
    from synthflaw.registry import STAGES

    run = tmp_path_factory.mktemp("stepping") / "run"
    out = tmp_path_factory.mktemp("executed")
    executed = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(TEXT_BARS_ENV, raising=False)  # a kernel started as JupyterLab starts it: widget bars
        mp.delenv(DEBUG_ENV, raising=False)
        for stage in STAGES:
            target = out / stage.notebook
            pm.execute_notebook(str(NOTEBOOKS / stage.notebook), str(target), kernel_name="python3",
                                parameters={"run_dir": str(run), "preset": "smoke"}, cwd=str(NOTEBOOKS),
                                progress_bar=False)
            executed[stage.name] = json.loads(target.read_text())
    return {"run": run, "notebooks": executed}
