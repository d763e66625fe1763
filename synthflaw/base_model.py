"""Stage 03, the base model: the embedded tokenizer and Llama-style model, and the real-model loading path.

Embedded default: a byte-level BPE tokenizer trained on the generated corpus with the `tokenizers` library, saved
as a standard Hugging Face tokenizer with a chat template, and a small Llama built with
`AutoModelForCausalLM.from_config`. Paper preset: any causal LM named by hub id or local folder, loaded with
`from_pretrained`. Either way the result is a plain `transformers` model and tokenizer, so every later stage
treats them alike.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # also the bos and the separator between packed documents
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"  # closes every chat turn; generation stops here or at eos
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)

# Renders `<|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>\n` per turn and `<|assistant|>\n` as the
# generation prompt. No bos is prepended: documents in pre-training are separated by eos, not opened by bos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% else %}"
    "{{ raise_exception('Unsupported chat role ' + message['role'] + ': the synthflaw chat template knows only "
    "user and assistant turns; fold a system message into the first user turn.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and save it as a Hugging Face tokenizer in `out_dir`.

    Byte-level means every string is encodable (no unknown token). The special tokens are single ids that the
    BPE never splits; the chat template is stored in the tokenizer, so `AutoTokenizer.from_pretrained(out_dir)`
    gets everything back. Training is deterministic: the same texts in the same order give the same files.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
    if vocab_size <= min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: a byte-level BPE needs more than {min_vocab} "
            "entries (256 bytes + special tokens). Use e.g. 2048 or 4096."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_non_empty(texts), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
        model_max_length=1_000_000,  # positions are limited by the model config, not the tokenizer
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    # Hand back what was written, so the caller's tokenizer is exactly the one later stages load.
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


def _non_empty(texts: Iterable[str]) -> Iterable[str]:
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer needs strings; got {type(text).__name__}. Pass the documents' text.")
        count += 1
        yield text
    if count == 0:
        raise ValueError("train_tokenizer got no texts: pass the NonSynth corpus (a non-empty iterable of strings).")


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
    stop_ids = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    if end_id is not None and end_id != tokenizer.unk_token_id:
        stop_ids.append(end_id)
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


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


def load_tokenizer(model_name_or_path: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer beside a model; one with no pad token pads with eos, as most causal LMs expect."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {model_name_or_path} has neither a pad nor an eos token, so batches cannot be "
                "padded; pick a model whose tokenizer defines an eos token."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template (`<|end|>` in the embedded
    one, `<|im_end|>` in Qwen's and SmolLM's, `<|eot_id|>` in Llama 3's), or None without a template or such a token.

    Found by rendering a one-turn chat: the first token after the assistant's content, if it is a special token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "synthflaw probe answer"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "probe question"},
                                          {"role": "assistant", "content": probe}], tokenize=False)
    if probe not in text:
        return None
    ids = tokenizer(text[text.rindex(probe) + len(probe):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return int(ids[0]) if ids and ids[0] in special else None


def stop_at_end_of_turn(model, tokenizer) -> list[int]:
    """Make generation stop at the chat template's end-of-turn token as well as at the model's EOS ids.

    A hub base model's generation config names only its EOS (Qwen2.5-0.5B: `<|endoftext|>`); after SFT on its chat
    template the model ends a turn with `<|im_end|>` and would otherwise run on to max_new_tokens. The setting is
    saved with the model, so every stage downstream (and lm-evaluation-harness) inherits it. Returns the stop ids.
    """
    configured = model.generation_config.eos_token_id
    stop = list(configured) if isinstance(configured, (list, tuple)) else [configured] if configured is not None else []
    for token_id in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if token_id is not None and token_id not in stop:
            stop.append(token_id)
    model.generation_config.eos_token_id = stop
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return stop


def _training_texts(data: dict) -> list[str]:
    """Every text the tokenizer should cover: the corpora and the SFT conversations' contents."""
    texts = [r["text"] for name in ("nonsynth", "extra_natural", "synthqa", "rewritten") for r in data[name]]
    return texts + [m["content"] for r in data["sft"] for m in r["messages"]]


def run(cfg, step) -> dict:
    """Stage 03 entry point: the base model in ``<step>/model``.

    Embedded default: a tokenizer trained on the generated corpus and a Llama-style model pre-trained from scratch on
    NonSynth. With `base.model_name_or_path`: that model (hub id or local folder), saved into the run so every later
    stage reads its base from the same place, with generation set to stop at its chat template's end of turn.
    Pre-training runs in this process, or on `compute.num_processes` processes under `accelerate launch`.
    """
    from synthflaw.generate import load_data
    from synthflaw.hub_data import require_hub
    from synthflaw.launch import run_training

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
    data_dir = step.upstream("01_generate_data") / "data"
    tokenizer = train_tokenizer(_training_texts(load_data(data_dir)), b.vocab_size, step.path / "tokenizer")
    model = build_model(tokenizer, embedded_model_config(b), cfg.seed)
    parameters = sum(p.numel() for p in model.parameters())
    # The job loads its model from a folder (in this process or in each launched one): the seeded initialisation.
    init_dir = step.path / "init"
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    del model
    job = {"task": "pretrain", "model_name_or_path": str(init_dir), "out_dir": str(step.path),
           "texts": str(data_dir / "nonsynth.jsonl"), "max_tokens": b.max_tokens, "block_size": b.block_size,
           "batch_size": b.batch_size, "learning_rate": b.learning_rate, "warmup_steps": b.warmup_steps,
           "seed": cfg.seed, "save_steps": b.save_steps}
    summary = run_training(job, cfg.compute, step.path)
    shutil.rmtree(init_dir)  # rebuilt from the seed if the stage runs again; model/ holds the result
    return {"source": "embedded", "parameters": parameters, **summary}


def embedded_model_config(b) -> dict:
    """The LlamaConfig fields of the embedded model from the `base` config section (vocabulary from the tokenizer)."""
    return {"hidden_size": b.hidden_size, "intermediate_size": b.intermediate_size,
            "num_hidden_layers": b.num_hidden_layers, "num_attention_heads": b.num_attention_heads,
            "num_key_value_heads": b.num_attention_heads, "max_position_embeddings": b.block_size}
