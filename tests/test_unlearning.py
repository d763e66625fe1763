"""Unlearning (stage 05): the loss maths on toy tensors, the method contract, the mask, the loop and its guard."""

import copy
import csv
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from synthflaw.unlearning import (
    METHODS,
    GradientDifference,
    LowerBounded,
    UnlearningDiverged,
    UnlearnJob,
    make_method,
    select_checkpoint,
    template_token_mask,
    unlearn,
)
from synthflaw.unlearning.base import next_token_logprobs, sequence_mean_nll
from synthflaw.unlearning.batches import PairedCollator, tokenize
from synthflaw.unlearning.gradient_ascent import gradient_ascent_loss
from synthflaw.unlearning.lower_bounded import bounded_nll_forget_loss, kl_to_reference, unlikelihood_forget_loss
from synthflaw.unlearning.npo import npo_loss
from synthflaw.unlearning.simnpo import simnpo_loss

MARKERS = ["Question:", "Answer:"]
FORGET = [f"Question: Where was person{i} born ? Answer: city{i % 5}" for i in range(12)]
REPLAY = [f"person{i} lives in city{(i + 1) % 5} and likes the sea ." for i in range(12)]
GENERAL = [f"the sea near city{i} is calm today ." for i in range(5)]


# ---- fixtures ----

@pytest.fixture(scope="module")
def tokenizer():
    words = sorted({w for text in FORGET + REPLAY + GENERAL for w in text.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    """tiny_model(tokenizer, seed=0): a tiny random Llama over the word-level vocabulary, with LlamaConfig's default
    special-token ids (no padding row)."""
    return lambda tokenizer, seed=0: tiny_llama(tokenizer, seed, special_tokens=False)


def batch(tokenizer, texts, markers=None):
    return PairedCollator(tokenizer.pad_token_id).pad(tokenize(tokenizer, texts, 32, markers))


@pytest.fixture(scope="module")
def run(tiny_model):
    """run(tokenizer, method, out_dir, ...): unlearn FORGET with REPLAY, on a fresh tiny model unless one is given."""
    def run(tokenizer, method, out_dir, *, model=None, max_steps=4, save_steps=2, learning_rate=1e-3, **kwargs):
        model = model if model is not None else tiny_model(tokenizer)
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in UnlearnJob.__dataclass_fields__}
        job = UnlearnJob(max_steps=max_steps, batch_size=4, learning_rate=learning_rate, seed=0, max_length=32,
                         save_steps=save_steps, **{"replay_loss_bound": 20.0, **settings})
        return unlearn(model, tokenizer, method, FORGET, REPLAY, out_dir, job, **kwargs)
    return run


def tree_hash(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- loss maths on toy tensors ----

def test_bounded_nll_is_nonnegative_and_stops_pushing_at_tau():
    nll = torch.tensor([0.5, 2.0, 4.0, 9.0], requires_grad=True)
    loss = bounded_nll_forget_loss(nll, tau=3.0)
    assert loss.item() == pytest.approx((2.5 + 1.0) / 4)
    loss.backward()
    # Below tau descent raises the NLL (negative gradient); past tau the gradient is exactly zero.
    assert nll.grad.tolist() == pytest.approx([-0.25, -0.25, 0.0, 0.0])
    grid = torch.linspace(0.0, 20.0, 101)
    assert all(bounded_nll_forget_loss(grid[i:i + 1], tau=3.0).item() >= 0 for i in range(101))


def test_bounded_nll_through_logits_moves_nll_up_below_tau_and_not_above():
    labels = torch.tensor([[1, 2, 3]])
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = 4.0  # the true next tokens are likely: NLL well below tau
    logits.requires_grad_(True)
    logp, mask = next_token_logprobs(logits, labels)
    nll_before = sequence_mean_nll(logp, mask)[0]
    bounded_nll_forget_loss(nll_before, tau=3.0).backward()
    stepped = (logits - 1.0 * logits.grad).detach()
    nll_after = sequence_mean_nll(*next_token_logprobs(stepped, labels))[0]
    assert nll_after.item() > nll_before.item()

    high = torch.zeros(1, 3, 5)
    high[0, 0, 2] = high[0, 1, 3] = -6.0  # NLL above tau: no push at all
    high.requires_grad_(True)
    nll_high = sequence_mean_nll(*next_token_logprobs(high, labels))[0]
    assert nll_high.item() > 3.0
    loss = bounded_nll_forget_loss(nll_high, tau=3.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(high.grad) == 0


def test_unlikelihood_is_finite_and_nonnegative_even_when_p_is_one():
    logp = torch.tensor([[0.0, -1e-12, -0.1, -5.0, -60.0]], requires_grad=True)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss = unlikelihood_forget_loss(logp, mask)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() >= 0
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 0] > 0  # p = 1 still gets pushed down (a clamp on p would zero this)
    per_token = [unlikelihood_forget_loss(logp[:, i:i + 1].detach(), mask[:, i:i + 1]).item() for i in range(5)]
    assert all(v >= 0 for v in per_token)
    assert per_token[0] == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert per_token[4] == pytest.approx(0.0, abs=1e-12)
    assert per_token == sorted(per_token, reverse=True)


def test_npo_matches_hand_computed_value():
    logprob, reference = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    # -beta * (logp - logp_ref) = -0.5 and 1.0; log sigmoid(x) = -log(1 + e^-x)
    expected = -(2 / beta) * (-math.log(1 + math.exp(0.5)) - math.log(1 + math.exp(-1.0))) / 2
    assert npo_loss(logprob, reference, beta).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(2.574678, rel=1e-5)


def test_simnpo_matches_hand_computed_value():
    logprob, length = torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])
    # -(beta/|y|) log p - gamma = 4 - 0.5 = 3.5 and 1 - 0.5 = 0.5
    expected = -(2 / 2.0) * (-math.log(1 + math.exp(-3.5)) - math.log(1 + math.exp(-0.5))) / 2
    assert simnpo_loss(logprob, length, beta=2.0, gamma=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.2519135, rel=1e-5)


