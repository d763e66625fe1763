"""Models: the embedded Llama built from config, loading any causal LM, and the one rule for where generation stops.

Embedded default: a small Llama built with `AutoModelForCausalLM.from_config`. Paper preset: any causal LM named by
hub id or local folder, loaded with `from_pretrained`. Either way the result is a plain `transformers` model, so
every later stage treats them alike.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from synthflaw.models.tokenizer import end_of_turn_id


def build_model(tokenizer: PreTrainedTokenizerFast, model_config: dict, seed: int) -> torch.nn.Module:
    """A freshly initialised Llama-style causal LM sized by `model_config` (LlamaConfig fields).

    The vocabulary size and the special-token ids come from the tokenizer. Initialisation draws from a forked
    torch RNG seeded with `seed`, so the weights depend on the seed alone and the caller's RNG is left untouched.
    Generation stops at `<|end|>` as well as eos when the tokenizer has it.
    """
    reserved = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"} & set(model_config)
    if reserved:
        raise ValueError(
            f"model_config sets {sorted(reserved)}, which come from the tokenizer; remove them from model_config."
        )
    config = LlamaConfig(
        **model_config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    stop_at_end_of_turn(model, tokenizer)
    return model


def embedded_model_config(b) -> dict:
    """The LlamaConfig fields of the embedded model from the `base` config section (vocabulary from the tokenizer)."""
    return {"hidden_size": b.hidden_size, "intermediate_size": b.intermediate_size,
            "num_hidden_layers": b.num_hidden_layers, "num_attention_heads": b.num_attention_heads,
            "num_key_value_heads": b.num_attention_heads, "max_position_embeddings": b.block_size}


def load_model(model_name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None):
    """Load a causal LM by hub id or local `save_pretrained` folder (the paper preset's base model).

    `dtype=None` keeps the checkpoint's stored dtype ("auto"); remote code runs only when asked for. `device=None`
    puts the model on the GPU when there is one (so evaluation and unlearning run there), else on the CPU.
    """
    model = AutoModelForCausalLM.from_pretrained(
        str(model_name_or_path),
        trust_remote_code=trust_remote_code,
        dtype=dtype if dtype is not None else "auto",
    )
    return model.to(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def cache_keyword(model) -> str:
    """The name under which this transformers version's forward takes and returns the KV cache: `cache` in 5.x
    releases that renamed it (`past_key_values` is then deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def stop_token_ids(model, tokenizer) -> list[int]:
    """Where generation stops, the one rule every generator uses: the model's configured EOS ids, the tokenizer's
    EOS, and the chat template's end-of-turn token (`<|end|>` in the embedded template, `<|im_end|>` in Qwen's)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured] if configured is not None else []
    for token_id in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if token_id is not None:
            ids.append(token_id)
    ids = list(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos token and its chat template no end-of-turn token")
    return ids


def stop_at_end_of_turn(model, tokenizer) -> list[int]:
    """Make generation stop at the chat template's end-of-turn token as well as at the model's EOS ids.

    A hub base model's generation config names only its EOS (Qwen2.5-0.5B: `<|endoftext|>`); after SFT on its chat
    template the model ends a turn with `<|im_end|>` and would otherwise run on to max_new_tokens. The setting is
    saved with the model, so every stage downstream (and lm-evaluation-harness) inherits it. Returns the stop ids.
    """
    stop = stop_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = stop
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return stop

