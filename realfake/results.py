"""Results across runs: every ``runs/*/metrics.json`` of a dataset's versions as one table, mean +- std over seeds.

One classifier run is one draw; the paper reports each setting as the mean and standard deviation over
several training seeds (its Tab. 9: real, synthetic and real + synthetic training data, tested on the real
test split and on ImageNet-V2 / -Sketch / -R / -A). Runs are grouped by the training data, the version
and every config field except the ones that do not change the recipe (the classifier seed, the device,
the storage root, data-loader workers, checkpointing, shard verification and the OOD folder locations:
:data:`NOT_RECIPE`); each group becomes one row whose numbers are the mean and the sample standard
deviation (n - 1) over its seeds. Two runs with the same seed in one group are the same measurement
repeated: they are averaged into one value before the statistics, so a re-run never narrows the spread.
A file that cannot be read is an error naming the file; a run folder without ``metrics.json`` (still
running, or failed) is left out and listed.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realfake.data.storage import Store, dataset_store, version_store
from realfake.ood import OOD_SETS

__all__ = [
    "NOT_RECIPE",
    "ResultsError",
    "RunResult",
    "aggregate_runs",
    "dataset_store",
    "format_results",
    "read_run",
    "read_runs",
    "results_report",
]

# Config fields that do not change what a run measures: runs differing only in these share a row.
NOT_RECIPE = ("classifier.seed", "classifier.workers", "classifier.checkpoint_every_epochs", "train_data.verify_shards",
              "device", "root", "ood")
_DATA_ORDER = {"real": 0, "synthetic": 1, "real+synthetic": 2}
_DATA_NAMES = {"real": "real", "synthetic": "synthetic", "real+synthetic": "real + synthetic"}
REPORTS = "reports"  # folder under {root}/{dataset}/ that holds the results table


class ResultsError(ValueError):
    """A results file or folder that cannot be used; the message names it and what to do."""


@dataclass
class RunResult:
    """The numbers of one ``metrics.json`` and the recipe it was measured with."""

    path: str
    version: str
    run: str
    data: str
    model: str
    seed: int
    top1: float
    top5: float
    ood: dict[str, dict[str, float]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    git_revision: str | None = None

    @property
    def group(self) -> tuple[str, str, str]:
        """What a row shares: training data, version and the recipe (every field outside :data:`NOT_RECIPE`)."""
        return self.data, self.version, json.dumps(self.recipe, sort_keys=True, default=str)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _is_recipe(key: str) -> bool:
    return not any(key == n or key.startswith(f"{n}.") for n in NOT_RECIPE)


def _fraction(value: Any, where: str, uri: str) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ResultsError(f"{uri}: {where} = {value!r} is not an accuracy in [0, 1]")
    return float(value)


def read_run(store: Store, run: str) -> RunResult:
    """Read and check ``runs/{run}/metrics.json`` of a version store.

    Raises:
        ResultsError: the file is not JSON or lacks a field the table needs (the message names both).
    """
    uri = store.uri("runs", run, "metrics.json")
    try:
        doc = json.loads(store.read_bytes("runs", run, "metrics.json"))
    except FileNotFoundError:
        raise ResultsError(f"{uri} does not exist; run train-eval for this run or remove the folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{uri} is not valid JSON ({e}); re-run train-eval or remove the run folder") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise ResultsError(f"{uri} has no 'metrics' object; it was not written by train-eval")
    m = doc["metrics"]
    config = doc.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("classifier"), dict):
        raise ResultsError(f"{uri} has no 'config' with a 'classifier' section; it was not written by train-eval")
    data = m.get("data")
    if not isinstance(data, str) or not data:
        raise ResultsError(f"{uri}: metrics.data = {data!r}; expected real, synthetic or real+synthetic")
    model = config["classifier"].get("model")
    if not isinstance(model, str) or not model:
        raise ResultsError(f"{uri}: config.classifier.model = {model!r}; expected a timm model name")
    seed = m.get("seed", config["classifier"].get("seed"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ResultsError(f"{uri}: metrics.seed = {seed!r}; expected the integer classifier seed")
    for key in ("top1", "top5"):
        if key not in m:
            raise ResultsError(f"{uri}: metrics.{key} is missing")
    ood: dict[str, dict[str, float]] = {}
    raw_ood = m.get("ood") or {}
    if not isinstance(raw_ood, dict):
        raise ResultsError(f"{uri}: metrics.ood must map OOD set names to their metrics, got {type(raw_ood).__name__}")
    for name, res in raw_ood.items():
        if not isinstance(res, dict) or "top1" not in res or "top5" not in res:
            raise ResultsError(f"{uri}: metrics.ood.{name} needs top1 and top5")
        ood[name] = {k: _fraction(res[k], f"metrics.ood.{name}.{k}", uri) for k in ("top1", "top5")}
    recipe = {k: v for k, v in _flatten(config).items() if _is_recipe(k)}
    revision = doc.get("git_revision")
    return RunResult(
        path=uri,
        version=posixpath.basename(store.root.rstrip("/")),
        run=run,
        data=data,
        model=model,
        seed=seed,
        top1=_fraction(m["top1"], "metrics.top1", uri),
        top5=_fraction(m["top5"], "metrics.top5", uri),
        ood=ood,
        recipe=recipe,
        git_revision=revision if isinstance(revision, str) else None,
    )


def read_runs(stores: Iterable[Store]) -> tuple[list[RunResult], list[str]]:
    """Every run of the given version stores, and a note for each run folder left out (no ``metrics.json``)."""
    runs: list[RunResult] = []
    notes: list[str] = []
    for store in stores:
        if not store.exists("runs"):
            notes.append(f"{store.uri('runs')}: no runs in this version")
            continue
        for name in store.listdir("runs"):
            if store.exists("runs", name, "metrics.json"):
                runs.append(read_run(store, name))
            elif store.exists("runs", name, "checkpoint"):  # a train-eval run under way or interrupted
                notes.append(f"{store.uri('runs', name)}: no metrics.json (still running, or failed); left out")
    return runs, notes


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
        "n": int(len(arr)),
        "values": [float(v) for v in arr],
    }


def _per_seed(runs: list[RunResult], value) -> list[float]:
    """One value per seed (ascending): the mean of that seed's runs that have the value."""
    by_seed: dict[int, list[float]] = {}
    for r in runs:
        v = value(r)
        if v is not None:
            by_seed.setdefault(r.seed, []).append(v)
    return [float(np.mean(by_seed[s])) for s in sorted(by_seed)]


