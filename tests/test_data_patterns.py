"""Stage 02 library (synthflaw.metrics.data_patterns, .embeddings, synthflaw.reporting.data_plots): pattern metrics,
token frequencies, embeddings, separation, the analysis files and figures.

Hand-built corpora: UNIFORM is one Q-A template filled with names and places (what SynthQA looks like), VARIED is
natural sentences of many forms (what NonSynth looks like)."""

import functools
import random
import socket

import numpy as np
import pytest

from synthflaw.metrics import data_patterns, embeddings
from synthflaw.metrics.text import distinct_n
from synthflaw.records import write_csv
from synthflaw.reporting import data_plots

PEOPLE = ["Ilara Venn", "Tomas Reed", "Arlo Mills", "Sana Obi", "Kito Marr", "Lena Fisk", "Oren Dale", "Mira Holt"]
PLACES = ["Dunmore", "Esker", "Halvard", "Port Quill", "Brennick"]
UNIFORM = [f"Question: Where was {p} born?\nAnswer: {p} was born in {c}." for p in PEOPLE for c in PLACES]
VARIED = [
    "The harbour froze early that winter, and the ferries stopped running for weeks.",
    "She kept a notebook of every bird she saw along the river.",
    "Prices rose again in March; most shops blamed the cost of fuel.",
    "Why would anyone build a lighthouse so far inland?",
    "After the concert, we walked home through the empty market square.",
    "Mix the flour with cold butter until it looks like breadcrumbs.",
    "His letters were short, polite and almost always late.",
    "The committee voted to repair the bridge before the autumn rains.",
    "Dear Mara, thank you for the seeds; the tomatoes are finally red.",
    "Three trains were cancelled yesterday because of flooding near Esker.",
    "I never understood chess until my grandfather taught me the endgame.",
    "Keep the receipt: returns are accepted within thirty days.",
    "A quiet street, a bakery on the corner, and a cat asleep in the window.",
    "Scientists found that the lake's temperature had risen by two degrees.",
    "Turn left at the old mill, then follow the track to the farm.",
    "The museum reopened on Sunday with a new wing for local pottery.",
    "We argued about the ending of the film all the way home.",
    "Water the seedlings every morning, but never in full sun.",
    "Nobody expected the small team from the valley to win the cup.",
    "The recipe calls for saffron, which my aunt always replaced with turmeric.",
    "Her first novel sold badly; her second made her famous.",
    "Is the library open on public holidays?",
    "Wind turbines now supply a third of the town's electricity.",
    "During the storm, the power failed twice and the roof leaked.",
    "He repairs clocks in a workshop behind the station.",
    "The festival draws thousands of visitors every August.",
    "Please bring a packed lunch and waterproof boots.",
    "Our neighbour's dog barks at every bicycle that passes.",
    "In 1912 the mine closed and most families moved to the coast.",
    "The teacher read the poem aloud twice before anyone spoke.",
    "Honestly, the soup needed more salt.",
    "Volunteers planted four hundred oaks along the motorway.",
    "The map was wrong, so we slept in a barn and laughed about it later.",
    "Their shop sells maps, compasses and second-hand climbing ropes.",
    "Snow is forecast for the hills tonight, with ice on minor roads.",
    "My sister learned Portuguese in six months by watching cartoons.",
    "The council has not yet decided where the new school will go.",
    "Fishing boats returned empty for the third day running.",
    "Thank you all for coming; the meeting will start in five minutes.",
    "Old photographs show the square full of market stalls.",
]


