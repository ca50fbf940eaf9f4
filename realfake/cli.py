"""The ``realfake`` command: the same verbs as the Prefect flows, without Prefect.

Every command takes a preset (``--preset``), a YAML file (``--config``) and ``--set section.field=value``
overrides, validated, then checked by the pre-flight of its stage (:mod:`realfake.preflight`), before any work
starts. Long loops show progress bars. A user error (a bad field, a missing file, an unreachable root, ...) prints
one message naming it and the fix, with secrets masked, and exits 2; ``--traceback`` or ``REALFAKE_TRACEBACK=1``
adds the traceback. Any other exception is a bug: its (masked) traceback is printed and the exit code is 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from realfake.config import BuildConfig, ConfigError, available_presets, load_config

# Exceptions of these types are about the user's inputs or environment wherever they are raised; so are the
# project's own error types (realfake.*) and ValueError / RuntimeError / OSError raised by realfake's own code,
# whose messages name the field or file. Anything else (TypeError, KeyError, an error inside a library) is a bug.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
_PACKAGE = Path(__file__).resolve().parent
_show_traceback = False


def _raised_by_realfake(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is about the user's inputs (a message, exit 2) rather than a bug (a traceback, exit 1)."""
    if type(e).__module__.split(".")[0] == "realfake" or isinstance(e, _USER_OS_ERRORS):
        return True
    return isinstance(e, ValueError | RuntimeError | OSError) and _raised_by_realfake(e)


def _traceback_wanted() -> bool:
    return _show_traceback or os.environ.get("REALFAKE_TRACEBACK", "").strip().lower() in ("1", "true", "yes", "on")


def report_error(e: BaseException) -> int:
    """Print ``e`` the way the command line shows errors, with secrets masked; return the exit code (2: a user
    error, one message; 1: a bug, with its traceback)."""
    from realfake.redact import redact, redact_exception

    e = redact_exception(e)
    user = is_user_error(e)
    if _traceback_wanted() or not user:
        typer.echo(redact("".join(traceback.format_exception(e))).rstrip("\n"), err=True)
    if user:
        typer.echo(f"error: {redact(str(e).strip()) or type(e).__name__}", err=True)
    else:
        typer.echo("realfake stopped on an unexpected error (a bug): please report it with the traceback above",
                   err=True)
    return 2 if user else 1


class _App(typer.Typer):
    """The command group; run as a program it turns an exception into :func:`report_error`'s message and exit
    code instead of Python's traceback (in-process callers, such as tests, still receive the exception)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every exception ends here, reported once
            sys.exit(report_error(e))


# Plain tracebacks: the error's message stays on one line, whole (rich's boxes wrap and cut it)
app = _App(add_completion=False, no_args_is_help=True, help="Real-Fake synthetic dataset factory.",
           pretty_exceptions_enable=False)

Preset = Annotated[str | None, typer.Option("--preset", "-p", help="Preset name (see `realfake presets`).")]
ConfigFile = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file (overrides the preset).")]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).")]


StorageFile = Annotated[str | None, typer.Option(
    "--config", "-c", help="YAML config file: its storage section (endpoint, region, ...) reaches the URI.")]
StorageSets = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Storage override: storage.field=value, e.g. storage.endpoint_url=http://minio:9000.")]


def _cfg(preset: str | None, config: str | None, sets: list[str] | None, stage: str | None = None) -> BuildConfig:
    """The validated configuration; with ``stage``, checked by that stage's pre-flight too."""
    from realfake.redact import register_overrides

    register_overrides(sets)  # a credential given as an override is refused, and masked wherever it is quoted
    try:
        cfg = load_config(preset=preset, file=config, overrides=sets)
        if stage is not None:
            from realfake.preflight import preflight

            preflight(cfg, stage=stage)
        return cfg
    except ConfigError as e:
        raise typer.Exit(report_error(e)) from None


def _storage_options(config: str | None, sets: list[str] | None, uri: str) -> dict:
    """fsspec options of a command that reads a stored version by URI, once ``uri`` proved readable."""
    from realfake.config import load_storage_config
    from realfake.data.storage import resolve_storage_options
    from realfake.preflight import check_readable
    from realfake.redact import register_overrides

    register_overrides(sets)
    try:
        options = resolve_storage_options(load_storage_config(config, sets))
        check_readable(uri, options)
    except ConfigError as e:
        raise typer.Exit(report_error(e)) from None
    return options