def aggregate_runs(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per group of runs (see :attr:`RunResult.group`): mean, sample std and count over seeds.

    Rows are ordered real, synthetic, real + synthetic (then any other training data), then by version,
    model and number of seeds (most first). ``recipe`` lists the config fields in which a row differs from
    the other rows of the same training data and version, so two rows that look alike can be told apart.
    """
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    rows: list[dict[str, Any]] = []
    for (data, version, _), members in groups.items():
        seeds = sorted({r.seed for r in members})
        row: dict[str, Any] = {
            "data": data,
            "version": version,
            "model": members[0].model,
            "seeds": seeds,
            "runs": sorted(r.path for r in members),
            "duplicate_seeds": sorted({r.seed for r in members if sum(m.seed == r.seed for m in members) > 1}),
            "git_revisions": sorted({r.git_revision for r in members if r.git_revision}),
            "top1": _stats(_per_seed(members, lambda r: r.top1)),
            "top5": _stats(_per_seed(members, lambda r: r.top5)),
            "ood": {},
            "_recipe": members[0].recipe,
        }
        for name in sorted({n for r in members for n in r.ood}, key=_ood_order):
            row["ood"][name] = {
                k: _stats(_per_seed(members, lambda r, n=name, k=k: r.ood.get(n, {}).get(k))) for k in ("top1", "top5")
            }
        rows.append(row)
    for row in rows:
        peers = [r["_recipe"] for r in rows if (r["data"], r["version"]) == (row["data"], row["version"])]
        keys = sorted({k for p in peers for k in p})
        varying = [k for k in keys if k != "classifier.model" and len({json.dumps(p.get(k), default=str)
                                                                       for p in peers}) > 1]
        row["recipe"] = {k: row["_recipe"].get(k) for k in varying}
    for row in rows:
        del row["_recipe"]
    # the setting with the most seeds first among look-alikes, usually the main recipe
    rows.sort(key=lambda r: (_DATA_ORDER.get(r["data"], len(_DATA_ORDER)), r["data"], r["version"], r["model"],
                             -len(r["seeds"]), json.dumps(r["recipe"], sort_keys=True, default=str)))
    return rows


def _ood_order(name: str) -> tuple[int, str]:
    names = list(OOD_SETS)
    return (names.index(name) if name in names else len(names), name)


def _cell(stats: dict[str, Any] | None, seeds: int) -> str:
    if not stats or not stats["n"]:
        return "-"
    text = f"{100 * stats['mean']:.2f}"
    if stats["std"] is not None:
        text += f" ± {100 * stats['std']:.2f}"
    if stats["n"] != seeds:
        text += f" (n={stats['n']})"
    return text


def format_results(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The rows of :func:`aggregate_runs` as one markdown table (accuracy in %, mean ± std over seeds)."""
    ood_names = sorted({n for r in rows for n in r["ood"]}, key=_ood_order)
    with_recipe = any(r["recipe"] for r in rows)
    head = ["training data", "version", "model", "seeds", "top-1 (%)", "top-5 (%)"]
    head += [f"{OOD_SETS.get(n, n)} top-1 (%)" for n in ood_names]
    if with_recipe:
        head.append("differs in")
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = len(r["seeds"])
        cells = [
            _DATA_NAMES.get(r["data"], r["data"]),
            r["version"],
            r["model"],
            f"{n} ({', '.join(map(str, r['seeds']))})",
            _cell(r["top1"], n),
            _cell(r["top5"], n),
        ]
        cells += [_cell(r["ood"].get(name, {}).get("top1"), n) for name in ood_names]
        if with_recipe:
            cells.append(", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in r["recipe"].items()) or "-")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Mean ± sample standard deviation over classifier seeds; (n=k) where only k seeds have the number."]
    dup = [r for r in rows if r["duplicate_seeds"]]
    if dup:
        lines.append("Runs repeating a seed were averaged into one value per seed: " + "; ".join(
            f"{_DATA_NAMES.get(r['data'], r['data'])} {r['version']} seeds {r['duplicate_seeds']}" for r in dup))
    return "\n".join(lines)


def results_report(root: str, dataset: str, versions: Sequence[str] | None = None,
                   storage_options: dict | None = None, write: bool = True) -> dict[str, Any]:
    """Collect the runs of a dataset's versions into one table; write it to ``{root}/{dataset}/reports/``.

    Args:
        root: Storage root (local path or fsspec URI).
        dataset: Dataset name.
        versions: Versions to include (default: every version folder of the dataset that has ``runs/``).
        storage_options: fsspec options for the root.
        write: Write ``reports/results.md`` and ``reports/results.json``.

    Returns:
        ``table`` (markdown), ``rows``, ``notes`` (run folders left out), ``versions`` and, when written,
        ``markdown`` / ``json`` (their URIs).

    Raises:
        ResultsError: a requested version does not exist, no run has a ``metrics.json``, or one is unusable.
    """
    top = dataset_store(root, dataset, storage_options)
    if versions:
        stores = []
        for v in dict.fromkeys(versions):
            store = version_store(root, dataset, v, storage_options)
            if not store.exists():
                raise ResultsError(f"version folder {store.uri()} does not exist (--version {v})")
            stores.append(store)
    else:
        if not top.exists():
            raise ResultsError(f"dataset folder {top.uri()} does not exist; check --root and --dataset")
        stores = [top.child(v) for v in top.listdir() if v != REPORTS and top.exists(v, "runs")]
    runs, notes = read_runs(stores)
    if not runs:
        where = ", ".join(s.uri("runs") for s in stores) or f"{top.uri()}/*/runs"
        raise ResultsError(f"no runs/*/metrics.json found under {where}; run train-eval first")
    rows = aggregate_runs(runs)
    names = [posixpath.basename(s.root.rstrip("/")) for s in stores]
    table = format_results(rows, title=f"{dataset}: accuracy by training data")
    out: dict[str, Any] = {"dataset": dataset, "versions": names, "runs": len(runs), "rows": rows, "notes": notes,
                           "table": table}
    if write:
        body = table + ("\n\nLeft out:\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"
        top.write_bytes(body.encode(), REPORTS, "results.md")
        top.write_json({k: v for k, v in out.items() if k != "table"}, REPORTS, "results.json")
        out["markdown"] = top.uri(REPORTS, "results.md")
        out["json"] = top.uri(REPORTS, "results.json")
    return out