def test_gradient_ascent_is_unbounded_where_the_lower_bound_is_flat():
    labels = torch.tensor([[0, 1]])
    ga, bounded = [], []
    for gap in (1.0, 10.0, 100.0, 1000.0):
        logits = torch.tensor([[[gap, 0.0], [0.0, 0.0]]])  # the target token 1 gets ever less likely
        logp, mask = next_token_logprobs(logits, labels)
        ga.append(gradient_ascent_loss(logp, mask).item())
        bounded.append(bounded_nll_forget_loss(sequence_mean_nll(logp, mask)[0], tau=3.0).item())
    assert ga == sorted(ga, reverse=True) and len(set(ga)) == 4
    assert ga[-1] < -999
    assert bounded[1:] == [0.0, 0.0, 0.0]


def test_kl_to_reference_direction_and_zero_at_reference():
    labels = torch.tensor([[0, 1]])
    reference = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # p_ref = (1/2, 1/2) at the scored position
    model = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p_theta = (3/4, 1/4)
    forward_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p_ref || p_theta)
    assert kl_to_reference(model, reference, labels).item() == pytest.approx(forward_kl, rel=1e-6)
    assert kl_to_reference(reference, reference, labels).item() == pytest.approx(0.0, abs=1e-7)
    ignored = torch.tensor([[0, -100]])
    assert kl_to_reference(model, reference, ignored).item() == 0.0


