"""Stage 03: the base model. Embedded default: a tokenizer trained on NonSynth and the SFT chats and a small Llama
pre-trained from scratch on NonSynth. Paper preset: a hub model, recorded into the run."""

from __future__ import annotations

import shutil

from synthflaw.data.schema import load_data, tokenizer_texts
from synthflaw.hub import model_name_problem, require_hub
from synthflaw.models.build import build_model, embedded_model_config, load_model, stop_at_end_of_turn
from synthflaw.models.tokenizer import load_tokenizer, train_tokenizer
from synthflaw.registry import GENERATE_DATA
from synthflaw.training.jobs import PretrainJob
from synthflaw.training.launch import accelerate_config_path, run_training


def check(cfg) -> list[str]:
    """A base model or an accelerate config file that cannot be found, before any step runs (the accelerate config
    serves stages 03, 04 and 06: checked once, here)."""
    problems = [model_name_problem("base.model_name_or_path", cfg.base.model_name_or_path)]
    try:
        accelerate_config_path(cfg.compute.accelerate_config)
    except FileNotFoundError as error:
        problems.append(str(error))
    return [p for p in problems if p]


def run(cfg, step) -> dict:
    """The base model in ``<step>/model``.

    Embedded default: a tokenizer trained on NonSynth and the SFT chats and a Llama-style model pre-trained from scratch on
    NonSynth. With `base.model_name_or_path`: that model (hub id or local folder), saved into the run so every later
    stage reads its base from the same place, with generation set to stop at its chat template's end of turn.
    Pre-training runs in this process, or on `compute.num_processes` processes under `accelerate launch`.
    """
    b = cfg.base
    model_dir = step.path / "model"
    if b.model_name_or_path:
        require_hub("base.model_name_or_path", b.model_name_or_path)
        model = load_model(b.model_name_or_path, trust_remote_code=b.trust_remote_code, device="cpu")
        tokenizer = load_tokenizer(b.model_name_or_path, trust_remote_code=b.trust_remote_code)
        stop_ids = stop_at_end_of_turn(model, tokenizer)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return {"source": b.model_name_or_path, "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": str(model.dtype).removeprefix("torch."), "stop_token_ids": stop_ids, "trained": False}
    data_dir = step.upstream(GENERATE_DATA) / "data"
    # NonSynth, the SFT chats and the templates' markers: nothing a swept data key changes alone (`tokenizer_texts`)
    tokenizer = train_tokenizer(tokenizer_texts(load_data(data_dir)), b.vocab_size, step.path / "tokenizer")
    model = build_model(tokenizer, embedded_model_config(b), cfg.seed)
    parameters = sum(p.numel() for p in model.parameters())
    # The job loads its model from a folder (in this process or in each launched one): the seeded initialisation.
    init_dir = step.path / "init"
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    del model
    summary = run_training(PretrainJob.from_config(cfg, init_dir, step.path, data_dir), cfg.compute, step.path)
    shutil.rmtree(init_dir)  # rebuilt from the seed if the stage runs again; model/ holds the result
    return {"source": "embedded", "parameters": parameters, **summary}
