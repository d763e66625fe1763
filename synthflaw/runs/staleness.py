"""Staleness: whether a run's finished steps still hold what they finished with (their products' digests), and
read what they read (their upstreams' digests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthflaw.runs.markers import describe_changes, load_marker, product_digests
from synthflaw.runs.step import Step, finished_steps, step_named


@dataclass(frozen=True)
class Cause:
    """Why a finished step is stale. `kind`: "products" (its own files changed), "upstream changed" (an upstream ran
    again or changed), "upstream unfinished" (an upstream it read is no longer finished), "upstream stale" (an
    upstream it read is itself stale), "new steps" (a step that reads the whole run: steps finished after it)."""

    step: str
    kind: str
    upstream: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.step} is stale: {self.text}"


def upstream_causes(step: Step, marker: dict) -> list[Cause]:
    """The upstream records of a finished step checked against the upstreams' current markers (no hashing: cheap)."""
    causes = []
    for name, digest in marker.get("upstream", {}).items():
        other = step_named(step.run_dir, name)
        current, problem = load_marker(other.path)
        if current is None:
            causes.append(Cause(step.name, "upstream unfinished", name,
                                f"{name} was read but is no longer finished ({problem or 'no done.json'})"))
        elif current.get("digest") != digest:
            causes.append(Cause(step.name, "upstream changed", name, f"{name} ran again or changed since it was read"))
    if marker.get("reads_run"):
        new = [s.name for s in finished_steps(step.run_dir, before=step.stage) if s.name not in marker["upstream"]]
        if new:
            shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            causes.append(Cause(step.name, "new steps", None, f"{shown} finished after it ran"))
    return causes


class Freshness:
    """Whether a run's finished steps still hold what they finished with, and read what they read.

    Each step's products are hashed at most once per instance: make one at a run's start and ask about any step.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._own: dict[str, list[str]] = {}
        self._causes: dict[str, list[Cause]] = {}

    def product_changes(self, step: Step, marker: dict) -> list[str]:
        """What changed in the step's own products since it finished (nothing to check for a marker from before
        products were recorded)."""
        if step.name not in self._own:
            recorded = marker.get("products")
            self._own[step.name] = ([] if recorded is None
                                    else describe_changes(step.path, recorded, product_digests(step.path)))
        return self._own[step.name]

    def causes(self, name: str) -> list[Cause]:
        """Why the finished step `name` is stale (empty when it is not, or not finished): its own products, its
        upstream records, and the staleness of the upstreams it read."""
        if name in self._causes:
            return self._causes[name]
        self._causes[name] = []  # a cycle cannot occur (upstreams are earlier stages); this guards it anyway
        step = step_named(self.run_dir, name)
        marker = step.marker()
        if marker is None:
            return []
        causes = []
        changes = self.product_changes(step, marker)
        if changes:
            shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
            causes.append(Cause(name, "products", None, f"{shown} since it finished"))
        causes += upstream_causes(step, marker)
        flagged = {c.upstream for c in causes}
        for upstream in marker.get("upstream", {}):
            if upstream not in flagged and self.causes(upstream):
                causes.append(Cause(name, "upstream stale", upstream, f"it read {upstream}, which is stale"))
        self._causes[name] = causes
        return causes
