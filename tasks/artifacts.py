"""What a person sees in the Prefect UI: tables of counts and accuracies, the sample grid, the card link,
and a progress bar of shards done while groups run.

Artifacts are built from the plain dicts the library returns. Artifacts live in the Prefect database, readable
by everyone with access to the UI, so every artifact of the Prefect layer is published through the
``create_*_artifact`` functions of this module, which pass its markdown, table, link and description through
:mod:`realfake.redact` first: a credential that slipped into a path, a URI or an error text is masked. For the
same reason files on object storage are named by their URI, never linked through a pre-signed URL: that URL
carries the access key id (and, with temporary credentials, the session token) in its query. The sample grid
is shown inline from a local disk and named by its URI on object storage.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import artifacts as prefect_artifacts

from realfake.redact import redact, scrub

__all__ = [
    "ProgressReporter",
    "artifact_key",
    "browser_url",
    "create_link_artifact",
    "create_markdown_artifact",
    "create_progress_artifact",
    "create_table_artifact",
    "publish_card_link",
    "publish_counts",
    "publish_grid",
    "publish_metrics",
    "publish_plan",
    "publish_report",
    "update_progress_artifact",
]


# --------------------------------------------------------------------------------------------------------
# Every artifact goes through these: Prefect's own functions with the text scrubbed of secrets
# --------------------------------------------------------------------------------------------------------
def _text(text: str | None) -> str | None:
    return redact(text) if text else text


def create_markdown_artifact(markdown: str, key: str | None = None, description: str | None = None) -> UUID:
    """Prefect's markdown artifact, with secrets masked in the markdown and the description."""
    return prefect_artifacts.create_markdown_artifact(redact(markdown), key=key, description=_text(description))


def create_table_artifact(table: dict[str, list[Any]] | list[dict[str, Any]] | list[list[Any]],
                          key: str | None = None, description: str | None = None) -> UUID:
    """Prefect's table artifact, scrubbed (:func:`realfake.redact.scrub`): every cell masked of secrets, and the
    cells of a secret-named column (``token``, ``secret``, ...) replaced."""
    return prefect_artifacts.create_table_artifact(scrub(table), key=key, description=_text(description))


def create_link_artifact(link: str, link_text: str | None = None, key: str | None = None,
                         description: str | None = None) -> UUID:
    """Prefect's link artifact, with secrets masked in the link, its text and the description."""
    return prefect_artifacts.create_link_artifact(redact(link), link_text=_text(link_text), key=key,
                                                  description=_text(description))


def create_progress_artifact(progress: float, key: str | None = None, description: str | None = None) -> UUID:
    """Prefect's progress artifact, with secrets masked in the description."""
    return prefect_artifacts.create_progress_artifact(progress, key=key, description=_text(description))


def update_progress_artifact(artifact_id: UUID, progress: float, description: str | None = None) -> UUID:
    """Update a progress artifact, with secrets masked in the new description."""
    return prefect_artifacts.update_progress_artifact(artifact_id, progress, description=_text(description))


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) from free-form parts."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:120]


def browser_url(uri: str) -> str:
    """The link of a stored file in an artifact: ``file://`` for a local path, the URI itself on object storage.

    Not pre-signed: a pre-signed URL carries the access key id, and with temporary credentials the session
    token, which must not be stored in the Prefect database.
    """
    if "://" not in uri or uri.startswith("file://"):
        return uri if uri.startswith("file://") else f"file://{uri}"
    return uri


def _class_counts(card: dict) -> list[dict[str, Any]]:
    # dataset.json: synthetic.classes {label: {class_name, count}}, real.splits {split: {label: count}}.
    synthetic = (card.get("synthetic") or {}).get("classes") or {}
    real = (card.get("real") or {}).get("splits") or {}
    labels = sorted(set(synthetic) | set(real.get("train", {})) | set(real.get("test", {})), key=int)
    names = (card.get("real") or {}).get("class_names") or {}
    return [
        {
            "label": int(label),
            "class": (synthetic.get(label) or {}).get("class_name") or names.get(label, str(label)),
            "real train": real.get("train", {}).get(label, 0),
            "real test": real.get("test", {}).get(label, 0),
            "synthetic": (synthetic.get(label) or {}).get("count", 0),
        }
        for label in labels
    ]


def publish_counts(card: dict, dataset: str, version: str) -> UUID | None:
    """Table artifact: images per class of the version, from its card."""
    rows = _class_counts(card)
    if not rows:
        return None
    return create_table_artifact(
        rows, key=artifact_key(dataset, "counts"), description=f"Images per class in {dataset}/{version}"
    )


