"""The results table across runs in the Prefect UI: one table artifact (a row per setting) and its markdown.

The table is :func:`realfake.results.results_report`'s (mean +- std over classifier seeds, per training data
and recipe); this module only publishes it. Everything shown passes through :func:`realfake.redact.scrub`,
because run paths and versions are free text that could carry a credential-bearing URI.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from realfake.redact import redacting_errors, scrub
from tasks.artifacts import artifact_key, create_markdown_artifact, create_table_artifact

__all__ = ["publish_results", "results_rows", "results_task"]


def _cell(stats: dict[str, Any] | None) -> float | None:
    return round(100 * stats["mean"], 2) if stats and stats.get("n") else None


def _spread(stats: dict[str, Any] | None) -> float | None:
    return round(100 * stats["std"], 2) if stats and stats.get("std") is not None else None


def results_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat table rows (accuracy in %) from :func:`realfake.results.aggregate_runs` rows."""
    out = []
    for r in rows:
        flat: dict[str, Any] = {
            "training data": r["data"],
            "version": r["version"],
            "model": r["model"],
            "seeds": len(r["seeds"]),
            "top-1 %": _cell(r["top1"]),
            "top-1 std": _spread(r["top1"]),
            "top-5 %": _cell(r["top5"]),
            "top-5 std": _spread(r["top5"]),
        }
        for name, res in r["ood"].items():
            flat[f"{name} top-1 %"] = _cell(res["top1"])
            flat[f"{name} top-1 std"] = _spread(res["top1"])
        flat["differs in"] = ", ".join(f"{k}={v}" for k, v in r["recipe"].items())
        out.append(flat)
    return out


def publish_results(report: dict[str, Any], dataset: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Table and markdown artifacts of a :func:`realfake.results.results_report` result; returns their ids."""
    rows = scrub(results_rows(report["rows"]), storage_options)
    # every row gets every column (a table artifact takes its columns from the rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    table_id = create_table_artifact(
        table=rows, key=artifact_key(dataset, "results"),
        description=f"{dataset}: accuracy (%) by training data, mean and std over classifier seeds",
    )
    md = scrub(report["table"], storage_options)
    if report.get("markdown"):
        md += f"\n\nFiles: `{scrub(report['markdown'], storage_options)}`, `{scrub(report['json'], storage_options)}`"
    md_id = create_markdown_artifact(md, key=artifact_key(dataset, "results-table"),
                                     description=f"{dataset}: results table (mean ± std over seeds)")
    return {"table": table_id, "markdown": md_id}


@task(name="results-report", tags=["realfake"])
@redacting_errors
def results_task(root: str, dataset: str, versions: list[str] | None = None,
                 storage_options: dict | None = None) -> dict[str, Any]:
    """Collect every run of the dataset's versions, write ``reports/results.{md,json}`` and publish the table."""
    from realfake.results import results_report

    report = results_report(root, dataset, versions, storage_options)
    ids = publish_results(report, dataset, storage_options)
    return {"markdown": report["markdown"], "json": report["json"], "rows": len(report["rows"]),
            "runs": report["runs"], "notes": report["notes"], "artifacts": {k: str(v) for k, v in ids.items()}}
