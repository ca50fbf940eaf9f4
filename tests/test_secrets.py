"""Secrets never leave the process: logs, exception messages, the card, the report and every written file.

Unit tests pin down :mod:`realfake.redact` (the log filter, the process-wide installation, dict scrubbing, the
AWS credentials file). The build test plants secrets in the environment and in ``storage_options``, runs a
miniature build and two failing builds through the real library, and greps everything they produced. The artifact
tests check that the Prefect layer publishes only through the scrubbing ``create_*_artifact`` functions, then
publish secret-bearing text through them on a real Prefect server and grep what the server kept.
"""

from __future__ import annotations

import io
import logging
import secrets
from pathlib import Path

import pytest
from conftest import mini_config

from realfake.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact,
    register_storage_options,
    scrub,
    secret_values,
    uninstall_log_redaction,
)


@pytest.fixture
def planted(monkeypatch, tmp_path) -> dict[str, str]:
    """Fresh secrets in every standard place: environment, AWS credentials file, storage_options."""
    values = {
        "aws_secret": f"awsSECRET{secrets.token_hex(16)}",
        "aws_session": f"awsSESSION{secrets.token_hex(24)}",
        "hf": "hf_" + secrets.token_hex(17),
        "profile_secret": f"profileSECRET{secrets.token_hex(12)}",
        "so_secret": f"soSECRET{secrets.token_hex(16)}",
        "so_token": f"soTOKEN{secrets.token_hex(16)}",
        "so_nested": f"soNESTED{secrets.token_hex(16)}",
    }
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", values["aws_secret"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", values["aws_session"])
    monkeypatch.setenv("HF_TOKEN", values["hf"])
    creds = tmp_path / "aws-credentials"
    creds.write_text(f"[default]\naws_access_key_id = AKIAABCDEFGHIJKLMNOP\n"
                     f"aws_secret_access_key = {values['profile_secret']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    return values


def _storage_options(v: dict[str, str]) -> dict:
    return {"key": "AKIAQWERTYUIOPASDFGH", "secret": v["so_secret"], "token": v["so_token"],
            "client_kwargs": {"aws_secret_access_key": v["so_nested"], "region_name": "us-east-1"}}


def _assert_clean(text: str, values: dict[str, str], where: str) -> None:
    leaked = [k for k, v in values.items() if v in text]
    assert not leaked, f"{where} contains the planted secret(s) {leaked}"


# --------------------------------------------------------------------------------------------------------
# realfake.redact
# --------------------------------------------------------------------------------------------------------
def test_known_secrets_are_collected_from_every_standard_place(planted):
    so = _storage_options(planted)
    values = secret_values(so)
    for k in ("aws_secret", "aws_session", "hf", "profile_secret", "so_secret", "so_token", "so_nested"):
        assert planted[k] in values, k
    assert "us-east-1" not in values  # not under a secret-like key


def test_redact_masks_values_and_secret_shaped_strings(planted):
    text = (f"cannot read s3://bucket/x with {planted['aws_secret']} / {planted['hf']}; "
            "url https://user:hunter2hunter2@host/p?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIA/x "
            "Authorization: Bearer eyJhbGciOi.payload.sig hf_ABCDEFGHIJKLMNOPQRSTUVWX AKIAIOSFODNN7EXAMPLE")
    out = redact(text)
    _assert_clean(out, planted, "redact()")
    for s in ("hunter2hunter2", "abcdef0123", "eyJhbGciOi", "hf_ABCDEFGHIJKLMNOPQRSTUVWX", "AKIAIOSFODNN7EXAMPLE"):
        assert s not in out, s
    assert "s3://bucket/x" in out and "user:***@host" in out


def test_secret_keys_are_recognised_by_whole_words():
    for k in ("secret", "key", "token", "password", "aws_secret_access_key", "AWS_SESSION_TOKEN", "hf_token",
              "accessKeyId", "sas_token", "connection_string", "Authorization"):
        assert is_secret_key(k), k
    for k in ("max_new_tokens", "tokenizer", "client_kwargs", "endpoint_url", "dataset", "num_beams", "keys_seen",
              "author"):
        assert not is_secret_key(k), k


def test_scrub_masks_secret_keys_and_secret_values_but_keeps_the_rest(planted):
    card = {"config": {"caption": {"max_new_tokens": 30}, "root": "s3://bucket/out"},
            "storage_options": _storage_options(planted), "note": f"token was {planted['hf']}",
            "empty_token": None, "steps": [1, {"password": "hunter2hunter2"}]}
    out = scrub(card)
    assert out["config"] == card["config"]
    assert out["storage_options"]["secret"] == MASK and out["storage_options"]["key"] == MASK
    assert out["storage_options"]["client_kwargs"] == {"aws_secret_access_key": MASK, "region_name": "us-east-1"}
    assert out["note"] == f"token was {MASK}" and out["empty_token"] is None
    assert out["steps"] == [1, {"password": MASK}]
    _assert_clean(repr(out), planted, "scrub()")


def test_filter_masks_message_arguments_and_traceback(planted):
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test_secrets.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting with %s", planted["aws_secret"])
        try:
            raise PermissionError(f"denied for token {planted['aws_session']}")
        except PermissionError:
            log.exception("upload failed for %r", {"secret": planted["hf"]})
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    assert "connecting with ***" in out and "PermissionError: denied for token ***" in out
    _assert_clean(out, planted, "filtered log")


def test_installed_redaction_covers_every_logger_and_registered_options(planted):
    so = {"secret": f"registered{secrets.token_hex(8)}"}
    register_storage_options(so)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)  # a handler added by someone else, with no filter of its own
    root = logging.getLogger()
    root.addHandler(handler)
    install_log_redaction()
    install_log_redaction()  # idempotent
    try:
        logging.getLogger("botocore.some.child").error("signing with %s and %s", planted["aws_secret"], so["secret"])
        try:
            {}["x"]
        except KeyError:
            logging.getLogger("prefect.task_runs").exception("env: %s", planted["hf"])
    finally:
        uninstall_log_redaction()
        root.removeHandler(handler)
    out = buf.getvalue()
    assert "signing with *** and ***" in out and "KeyError" in out
    _assert_clean(out, {**planted, "registered": so["secret"]}, "process-wide log")