def publish_metrics(metrics: dict[str, dict], dataset: str, version: str) -> UUID | None:
    """Table artifact: one row per measured training set with its scalar measures (nested dicts flattened)."""
    rows = []
    for data, m in metrics.items():
        row: dict[str, Any] = {"trained on": data}
        row.update(_scalars(m))
        rows.append(row)
    if not rows:
        return None
    return create_table_artifact(
        rows, key=artifact_key(dataset, "accuracy"), description=f"Classifier measures for {dataset}/{version}"
    )


def _scalars(m: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(m, dict):
        return {prefix.rstrip("."): m} if isinstance(m, int | float | str) and prefix else {}
    out: dict[str, Any] = {}
    for k, v in m.items():
        if isinstance(v, float):
            out[f"{prefix}{k}"] = round(v, 4)
        elif isinstance(v, int | str) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict) and k not in ("per_class", "confusion"):
            out.update(_scalars(v, f"{prefix}{k}."))
    return out


def publish_card_link(card_uri: str, dataset: str, version: str) -> UUID:
    """Link artifact to the dataset card (``dataset.json``)."""
    return create_link_artifact(
        browser_url(card_uri), link_text=f"{dataset}/{version} dataset card", key=artifact_key(dataset, "card"),
        description=f"Card of {dataset}/{version}: config, model hashes, counts, shard checksums",
    )


def publish_grid(grid_uri: str, dataset: str, version: str) -> UUID:
    """Markdown artifact with the real / baseline / Real-Fake sample grid per class: shown from a local disk,
    named by its URI on object storage (download it with any client of that store)."""
    url = browser_url(grid_uri)
    shown = f"![sample grid]({url})\n\n" if url.startswith("file://") else ""
    md = f"## Samples of {dataset}/{version}\n\n{shown}Grid file: `{grid_uri}`\n"
    return create_markdown_artifact(md, key=artifact_key(dataset, "grid"), description="Sample grid per class")


def publish_plan(markdown: str, dataset: str, version: str) -> UUID:
    """Markdown artifact with the build's plan (:func:`realfake.plan.format_plan`), published before any GPU work."""
    return create_markdown_artifact(
        markdown, key=artifact_key(dataset, "plan"), description=f"Plan of {dataset}/{version}: counts, steps, "
        "bytes and GPU-hours per stage"
    )


def publish_report(markdown: str, dataset: str, version: str) -> UUID:
    """Markdown artifact with the whole build report."""
    return create_markdown_artifact(
        markdown, key=artifact_key(dataset, "report"), description=f"Build report of {dataset}/{version}"
    )


class ProgressReporter:
    """Keeps a progress artifact (shards done / total, images/s) current while groups run elsewhere.

    A background thread polls ``count_done`` every ``poll_seconds``; it reads storage, not the workers, so it
    works the same for local processes and for child flow runs on other nodes. While the flow run that created
    it waits on child runs (:func:`tasks.child_runs.run_child_deployment`), the description also says which
    group each waits on, in which state and for how long, so a stalled build shows where it stalls.
    """

    def __init__(self, total: int, count_done: Callable[[], tuple[int, int]], key: str, poll_seconds: float = 5.0):
        from prefect.runtime import flow_run

        self.total = max(total, 1)
        self.count_done = count_done
        self.poll_seconds = poll_seconds
        self.parent_flow_run_id = str(flow_run.id or "")  # the reporter's thread has no run context of its own
        self.t0 = time.monotonic()
        self.start_images = self._safe_count()[1]
        self.artifact_id = create_progress_artifact(0.0, key=key, description=self._describe(0, 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="realfake-progress", daemon=True)

    def _safe_count(self) -> tuple[int, int]:
        try:
            return self.count_done()
        except Exception:  # a transient listing failure must not kill the parent flow
            return (0, 0)

    def _describe(self, shards: int, images: int) -> str:
        from tasks.child_runs import waiting_lines

        rate = (images - self.start_images) / max(time.monotonic() - self.t0, 1e-6)
        text = f"shards {shards}/{self.total}, {images} images, {rate:.2f} images/s"
        waiting = waiting_lines(self.parent_flow_run_id) if self.parent_flow_run_id and shards < self.total else []
        return text + "".join(f"\n- waiting on {line}" for line in waiting)

    def refresh(self) -> tuple[int, int]:
        """Poll once and update the artifact; returns (shards done, images written)."""
        shards, images = self._safe_count()
        progress = min(100.0, 100.0 * shards / self.total)
        update_progress_artifact(self.artifact_id, progress, self._describe(shards, images))
        return shards, images

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # the API may be briefly unreachable; the next poll retries
                pass

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_seconds + 5)
        self.refresh()
