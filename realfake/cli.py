"""The ``realfake`` command: the same verbs as the Prefect flows, without Prefect.

Every command takes a preset (``--preset``), a YAML file (``--config``) and ``--set section.field=value``
overrides, validated before any work starts. Long loops show progress bars.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer

from realfake.config import BuildConfig, ConfigError, available_presets, load_config

# Plain tracebacks: the error's message stays on one line, whole (rich's boxes wrap and cut it)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-Fake synthetic dataset factory.",
                  pretty_exceptions_enable=False)

Preset = Annotated[str | None, typer.Option("--preset", "-p", help="Preset name (see `realfake presets`).")]
ConfigFile = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file (overrides the preset).")]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).")]


def _cfg(preset: str | None, config: str | None, sets: list[str] | None) -> BuildConfig:
    try:
        return load_config(preset=preset, file=config, overrides=sets)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _print(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from realfake.redact import install_log_redaction

    install_log_redaction()  # credentials from the environment never reach the log


@app.command()
def presets() -> None:
    """List the shipped presets."""
    for name in available_presets():
        typer.echo(name)


@app.command()
def build(preset: Preset = None, config: ConfigFile = None, set: Sets = None,
          baseline: Annotated[bool, typer.Option(help="Also build the text-to-image baseline version.")] = False,
          measure: Annotated[bool, typer.Option(help="Train and evaluate classifiers on the results.")] = True) -> None:
    """Build a dataset version end to end (prepare, finetune, synthesize, finalize) and measure it."""
    from realfake.build import run_build

    cfg = _cfg(preset, config, set)
    report = run_build(cfg, compare_baseline=baseline, measure=measure, progress=True)
    typer.echo(report["table"])
    typer.echo(f"\nreport: {report['report']}\ngrid:   {report['grid']}")
    for name, uri in report["locations"]["shards"].items():
        typer.echo(f"shards ({name}): {uri}\ncard   ({name}): {report['locations']['card'][name]}")


@app.command()
def demo(set: Sets = None) -> None:
    """The demo preset end to end with the baseline comparison (what `make demo` runs through Prefect)."""
    build(preset="demo", config=None, set=set, baseline=True, measure=True)


@app.command()
def prepare(preset: Preset = None, config: ConfigFile = None, set: Sets = None) -> None:
    """Ingest the source (manifest, rejects), captions and guidance embeddings."""
    from realfake.build import prepare as run

    _print(run(_cfg(preset, config, set), progress=True))


@app.command()
def finetune(preset: Preset = None, config: ConfigFile = None, set: Sets = None,
             scope: Annotated[str | None, typer.Option(help="Adapter scope: all or a class label.")] = None) -> None:
    """Fine-tune the LoRA adapter(s) under the Real-Fake objective."""
    from realfake.build import finetune as run
    from realfake.build import finetune_scopes

    cfg = _cfg(preset, config, set)
    _print([run(cfg, s, progress=True) for s in ([scope] if scope else finetune_scopes(cfg))])


@app.command()
def synthesize(preset: Preset = None, config: ConfigFile = None, set: Sets = None,
               shard: Annotated[list[str] | None, typer.Option(help="Only these shards (repeatable).")] = None) -> None:
    """Generate and commit the missing shards (resumes; committed shards are skipped)."""
    from realfake.build import synthesize as run

    _print(run(_cfg(preset, config, set), shard, progress=True))


@app.command()
def finalize(preset: Preset = None, config: ConfigFile = None, set: Sets = None) -> None:
    """Write the index and the card, then verify the version."""
    from realfake.build import finalize as run

    card = run(_cfg(preset, config, set))
    typer.echo(f"verified: {card.get('synthetic', {}).get('num_images')} images")


@app.command("train-eval")
def train_eval(
    preset: Preset = None,
    config: ConfigFile = None,
    set: Sets = None,
    data: Annotated[str, typer.Option(help="real, synthetic or real+synthetic.")] = "synthetic",
    mix_ratio: Annotated[float | None, typer.Option(
        help="real+synthetic: synthetic images per real image, the larger side subsampled per class "
        "(train_data.mix_ratio; default 1 = equal amounts).")] = None,
    scale: Annotated[int | None, typer.Option(
        help="Synthetic images per real image, 1-10: replicas 0..K-1 of the synthetic version(s) "
        "(train_data.synthetic_scale; default: every image).")] = None,
    synthetic_version: Annotated[list[str] | None, typer.Option(
        "--synthetic-version", help="Pool the synthetic images of this version of the dataset (repeatable; "
        "train_data.synthetic_versions; default: the configured version).")] = None,
    streaming: Annotated[bool | None, typer.Option(
        "--streaming/--in-memory", help="Stream synthetic shards in the DataLoader workers, or decode them into "
        "memory first (train_data.streaming).")] = None,
) -> None:
    """Train the classifier on a version's data and evaluate it on the real test split."""
    from realfake.build import train_eval as run
    from realfake.data.loaders import DATA_MODES

    if data not in DATA_MODES:
        typer.echo(f"error: --data must be one of {', '.join(DATA_MODES)}, got {data!r}", err=True)
        raise typer.Exit(2)
    sets = list(set or [])
    for name, value in (("mix_ratio", mix_ratio), ("synthetic_scale", scale), ("streaming", streaming)):
        if value is not None:
            sets.append(f"train_data.{name}={json.dumps(value)}")
    if synthetic_version:
        sets.append(f"train_data.synthetic_versions={json.dumps(list(synthetic_version))}")
    m = run(_cfg(preset, config, sets), data, progress=True)
    _print({k: v for k, v in m.items() if k not in ("confusion",)})


@app.command()
def verify(
    uri: str,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Shards checked at a time (default: up to 8, bounded by shard size).")] = None,
) -> None:
    """Check a dataset version end to end; exits non-zero listing every problem."""
    from realfake.data.card import verify_version

    problems = verify_version(uri, workers=workers)
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {uri}")


@app.command()
def inspect(uri: str) -> None:
    """Print a version's card summary and per-class counts."""
    from realfake.data.card import inspect_version

    typer.echo(inspect_version(uri))


@app.command("demo-base")
def demo_base(
    retrain: Annotated[bool, typer.Option(help="Train from scratch into the cache, not the shipped copy.")] = False,
    out: Annotated[str | None, typer.Option(help="Copy the resulting folder here (to re-ship it).")] = None,
) -> None:
    """Print the demo base folder; --retrain reproduces the shipped pre-trained tiny base from its recipe."""
    import shutil

    from realfake.models.demo_base import ensure_demo_base

    folder = ensure_demo_base(retrain=retrain)
    if out:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        folder = out
    typer.echo(str(folder))


@app.command()
def report(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (the folder under the root).")],
    root: Annotated[str, typer.Option(help="Storage root: a local path or an fsspec URI such as s3://b/p.")] = "./out",
    version: Annotated[list[str] | None, typer.Option(
        "--version", help="Only this version (repeatable; default: every version with runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of the table.")] = False,
) -> None:
    """Table of every train-eval run of a dataset: mean +- std over seeds per training data and recipe.

    Writes {root}/{dataset}/reports/results.md and results.json.
    """
    from realfake.results import ResultsError, results_report

    try:
        res = results_report(root, dataset, version)
    except ResultsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        _print(res["rows"])
    else:
        typer.echo(res["table"])
    for note in res["notes"]:
        typer.echo(f"left out: {note}", err=True)
    typer.echo(f"\nwritten: {res['markdown']}\n         {res['json']}", err=as_json)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