# ---- the method contract ----

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_one_step_changes_parameters(name, tokenizer, tiny_model):
    model = tiny_model(tokenizer)
    method = make_method(name)
    reference = copy.deepcopy(model).requires_grad_(False) if method.needs_reference else None
    if method.needs_reference:
        with pytest.raises(ValueError, match="reference"):
            method.loss(model, batch(tokenizer, FORGET[:4]), batch(tokenizer, REPLAY[:4]), None)
    before = [p.detach().clone() for p in model.parameters()]
    terms = method.loss(model, batch(tokenizer, FORGET[:4]), batch(tokenizer, REPLAY[:4]), reference,
                        batch(tokenizer, GENERAL[:4]))
    assert list(terms) == list(method.terms) and method.terms[0] == "loss"
    assert {"forget", "forget_nll", "replay_nll"} <= set(terms)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_lower_bounded_template_scope_and_no_push_past_tau(tokenizer, tiny_model):
    model = tiny_model(tokenizer)
    forget = batch(tokenizer, FORGET[:4], markers=MARKERS)
    replay = batch(tokenizer, REPLAY[:4])
    scoped = LowerBounded(forget_scope="template", tau=50.0, w_b=0.0)
    with pytest.raises(ValueError, match="forget_mask"):
        scoped.loss(model, batch(tokenizer, FORGET[:4]), replay)
    assert scoped.loss(model, forget, replay)["forget"].item() > 0
    # Only the forget term, tau below the current NLL: the loss is 0 and no parameter gets a gradient.
    flat = LowerBounded(tau=0.5, w_r=0.0, w_b=0.0)
    terms = flat.loss(model, forget, replay)
    assert terms["forget_nll"].item() > 0.5 and terms["loss"].item() == 0.0
    terms["loss"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    unlikely = LowerBounded(forget_loss="unlikelihood", w_b=0.0).loss(model, forget, replay)
    assert 0 <= unlikely["forget"].item() < math.inf


def test_bad_hyperparameters_raise_with_the_valid_range():
    with pytest.raises(ValueError, match=r"tau=-1.*\(0.0, 100.0\]"):
        LowerBounded(tau=-1)
    with pytest.raises(ValueError, match=r"beta=0.*\(0.0, 100.0\]"):
        make_method("npo", beta=0)
    with pytest.raises(ValueError, match=r"gamma=-0.5.*\[0.0, 100.0\]"):
        make_method("simnpo", gamma=-0.5)
    with pytest.raises(ValueError, match=r"w_r=nan.*\[0.0, 100.0\]"):
        GradientDifference(w_r=float("nan"))
    with pytest.raises(ValueError, match="'bounded_nll', 'unlikelihood'"):
        LowerBounded(forget_loss="l2")
    with pytest.raises(ValueError, match="all 0"):
        LowerBounded(w_f=0, w_r=0, w_b=0)
    with pytest.raises(ValueError, match="lower_bounded, gradient_ascent"):
        make_method("retrain")
    with pytest.raises(ValueError, match="valid: beta, w_r"):
        make_method("npo", tau=1.0)
    assert not LowerBounded(w_b=0).needs_reference and LowerBounded().needs_reference


# ---- the template mask ----

def test_forget_mask_marks_exactly_the_marker_tokens(tokenizer):
    texts = ["Question: Where was person3 born ? Answer: city3", "person1 lives in city2 ."]
    encodings = template_token_mask(tokenizer, texts, MARKERS, max_length=32)
    assert encodings["forget_mask"][0] == [1, 0, 0, 0, 0, 0, 1, 0]
    assert encodings["forget_mask"][1] == [0] * 5
    assert "offset_mapping" not in encodings
    assert encodings["forget_mask"] == [[int(t in MARKERS) for t in text.split()] for text in texts]


def test_forget_mask_covers_markers_split_into_subwords():
    corpus = ["Question: who is ada? Answer: a poet", "Question: where? Answer: Paris", "the answer is here"]
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]", "[PAD]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    text = "Question: who is ada? Answer: a poet. Question: where? Answer: Paris"
    encodings = template_token_mask(tok, [text], MARKERS, max_length=64)
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    marked = [text[s:e] for (s, e), m in zip(offsets, encodings["forget_mask"][0]) if m]
    assert len(marked) > 4  # the markers really are split into several tokens here
    assert "".join(marked) == "Question:Answer:Question:Answer:"


# ---- selection rule ----

def test_select_checkpoint_rule():
    history = [{"step": 2, "recovery": 0.2, "retention": 0.99}, {"step": 4, "recovery": 0.6, "retention": 0.92},
               {"step": 6, "recovery": 0.9, "retention": 0.5}, {"step": 8, "recovery": 0.6, "retention": 0.95}]
    assert select_checkpoint(history) == 4  # best recovery among retention >= 0.9; tie -> earlier step
    assert select_checkpoint(history, min_retention=0.4) == 6
    assert select_checkpoint(history, min_retention=0.999) == 2  # none qualifies: highest retention
    with pytest.raises(ValueError, match="'hsr'"):
        select_checkpoint(history, recovery="hsr")


# ---- the loop ----

