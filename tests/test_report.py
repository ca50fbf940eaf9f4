"""Results across runs (mean +- std over seeds), the ``realfake report`` command, its Prefect artifact and the
confusion-matrix plot.

The metrics files are written by hand in the layout ``train_eval`` writes, with accuracies chosen so that every
mean and standard deviation in the table can be checked by hand.
"""

from __future__ import annotations

import io
import json
import math
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from realfake.cli import app
from realfake.config import load_config
from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA
from realfake.data.storage import Store
from realfake.report import confusion_png, write_confusion_plot
from realfake.results import ResultsError, aggregate_runs, read_runs, results_report


def _config(version: str, seed: int, **classifier) -> dict:
    cfg = load_config(data={"dataset": "toy", "version": version, "source": {"uri": "/data/toy"},
                            "classifier": {"seed": seed, "model": "resnet18", **classifier}})
    return cfg.model_dump(mode="json")


def _run(root: Path, version: str, data: str, seed: int, top1: float, top5: float, run: str | None = None,
         ood: dict | None = None, **classifier) -> Path:
    metrics = {"data": data, "train_images": 100, "top1": top1, "top5": top5, "per_class": [top1],
               "confusion": [[1]], "train_s": 1.0, "seed": seed}
    if ood is not None:
        metrics["ood"] = ood
    run = run or f"{data.replace('+', '-')}-resnet18-s{seed}"
    path = root / "toy" / version / "runs" / run / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": _config(version, seed, **classifier), "version": str(root / "toy" / version),
                                "metrics": metrics, "git_revision": "abc123"}))
    return path


def _ood(r_top1: float | None = None, a_top1: float | None = None) -> dict:
    out = {}
    if r_top1 is not None:
        out["imagenet_r"] = {"top1": r_top1, "top5": 0.5, "n": 10}
    if a_top1 is not None:
        out["imagenet_a"] = {"top1": a_top1, "top5": 0.5, "n": 10}
    return out


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "out"
    for seed, (t1, t5) in enumerate([(0.90, 0.99), (0.92, 0.99), (0.94, 1.00)]):
        _run(root, "v1", "real", seed, t1, t5)
    _run(root, "v1", "synthetic", 0, 0.80, 0.95, ood=_ood(0.30, 0.10))
    _run(root, "v1", "synthetic", 1, 0.84, 0.97, ood=_ood(0.34))
    _run(root, "v1", "synthetic", 0, 0.50, 0.90, run="short", epochs=10)  # another recipe: its own row
    _run(root, "v1", "real+synthetic", 0, 0.95, 1.00)
    _run(root, "v1-baseline", "synthetic", 0, 0.60, 0.90)
    _run(root, "v1-baseline", "synthetic", 1, 0.70, 0.92)
    (root / "toy" / "v1" / "runs" / "in-progress" / "checkpoint").mkdir(parents=True)  # under way: listed
    (root / "toy" / "v1" / "runs" / "privacy-lira").mkdir()  # another kind of run (privacy audit): not a note
    (root / "toy" / "latest.json").write_text("{}")  # the dataset's latest pointer is no version
    return root


def _close(stats: dict, mean: float, std: float | None, n: int) -> None:
    assert stats["mean"] == pytest.approx(mean) and stats["n"] == n
    assert stats["std"] is None if std is None else stats["std"] == pytest.approx(std)


