"""Stage 07: measure an SFT model the way the paper does, and more.

Four families of measurements, each a plain function with explicit arguments:

1. Knowledge benchmark (the MMLU analog): 4-option multiple choice scored by log-likelihood, as
   lm-evaluation-harness scores MMLU; accuracy overall and per split ("stated": facts NonSynth states,
   "synthqa_only": facts only SynthQA carries), so the benchmark gain can be attributed.
2. Instruction following (the FollowBench / IFEval analog): greedy responses to the held-out suite, every constraint
   checked by `synthflaw.constraints`; hard and soft satisfaction rates per level, IFEval strict and loose accuracy.
3. Chat quality (the MT-Bench analog): a reference-based score on a 0-10 scale, plus an optional LLM judge
   (`synthflaw.judge`).
4. Output-distribution shift: per-sample perplexities, template leakage, response length, distinct-n, and the
   next-token KL divergence from a reference (the `natural`) model; for the checkpoint SFT started from, the
   perplexities and the leakage of its plain-text continuations (SFT can erase a shift the CPT model shows).

`evaluate_model` runs them all on a stage-01 data folder and writes `metrics.json`, `samples.jsonl` and
`perplexities.csv`.

Tokenisation conventions (they must match how the models were trained):
- Plain text (benchmark cloze prompts, held-out NonSynth documents) is scored after one start token: BOS, or EOS
  where the tokenizer has no BOS (EOS is the document separator of the embedded pre-training stream), so the first
  real token is scored too.
- Chat prompts are the tokenizer's chat template rendered as text and tokenized with `add_special_tokens=False`:
  the template itself carries whatever start tokens the model expects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synthflaw.constraints import check_response, check_response_loose
from synthflaw.records import read_jsonl, write_text_atomic

BENCHMARK_SPLITS = ("stated", "synthqa_only")
DATA_FILES = ("benchmark.jsonl", "instruction_suite.jsonl", "chat.jsonl", "heldout_nonsynth.jsonl")
END_OF_TURN = "<|end|>"


# --------------------------------------------------------------------------------------------------------------
# Tokenisation and batched scoring shared by the benchmark, the perplexities and the KL
# --------------------------------------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _start_tokens(tokenizer) -> list[int]:
    """The token plain text is scored after: BOS, else EOS (the document separator), else nothing."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before evaluating")