# --------------------------------------------------------------------------------------------------------
# A miniature build with planted secrets: grep everything it produced
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def all_logs():
    """Every log record of the process at DEBUG, formatted with tracebacks, as the CLI or a worker would."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old)


def _all_files_text(root: Path) -> str:
    parts = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            parts.append(p.read_bytes().decode("latin-1"))  # binary-safe: a secret is ASCII either way
    return "\n".join(parts)


@pytest.mark.slow
def test_miniature_build_and_its_failures_leak_no_secret(planted, all_logs, capfd, tmp_path, tiny_base,
                                                         digits_folder):
    from realfake.build import run_build
    from realfake.data.card import inspect_version

    so = _storage_options(planted)
    out_root = tmp_path / "out"
    cfg = mini_config(str(out_root), tiny_base, digits_folder, source__max_per_class=3)
    report = run_build(cfg, compare_baseline=False, measure=True, storage_options=so)

    # failure paths: a model that cannot be loaded, a source with nothing usable
    broken_model = mini_config(str(out_root), str(tmp_path / "no-such-model"), digits_folder, version="v2")
    with pytest.raises(Exception) as model_err:
        run_build(broken_model, measure=False, storage_options=so)
    bad_src = tmp_path / "bad-src" / "a"
    bad_src.mkdir(parents=True)
    (bad_src / "x.png").write_bytes(b"")
    broken_source = mini_config(str(out_root), tiny_base, str(bad_src.parent), version="v3")
    with pytest.raises(Exception) as source_err:
        run_build(broken_source, measure=False, storage_options=so)

    import traceback

    errors = "".join("".join(traceback.format_exception(e.value)) for e in (model_err, source_err))
    assert "no-such-model" in errors and "no usable image" in errors  # the failures are the ones intended
    captured = capfd.readouterr()
    card_text = inspect_version(report["versions"]["realfake"]["uri"])
    written = _all_files_text(out_root)
    version = out_root / "mini" / "v1"  # the files grepped below include the card and the report
    assert (version / "dataset.json").is_file() and (version / "report" / "report.md").is_file()
    for where, text in {"logs": all_logs.getvalue(), "stdout/stderr": captured.out + captured.err,
                        "exceptions": errors, "card (inspect)": card_text, "written files": written,
                        "report dict": repr(report)}.items():
        _assert_clean(text, planted, where)


# --------------------------------------------------------------------------------------------------------
# Prefect artifacts: everything published is scrubbed, read back from a real Prefect server
# --------------------------------------------------------------------------------------------------------
def test_every_artifact_of_the_prefect_layer_goes_through_the_scrubbing_functions():
    import ast

    root = Path(__file__).resolve().parents[1]
    direct = []
    for path in sorted([*root.joinpath("flows").rglob("*.py"), *root.joinpath("tasks").rglob("*.py")]):
        if path == root / "tasks" / "artifacts.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "prefect.artifacts":
                direct.append(f"{path.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module == "prefect" and any(
                    a.name == "artifacts" for a in node.names):
                direct.append(f"{path.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("prefect.artifacts") for a in node.names):
                direct.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not direct, f"import the create_*_artifact functions from tasks.artifacts (they scrub secrets): {direct}"


@pytest.mark.slow
def test_artifacts_read_back_from_the_server_hold_no_secret(planted, harness):
    from prefect import artifacts as prefect_artifacts
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.artifacts import publish_card_link, publish_counts, publish_grid, publish_metrics, publish_report
    from tasks.privacy import publish_lira_report

    # Free text that reaches artifacts: class names (folder names), measures, URIs with credentials in them,
    # a report quoting an error message.
    leaky = f"https://builder:{planted['so_secret']}@minio.internal:9000/bucket/out/mini/v1"
    card = {"real": {"splits": {"train": {"0": 3, "1": 3}, "test": {"0": 1, "1": 1}},
                     "class_names": {"0": f"zero {planted['hf']}", "1": "one"}},
            "synthetic": {"classes": {"0": {"class_name": f"zero {planted['hf']}", "count": 3},
                                      "1": {"class_name": "one", "count": 3}}}}
    metrics = {"synthetic": {"top1": 0.5, "source": f"{leaky}/synthetic", "token": planted["so_token"]},
               "real": {"top1": 0.75, "source": "./out/mini/v1"}}
    report = (f"# Build report\n\n| stage | seconds |\n|---|---|\n| synthesize | 3 |\n\n"
              f"Failure: cannot write s3://bucket/x with {planted['aws_secret']} (session {planted['aws_session']})")
    lira = {"table": f"| shadows | 4 |\n|---|---|\n| source | {leaky} |\n",
            "files": {"roc": f"{leaky}/runs/privacy-lira/roc.png", "results": f"{leaky}/runs/privacy-lira/lira.json"}}

    @flow(name="secrets-artifacts")
    def publish() -> None:
        publish_counts(card, "mini", "v1")
        publish_metrics(metrics, "mini", "v1")
        publish_card_link(f"{leaky}/dataset.json", "mini", "v1")
        publish_grid(f"{leaky}/report/grid.png", "mini", "v1")
        publish_grid("s3://bucket/out/other/v1/report/grid.png", "other", "v1")
        publish_report(report, "mini", "v1")
        publish_lira_report(lira, "mini", "v1")
        # control: the same text published around the scrubbing functions reaches the server verbatim
        prefect_artifacts.create_markdown_artifact(report, key="control-unscrubbed")

    state = publish(return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"mini-v1-classes", "mini-v1-measures", "mini-v1-card", "mini-v1-grid", "other-v1-grid", "mini-v1-report",
            "mini-privacy-lira",
            "mini-privacy-lira-roc", "mini-privacy-lira-results", "control-unscrubbed"} <= set(by_key)
    control = by_key.pop("control-unscrubbed")
    assert planted["aws_secret"] in str(control.data)  # the grep below would see a leak

    for a in by_key.values():
        _assert_clean(f"{a.data}\n{a.description}", planted, f"artifact {a.key} ({a.type})")
    # what is not secret is still there
    assert "zero ***" in str(by_key["mini-v1-classes"].data) and "one" in str(by_key["mini-v1-classes"].data)
    assert "builder:***@minio.internal:9000/bucket/out/mini/v1/dataset.json" in str(by_key["mini-v1-card"].data)
    assert "| synthesize | 3 |" in str(by_key["mini-v1-report"].data)
    # object storage: named by its URI, no pre-signed URL (it would carry the key id and session token)
    grid_s3 = str(by_key["other-v1-grid"].data)
    assert "Grid file: `s3://bucket/out/other/v1/report/grid.png`" in grid_s3 and "X-Amz-" not in grid_s3
