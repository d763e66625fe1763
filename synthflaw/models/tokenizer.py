"""Tokenizers: the embedded study's byte-level BPE with its chat template, loading any other, and the encoding
conventions every scorer and generator shares.

Conventions (they must match how the models were trained):
- Plain text (benchmark cloze prompts, held-out NonSynth documents, plain continuations) is encoded after one
  start token: BOS, or EOS where the tokenizer has no BOS (EOS is the document separator of the embedded
  pre-training stream), so the first real token is scored too (`start_tokens`).
- Chat prompts are the tokenizer's chat template rendered as text (`chat_text`) and tokenized with
  `add_special_tokens=False`: the template itself carries whatever start tokens the model expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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



def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (chat text carries its own; plain text gets `start_tokens`)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_all(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text: each distinct text tokenized once, all of them in one batched call (an evaluation
    tokenizes ~27k texts, most of them again and again; one at a time, the per-call overhead cost ~2 s a model)."""
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"])) if distinct else {}
    return [list(ids[text]) for text in texts]


def encode_chats(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """`encode` of each prompt's `chat_text`, each distinct prompt rendered once (an evaluation's calls repeat their
    prompts: one before each of its replies)."""
    rendered = {prompt: chat_text(tokenizer, prompt) for prompt in dict.fromkeys(prompts)}
    return encode_all(tokenizer, [rendered[prompt] for prompt in prompts])


def start_tokens(tokenizer) -> list[int]:
    """The token plain text is scored after: BOS, else EOS (the document separator), else nothing."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else EOS (padding is masked, so its id never matters)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before batching")


def chat_text(tokenizer, prompt: str) -> str:
    """A one-turn chat with the generation prompt, rendered by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use an SFT checkpoint whose tokenizer carries one "
                         "(set tokenizer.chat_template)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness encodes them (`_encode_pair`).

    Trailing whitespace of the context moves to the continuation, the pair is tokenized whole and the continuation
    is what follows the context's own tokens, so a merge across the boundary cannot drop a character. If the
    context's tokens are not a prefix of the whole (a merge did cross it), the continuation is tokenized alone.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    context_ids = encode(tokenizer, context)
    whole_ids = encode(tokenizer, context + continuation)
    if whole_ids[:len(context_ids)] == context_ids:
        return context_ids, whole_ids[len(context_ids):]
    return context_ids, encode(tokenizer, continuation)