def _print(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
          show_traceback: Annotated[bool, typer.Option(
              "--traceback", help="Print the traceback of an error too (or set REALFAKE_TRACEBACK=1).")] = False,
          ) -> None:
    global _show_traceback
    _show_traceback = show_traceback
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "aiobotocore", "s3fs", "fsspec"):
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
          baseline_prompt: Annotated[str, typer.Option(
              help="The baseline's prompt: caption (the authors': the build's prompt, caption kept where the preset "
              "captions), class_name, or a_photo_of.")] = "caption",
          measure: Annotated[bool, typer.Option(help="Train and evaluate classifiers on the results.")] = True) -> None:
    """Build a dataset version end to end (prepare, finetune, synthesize, finalize) and measure it."""
    from realfake.build import BASELINE_PROMPTS, run_build

    if baseline_prompt not in BASELINE_PROMPTS:
        raise typer.BadParameter(f"use one of {', '.join(BASELINE_PROMPTS)}", param_hint="--baseline-prompt")
    cfg = _cfg(preset, config, set)
    report = run_build(cfg, compare_baseline=baseline, measure=measure, progress=True, baseline=baseline_prompt)
    typer.echo(report["table"])
    typer.echo(f"\nreport: {report['report']}\ngrid:   {report['grid']}")
    for name, uri in report["locations"]["shards"].items():
        typer.echo(f"shards ({name}): {uri}\ncard   ({name}): {report['locations']['card'][name]}")


@app.command()
def demo(set: Sets = None) -> None:
    """The demo preset end to end with the baseline comparison (what `make demo` runs through Prefect)."""
    build(preset="demo", config=None, set=set, baseline=True, baseline_prompt="caption", measure=True)


@app.command()
def plan(
    preset: Preset = None,
    config: ConfigFile = None,
    set: Sets = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the build runs on: divides wall time, splits the global "
                                      "batches (the paper used 8).")] = 1,
    paper_counts: Annotated[bool, typer.Option(
        "--paper-counts", help="Take the real counts from the paper's Tab. 5 instead of listing the source.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of the tables.")] = False,
) -> None:
    """What a build will do and cost, before it runs: image counts, steps, bytes and GPU-hours per stage.

    Offline and in seconds: no model is loaded; GPU-hours come from the rates measured in benchmarks/results.
    """
    from realfake.plan import build_plan, format_plan, load_plan_config

    try:
        cfg, listable = load_plan_config(preset, config, set)
        result = build_plan(cfg, gpus=gpus, list_source=listable and not paper_counts)
    except ConfigError as e:
        raise typer.Exit(report_error(e)) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_plan(result))


@app.command()
def prepare(preset: Preset = None, config: ConfigFile = None, set: Sets = None) -> None:
    """Ingest the source (manifest, rejects), captions and guidance embeddings."""
    from realfake.build import prepare as run

    _print(run(_cfg(preset, config, set, stage="prepare"), progress=True))


@app.command()
def finetune(preset: Preset = None, config: ConfigFile = None, set: Sets = None,
             scope: Annotated[str | None, typer.Option(help="Adapter scope: all or a class label.")] = None) -> None:
    """Fine-tune the LoRA adapter(s) under the Real-Fake objective."""
    from realfake.build import finetune as run
    from realfake.build import finetune_scopes

    cfg = _cfg(preset, config, set, stage="finetune")
    _print([run(cfg, s, progress=True) for s in ([scope] if scope else finetune_scopes(cfg))])


@app.command()
def synthesize(preset: Preset = None, config: ConfigFile = None, set: Sets = None,
               shard: Annotated[list[str] | None, typer.Option(help="Only these shards (repeatable).")] = None) -> None:
    """Generate and commit the missing shards (resumes; committed shards are skipped)."""
    from realfake.build import synthesize as run

    _print(run(_cfg(preset, config, set, stage="synthesize"), shard, progress=True))


@app.command()
def finalize(preset: Preset = None, config: ConfigFile = None, set: Sets = None) -> None:
    """Write the index and the card, then verify the version."""
    from realfake.build import finalize as run

    card = run(_cfg(preset, config, set, stage="finalize"))
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
    m = run(_cfg(preset, config, sets, stage="train-eval"), data, progress=True)
    _print({k: v for k, v in m.items() if k not in ("confusion",)})


@app.command()
def verify(
    uri: str,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Shards checked at a time (default: up to 8, bounded by shard size).")] = None,
    config: StorageFile = None,
    set: StorageSets = None,
) -> None:
    """Check a dataset version end to end; exits non-zero listing every problem."""
    from realfake.data.card import verify_version

    problems = verify_version(uri, _storage_options(config, set, uri), workers=workers)
    if problems:
        for p in problems:
            typer.echo(f"FAIL {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {uri}")


@app.command()
def inspect(uri: str, config: StorageFile = None, set: StorageSets = None) -> None:
    """Print a version's card summary and per-class counts."""
    from realfake.data.card import inspect_version

    typer.echo(inspect_version(uri, _storage_options(config, set, uri)))


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
    config: StorageFile = None,
    set: StorageSets = None,
) -> None:
    """Table of every train-eval run of a dataset: mean +- std over seeds per training data and recipe.

    Writes {root}/{dataset}/reports/results.md and results.json.
    """
    from realfake.results import ResultsError, results_report

    options = _storage_options(config, set, root)
    try:
        res = results_report(root, dataset, version, options)
    except ResultsError as e:
        raise typer.Exit(report_error(e)) from None
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
