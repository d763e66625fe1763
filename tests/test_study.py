"""The whole smoke study end to end, and every notebook executed through papermill.

The study runs once in-process (the same library calls the notebooks make; conftest's `smoke_study`) and once
through its notebooks (conftest's `smoke_notebooks`, which test_notebooks.py reads as a researcher sees it): every
step of the notebook run must reproduce the in-process result exactly (seeded and deterministic on CPU). One step
deleted and re-executed through `run_study`'s papermill engine must run its stage's notebook for that variant only.
"""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from synthflaw import config
from synthflaw.registry import models_of
from synthflaw.runner import run_study

pytestmark = pytest.mark.slow  # end to end

# What must match between the in-process and the papermill execution (timings excluded).
COMPARE = {"01_generate_data": ("counts", "words"), "02_data_flaws": ("sets",),
           "03_base_model": ("final_loss", "tokens", "parameters"), "04_continued_pretraining": ("final_loss", "tokens"),
           "05_unlearning": ("final_losses", "forget_tokens", "tau_calibrated"),
           "06_sft": ("final_loss", "tokens", "curve_steps"),
           "07_evaluate": ("pre_sft_benchmark_accuracy", "learnable_hard_satisfaction_rate", "compliance_margin",
                           "template_pull", "hard_satisfaction_rate", "chat_score", "next_token_kl"),
           "08_figures": ("figures", "models")}


@pytest.fixture(scope="module")
def smoke_run(smoke_study):
    return smoke_study


def test_every_step_completed(smoke_run):
    cfg = config.resolve("smoke")
    for model in models_of(cfg):
        for stage in ("06_sft", "07_evaluate"):
            assert (smoke_run / stage / model / "done.json").exists(), f"{stage}/{model}"
    for method in cfg.unlearn.methods:
        assert (smoke_run / "05_unlearning" / method / "loss.csv").exists()


def test_sft_checkpoints_load_and_generate(smoke_run):
    for model in ("natural", "synthetic", "unlearn-lower_bounded"):
        path = smoke_run / "06_sft" / model / "model"
        lm, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about rain."}],
                                         add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = lm.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]


def test_metrics_have_the_required_keys(smoke_run):
    required = ("benchmark_accuracy", "hard_satisfaction_rate", "hsr_by_level", "soft_satisfaction_rate",
                "ifeval_prompt_strict", "ifeval_instruction_strict", "chat_score", "perplexity",
                "template_leakage_rate")
    for model in models_of(config.resolve("smoke")):
        metrics = json.loads((smoke_run / "07_evaluate" / model / "metrics.json").read_text())
        missing = [k for k in required if k not in metrics]
        assert not missing, f"{model} lacks {missing}"
        assert set(metrics["perplexity"]) >= {"mean", "std", "median"}
        assert (smoke_run / "07_evaluate" / model / "samples.jsonl").stat().st_size > 0
        # scored in the precision the model was trained in (compute.precision=auto's choice on this machine)
        trained = json.loads((smoke_run / "06_sft" / model / "result.json").read_text())["precision"]
        assert metrics["settings"]["scoring_precision"] == trained["precision"]


def test_figures_and_loss_curves(smoke_run):
    made = json.loads((smoke_run / "08_figures" / "result.json").read_text())["figures"]
    for name in ("tsne.png", "token_kde.png", "loss_curves.png", "headline.png", "hsr_by_level.png",
                 "perplexity_distributions.png", "unlearning_losses.png"):
        assert name in made and (smoke_run / "08_figures" / name).stat().st_size > 1000, name
    assert (smoke_run / "08_figures" / "tables" / "headline.csv").exists()
    for stage in ("03_base_model", "04_continued_pretraining/natural", "06_sft/synthetic"):
        assert (smoke_run / stage / "loss.csv").exists(), stage


def test_branches_got_equal_token_budgets(smoke_run):
    tokens = {b: json.loads((smoke_run / "04_continued_pretraining" / b / "result.json").read_text())["tokens"]
              for b in ("natural", "synthetic", "rewritten")}
    assert len(set(tokens.values())) == 1, tokens


def step_results(run) -> dict[str, dict]:
    """Every step's result.json in a run folder, by step name (``06_sft/natural``)."""
    return {str(p.parent.relative_to(run)): json.loads(p.read_text())
            for pattern in ("*/result.json", "*/*/result.json") for p in run.glob(pattern)}


def test_the_notebooks_reproduce_the_inprocess_study(smoke_run, smoke_notebooks):
    inprocess, notebooks = step_results(smoke_run), step_results(smoke_notebooks["run"])
    assert set(notebooks) == set(inprocess) and {name.split("/")[0] for name in inprocess} >= set(COMPARE)
    for name, before in inprocess.items():
        for key in COMPARE[name.split("/")[0]]:
            assert notebooks[name].get(key) == before.get(key), f"{name}: {key} differs between papermill and in-process"


def test_a_deleted_step_is_redone_by_its_notebook_for_that_variant_only(smoke_run, tmp_path):
    # In a copy: redoing a step makes every finished step that read it stale, which the shared run must not be.
    stage, variant = "05_unlearning", "simnpo"
    run = tmp_path / smoke_run.name
    shutil.copytree(smoke_run, run)
    step_dir = run / stage / variant
    before = json.loads((step_dir / "result.json").read_text())
    shutil.rmtree(step_dir)
    run_study("smoke", run.name, runs_root=tmp_path, engine="papermill", only=[stage], log=lambda _: None)
    after = json.loads((step_dir / "result.json").read_text())
    assert (run / stage / "notebook.ipynb").exists() and (step_dir / "done.json").exists()
    executed = json.loads((run / stage / "notebook.ipynb").read_text())
    injected = next(c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert f'variants = ["{variant}"]' in "".join(injected["source"])
    for key in COMPARE[stage]:
        assert after.get(key) == before.get(key), f"{stage}: {key} differs between papermill and in-process"


def test_export_keeps_no_weights_or_data_and_regenerates_the_same_tables(smoke_run, tmp_path):
    from synthflaw.export import export_run
    from synthflaw.runner import regenerate

    # Stage 08 as a notebook, so the run has an executed notebook to export as HTML.
    shutil.rmtree(smoke_run / "08_figures")
    run_study("smoke", "s", runs_root=smoke_run.parent, engine="papermill", only=["08"], log=lambda _: None)
    out = tmp_path / "exported"
    export_run(smoke_run, out)
    assert (out / "study.json").exists() and (out / "07_evaluate" / "synthetic" / "metrics.json").exists()
    assert not [p for p in out.rglob("*") if p.name in ("model", "data", "checkpoints") or p.suffix == ".safetensors"]
    assert (out / "notebooks" / "08_figures.html").exists()
    with pytest.raises(FileExistsError):
        export_run(smoke_run, out)  # never over an existing export
    original = {p.name: p.read_bytes() for p in (smoke_run / "08_figures").rglob("*.csv")}
    regenerate("exported", runs_root=tmp_path, engine="inprocess")
    assert {p.name: p.read_bytes() for p in (out / "08_figures").rglob("*.csv")} == original