def test_runs_are_grouped_by_recipe_and_aggregated_over_seeds(runs):
    res = results_report(str(runs), "toy")
    assert res["versions"] == ["v1", "v1-baseline"] and res["runs"] == 9
    assert res["notes"] == [f"{runs}/toy/v1/runs/in-progress: no metrics.json (still running, or failed); left out"]
    rows = res["rows"]
    assert [(r["data"], r["version"], r["seeds"]) for r in rows] == [
        ("real", "v1", [0, 1, 2]),
        ("synthetic", "v1", [0, 1]),
        ("synthetic", "v1", [0]),
        ("synthetic", "v1-baseline", [0, 1]),
        ("real+synthetic", "v1", [0]),
    ]
    real, syn, short, base, both = rows
    # real: 0.90, 0.92, 0.94 -> mean 0.92, sample std sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02
    _close(real["top1"], 0.92, 0.02, 3)
    # top-5: 0.99, 0.99, 1.00 -> mean 0.99333, std sqrt((2 * (1/300)^2 + (2/300)^2) / 2) = sqrt(3) / 300
    _close(real["top5"], 2.98 / 3, math.sqrt(3) / 300, 3)
    _close(syn["top1"], 0.82, math.sqrt(2) * 0.02, 2)  # 0.80, 0.84
    _close(syn["ood"]["imagenet_r"]["top1"], 0.32, math.sqrt(2) * 0.02, 2)
    _close(syn["ood"]["imagenet_a"]["top1"], 0.10, None, 1)  # only seed 0 was tested on -A
    _close(base["top1"], 0.65, math.sqrt(2) * 0.05, 2)  # 0.60, 0.70
    _close(both["top1"], 0.95, None, 1)
    assert list(syn["ood"]) == ["imagenet_r", "imagenet_a"]  # the paper's column order
    assert short["recipe"] == {"classifier.epochs": 10} and syn["recipe"] == {"classifier.epochs": 200}
    assert real["recipe"] == {} and real["git_revisions"] == ["abc123"] and len(real["runs"]) == 3

    table = res["table"].splitlines()
    assert table[2] == ("| training data | version | model | seeds | top-1 (%) | top-5 (%) | IN-R top-1 (%) | "
                        "IN-A top-1 (%) | differs in |")
    assert table[4] == "| real | v1 | resnet18 | 3 (0, 1, 2) | 92.00 ± 2.00 | 99.33 ± 0.58 | - | - | - |"
    assert table[5] == ("| synthetic | v1 | resnet18 | 2 (0, 1) | 82.00 ± 2.83 | 96.00 ± 1.41 | 32.00 ± 2.83 | "
                        "10.00 (n=1) | classifier.epochs=200 |")
    assert table[7] == "| synthetic | v1-baseline | resnet18 | 2 (0, 1) | 65.00 ± 7.07 | 91.00 ± 1.41 | - | - | - |"
    assert table[8] == "| real + synthetic | v1 | resnet18 | 1 (0) | 95.00 | 100.00 | - | - | - |"

    # written next to the versions, readable back
    assert res["markdown"] == f"{runs}/toy/reports/results.md"
    assert (runs / "toy" / "reports" / "results.md").read_text().startswith("### toy: accuracy by training data")
    saved = json.loads((runs / "toy" / "reports" / "results.json").read_text())
    assert saved["rows"][0]["top1"]["values"] == pytest.approx([0.90, 0.92, 0.94])
    # a report folder is not a version: a second report reads the same runs
    assert results_report(str(runs), "toy")["runs"] == 9


def test_a_repeated_seed_is_one_measurement(tmp_path):
    root = tmp_path / "out"
    _run(root, "v1", "real", 0, 0.90, 1.0)
    _run(root, "v1", "real", 1, 0.94, 1.0)
    _run(root, "v1", "real", 1, 0.96, 1.0, run="real-again")
    (row,) = results_report(str(root), "toy", write=False)["rows"]
    # seed 1 counts once, as (0.94 + 0.96) / 2 = 0.95: values 0.90, 0.95
    assert row["seeds"] == [0, 1] and row["duplicate_seeds"] == [1]
    _close(row["top1"], 0.925, math.sqrt(2) * 0.025, 2)


def test_versions_can_be_chosen_and_bad_requests_name_the_folder(runs):
    only = results_report(str(runs), "toy", ["v1-baseline"], write=False)
    assert [r["version"] for r in only["rows"]] == ["v1-baseline"]
    with pytest.raises(ResultsError, match=r"version folder .*toy/v9 does not exist \(--version v9\)"):
        results_report(str(runs), "toy", ["v9"])
    with pytest.raises(ResultsError, match=r"dataset folder .*nothing does not exist"):
        results_report(str(runs), "nothing")
    (runs / "toy" / "v2").mkdir()
    with pytest.raises(ResultsError, match=r"no runs/\*/metrics.json found under .*toy/v2/runs; run train-eval"):
        results_report(str(runs), "toy", ["v2"])


def _drop(key: str):
    return lambda m: m.pop(key)


def _set(key: str, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"has no 'metrics' object"),
        (json.dumps({"metrics": {"data": "real", "top1": 0.5, "top5": 0.9, "seed": 0}}), r"has no 'config'"),
        (_drop("top1"), r"metrics\.top1 is missing"),
        (_set("top5", 1.5), r"metrics\.top5 = 1\.5 is not an accuracy in \[0, 1\]"),
        (_set("seed", "one"), r"metrics\.seed = 'one'; expected the integer classifier seed"),
        (_set("ood", {"imagenet_r": {"top1": 0.2}}), r"metrics\.ood\.imagenet_r needs top1 and top5"),
        (_set("ood", {"imagenet_r": {"top1": float("nan"), "top5": 0.2}}), r"metrics\.ood\.imagenet_r\.top1 = nan"),
        (_drop("data"), r"metrics\.data = None"),
    ],
)
def test_a_bad_metrics_file_is_an_error_naming_it(runs, content, message):
    path = _run(runs, "v1", "real", 7, 0.5, 0.9, run="bad")
    if callable(content):
        doc = json.loads(path.read_text())
        content(doc["metrics"])
        content = json.dumps(doc)
    path.write_text(content)
    with pytest.raises(ResultsError, match=re.escape(str(path)) + ".*" + message):
        results_report(str(runs), "toy")
    result = CliRunner().invoke(app, ["report", "--root", str(runs), "--dataset", "toy"])
    assert result.exit_code == 2 and str(path) in result.output and "error:" in result.output


