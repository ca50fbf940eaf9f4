"""One preflight, one clear error: what a user of the ``realfake`` program sees when an input is wrong.

The CLI cases run ``.venv/bin/realfake`` in a subprocess, the user's path, against real things: the Hugging Face
hub in offline mode with an empty cache, and moto's S3 server on loopback (one that accepts any credentials, and
one with IAM authentication on, which refuses unknown ones). The Prefect cases run real flows on a throwaway
Prefect API and read back what the server kept of a failed run: the flow and task run state messages and the
persisted exception.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support.s3 import BUCKET, MotoServer, moto  # noqa: F401 - pytest fixture

REALFAKE = str(Path(sys.executable).with_name("realfake"))


def _folder(root: Path, classes=("a", "b"), per_class: int = 3) -> str:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(root / c / f"{i}.png")
    return str(root)


def _config(tmp_path: Path, name: str = "cfg", **over) -> Path:
    """A small config file: local source, no captions / guidance unless asked, CPU."""
    data = {"dataset": "mini", "version": "v1", "root": str(tmp_path / "out"), "device": "cpu",
            "source": {"kind": "image_folder", "uri": _folder(tmp_path / "src")},
            "caption": {"enabled": False}, "guidance": {"enabled": False}}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user without AWS credentials or endpoint settings (no instance role either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "REALFAKE_"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_EC2_METADATA_DISABLED="true", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"))
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([REALFAKE, *args], env=env, capture_output=True, text=True, timeout=600)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------------------
# Pre-flight of the stage commands
# --------------------------------------------------------------------------------------------------------
def test_prepare_offline_with_an_uncached_captioner_is_one_line_naming_the_field(tmp_path):
    cfg = _config(tmp_path, caption={"enabled": True}, models={"captioner": "some-org/not-cached-captioner"})
    proc = _run(["prepare", "-c", str(cfg)], _env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert line.startswith("error: pre-flight check failed: models.captioner = 'some-org/not-cached-captioner': ")
    assert "HF_HUB_OFFLINE=1" in line and "hf download some-org/not-cached-captioner" in line
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing ingested before the check


def test_prepare_of_a_paper_preset_offline_names_both_models_under_one_message(tmp_path):
    wnids = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
             "n03445777", "n03888257")  # the imagenette preset's classes (the authors' list)
    src = _folder(tmp_path / "imagenette" / "train", wnids, per_class=1)
    proc = _run(["prepare", "-p", "imagenette", "--set", f"source.uri={Path(src).parent}",
                 "--set", f"root={tmp_path / 'out'}", "--set", "device=cpu"], _env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    head, *problems = _error_lines(proc)
    assert head == "error: pre-flight check failed (2 problems):"
    assert [p.split(" = ")[0].strip() for p in problems] == ["models.clip", "models.captioner"]
    assert all("not in the Hugging Face cache" in p and "hf download" in p for p in problems)


def test_finalize_checks_only_the_root(tmp_path):
    # models and the source are not finalize's business: an uncached captioner does not stop it, a root that is a
    # file does
    (tmp_path / "a-file").write_text("x")
    cfg = _config(tmp_path, caption={"enabled": True}, models={"captioner": "some-org/not-cached-captioner"},
                  root=str(tmp_path / "a-file" / "out"))
    proc = _run(["finalize", "-c", str(cfg)], _env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert line.startswith(f"error: pre-flight check failed: root = '{tmp_path / 'a-file' / 'out'}'")


# --------------------------------------------------------------------------------------------------------
# Object storage: the storage section, credentials from the environment only
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def s3_root(moto) -> str:  # noqa: F811
    return f"s3://{BUCKET}/cli-{secrets.token_hex(4)}"


@pytest.mark.s3
def test_s3_root_without_credentials_is_one_line_naming_root_and_the_fix(tmp_path, moto, s3_root):  # noqa: F811
    cfg = _config(tmp_path, root=s3_root, storage={"endpoint_url": moto.endpoint_url})
    proc = _run(["prepare", "-c", str(cfg)], _env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert line.startswith(f"error: pre-flight check failed: root = '{s3_root}': no credentials for "
                           f"{moto.endpoint_url} were found")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line and "AWS_PROFILE" in line


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[MotoServer]:
    """A second moto server with IAM authentication on: requests signed with an unknown key are refused."""
    before = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read by the server process it starts
    try:
        server = MotoServer().start()
    finally:
        if before is None:
            del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = before
    yield server
    server.stop()


@pytest.mark.s3
def test_s3_root_with_wrong_credentials_is_one_line_naming_root(tmp_path, iam_moto):
    wrong = f"wrong{secrets.token_hex(12)}"
    cfg = _config(tmp_path, root=f"s3://{BUCKET}/x", storage={"endpoint_url": iam_moto.endpoint_url})
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7WRONG00", AWS_SECRET_ACCESS_KEY=wrong)
    proc = _run(["prepare", "-c", str(cfg)], env)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert line.startswith(f"error: pre-flight check failed: root = 's3://{BUCKET}/x': {iam_moto.endpoint_url} "
                           "refused the credentials (InvalidAccessKeyId)")
    assert wrong not in proc.stderr


@pytest.mark.s3
def test_the_storage_section_reaches_an_s3_compatible_endpoint_with_credentials_from_the_environment(
        tmp_path, moto, s3_root):  # noqa: F811
    import s3fs

    cfg = _config(tmp_path, root=s3_root, storage={"endpoint_url": moto.endpoint_url, "region": "us-east-1",
                                                   "addressing_style": "path"})
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = _run(["prepare", "-c", str(cfg)], env)
    assert proc.returncode == 0, proc.stderr
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.endpoint_url, skip_instance_cache=True)
    manifest = f"{s3_root.removeprefix('s3://')}/mini/v1/real/manifest.parquet"
    assert fs.exists(manifest)
    # the same endpoint reaches a stored version by URI, from the config file's storage section
    proc = _run(["inspect", f"{s3_root}/mini/v1", "-c", str(cfg)], env)
    assert "cannot be reached" not in proc.stderr and "no credentials" not in proc.stderr
    assert "dataset.json" in proc.stderr  # reached the version: it has no card yet (prepare writes none)
    # an endpoint where nothing listens: named, with the root, after one attempt
    unreachable = _config(tmp_path, "unreachable", root=s3_root, storage={"endpoint_url": "http://127.0.0.1:9"})
    proc = _run(["prepare", "-c", str(unreachable)], env)
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert f"root = '{s3_root}': cannot connect to http://127.0.0.1:9" in line


def test_a_credential_in_the_configuration_is_refused_naming_the_standard_places(tmp_path):
    planted = f"cfgSECRET{secrets.token_hex(12)}"
    cfg = _config(tmp_path, storage={"endpoint_url": "http://127.0.0.1:9000", "options": {"secret": planted}})
    for args in (["prepare", "-c", str(cfg)],
                 ["prepare", "-c", str(_config(tmp_path, "plain")), "--set", f"storage.key={planted}"],
                 ["verify", str(tmp_path / "out"),
                  "--set", f"storage.options.client_kwargs.aws_secret_access_key={planted}"]):
        proc = _run(args, _env(tmp_path))
        assert proc.returncode == 2, proc.stderr
        text = proc.stdout + proc.stderr
        assert planted not in text
        assert "credentials are not accepted in the configuration" in text
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in text and "instance role" in text


def test_the_traceback_is_one_flag_or_variable_away_and_masked(tmp_path):
    planted = f"envSECRET{secrets.token_hex(12)}"
    src = tmp_path / f"src-{planted}"  # a path that happens to hold a secret of the environment
    cfg = _config(tmp_path, source={"uri": str(src)})
    env = _env(tmp_path, AWS_SECRET_ACCESS_KEY=planted)
    plain = _run(["prepare", "-c", str(cfg)], env)
    flag = _run(["--traceback", "prepare", "-c", str(cfg)], env)
    variable = _run(["prepare", "-c", str(cfg)], {**env, "REALFAKE_TRACEBACK": "1"})
    assert plain.returncode == flag.returncode == variable.returncode == 2
    (line,) = _error_lines(plain)
    assert line.startswith(f"error: pre-flight check failed: source.uri = '{tmp_path}/src-***': ")
    for proc in (flag, variable):
        assert "Traceback (most recent call last)" in proc.stderr and "PreflightError" in proc.stderr
        assert proc.stderr.rstrip().endswith(line)
    assert all(planted not in p.stderr for p in (plain, flag, variable))


def test_user_errors_and_bugs_are_told_apart():
    import json

    from realfake.cli import is_user_error
    from realfake.config import ConfigError, load_config

    def raised(fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the exception is the subject
            return e
        raise AssertionError("no exception")

    assert is_user_error(raised(load_config, "no-such-preset"))  # the project's own type
    assert isinstance(raised(load_config, "no-such-preset"), ConfigError)
    assert is_user_error(raised(open, "/no/such/file"))  # about a file the user named
    from realfake.build import train_eval

    assert is_user_error(raised(train_eval, load_config(preset="demo"), "bogus"))  # realfake's own ValueError
    assert not is_user_error(raised(json.loads, "{"))  # a ValueError inside a library: a bug until proven otherwise
    assert not is_user_error(raised(lambda: {}["missing"]))  # KeyError: a bug


# --------------------------------------------------------------------------------------------------------
# Prefect keeps failure messages: they are masked before it does
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_failed_flow_run_keeps_no_secret_in_its_state_messages_or_result(harness, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.params import PrepareParams
    from flows.prepare import prepare_flow

    env_secret = f"envSECRET{secrets.token_hex(12)}"
    override_secret = f"setSECRET{secrets.token_hex(12)}"
    url_secret = f"urlSECRET{secrets.token_hex(12)}"
    form_secret = f"formSECRET{secrets.token_hex(12)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    bad_images = tmp_path / f"src-{env_secret}"
    for c in ("a", "b"):
        (bad_images / c).mkdir(parents=True)
        (bad_images / c / "x.png").write_bytes(b"not an image")
    base = {"preset": None, "dataset": "mini", "version": "v1", "root": str(tmp_path / "out"), "device": "cpu",
            "caption": {"enabled": False}, "guidance": {"enabled": False}}
    cases = {
        "override": PrepareParams(**base, source={"uri": str(bad_images)},
                                  overrides=[f"storage.key={override_secret}"]),
        "uri": PrepareParams(**base, source={"uri": f"http://builder:{url_secret}@127.0.0.1:9/data"}),
        "task": PrepareParams(**base, source={"uri": str(bad_images)}),  # fails inside the prepare task
        # a form as the UI or an API client sends it: Prefect validates it before the flow runs
        "form": {**base, "source": {"uri": str(bad_images)}, "storage": {"secret": form_secret}},
    }
    planted = (env_secret, override_secret, url_secret, form_secret)
    for name, params in cases.items():
        state = prepare_flow(params, return_state=True)
        assert state.is_failed(), name
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            kept = [client.read_flow_run(run_id).state.message]
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            kept += [t.state.message for t in tasks]
        exc = state.result(raise_on_failure=False)
        kept.append(f"{type(exc).__name__}: {exc}")
        text = "\n".join(m or "" for m in kept)
        assert not [s for s in planted if s in text], f"{name}: a secret is kept by Prefect:\n{text}"
        if name == "override":
            assert "storage.key: credentials are not accepted" in text
        elif name == "form":
            assert "storage.secret: credentials are not accepted" in text
        elif name == "uri":
            assert "source.uri = 'http://builder:***@127.0.0.1:9/data'" in text
        else:
            assert len(tasks) == 1 and tasks[0].state.is_failed() and "src-***" in text and "no usable image" in text


def test_storage_options_come_from_the_section_under_the_callers_own():
    from realfake.config import StorageConfig
    from realfake.data.storage import resolve_storage_options

    assert resolve_storage_options(StorageConfig()) == {}  # the environment's settings stay in charge
    section = StorageConfig(endpoint_url="http://minio:9000/", region="us-east-1", addressing_style="path",
                            options={"config_kwargs": {"max_pool_connections": 50}})
    opts = resolve_storage_options(section, {"key": "k", "client_kwargs": {"region_name": "eu-west-1"}})
    assert opts == {"endpoint_url": "http://minio:9000", "key": "k", "client_kwargs": {"region_name": "eu-west-1"},
                    "config_kwargs": {"s3": {"addressing_style": "path"}, "max_pool_connections": 50}}
    assert resolve_storage_options(section, opts) == opts  # resolving twice changes nothing


def test_a_refused_credential_is_masked_in_pydantics_own_message_too():
    from pydantic import ValidationError

    from realfake.config import BuildConfig
    from realfake.redact import redact

    planted = f"pydSECRET{secrets.token_hex(12)}"
    with pytest.raises(ValidationError) as err:  # str() of a ValidationError quotes its input
        BuildConfig.model_validate({"dataset": "d", "source": {"kind": "demo_digits"},
                                    "storage": {"options": {"client_kwargs": {"aws_secret_access_key": planted}}}})
    assert planted not in str(err.value) and "': '***'}" in str(err.value)
    assert redact(f"x {planted} y") == "x *** y"  # and registered: masked wherever it shows up later