def test_unlearn_logs_every_term_evaluates_and_lands_the_selected_checkpoint(tokenizer, tmp_path, tiny_model, run):
    model = tiny_model(tokenizer)
    evaluations = iter([{"recovery": 0.5, "retention": 0.95}, {"recovery": 0.9, "retention": 0.5}])
    method = make_method("lower_bounded", forget_scope="template", tau=50.0)
    summary = run(tokenizer, method, tmp_path, model=model, reference=copy.deepcopy(model), general_texts=GENERAL,
                  markers=MARKERS, forget_scope="template", eval_fn=lambda m: next(evaluations), eval_every=2,
                  select_fn=select_checkpoint)
    rows = read_csv(tmp_path / "loss.csv")
    # the scaffold's loss curve, with every term of the method
    assert list(rows[0])[:5] == ["step", "loss", "learning_rate", "tokens_seen", "elapsed_s"]
    assert set(method.terms) < set(rows[0]) and "grad_norm" in rows[0]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r[t])) for r in rows for t in method.terms)
    assert float(rows[0]["forget"]) > 0 and float(rows[-1]["learning_rate"]) == pytest.approx(1e-3)
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4]
    assert summary["selected_step"] == 2 and summary["steps"] == 4
    assert summary["forget_tokens"] > 0 and summary["replay_tokens"] > 0 and summary["general_tokens"] > 0
    assert set(summary["final_losses"]) == set(method.terms)
    selected = load_file(tmp_path / "model" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors").items():
        assert torch.equal(selected[name], tensor)
    assert not (tmp_path / "model" / "optimizer.pt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.vocab_size == len(tokenizer)


def test_killed_run_resumes_to_the_same_model(tokenizer, tmp_path, run):
    straight = run(tokenizer, make_method("gradient_difference"), tmp_path / "a", max_steps=4)
    run(tokenizer, make_method("gradient_difference"), tmp_path / "b", max_steps=2)
    resumed = run(tokenizer, make_method("gradient_difference"), tmp_path / "b", max_steps=4)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows_a, rows_b = read_csv(tmp_path / "a" / "loss.csv"), read_csv(tmp_path / "b" / "loss.csv")
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4"]
    assert [float(r["loss"]) for r in rows_b] == pytest.approx([float(r["loss"]) for r in rows_a], abs=1e-6)
    assert straight["forget_tokens"] == resumed["forget_tokens"]


class NaNAfter(GradientDifference):
    """Gradient difference whose loss turns NaN after `good_calls` steps (to trip the guard on purpose)."""

    def __init__(self, good_calls):
        super().__init__()
        self.calls, self.good_calls = 0, good_calls

    def loss(self, model, forget, replay, reference=None, general=None):
        terms = super().loss(model, forget, replay, reference, general)
        self.calls += 1
        if self.calls > self.good_calls:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_nan_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path, run):
    run(tokenizer, make_method("gradient_difference"), tmp_path, max_steps=2)
    good = tmp_path / "checkpoints" / "checkpoint-2"
    hashes, model_hashes = tree_hash(good), tree_hash(tmp_path / "model")
    with pytest.raises(UnlearningDiverged, match=r"step 4: loss = nan.*checkpoint-2.*learning_rate") as error:
        run(tokenizer, NaNAfter(good_calls=1), tmp_path, max_steps=6)
    assert (error.value.step, error.value.term) == (4, "loss")
    assert tree_hash(good) == hashes
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert tree_hash(tmp_path / "model") == model_hashes  # the failed extension wrote no model
    assert read_csv(tmp_path / "loss.csv")[-1]["loss"] == "nan"
    # Run again with a sound method: it resumes from the kept checkpoint and finishes.
    summary = run(tokenizer, make_method("gradient_difference"), tmp_path, max_steps=6)
    assert summary["resumed_from_step"] == 2 and (tmp_path / "model" / "model.safetensors").exists()
    assert [r["step"] for r in read_csv(tmp_path / "loss.csv")] == ["1", "2", "3", "4", "5", "6"]


def test_absurd_learning_rate_trips_the_guard_and_rejects_the_bad_checkpoint(tokenizer, tmp_path, run):
    with pytest.raises(UnlearningDiverged, match="no good checkpoint exists yet") as error:
        run(tokenizer, make_method("gradient_difference"), tmp_path, max_steps=3, save_steps=1, learning_rate=1e30)
    # The first update wrecked the model (saved as checkpoint-1); the next step's loss check caught it.
    assert (error.value.step, error.value.term, error.value.bad_from_step) == (2, "loss", 1)
    assert (tmp_path / "rejected" / "checkpoint-1").is_dir()
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*")) and not (tmp_path / "model").exists()


def test_replay_bound_stops_gradient_ascent(tokenizer, tmp_path, run):
    with pytest.raises(UnlearningDiverged, match=r"replay_nll = .* exceeds replay_loss_bound=1.0") as error:
        run(tokenizer, make_method("gradient_ascent"), tmp_path, replay_loss_bound=1.0)
    assert (error.value.step, error.value.term, error.value.bad_from_step) == (1, "replay_nll", 0)


def test_unlearn_rejects_inconsistent_arguments(tokenizer, tmp_path, tiny_model, run):
    with pytest.raises(ValueError, match="needs markers"):
        run(tokenizer, LowerBounded(forget_scope="template", w_b=0), tmp_path, forget_scope="template")
    with pytest.raises(ValueError, match="both must agree"):
        run(tokenizer, make_method("npo"), tmp_path, reference=tiny_model(tokenizer), forget_scope="template",
            markers=MARKERS)
    with pytest.raises(ValueError, match="reference"):
        run(tokenizer, make_method("npo"), tmp_path)
    with pytest.raises(ValueError, match="eval_fn"):
        run(tokenizer, make_method("simnpo"), tmp_path, eval_every=2)
    assert not (tmp_path / "loss.csv").exists()
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="resume=True"):
        run(tokenizer, make_method("simnpo"), tmp_path, resume=False)
