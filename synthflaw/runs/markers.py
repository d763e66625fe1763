"""What a step's configuration is (its sections, its fingerprint), the digests of a step's products, and its
``done.json`` marker: written last and atomically, so a killed step never looks finished; read back only when every
record in it checks out (:func:`load_marker`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from synthflaw.config import StudyConfig
from synthflaw.registry import STAGES, Stage
from synthflaw.registry import stage as find_stage
from synthflaw.runs.folders import check_run_id

# What a step's product digest leaves out: the bookkeeping the runner writes around the products, the executed
# notebook and its PNGs (re-made by a re-execution, never read downstream), the accelerate log, and the folders a
# step keeps for itself while it runs (checkpoints to resume from, checkpoints rejected by unlearning, the seeded
# initialisation). Names starting with '.' are left out everywhere: the atomic writer's temporaries and the
# droppings of editors and JupyterLab (.ipynb_checkpoints/), none of them a product.
UNHASHED_FILES = frozenset({"done.json", "meta.json", "config.json", "launch.log"})
UNHASHED_DIRS = frozenset({"checkpoints", "rejected", "init"})
LARGE_FILE_BYTES = 64 * 2**20
DONE_KEYS = ("fingerprint", "finished", "digest", "products", "upstream")


def step_config(cfg: StudyConfig, stage: str | Stage, variant: str | None) -> dict:
    """The part of the study configuration a step depends on, plus the seed and the variant. A key the step's model
    never reads (`registry.UNREAD_BY_BRANCH`) is taken at its library default, not left out, so that a run made at
    the default has the fingerprint it had before the key was known to be unread."""
    full, stage = cfg.to_dict(), find_stage(stage)
    unread = stage.unread_for(variant)
    defaults = StudyConfig().to_dict() if unread else {}
    for key in unread:
        section, name = key.split(".")
        full[section] = {**full[section], name: defaults[section][name]}
    return {"seed": cfg.seed, "variant": variant, **{s: full[s] for s in stage.sections_for(variant)}}


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of the file's content, read in 1 MiB chunks; for a file over 64 MiB its size and modification time.

    Why not hash large files: the check runs at every run start, and hashing the multi-GB weights of a GPU-scale
    study would cost minutes each time. Such files (model shards, large data sets) are replaced whole, never edited
    in place, and replacing a file changes its modification time. Copying a run with a tool that does not keep
    modification times (cp without -p) therefore makes its large files look changed.
    """
    stat = path.stat()
    if stat.st_size > LARGE_FILE_BYTES:
        return f"size:{stat.st_size}:mtime_ns:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def product_files(step_dir: str | Path) -> list[Path]:
    """The step's products: every file in its folder except what UNHASHED_* and the dot-names leave out, sorted."""
    step_dir = Path(step_dir)
    found = []
    for root, dirs, files in os.walk(step_dir):
        top = Path(root) == step_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in UNHASHED_DIRS))
        for name in files:
            if name.startswith(".") or name.endswith(".png"):
                continue
            if top and (name in UNHASHED_FILES or (name.startswith("notebook") and name.endswith(".ipynb"))):
                continue
            found.append(Path(root, name).relative_to(step_dir))
    return sorted(found)


def product_digests(step_dir: str | Path) -> dict[str, str]:
    """{relative path: file digest} of the step's products."""
    step_dir = Path(step_dir)
    return {rel.as_posix(): file_digest(step_dir / rel) for rel in product_files(step_dir)}


def combined_digest(products: dict[str, str]) -> str:
    """One digest for a step's products: what a downstream step records of what it read."""
    return hashlib.sha256(json.dumps(products, sort_keys=True).encode()).hexdigest()


def describe_changes(step_dir: Path, recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between a step's recorded and current products, a deleted folder named as the folder."""
    def top(rel: str) -> str:
        return rel.split("/")[0] if "/" in rel else ""

    missing, added = sorted(set(recorded) - set(current)), sorted(set(current) - set(recorded))
    gone = sorted({top(rel) for rel in missing if top(rel) and not (step_dir / top(rel)).exists()})
    new = sorted({top(rel) for rel in added if top(rel) and not any(top(r) == top(rel) for r in recorded)})
    changes = [f"{folder}/ was deleted" for folder in gone]
    changes += [f"{rel} was deleted" for rel in missing if top(rel) not in gone]
    changes += [f"{rel} changed" for rel in sorted(recorded) if rel in current and current[rel] != recorded[rel]]
    changes += [f"{folder}/ was added" for folder in new]
    changes += [f"{rel} was added" for rel in added if top(rel) not in new]
    return changes


def load_marker(step_dir: str | Path) -> tuple[dict | None, str | None]:
    """(marker, None) for a valid done.json; (None, why) for a missing or unreadable one.

    Valid: JSON with every key of DONE_KEYS, a `digest` that is the digest of its `products` records, `upstream`
    records that name steps of the run (never a path), and the fingerprint of the step's config.json. Anything else
    (a disk filled up, a hand edit, a forged or copied marker) counts as not done: the step runs again rather than
    being trusted, and `why` names the file. Whether the products still match their records is
    :class:`Freshness`'s check (it hashes them).
    """
    path = Path(step_dir) / "done.json"
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"
    if not isinstance(marker, dict) or any(k not in marker for k in DONE_KEYS):
        return None, f"{path} lacks the keys {', '.join(DONE_KEYS)}"
    products, upstream = marker["products"], marker["upstream"]
    if not (isinstance(products, dict) and all(isinstance(v, str) for v in products.values())
            and isinstance(upstream, dict) and all(v is None or isinstance(v, str) for v in upstream.values())):
        return None, f"{path} has malformed 'upstream' or 'products' records"
    if marker["digest"] != combined_digest(products):
        return None, f"{path}: its 'digest' is not the digest of its 'products' records (edited by hand?)"
    for name in upstream:
        if not is_step_name(name):
            return None, (f"{path}: its upstream record {name!r} is not a step of the run (<NN_stage>[/<variant>]); "
                          "the marker was edited")
    try:
        saved = json.loads((Path(step_dir) / "config.json").read_text()).get("fingerprint")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        saved = None
    if saved is None or saved != marker["fingerprint"]:
        return None, (f"{path} is not the marker of the configuration in {Path(step_dir) / 'config.json'} (missing, "
                      "unreadable or another fingerprint)")
    return marker, None


def is_step_name(name) -> bool:
    """Whether `name` names a step: ``NN_stage`` for a stage without variants, ``NN_stage/<variant>`` for one with."""
    if not isinstance(name, str):
        return False
    stage_name, _, variant = name.partition("/")
    found = next((s for s in STAGES if s.name == stage_name), None)
    if found is None or bool(variant) != bool(found.variants):
        return False
    try:
        return not variant or check_run_id(variant) == variant  # a variant is a plain folder name, as a run id
    except ValueError:
        return False