def test_the_report_command_prints_and_writes_the_table(runs):
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--root", str(runs), "--dataset", "toy"])
    assert result.exit_code == 0, result.output
    assert "| real | v1 | resnet18 | 3 (0, 1, 2) | 92.00 ± 2.00 | 99.33 ± 0.58 | - | - | - |" in result.output
    assert "left out:" in result.output and "in-progress" in result.output
    assert f"{runs}/toy/reports/results.md" in result.output
    assert (runs / "toy" / "reports" / "results.json").is_file()

    as_json = runner.invoke(app, ["report", "--root", str(runs), "--dataset", "toy", "--version", "v1-baseline",
                                  "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [(r["data"], r["version"]) for r in rows] == [("synthetic", "v1-baseline")]
    assert rows[0]["top1"]["mean"] == pytest.approx(0.65)

    missing = runner.invoke(app, ["report", "--root", str(runs), "--dataset", "toy", "--version", "v7"])
    assert missing.exit_code == 2 and "v7 does not exist" in missing.output
    assert runner.invoke(app, ["report", "--root", str(runs)]).exit_code == 2  # --dataset is required


def test_read_runs_lists_a_version_without_runs(tmp_path):
    store = Store(str(tmp_path / "toy" / "v1"))
    runs, notes = read_runs([store])
    assert runs == [] and notes == [f"{tmp_path}/toy/v1/runs: no runs in this version"]
    assert aggregate_runs([]) == []


@pytest.mark.slow
def test_the_results_table_is_published_as_artifacts_without_secrets(harness, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from realfake.redact import register_secret
    from tasks.reports import results_task

    secret = f"s3cr3t{uuid.uuid4().hex}"
    register_secret(secret)
    root = tmp_path / secret / "out"  # a credential that ended up in a path must not reach the UI
    _run(root, "v1", "real", 0, 0.90, 0.99)
    _run(root, "v1", "real", 1, 0.92, 0.99)
    _run(root, "v1", "synthetic", 0, 0.80, 0.95, ood=_ood(0.30))

    @flow
    def publish() -> dict:
        return results_task(str(root), "toy")

    state = publish(return_state=True)
    out = state.result()
    assert out["rows"] == 2 and out["runs"] == 3 and out["markdown"].endswith("toy/reports/results.md")
    ran = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])  # the session's server has other runs
    with get_client(sync_client=True) as c:
        (table,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["toy-results"]),
                                                                   flow_run_id=ran))
        (md,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["toy-results-table"]),
                                                                flow_run_id=ran))
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["training data"] == "real" and rows[0]["top-1 %"] == 91.0 and rows[0]["top-1 std"] == 1.41
    assert rows[1]["imagenet_r top-1 %"] == 30.0 and rows[0]["imagenet_r top-1 %"] is None
    assert "| real | v1 | resnet18 | 2 (0, 1) | 91.00 ± 1.41 |" in md.data
    assert secret not in md.data and secret not in json.dumps(rows) and "***" in md.data


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def test_confusion_png_draws_the_matrix_and_refuses_bad_input():
    perfect = _png(confusion_png([[5, 0, 0], [0, 3, 0], [0, 0, 2]], ["cat", "dog", "emu"], title="real"))
    confused = _png(confusion_png([[0, 5, 0], [0, 0, 3], [2, 0, 0]], ["cat", "dog", "emu"], title="real"))
    assert perfect.size[0] > 200 and perfect.size[1] > 200
    assert perfect.tobytes() != confused.tobytes()
    big = _png(confusion_png([[1 if i == j else 0 for j in range(300)] for i in range(300)]))  # no labels, no text
    assert big.size[0] > perfect.size[0]
    with pytest.raises(ValueError, match="square"):
        confusion_png([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        confusion_png([[1, 0, 0], [0, 1, 0], [0, 0, 1]], ["a", "b"])
    with pytest.raises(ValueError, match="negative"):
        confusion_png([[1, -1], [0, 1]])


def test_write_confusion_plot_names_classes_from_the_manifest(tmp_path):
    store = Store(str(tmp_path / "toy" / "v1"))
    rows = [{"sample_id": f"{c}/{i}.png", "split": "test", "label": k, "class_name": c, "uri": f"/x/{c}/{i}.png",
             "sha256": f"{k}{i}", "width": 8, "height": 8} for k, c in enumerate(["ant", "bee"]) for i in range(2)]
    store.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), *MANIFEST)
    metrics = {"data": "synthetic", "confusion": [[2, 0], [1, 1]]}
    uri = write_confusion_plot(store, "synthetic-resnet18-s0", metrics)
    assert uri == f"{tmp_path}/toy/v1/runs/synthetic-resnet18-s0/confusion.png"
    _png(Path(uri).read_bytes())
    # the same picture as drawing it with the manifest's names by hand
    assert Path(uri).read_bytes() == confusion_png([[2, 0], [1, 1]], ["ant", "bee"], "synthetic -> real test")
    with pytest.raises(ValueError, match="no 'confusion'"):
        write_confusion_plot(store, "r", {"top1": 0.5})