def _chat_text(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; evaluate an SFT checkpoint whose tokenizer carries one "
                         "(set tokenizer.chat_template)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness encodes them (`_encode_pair`).

    Trailing whitespace of the context moves to the continuation, the pair is tokenized whole and the continuation
    is what follows the context's own tokens, so a merge across the boundary cannot drop a character. If the
    context's tokens are not a prefix of the whole (a merge did cross it), the continuation is tokenized alone.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    context_ids = _encode(tokenizer, context)
    whole_ids = _encode(tokenizer, context + continuation)
    if whole_ids[:len(context_ids)] == context_ids:
        return context_ids, whole_ids[len(context_ids):]
    return context_ids, _encode(tokenizer, continuation)


def _right_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.inference_mode()
def _continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                           pad_id: int) -> list[tuple[float, int]]:
    """Sum of log p(continuation token | everything before it) and the token count, per (context, continuation).

    Sequences are right-padded, so every real token keeps its unpadded positions and the causal mask hides the
    padding from it: batched and unbatched scores agree up to floating-point rounding. Batches are formed from
    length-sorted sequences to waste little compute on padding.
    """
    _check_batch_size(batch_size)
    for context, continuation in pairs:
        if not context:
            raise ValueError("a scored continuation needs at least one context token to condition on")
        if not continuation:
            raise ValueError("a scored continuation is empty; remove empty choices or texts from the data")
    device = _model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = _right_padded([pairs[i][0] + pairs[i][1] for i in rows], pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # position t predicts token t + 1
        token_logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for row, i in enumerate(rows):
            n_context, n_cont = len(pairs[i][0]), len(pairs[i][1])
            total = token_logprobs[row, n_context - 1:n_context - 1 + n_cont].sum().item()
            results[i] = (float(total), n_cont)
    return results


# --------------------------------------------------------------------------------------------------------------
# 1. Knowledge benchmark
# --------------------------------------------------------------------------------------------------------------

def score_choices(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                  batch_size: int) -> list[list[tuple[float, int, int]]]:
    """Log-likelihood of every answer option: `log p(" " + choice | prompt)` summed over the choice's tokens.

    Returns, per prompt, one `(logprob_sum, n_tokens, n_chars)` per choice, `n_chars = len(choice)` (without the
    joining space, as lm-evaluation-harness normalises `acc_norm`). All (prompt, choice) pairs of all prompts are
    batched together with right padding.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"got {len(prompts)} prompts but {len(choices)} choice lists; pass one list per prompt")
    start = _start_tokens(tokenizer)
    pairs, index = [], []
    for p, (prompt, options) in enumerate(zip(prompts, choices)):
        if not options:
            raise ValueError(f"prompt {p} has no choices; every benchmark item needs its answer options")
        for c, choice in enumerate(options):
            if not choice.strip():
                raise ValueError(f"choice {c} of prompt {p} is empty; every answer option needs text")
            context_ids, choice_ids = _encode_pair(tokenizer, prompt, " " + choice)
            pairs.append((start + context_ids, choice_ids))
            index.append((p, c))
    scores = _continuation_logprobs(model, pairs, batch_size, _pad_id(tokenizer))
    out: list[list[tuple[float, int, int]]] = [[None] * len(options) for options in choices]
    for (p, c), (logprob, n_tokens) in zip(index, scores):
        out[p][c] = (logprob, n_tokens, len(choices[p][c]))
    return out


def _predicted_choice(score: Sequence[tuple[float, int, int]], per_char: bool) -> int:
    values = [logprob / n_chars if per_char else logprob for logprob, _, n_chars in score]
    return int(np.argmax(values))  # ties go to the first option, as np.argmax in lm-evaluation-harness


def benchmark_metrics(records: Sequence[dict], scores: Sequence[Sequence[tuple[float, int, int]]]) -> dict:
    """Accuracy of log-likelihood multiple choice, overall and per split, with counts.

    accuracy = mean_i [argmax_j LL_ij == answer_i], LL_ij = sum of the choice's token log-probabilities;
    acc_norm = mean_i [argmax_j LL_ij / n_chars_ij == answer_i], the per-character normalisation of
    lm-evaluation-harness (Gao et al., 2021), which removes the bias towards short options.
    A split with no items reports None.
    """
    if len(records) != len(scores):
        raise ValueError(f"got {len(records)} benchmark records but {len(scores)} score lists; score every record")
    hits: dict[str, list[tuple[bool, bool]]] = {split: [] for split in BENCHMARK_SPLITS}
    for record, score in zip(records, scores):
        n_choices = len(record["choices"]) if "choices" in record else len(score)
        if len(score) != n_choices:
            raise ValueError(f"record {record.get('id')!r} has {n_choices} choices but {len(score)} scores")
        answer = record["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(score):
            raise ValueError(f"record {record.get('id')!r}: answer {answer!r} is not an index into its "
                             f"{len(score)} choices")
        split = record.get("split", "unsplit")
        hits.setdefault(split, []).append((_predicted_choice(score, False) == answer,
                                           _predicted_choice(score, True) == answer))

    def summary(rows: list[tuple[bool, bool]]) -> dict:
        if not rows:
            return {"accuracy": None, "acc_norm": None, "count": 0}
        return {"accuracy": float(np.mean([r[0] for r in rows])), "acc_norm": float(np.mean([r[1] for r in rows])),
                "count": len(rows)}

    everything = [row for rows in hits.values() for row in rows]
    if not everything:
        raise ValueError("no benchmark records to score; check benchmark.jsonl")
    return {**summary(everything), "by_split": {split: summary(rows) for split, rows in hits.items()}}


# --------------------------------------------------------------------------------------------------------------
# 2. Generation
# --------------------------------------------------------------------------------------------------------------

def _stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn `<|end|>` where the vocabulary has it, the tokenizer's EOS, and the model's configured EOS ids."""
    ids = set()
    if END_OF_TURN in tokenizer.get_vocab():
        ids.add(int(tokenizer.convert_tokens_to_ids(END_OF_TURN)))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos token and no <|end|> token")
    return sorted(ids)


@torch.inference_mode()
def _generate_ids(model, tokenizer, texts: Sequence[str], max_new_tokens: int,
                  batch_size: int, start: bool = False) -> tuple[list[list[int]], list[int]]:
    """Greedy continuations of `texts`: (new token ids cut before the first stop token, tokens generated per text).

    Left padding keeps every prompt's last token in the last column, so one KV-cached decoding step serves the whole
    batch; `generate` derives position ids from the attention mask, so padding changes no prompt's positions.
    The generated count includes the stop token (it was computed) but not the padding after it. `start` puts the
    start token (BOS, else EOS) before each text, as plain text is scored (chat texts carry their own).
    """
    _check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = _model_device(model)
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    prefix = _start_tokens(tokenizer) if start else []
    encoded = [_encode(tokenizer, text) for text in texts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing; every prompt needs text")
    encoded = [prefix + ids for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    responses: list[list[int]] = [[] for _ in encoded]
    generated: list[int] = [0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            attention_mask[row, width - len(encoded[i]):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                eos_token_id=stop_ids, pad_token_id=pad_id,
                                temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(rows):
            new = output[row, width:].tolist()
            cut = next((k for k, token in enumerate(new) if token in stop_ids), None)
            responses[i] = new if cut is None else new[:cut]
            generated[i] = len(new) if cut is None else cut + 1
    return responses, generated


def generate_continuations(model, tokenizer, texts: Sequence[str], max_new_tokens: int,
                           batch_size: int, start: bool = False) -> list[str]:
    """Greedy, batched, KV-cached continuations of already formatted texts, decoded without special tokens
    (`start`: after the start token, for plain text)."""
    ids, _ = _generate_ids(model, tokenizer, texts, max_new_tokens, batch_size, start)
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]


def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Greedy chat responses: chat template with the generation prompt, left padding, KV cache, stop at
    `<|end|>` or EOS, decoded without special tokens and stripped. Equal to one-prompt-at-a-time generation."""
    return generate_continuations(model, tokenizer, [_chat_text(tokenizer, p) for p in prompts], max_new_tokens,
                                  batch_size)


def _synchronize(model) -> None:
    if _model_device(model).type == "cuda":
        torch.cuda.synchronize()


def generation_speed(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> dict:
    """New tokens per second of the batched path against one-prompt-at-a-time `generate`, on the same prompts.

    Both paths run greedy with the KV cache; new tokens count everything computed up to and including each
    response's stop token. A one-prompt warm-up first keeps one-off costs (allocations, kernel selection) out of
    both timings. `speedup` = batched tokens/s / sequential tokens/s; `identical_responses` checks that batching
    changed no response.
    """
    if not prompts:
        raise ValueError("generation_speed needs at least one prompt")
    texts = [_chat_text(tokenizer, p) for p in prompts]
    _generate_ids(model, tokenizer, texts[:1], max_new_tokens, 1)
    timings = {}
    for name, size in (("batched", batch_size), ("sequential", 1)):
        _synchronize(model)
        started = time.perf_counter()
        ids, generated = _generate_ids(model, tokenizer, texts, max_new_tokens, size)
        _synchronize(model)
        seconds = time.perf_counter() - started
        timings[name] = (ids, sum(generated), seconds)
    batched_rate = timings["batched"][1] / timings["batched"][2]
    sequential_rate = timings["sequential"][1] / timings["sequential"][2]
    return {
        "n_prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "batched_new_tokens": timings["batched"][1], "batched_seconds": timings["batched"][2],
        "batched_tokens_per_s": batched_rate,
        "sequential_new_tokens": timings["sequential"][1], "sequential_seconds": timings["sequential"][2],
        "sequential_tokens_per_s": sequential_rate,
        "speedup": batched_rate / sequential_rate,
        "identical_responses": timings["batched"][0] == timings["sequential"][0],
        "device": str(_model_device(model)),
    }


# --------------------------------------------------------------------------------------------------------------
# 3. Instruction following
# --------------------------------------------------------------------------------------------------------------

def _rate(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def instruction_following(items: Sequence[dict], responses: Sequence[str]) -> tuple[dict, list[dict]]:
    """Constraint satisfaction of `responses` to the instruction suite `items` (FollowBench and IFEval metrics).

    With s_ij in {0, 1} the strict verdict on constraint j of item i (n_i constraints, m items):
      hard satisfaction rate HSR = (1/m) sum_i prod_j s_ij              (FollowBench, Jiang et al., 2024)
      soft satisfaction rate SSR = (1/m) sum_i (1/n_i) sum_j s_ij       (FollowBench)
      IFEval prompt-level accuracy      = HSR's formula                 (Zhou et al., 2023)
      IFEval instruction-level accuracy = sum_ij s_ij / sum_i n_i       (pooled over all constraints)
    each with the strict checker and with IFEval's loose one (the response also tried without its first/last line
    and without markdown emphasis). HSR and SSR are also given per level 1-5 (`hsr_by_level` keyed "1".."5").

    Returns (metrics, verdicts), verdicts[i] = {"strict": [bool per constraint], "loose": [...]}.
    """
    if len(items) != len(responses):
        raise ValueError(f"got {len(items)} suite items but {len(responses)} responses; generate one per item")
    if not items:
        raise ValueError("the instruction suite is empty; check instruction_suite.jsonl")
    verdicts, by_level = [], {}
    for item, response in zip(items, responses):
        if not item.get("constraints"):
            raise ValueError(f"suite item {item.get('id')!r} has no constraints; every suite item needs 1-5")
        strict = [bool(v) for v in check_response(response, item["constraints"])]
        loose = [bool(v) for v in check_response_loose(response, item["constraints"])]
        verdicts.append({"strict": strict, "loose": loose})
        by_level.setdefault(str(item["level"]), []).append(strict)

    def hard(rows): return _rate([float(all(r)) for r in rows])
    def soft(rows): return _rate([sum(r) / len(r) for r in rows])
    def pooled(rows): return float(sum(map(sum, rows)) / sum(map(len, rows)))

    strict_rows = [v["strict"] for v in verdicts]
    loose_rows = [v["loose"] for v in verdicts]
    levels = sorted(by_level, key=lambda level: (len(level), level))
    metrics = {
        "hard_satisfaction_rate": hard(strict_rows),
        "soft_satisfaction_rate": soft(strict_rows),
        "hsr_by_level": {level: hard(by_level[level]) for level in levels},
        "ssr_by_level": {level: soft(by_level[level]) for level in levels},
        "count_by_level": {level: len(by_level[level]) for level in levels},
        "ifeval_prompt_strict": hard(strict_rows),
        "ifeval_instruction_strict": pooled(strict_rows),
        "ifeval_prompt_loose": hard(loose_rows),
        "ifeval_instruction_loose": pooled(loose_rows),
        "suite_prompts": len(items),
        "suite_constraints": sum(map(len, strict_rows)),
    }
    return metrics, verdicts


# --------------------------------------------------------------------------------------------------------------
# 4. Chat quality
# --------------------------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation: what ROUGE-L and distinct-n compare."""
    return re.findall(r"\w+", text.lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def reference_chat_scores(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Reference-based chat score on MT-Bench's 0-10 scale: 10 x ROUGE-L F1 on lower-cased word tokens.

    ROUGE-L (Lin, 2004): with LCS the longest common subsequence of response words r and reference words g,
    P = LCS / |r|, R = LCS / |g|, F1 = 2PR / (P + R); an empty response scores 0.
    Why this score: offline and deterministic (CI has no judge), it rewards saying the reference's content in a
    sensible order rather than bag-of-words overlap, F1 penalises both padding and truncation, and ROUGE-L is the
    standard reference-based metric for open instruction following (Super-NaturalInstructions, Wang et al., 2022,
    found it tracks human ratings there). It measures closeness to one reference, not quality: use a judge for
    claims about quality.
    """
    if len(responses) != len(references):
        raise ValueError(f"got {len(responses)} responses but {len(references)} references; pass one per chat item")
    scores = []
    for i, (response, reference) in enumerate(zip(responses, references)):
        ref_words, resp_words = _words(reference), _words(response)
        if not ref_words:
            raise ValueError(f"chat reference {i} has no words; every chat item needs a reference answer")
        lcs = _lcs_length(resp_words, ref_words)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(resp_words), lcs / len(ref_words)
        scores.append(10.0 * 2 * precision * recall / (precision + recall))
    return scores


# --------------------------------------------------------------------------------------------------------------
# 5. Output-distribution shift
# --------------------------------------------------------------------------------------------------------------

def perplexities(model, tokenizer, texts: Sequence[str], batch_size: int, *, contexts: Sequence[str] | None = None,
                 max_length: int | None = None) -> np.ndarray:
    """Per-sample perplexity PPL(x) = exp(-(1/|x|) sum_t log p(x_t | x_<t)), batched (equal to unbatched).

    Without `contexts`, each text is scored after the start token (BOS, else EOS), so every token counts. With
    `contexts` (e.g. chat prompts), text i is scored as the response to prompt i: the context is rendered with the
    chat template and only the text's tokens count. Texts longer than `max_length` tokens in all (default: the
    model's `max_position_embeddings`) are cut to fit; the cut is the perplexity of the text's beginning.
    """
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(contexts)} contexts; pass one context per text or none")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    pairs = []
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"text {i} is empty; perplexity needs at least one token")
        if contexts is None:
            context_ids, text_ids = _start_tokens(tokenizer), _encode(tokenizer, text)
        else:
            # the generation prompt ends in a newline that belongs to the prompt (not lm-eval's pair rule here)
            context_ids, text_ids = _encode(tokenizer, _chat_text(tokenizer, contexts[i])), _encode(tokenizer, text)
        room = max_length - len(context_ids)
        if room < 1:
            raise ValueError(f"context {i} alone fills max_length={max_length} tokens; shorten it or raise "
                             "max_length")
        pairs.append((context_ids, text_ids[:room]))
    scores = _continuation_logprobs(model, pairs, batch_size, _pad_id(tokenizer))
    return np.array([math.exp(-logprob / n) for logprob, n in scores], dtype=np.float64)


def perplexity_summary(ppl: Sequence[float]) -> dict:
    """Mean, population standard deviation (ddof=0) and median of per-sample perplexities."""
    values = np.asarray(ppl, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no perplexities to summarise; score at least one text")
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values))}


def template_leakage_rate(responses: Sequence[str], markers: Sequence[str]) -> float:
    """Share of responses that contain any SynthQA structural marker (e.g. "Question:", "Answer:"), case-sensitive,
    since the template's markers are capitalised and a lower-case "answer:" in prose is no leak."""
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers must be non-empty strings (the SynthQA templates' structural strings), "
                         f"got {markers!r}")
    if not responses:
        raise ValueError("no responses to check for template leakage")
    return float(np.mean([any(m in response for m in markers) for response in responses]))


# A leaked template shows in the first line of a continuation ("Answer: ..."); longer probes only cost time.
PROBE_NEW_TOKENS = 48


def plain_prompt_probes(suite: Sequence[dict], chat: Sequence[dict]) -> list[str]:
    """The prompts a model before SFT continues as plain text to test template leakage: each chat instruction and
    each instruction-suite base prompt once (its level-1 item), none of them in the SynthQA format."""
    return [r["prompt"] for r in chat] + [r["prompt"] for r in suite if r.get("level") == 1]


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): distinct word n-grams / all word n-grams over all responses.
    Lower means more repetitive, template-like output; 0.0 when the responses hold no n-gram."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [tuple(words[k:k + n]) for words in map(_words, responses) for k in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_response_words(responses: Sequence[str]) -> float:
    """Mean response length in whitespace-separated words."""
    if not responses:
        raise ValueError("no responses to measure")
    return float(np.mean([len(r.split()) for r in responses]))


@torch.inference_mode()
def next_token_kl(model, reference_model, tokenizer, prompts: Sequence[str], batch_size: int) -> float:
    """Mean over prompts of KL(p_model || p_reference) of the next-token distribution at the first response position.

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)), p = the evaluated model, q = the reference (the `natural` model),
    both given the chat template's generation prompt. Direction: the expectation is under the evaluated model's own
    distribution, so the KL weighs the tokens this model would actually emit and grows when it puts mass where the
    reference puts little (e.g. a "Question:" opening) -- the output shift the paper describes; it is also the
    direction of the KL penalty to a reference policy in RLHF and of this project's bias-mitigation loss.
    Both models must share the tokenizer's vocabulary.
    """
    _check_batch_size(batch_size)
    if not prompts:
        raise ValueError("next_token_kl needs at least one prompt")
    pad_id = _pad_id(tokenizer)
    encoded = [_encode(tokenizer, _chat_text(tokenizer, p)) for p in prompts]
    total = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        last = torch.tensor([len(s) - 1 for s in batch])
        log_probs = []
        for m in (model, reference_model):
            input_ids, attention_mask = _right_padded(batch, pad_id, _model_device(m))
            logits = m(input_ids=input_ids, attention_mask=attention_mask).logits
            log_probs.append(torch.log_softmax(logits[torch.arange(len(batch)), last.to(logits.device)].float(),
                                               dim=-1).cpu())
        if log_probs[0].shape != log_probs[1].shape:
            raise ValueError(f"the model and the reference model have different vocabularies "
                             f"({log_probs[0].shape[-1]} vs {log_probs[1].shape[-1]}); compare models that share "
                             "a tokenizer")
        log_p, log_q = log_probs
        total += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
    return total / len(encoded)


# --------------------------------------------------------------------------------------------------------------
# 6. The whole evaluation of one model
# --------------------------------------------------------------------------------------------------------------

def _require(records: list[dict], keys: tuple[str, ...], name: str) -> None:
    if not records:
        raise ValueError(f"{name} is empty; regenerate the data (stage 01) with items in every suite")
    for record in records:
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"{name}: record {record.get('id')!r} lacks {missing}; regenerate the data (stage 01)")


def _mean_or_none(values: list[float | None]) -> float | None:
    parsed = [v for v in values if v is not None]
    return float(np.mean(parsed)) if parsed else None


def evaluate_model(model, tokenizer, data_dir, out_dir, *, reference_model=None, markers: Sequence[str],
                   max_new_tokens: int, batch_size: int, limit: int | None = None, judge=None,
                   speed_prompts: int = 0, pre_sft_model=None) -> dict:
    """Evaluate one model on a stage-01 data folder; write `metrics.json`, `samples.jsonl`, `perplexities.csv`.

    data_dir holds benchmark.jsonl, instruction_suite.jsonl, chat.jsonl and heldout_nonsynth.jsonl; `limit` keeps
    the first N records of each (None or 0: all). `markers` are the SynthQA templates' structural strings.
    `reference_model` (the `natural` SFT model) enables `next_token_kl` (null without it). `judge` is any callable
    (question, reference, response) -> score in 1-10 or None when its output was unparseable (`synthflaw.judge`).
    `speed_prompts` > 0 also times batched against one-at-a-time generation on that many suite prompts.
    `pre_sft_model` (the CPT or unlearned checkpoint this model was fine-tuned from) is scored on the benchmark too:
    `pre_sft_benchmark_*` is base capability as the paper reports it (knowledge benchmarks measure the pre-trained
    model; SFT on a small model also erodes knowledge, which the post-SFT `benchmark_*` shows). The same checkpoint
    gets `pre_sft_perplexity` on the held-out NonSynth documents and `pre_sft_template_leakage_rate` on plain-text
    continuations of `plain_prompt_probes` (null without a pre-SFT model).
    The metrics file is written last, so its presence means the other two are complete.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
    missing = [name for name in DATA_FILES if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {missing}; point data_dir at stage 01's output folder")
    data = {name: read_jsonl(data_dir / name)[:limit or None] for name in DATA_FILES}
    benchmark, suite, chat, heldout = (data[name] for name in DATA_FILES)
    _require(benchmark, ("id", "prompt", "choices", "answer", "split"), "benchmark.jsonl")
    _require(suite, ("id", "prompt", "level", "constraints"), "instruction_suite.jsonl")
    _require(chat, ("id", "prompt", "reference"), "chat.jsonl")
    _require(heldout, ("id", "text"), "heldout_nonsynth.jsonl")
    model.eval()
    if reference_model is not None:
        reference_model.eval()
    timings = {}

    started = time.perf_counter()
    prompts, choices = [r["prompt"] for r in benchmark], [r["choices"] for r in benchmark]
    scores = score_choices(model, tokenizer, prompts, choices, batch_size)
    bench = benchmark_metrics(benchmark, scores)
    pre_sft = None
    if pre_sft_model is not None:
        pre_sft_model.eval()
        pre_sft = benchmark_metrics(benchmark, score_choices(pre_sft_model, tokenizer, prompts, choices, batch_size))
    timings["benchmark_s"] = time.perf_counter() - started

    started = time.perf_counter()
    suite_responses = generate_responses(model, tokenizer, [r["prompt"] for r in suite], max_new_tokens, batch_size)
    chat_responses = generate_responses(model, tokenizer, [r["prompt"] for r in chat], max_new_tokens, batch_size)
    timings["generation_s"] = time.perf_counter() - started
    following, verdicts = instruction_following(suite, suite_responses)

    chat_scores = reference_chat_scores(chat_responses, [r["reference"] for r in chat])
    judge_scores = [None] * len(chat)
    if judge is not None:
        started = time.perf_counter()
        judge_scores = [judge(r["prompt"], r["reference"], response) for r, response in zip(chat, chat_responses)]
        timings["judge_s"] = time.perf_counter() - started

    started = time.perf_counter()
    ppl_heldout = perplexities(model, tokenizer, [r["text"] for r in heldout], batch_size)
    ppl_reference = perplexities(model, tokenizer, [r["reference"] for r in chat], batch_size,
                                 contexts=[r["prompt"] for r in chat])
    kl = None
    if reference_model is not None:
        kl = next_token_kl(model, reference_model, tokenizer, [r["prompt"] for r in suite], batch_size)
    # Before SFT: SFT on the same chats can erase the CPT model's shift (in the embedded study no SFT model leaks the
    # template), so the checkpoint SFT started from is measured too, on plain text (it has seen no chat template).
    ppl_pre_sft, probes, probe_responses = None, plain_prompt_probes(suite, chat), []
    if pre_sft_model is not None:
        ppl_pre_sft = perplexities(pre_sft_model, tokenizer, [r["text"] for r in heldout], batch_size)
        probe_responses = generate_continuations(pre_sft_model, tokenizer, probes,
                                                 min(PROBE_NEW_TOKENS, max_new_tokens), batch_size, start=True)
    timings["distribution_shift_s"] = time.perf_counter() - started

    responses = suite_responses + chat_responses
    metrics = {
        "benchmark_accuracy": bench["accuracy"],
        "benchmark_acc_norm": bench["acc_norm"],
        "benchmark_accuracy_by_split": {s: v["accuracy"] for s, v in bench["by_split"].items()},
        "benchmark_acc_norm_by_split": {s: v["acc_norm"] for s, v in bench["by_split"].items()},
        "benchmark_count_by_split": {s: v["count"] for s, v in bench["by_split"].items()},
        "pre_sft_benchmark_accuracy": pre_sft["accuracy"] if pre_sft else None,
        "pre_sft_benchmark_acc_norm": pre_sft["acc_norm"] if pre_sft else None,
        "pre_sft_benchmark_accuracy_by_split": (
            {s: v["accuracy"] for s, v in pre_sft["by_split"].items()} if pre_sft else None),
        **following,
        "chat_score": float(np.mean(chat_scores)),
        "chat_score_method": "10 x ROUGE-L F1 on lower-cased word tokens against the reference",
        "chat_judge_score": _mean_or_none(judge_scores),
        "chat_judge_unparseable": sum(s is None for s in judge_scores) if judge is not None else None,
        "perplexity": perplexity_summary(ppl_heldout),
        "perplexity_reference": perplexity_summary(ppl_reference),
        "template_leakage_rate": template_leakage_rate(responses, markers),
        "template_leakage_rate_suite": template_leakage_rate(suite_responses, markers),
        "template_leakage_rate_chat": template_leakage_rate(chat_responses, markers),
        "response_words": mean_response_words(responses),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "next_token_kl": kl,
        "pre_sft_perplexity": perplexity_summary(ppl_pre_sft) if ppl_pre_sft is not None else None,
        "pre_sft_template_leakage_rate": (template_leakage_rate(probe_responses, markers) if probe_responses
                                          else None),
        "counts": {"benchmark": len(benchmark), "instruction_suite": len(suite), "chat": len(chat),
                   "heldout_nonsynth": len(heldout),
                   "pre_sft_probes": len(probe_responses)},
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit,
                     "markers": list(markers), "judge": type(judge).__name__ if judge is not None else None},
    }
    if speed_prompts:
        metrics["generation_speed"] = generation_speed(model, tokenizer, [r["prompt"] for r in suite[:speed_prompts]],
                                                       max_new_tokens, batch_size)
    metrics["timings"] = timings

    samples = []
    for record, score in zip(benchmark, scores):
        samples.append({"task": "benchmark", "id": record["id"], "prompt": record["prompt"],
                        "choices": record["choices"], "split": record["split"], "answer": record["answer"],
                        "predicted": _predicted_choice(score, False), "predicted_norm": _predicted_choice(score, True),
                        "logprobs": [s[0] for s in score]})
    for record, response, verdict in zip(suite, suite_responses, verdicts):
        samples.append({"task": "instruction", "id": record["id"], "prompt": record["prompt"],
                        "level": record["level"], "response": response, "constraints": record["constraints"],
                        "verdicts": verdict["strict"], "verdicts_loose": verdict["loose"],
                        "all_followed": all(verdict["strict"]),
                        "template_leak": any(m in response for m in markers)})
    for record, response, score, judged, ppl in zip(chat, chat_responses, chat_scores, judge_scores, ppl_reference):
        samples.append({"task": "chat", "id": record["id"], "prompt": record["prompt"], "response": response,
                        "reference": record["reference"], "reference_score": score, "judge_score": judged,
                        "reference_perplexity": float(ppl), "template_leak": any(m in response for m in markers)})
    for prompt, response in zip(probes, probe_responses):
        samples.append({"task": "pre_sft_continuation", "prompt": prompt, "response": response,
                        "template_leak": any(m in response for m in markers)})

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["set", "id", "perplexity"])
    writer.writerows([("heldout_nonsynth", r["id"], repr(float(p))) for r, p in zip(heldout, ppl_heldout)])
    writer.writerows([("chat_reference", r["id"], repr(float(p))) for r, p in zip(chat, ppl_reference)])
    if ppl_pre_sft is not None:
        writer.writerows([("pre_sft_heldout_nonsynth", r["id"], repr(float(p))) for r, p in zip(heldout, ppl_pre_sft)])

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_text_atomic(out_dir / "perplexities.csv", table.getvalue())
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


def make_judge(cfg):
    """The optional chat judge named by the `evaluate` config section (None when no judge is set)."""
    from synthflaw.judge import LocalJudge, OpenAICompatibleJudge
    if not cfg.judge:
        return None
    if cfg.judge_endpoint:
        return OpenAICompatibleJudge(cfg.judge_endpoint, cfg.judge, cfg.judge_api_key_env)
    return LocalJudge(cfg.judge)


def run(cfg, step) -> dict:
    """Stage 07 entry point: evaluate the SFT model named by the step's variant.

    The `natural` SFT model, when it has finished, is the reference of the next-token KL (the shift is measured
    from the control).
    """
    from synthflaw.base_model import load_model, load_tokenizer

    if not step.variant:
        raise ValueError("07_evaluate needs a variant: the model to evaluate (a CPT branch or unlearn-<method>)")
    data_dir = step.upstream("01_generate_data") / "data"
    model_dir = step.upstream("06_sft", step.variant) / "model"
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    # the checkpoint SFT started from (same tokenizer): its benchmark score is the pre-SFT base capability
    pre_sft = load_model(step.run_dir / json.loads((model_dir.parent / "result.json").read_text())["started_from"])
    reference = None
    natural = type(step)(step.run_dir, "06_sft", "natural")
    if natural.done:
        reference = load_model(natural.path / "model")
    markers = [m for t in json.loads((data_dir / "synthqa_templates.json").read_text())["templates"]
               for m in t["markers"]]
    ev = cfg.evaluate
    metrics = evaluate_model(model, tokenizer, data_dir, step.path, reference_model=reference, markers=markers,
                             max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, limit=ev.limit or None,
                             judge=make_judge(ev), speed_prompts=ev.speed_prompts, pre_sft_model=pre_sft)
    keys = ("benchmark_accuracy", "pre_sft_benchmark_accuracy", "hard_satisfaction_rate", "soft_satisfaction_rate",
            "chat_score", "template_leakage_rate", "pre_sft_template_leakage_rate", "next_token_kl")
    summary = {"model": step.variant, **{k: metrics.get(k) for k in keys}}
    if ev.harness_tasks:  # after evaluate_model: the harness reseeds the global RNGs
        from synthflaw.harness import run_harness
        summary.update(run_harness(model, tokenizer, ev.harness_tasks, step.path, batch_size=ev.batch_size,
                                   limit=ev.limit or None,
                                   num_fewshot=None if ev.harness_num_fewshot < 0 else ev.harness_num_fewshot,
                                   seed=cfg.seed))
    return summary


def show_samples(samples_path, n: int = 6) -> str:
    """The first `n` instruction-following samples with their per-constraint verdicts, for reading in a notebook."""
    rows = [r for r in read_jsonl(Path(samples_path)) if r.get("task") == "instruction"][:n]
    parts = []
    for r in rows:
        verdicts = ", ".join(f"{c['type']}={'ok' if v else 'FAIL'}" for c, v in zip(r["constraints"], r["verdicts"]))
        parts.append(f"--- level {r.get('level')}: {r['prompt']}\n>>> {r['response']}\n[{verdicts}]")
    return "\n\n".join(parts)
