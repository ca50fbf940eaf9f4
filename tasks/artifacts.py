"""What a person sees in the Prefect UI: the effective configuration, the plan, tables of counts and measures, the
sample grid, the card, and progress of every long stage.

Every artifact has a key named after the dataset, the version and the stage (:func:`artifact_key`:
``{dataset}-{version}-{stage}``, e.g. ``demo-v1-grid``), so the UI's artifact pages list each version's history,
and a description saying what it shows. (The results table across versions is the dataset's:
``{dataset}-results``, :mod:`tasks.reports`.)

Artifacts are built from the plain dicts the library returns. Artifacts live in the Prefect database, readable
by everyone with access to the UI, so every artifact of the Prefect layer is published through the
``create_*_artifact`` functions of this module, which pass its markdown, table, link and description through
:mod:`realfake.redact` first: a credential that slipped into a path, a URI or an error text is masked.

Images reach the browser embedded in the markdown as a ``data:image/png`` URI (:func:`embedded_png`, downscaled to
at most :data:`EMBED_MAX_SIDE` pixels a side and :data:`EMBED_MAX_BYTES`): a browser refuses ``file://`` images on
a web page, and a pre-signed object-storage URL would carry the access key id (and, with temporary credentials,
the session token) into the Prefect database. The image is read through the version's store, so the same
artifact shows a local root and an S3 root; the file's URI is named next to it.

Progress of the library's long stages (fine-tuning, captioning, guidance, classifier training) reaches the UI
without the library importing Prefect: the library reports through :class:`realfake.progress.StageProgress`, a log
record on the ``realfake.progress`` logger at most every few seconds; :class:`ProgressBridge` (installed on that
logger when this module is imported) turns each record, in the thread of the task that made it, into a line of
the run's log and an update of that stage's progress artifact.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import artifacts as prefect_artifacts

from realfake.redact import redact, scrub

__all__ = [
    "EMBED_MAX_BYTES",
    "EMBED_MAX_SIDE",
    "ProgressBridge",
    "ProgressReporter",
    "artifact_key",
    "browser_url",
    "create_link_artifact",
    "create_markdown_artifact",
    "create_progress_artifact",
    "create_table_artifact",
    "embedded_png",
    "measure_rows",
    "publish_card_link",
    "publish_config",
    "publish_counts",
    "publish_grid",
    "publish_metrics",
    "publish_plan",
    "publish_quality",
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


EMBED_MAX_SIDE = 1200  # px: a grid of a few classes stays legible, one of 1000 classes is scaled down to fit
EMBED_MAX_BYTES = 1_500_000  # bytes of PNG embedded in one artifact (the Prefect database keeps every version)


def embedded_png(data: bytes, max_side: int = EMBED_MAX_SIDE, max_bytes: int = EMBED_MAX_BYTES) -> tuple[str, tuple]:
    """A ``data:image/png;base64,...`` URI of an image, downscaled until it fits ``max_side`` and ``max_bytes``;
    returns it and the embedded size (width, height)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    while True:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        shown = img if size == img.size else img.resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        shown.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or scale < 0.05:
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), size
        scale *= 0.7


def _read(uri: str, storage_options: dict | None) -> bytes:
    import fsspec

    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


def _class_counts(card: dict, measures: dict | None = None) -> list[dict[str, Any]]:
    # dataset.json: synthetic.classes {label: {class_name, count}}, real.splits {split: {label: count}}.
    synthetic = (card.get("synthetic") or {}).get("classes") or {}
    real = (card.get("real") or {}).get("splits") or {}
    labels = sorted(set(synthetic) | set(real.get("train", {})) | set(real.get("test", {})), key=int)
    names = (card.get("real") or {}).get("class_names") or {}
    rows = []
    for label in labels:
        row = {
            "label": int(label),
            "class": (synthetic.get(label) or {}).get("class_name") or names.get(label, str(label)),
            "real train": real.get("train", {}).get(label, 0),
            "real test": real.get("test", {}).get(label, 0),
            "synthetic": (synthetic.get(label) or {}).get("count", 0),
        }
        for data, m in (measures or {}).items():  # real-test accuracy of the classifier trained on each data
            per_class = m.get("per_class") if isinstance(m, dict) else None
            if isinstance(per_class, list):
                acc = per_class[int(label)] if int(label) < len(per_class) else None
                row[f"top-1 % ({_DATA_NAMES.get(data, data)})"] = None if acc is None else round(100 * acc, 1)
        rows.append(row)
    return rows


def publish_counts(card: dict, dataset: str, version: str, measures: dict | None = None) -> UUID | None:
    """Table artifact, one row per class: its name, real train / test and synthetic images, and (with the build's
    ``measures``) the real-test accuracy of the classifier trained on each data."""
    rows = _class_counts(card, measures)
    if not rows:
        return None
    return create_table_artifact(
        rows, key=artifact_key(dataset, version, "classes"),
        description=f"Per class in {dataset}/{version}: images (real train, real test, synthetic)"
        + (" and real-test top-1 % of each classifier" if measures else ""),
    )