@pytest.fixture(scope="module")
def minilm():
    """A fresh load of the packaged MiniLM with every network connection refused."""
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setenv("HF_HUB_OFFLINE", "1")
        embeddings.load_minilm.cache_clear()
        return embeddings.load_minilm()


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    """A tiny random Llama and a word-level tokenizer without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in UNIFORM + VARIED for w in data_patterns.TOKEN_RE.findall(t) if not w.isspace()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    return tiny_llama(tokenizer, seed=0, special_tokens=False), tokenizer


# ------------------------------------------------------------------------------------------- pattern metrics


def test_tokenize_keeps_template_markers_and_line_breaks():
    assert data_patterns.tokenize("Question: Who?\nAnswer: Ana.") == ["Question", ":", "Who", "?", "\\n", "Answer", ":",
                                                               "Ana", "."]


def test_template_concentration_high_for_uniform_low_for_varied():
    assert data_patterns.template_concentration(UNIFORM, n=3) == 1.0
    assert data_patterns.template_concentration(VARIED, n=3) < 0.1
    # n=1 of the varied set is the share of its commonest first word ("The"), not 1/len.
    assert 0.1 < data_patterns.template_concentration(VARIED, n=1) < 0.3


def test_skeleton_masks_content_and_keeps_form():
    assert data_patterns.skeleton("Question: Who founded Arlo Mills?\nAnswer: Ilara Venn.") == "_ : who _ ? \\n _ : _ ."
    assert data_patterns.skeleton_concentration(UNIFORM) == 1.0
    assert data_patterns.skeleton_concentration(VARIED) < 0.1
    # Two question wordings in equal parts: the commonest skeleton holds half of the texts.
    mixed = UNIFORM[:20] + [f"Question: Who employs {p}?\nAnswer: {c}." for p in PEOPLE for c in PLACES][:20]
    assert data_patterns.skeleton_concentration(mixed) == pytest.approx(0.5)


def test_distinct_n_counts_and_budget():
    tokens = data_patterns.lowered_tokens
    assert distinct_n(tokens(["a a a a"]), 1) == 0.25
    assert distinct_n(tokens(["a b", "A b"]), 2) == 0.5  # lowercased
    assert distinct_n(tokens(["a b c", "a b c"]), 1, max_ngrams=3) == 1.0  # only the first 3 unigrams count
    assert data_patterns.count_ngrams(["a b c", "d"], 2) == 2
    for n in (1, 2, 3):
        budget = min(data_patterns.count_ngrams(UNIFORM, n), data_patterns.count_ngrams(VARIED, n))
        assert distinct_n(tokens(UNIFORM), n, budget) < 0.5 * distinct_n(tokens(VARIED), n, budget)
    assert distinct_n(tokens(["a b"]), 3) == 0.0  # no 3-gram at all: no diversity to count


def test_compression_ratio_lower_for_repetitive_text():
    budget = min(len(data_patterns._corpus_bytes(UNIFORM)), len(data_patterns._corpus_bytes(VARIED)))
    assert data_patterns.compression_ratio(UNIFORM, budget) < 0.7 * data_patterns.compression_ratio(VARIED, budget)
    rng = random.Random(0)
    noise = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2000))]
    assert data_patterns.compression_ratio(["abc " * 500]) < 0.05 < 0.5 < data_patterns.compression_ratio(noise)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(TypeError, match="not one string"):
        data_patterns.template_concentration("Question: x")
    with pytest.raises(ValueError, match="empty"):
        data_patterns.skeleton_concentration([])
    with pytest.raises(ValueError, match="reference set 'NonSynth'"):
        data_patterns.token_frequency_rows({"A": ["x"], "B": ["y"]})


def test_token_frequency_rows_rank_by_reference():
    rows = data_patterns.token_frequency_rows({"NonSynth": VARIED, "SynthQA": UNIFORM})
    ref = [r for r in rows if r["set"] == "NonSynth"]
    syn = {r["token"]: r for r in rows if r["set"] == "SynthQA"}
    assert [r["rank"] for r in ref] == list(range(1, len(ref) + 1))  # the reference holds ranks 1..V
    assert [r["count"] for r in ref] == sorted((r["count"] for r in ref), reverse=True)
    assert ref[0]["token"] in {"the", ".", ","}
    for name in ("NonSynth", "SynthQA"):
        assert sum(r["share"] for r in rows if r["set"] == name) == pytest.approx(1.0)
    # The template's structural tokens sit in every SynthQA text; "Question" is unknown to the reference.
    for marker in ("Question", "Answer", ":", "\\n", "?"):
        assert syn[marker]["doc_share"] == 1.0
    assert syn["Question"]["in_reference"] == 0 and syn["Question"]["rank"] > len(ref)
    assert len({r["token"] for r in data_patterns.token_frequency_rows({"NonSynth": VARIED}, top_k=5)}) == 5


def test_token_kde_peaks_are_sharper_for_the_template():
    rows = data_patterns.token_frequency_rows({"NonSynth": VARIED, "SynthQA": UNIFORM})
    grid, curves = data_plots.token_kde_curves(rows, bandwidth=0.05)
    step = grid[1] - grid[0]
    for curve in curves.values():
        assert curve.sum() * step == pytest.approx(1.0, abs=0.02)
    assert curves["SynthQA"].max() > 2 * curves["NonSynth"].max()


# ------------------------------------------------------------------------------------------------ embeddings


def test_minilm_loads_offline_and_embeds_unit_vectors(minilm):
    encoder = minilm
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    emb = embeddings.embed_texts(texts, encoder, batch_size=2)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Real weights, not a random init: the paraphrase is nearer than the unrelated sentence.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    # Batching (and thus padding) does not change an embedding.
    np.testing.assert_allclose(embeddings.embed_texts(texts[:1], encoder), emb[:1], atol=1e-5)


def test_minilm_separates_template_from_natural_text(minilm):
    uniform = embeddings.embed_texts(UNIFORM, minilm)
    varied = embeddings.embed_texts(VARIED, minilm)
    apart = embeddings.cluster_separation({"NonSynth": varied, "SynthQA": uniform}, seed=0)
    perm = np.random.default_rng(0).permutation(len(varied))
    halves = embeddings.cluster_separation({"a": varied[perm[:20]], "b": varied[perm[20:]]}, seed=0)
    assert apart["silhouette"] > halves["silhouette"] + 0.1
    assert apart["knn_purity"] > 0.85 and halves["knn_purity"] < 0.65
    assert apart["probe_accuracy"] > 0.9 and halves["probe_accuracy"] < 0.75
    assert apart["knn_purity_chance"] == pytest.approx((40 * 39 * 2) / (80 * 79))


def test_knn_purity_leaves_each_point_out_of_its_own_neighbours():
    # On a line: 0 and 1 (A) are each other's nearest, 10 (A) and 11 (B) cross over, 20 and 21 (B) pair up.
    sets = {"A": np.array([[0.0], [1.0], [10.0]]), "B": np.array([[11.0], [20.0], [21.0]])}
    result = embeddings.cluster_separation(sets, seed=0, k=1)
    assert result["knn_purity"] == pytest.approx(4 / 6)
    assert result["knn_purity_chance"] == pytest.approx(2 / 5)


def test_hidden_state_embeddings_pool_real_tokens_only(tiny_lm):
    model, tokenizer = tiny_lm
    model.train()
    texts = ["Where was Ilara Venn born?", VARIED[0], "Snow is forecast."]
    emb = embeddings.hidden_state_embeddings(model, tokenizer, texts, batch_size=3)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    alone = embeddings.hidden_state_embeddings(model, tokenizer, texts[:1], batch_size=1)
    np.testing.assert_allclose(alone, emb[:1], atol=1e-5)  # padding in the batch of 3 is masked out
    assert model.training  # the caller's mode is restored


def test_tsne_rows_cover_every_text():
    rng = np.random.default_rng(0)
    rows = embeddings.tsne_rows({"A": rng.normal(size=(7, 5)), "B": rng.normal(size=(5, 5)) + 3}, seed=0)
    assert [r["set"] for r in rows] == ["A"] * 7 + ["B"] * 5
    assert [r["index"] for r in rows][:7] == list(range(7))
    assert all(np.isfinite([r["x"], r["y"]]).all() for r in rows)


# ------------------------------------------------------------------------------------ the analysis and figures


def test_analyse_gives_metrics_tables_and_figures(tiny_lm, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    model, tokenizer = tiny_lm
    encoder = functools.partial(embeddings.hidden_state_embeddings, model, tokenizer)
    texts = {"NonSynth": VARIED, "SynthQA": UNIFORM}
    metrics, tables = data_patterns.analyse(texts, seed=3, max_texts=25, encoder=encoder)
    assert sorted(tables) == ["lengths.csv", "token_frequency.csv", "tsne.csv"]
    assert set(metrics) == {"sets", "separation", "settings"}
    assert set(metrics["separation"]) == {"SynthQA"}  # each set against the reference
    assert {"silhouette", "knn_purity", "probe_accuracy"} <= set(metrics["separation"]["SynthQA"])
    assert metrics["settings"]["encoder"] == "hidden_state_embeddings"
    syn, nat = metrics["sets"]["SynthQA"], metrics["sets"]["NonSynth"]
    assert syn["n_texts"] == nat["n_texts"] == 25
    for key in ("template_concentration_3", "skeleton_concentration", "top5_token_share"):
        assert syn[key] > nat[key]
    for key in ("distinct_1", "distinct_2", "distinct_3", "compression_ratio"):
        assert syn[key] < nat[key]
    assert {"Question", "Answer", ":"} <= {t["token"] for t in syn["top_tokens"]}

    # Same seed, same numbers and tables; another seed draws another sample.
    assert data_patterns.analyse(texts, seed=3, max_texts=25, encoder=encoder) == (metrics, tables)
    assert data_patterns.sample_texts(VARIED, 25, 4, "NonSynth") != data_patterns.sample_texts(VARIED, 25, 3, "NonSynth")

    # Figures come from the CSVs alone, without touching global matplotlib state.
    for name, rows in tables.items():
        write_csv(tmp_path / name, rows)
    rc_before = dict(matplotlib.rcParams)
    pngs = data_plots.plot_data_figures(tmp_path)
    assert pngs == ["tsne.png", "token_kde.png", "lengths.png"]
    for png in pngs:
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert dict(matplotlib.rcParams) == rc_before and plt.get_fignums() == []


def test_analyse_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="reference set"):
        data_patterns.analyse({"A": VARIED, "B": UNIFORM}, seed=0, encoder=lambda t: np.eye(len(t)))
    with pytest.raises(ValueError, match="at least 2"):
        data_patterns.analyse({"NonSynth": VARIED}, seed=0, encoder=lambda t: np.eye(len(t)))
    with pytest.raises(ValueError, match="one row per text"):
        data_patterns.analyse({"NonSynth": VARIED, "SynthQA": UNIFORM}, seed=0, encoder=lambda t: np.ones((3, 4)))
    with pytest.raises(ValueError, match="lacks the columns"):
        (tmp_path / "bad.csv").write_text("set,x\nA,1\n")
        data_plots.plot_tsne(tmp_path / "bad.csv", tmp_path / "bad.png")