_DATA_NAMES = {"real": "(a) real train", "baseline": "(b) baseline synthetic", "realfake": "(c) Real-Fake synthetic",
               "synthetic": "synthetic"}
_MEASURES = {  # measure -> (column, scale, digits)
    "top1": ("real-test top-1 %", 100, 2),
    "top5": ("real-test top-5 %", 100, 2),
    "label_fidelity": ("label fidelity %", 100, 2),
    "mmd": ("MMD to real test", 1, 5),
    "frechet": ("Frechet to real test", 1, 3),
    "train_images": ("train images", 1, None),
}


def measure_rows(metrics: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per measured training set with every measure as a column, the same columns in every row (None
    where a row has no such measure): a table artifact takes its columns from its first row."""
    rows = []
    for data, m in metrics.items():
        row: dict[str, Any] = {"trained on": _DATA_NAMES.get(data, data)}
        flat = _scalars(m)
        for key, (column, scale, digits) in _MEASURES.items():
            if key in flat:
                value = flat.pop(key)
                row[column] = value if digits is None else round(scale * float(value), digits)
        row.update(flat)
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in columns} for r in rows]


def publish_metrics(metrics: dict[str, dict], dataset: str, version: str) -> UUID | None:
    """Table artifact: one row per measured training set with every measure (accuracy on the real test split,
    label fidelity, MMD and Frechet distance to the real test features, ...) in every row."""
    rows = measure_rows(metrics)
    if not rows:
        return None
    return create_table_artifact(
        rows, key=artifact_key(dataset, version, "measures"),
        description=f"Measures of {dataset}/{version}: a classifier trained on each data, tested on real test images; "
        "label fidelity and feature distances taken with the real-trained classifier",
    )


def _scalars(m: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(m, dict):
        return {prefix.rstrip("."): m} if isinstance(m, int | float | str) and prefix else {}
    out: dict[str, Any] = {}
    for k, v in m.items():
        if isinstance(v, float):
            out[f"{prefix}{k}"] = round(v, 4) if prefix or k not in _MEASURES else v
        elif isinstance(v, int | str) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict) and k not in ("per_class", "confusion"):
            out.update(_scalars(v, f"{prefix}{k}."))
    return out


def publish_config(rows: list[dict[str, Any]], preset: str | None, dataset: str, version: str) -> UUID:
    """Table artifact: the run's effective configuration where it differs from the paper's recipe, next to the
    preset's value and the paper's, and who set it (:func:`flows.params.config_rows`)."""
    return create_table_artifact(
        rows or [{"field": "(none)", "this run": "the paper's recipe", "preset": "", "paper": "", "set by": ""}],
        key=artifact_key(dataset, version, "config"),
        description=f"Effective configuration of {dataset}/{version}: every field away from the paper's recipe "
        f"(the library's defaults), with the value of preset {preset or '(none)'} and who set it",
    )


def _card_markdown(card: dict, card_uri: str, dataset: str, version: str) -> str:
    syn = card.get("synthetic") or {}
    real = card.get("real") or {}
    made_with = card.get("versions") or {}
    facts = [
        ("created", card.get("created_at")),
        ("realfake / torch", f"{made_with.get('realfake')} / {made_with.get('torch')}"),
        ("synthetic", f"{syn.get('num_images')} images in {syn.get('num_shards')} {syn.get('format')} shard(s), "
                      f"{syn.get('image_format')}, {(syn.get('bytes') or 0) / 1e6:.1f} MB"),
        ("real", f"{real.get('num_images', 0)} images; rejected inputs: {(card.get('rejects') or {}).get('total', 0)}"),
        ("index sha256", ((syn.get("index") or {}).get("sha256") or "")[:16]),
        ("load with", f"`{syn.get('load_with')}`" if syn.get("load_with") else None),
    ]
    lines = [f"## Dataset card of {dataset}/{version}", "", f"Card file: `{card_uri}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in facts if v not in (None, "")]
    if card.get("quality"):
        from realfake.quality import format_quality_table

        lines += ["", "Quality per class (far from the real class first):", "", "```",
                  format_quality_table(card["quality"]), "```"]
    lines += ["", "The per-class counts are the `classes` artifact; the whole card is the file above "
              "(`realfake inspect` prints it)."]
    return "\n".join(lines) + "\n"


def publish_card_link(card_uri: str, dataset: str, version: str, card: dict | None = None) -> UUID:
    """Markdown artifact of the dataset card (``dataset.json``): its URI, and with ``card`` a summary of it
    (counts, shards, models). Named by its URI, not linked: a browser does not open ``file://`` from a page."""
    md = (_card_markdown(card, card_uri, dataset, version) if card else
          f"## Dataset card of {dataset}/{version}\n\nCard file: `{card_uri}`\n")
    return create_markdown_artifact(
        md, key=artifact_key(dataset, version, "card"),
        description=f"Card of {dataset}/{version}: config, model hashes, counts, shard checksums",
    )


def _embedded_grid(path: str, alt: str, storage_options: dict | None) -> str:
    """Markdown embedding the PNG at ``path`` (a local path or a URI) as a data URI, or the reason it could not be
    read: a grid informs, it never fails the build."""
    uri = path if "://" in path else f"file://{path}"
    try:
        src, (w, h) = embedded_png(_read(uri, storage_options))
        return f"![{alt}, {w} x {h} px]({src})\n\n"
    except Exception as e:  # noqa: BLE001 - see above
        return f"(the grid could not be read for display: {type(e).__name__}: {str(e)[:200]})\n\n"


def publish_grid(grid_uri: str, dataset: str, version: str, storage_options: dict | None = None) -> UUID:
    """Markdown artifact with the real / baseline / Real-Fake sample grid (a row per class, labelled with its name),
    embedded as a PNG data URI read through fsspec (local root or object storage alike), and the file's URI.
    An image that cannot be read is named with the reason instead of failing the run."""
    shown = _embedded_grid(grid_uri, f"sample grid of {dataset}/{version}", storage_options)
    md = (f"## Samples of {dataset}/{version}\n\nEach row is a class; columns: real training images, then the "
          f"images each version made from those same images.\n\n{shown}Grid file: `{grid_uri}`\n")
    return create_markdown_artifact(md, key=artifact_key(dataset, version, "grid"),
                                    description=f"Sample grid per class of {dataset}/{version}")


def publish_quality(card: dict, dataset: str, version: str, storage_options: dict | None = None) -> UUID | None:
    """Table artifact: the card's per-class quality, classes far from their real counterpart first; and a markdown
    artifact with the worst-examples grid embedded. None when the version was not measured (``quality`` off)."""
    q = card.get("quality")
    if not q:
        return None
    rows = [{"label": int(k), **{c: v for c, v in q["classes"][k].items() if c != "flags"},
             "flags": "; ".join(q["classes"][k]["flags"])} for k in q["order"]]
    create_table_artifact(rows, key=artifact_key(dataset, version, "quality"),
                          description=f"Per-class quality of {dataset}/{version}, far from real first ({q['judge']})")
    shown = _embedded_grid(q["worst_grid"], f"worst examples of {dataset}/{version}", storage_options)
    md = (f"## Worst examples per class of {dataset}/{version}\n\nEach row is a class, far from its real "
          f"counterpart first; columns: its images the judge finds least like their class.\n\n{shown}"
          f"Grid file: `{q['worst_grid']}`\n")
    return create_markdown_artifact(md, key=artifact_key(dataset, version, "worst"),
                                    description=f"Lowest label agreement per class of {dataset}/{version}")


def publish_plan(markdown: str, dataset: str, version: str) -> UUID:
    """Markdown artifact with the build's plan (:func:`realfake.plan.format_plan`), published before any GPU work."""
    return create_markdown_artifact(
        markdown, key=artifact_key(dataset, version, "plan"), description=f"Plan of {dataset}/{version}: counts, "
        "steps, bytes and GPU-hours per stage"
    )


def publish_report(markdown: str, dataset: str, version: str) -> UUID:
    """Markdown artifact with the whole build report."""
    return create_markdown_artifact(
        markdown, key=artifact_key(dataset, version, "report"), description=f"Build report of {dataset}/{version}"
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


class ProgressBridge(logging.Handler):
    """Shows the library's progress records (:class:`realfake.progress.StageProgress`) in the Prefect UI.

    Each record that carries ``realfake_progress`` becomes, when it is made inside a flow or task run (the
    library runs in the task's thread), a line of that run's log and an update of a progress artifact keyed
    ``{dataset}-{version}-{stage}[-{scope}]-progress``, created at the stage's first record. Records made
    outside a run (the plain CLI) are left to the other handlers.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._artifacts: dict[tuple[str, str], UUID] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        figures = getattr(record, "realfake_progress", None)
        if not isinstance(figures, dict):
            return
        try:
            from prefect import get_run_logger
            from prefect.context import FlowRunContext, TaskRunContext

            ctx = TaskRunContext.get() or FlowRunContext.get()
            if ctx is None:
                return
            run = getattr(ctx, "task_run", None) or getattr(ctx, "flow_run", None)
            get_run_logger().info("%s", figures["text"])
            scope = figures.get("scope")
            parts = [figures["dataset"], figures["version"], figures["stage"]]
            key = artifact_key(*parts, *([str(scope)] if scope not in (None, "all") else []), "progress")
            percent = float(min(100.0, max(0.0, figures.get("percent", 0.0))))
            with self._lock:
                known = self._artifacts.get((str(run.id), key))
                if known is None:
                    self._artifacts[(str(run.id), key)] = create_progress_artifact(
                        percent, key=key, description=figures["text"])
                else:
                    update_progress_artifact(known, percent, figures["text"])
        except Exception:  # noqa: BLE001 - progress is shown on a best-effort basis; it never fails the stage
            pass


def _install_progress_bridge() -> None:
    from realfake.progress import LOGGER

    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, ProgressBridge) for h in logger.handlers):
        logger.addHandler(ProgressBridge())
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the root logger's WARNING would drop the records before any handler


_install_progress_bridge()
