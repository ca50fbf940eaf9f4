"""Static checks of the deployment and infrastructure files: they parse, and what they reference exists.

These files cannot run here (no Docker, no Kubernetes), so the tests check what would break first on a
cluster: YAML syntax, the Kubernetes job template against the shape of Prefect's own default template for
the kubernetes worker (shipped inside Prefect), placeholders that name declared variables, the GPU request,
entrypoints that import and take one typed parameter model, and compose references that resolve.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import typing
from pathlib import Path

import jsonschema
import prefect
import pytest
import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "infra" / "k8s-gpu-job-template.json"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
COMPOSE = REPO / "infra" / "docker-compose.yaml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _kubernetes_default() -> dict:
    meta = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    return json.loads(meta.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def _placeholders(obj) -> set[str]:
    if isinstance(obj, str):
        return set(PLACEHOLDER.findall(obj))
    if isinstance(obj, dict):
        return set().union(*(_placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_placeholders(v) for v in obj)) if obj else set()
    return set()


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def deployments() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def test_job_template_has_the_kubernetes_worker_shape(template):
    default = _kubernetes_default()
    assert set(template) == {"job_configuration", "variables"}
    # The worker reads these keys of job_configuration; a missing one fails at submission time.
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "prefect-job"  # the worker streams logs of the container with this name
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"


def test_job_template_variables_are_a_valid_schema_covering_every_placeholder(template):
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    declared = set(variables["properties"])
    used = _placeholders(template["job_configuration"])
    assert used <= declared, f"placeholders without a variable: {sorted(used - declared)}"
    for name in ("image", "gpu_count", "memory", "cpu"):
        prop = variables["properties"][name]
        assert prop.get("description"), f"job variable {name} is undocumented"
    # The variables of the default template are all still accepted (deployments written for it keep working).
    assert set(_kubernetes_default()["variables"]["properties"]) - {
        "cpu_request", "cpu_limit", "memory_request", "memory_limit"
    } <= declared


def test_job_template_requests_one_gpu_by_default(template):
    resources = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1
    # Defaults validate against the schema, and a typo'd value type is rejected.
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    jsonschema.validate(defaults, template["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu_count": "two"}, template["variables"])


def test_deployments_cover_build_and_every_stage(deployments):
    names = {d["name"] for d in deployments["deployments"]}
    assert {"build", "prepare", "finetune", "synthesize", "synthesize-shards", "train-eval", "regenerate",
            "privacy-audit"} <= names
    pools = {d["work_pool"]["name"] for d in deployments["deployments"]}
    assert pools == {"realfake-process", "realfake-gpu"}
    for d in deployments["deployments"]:
        assert d.get("tags") and "realfake" in d["tags"], d["name"]
        assert d.get("description"), d["name"]


@pytest.mark.parametrize(
    "entrypoint",
    sorted({d["entrypoint"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}),
)
def test_entrypoints_are_flows_with_one_described_parameter_model(entrypoint):
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    fl = getattr(module, name)
    assert isinstance(fl, prefect.Flow)
    params = list(inspect.signature(fl.fn).parameters.values())
    assert len(params) == 1 and params[0].name == "params"
    model = typing.get_type_hints(fl.fn)["params"]
    assert issubclass(model, BaseModel)
    undocumented = [f for f, info in model.model_fields.items() if not info.description]
    assert not undocumented, f"{entrypoint}: fields without description: {undocumented}"


def _subset(given, parsed) -> bool:
    """Every value written in the deployment is the one the flow's model holds (nested mappings compared key by key)."""
    if isinstance(given, dict):
        return isinstance(parsed, dict) and all(k in parsed and _subset(v, parsed[k]) for k, v in given.items())
    return given == parsed


def test_deployment_parameters_validate_against_the_flow_models(deployments):
    checked = []
    for d in deployments["deployments"]:
        if "params" not in (d.get("parameters") or {}):
            continue
        path, name = d["entrypoint"].split(":")
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        model = typing.get_type_hints(fl.fn)["params"]
        given = d["parameters"]["params"]
        parsed = model.model_validate(given)  # raises on an unknown or mistyped field
        assert _subset(given, parsed.model_dump(mode="json")), (d["name"], given)
        checked.append(d["name"])
    assert {"build", "regenerate"} <= set(checked), checked  # the deployments that carry parameters were checked


def test_regeneration_schedule_ships_inactive(deployments):
    regen = next(d for d in deployments["deployments"] if d["name"] == "regenerate")
    (schedule,) = regen["schedules"]
    assert schedule["active"] is False and len(schedule["cron"].split()) == 5


def test_gpu_deployments_run_in_the_image_folder_and_request_gpus(deployments):
    dockerfile = DOCKERFILE.read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    for d in deployments["deployments"]:
        if d["work_pool"]["name"] != "realfake-gpu":
            continue
        (step,) = d["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
        assert d["work_pool"]["job_variables"]["gpu_count"] >= 1


def test_compose_references_resolve():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "worker-gpu", "worker-cpu"} <= set(services)
    volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert set(deps) <= set(services), f"{name} depends on unknown services {set(deps) - set(services)}"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")):
                assert (COMPOSE.parent / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in volumes, f"{name} uses undeclared volume {src}"
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile at {build['dockerfile']}"
            assert context == REPO
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    # Workers poll queues that deployments use.
    queues = {(d["work_pool"]["name"], d["work_pool"].get("work_queue_name", "default"))
              for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for name in ("worker-gpu", "worker-cpu"):
        cmd = services[name]["command"]
        pool, queue = cmd[cmd.index("--pool") + 1], cmd[cmd.index("--work-queue") + 1]
        assert (pool, queue) in queues, f"{name} polls {pool}/{queue}, which no deployment uses"


def test_dockerfile_copies_what_the_image_imports():
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    for folder in re.findall(r"^COPY (\S+) \./\S+$", text, re.M):
        assert (REPO / folder).exists(), f"Dockerfile copies missing {folder}"
    for module in ("realfake", "flows", "tasks"):
        assert f"COPY {module} ./{module}" in text


def test_every_gpu_deployment_is_watched_for_lost_runs_and_sets_the_heartbeat_itself(deployments):
    from tasks.lost_runs import HEARTBEAT_ENV, HEARTBEAT_SECONDS, WATCH_TAG

    for d in deployments["deployments"]:
        pool = d["work_pool"]
        on_gpu = pool["name"] == "realfake-gpu" or pool.get("work_queue_name") == "gpu"
        assert (WATCH_TAG in d["tags"]) is on_gpu, d["name"]  # only GPU runs: never the build parent
        if on_gpu:
            # the automation crashes a watched run silent for 3 heartbeats: the run must heartbeat at this period,
            # whatever the worker's environment says
            heartbeat = (pool.get("job_variables") or {}).get("env", {}).get(HEARTBEAT_ENV)
            assert heartbeat is not None and 30 <= int(heartbeat) <= HEARTBEAT_SECONDS, d["name"]


def test_compose_and_the_kubernetes_template_set_the_heartbeat_and_turn_server_analytics_off(template):
    from tasks.lost_runs import HEARTBEAT_ENV, HEARTBEAT_SECONDS

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    for name in ("worker-gpu", "worker-cpu", "deploy"):
        assert int(services[name]["environment"][HEARTBEAT_ENV]) == HEARTBEAT_SECONDS, name
    assert "python -m tasks.lost_runs" in " ".join(services["deploy"]["command"])  # the automation is installed
    env_default = template["variables"]["properties"]["env"]["default"]
    assert int(env_default[HEARTBEAT_ENV]) == HEARTBEAT_SECONDS
    assert {"HF_HOME", "REALFAKE_CACHE"} <= set(env_default)
    dockerfile = DOCKERFILE.read_text()
    assert f"{HEARTBEAT_ENV}={HEARTBEAT_SECONDS}" in dockerfile
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in dockerfile


def test_kubernetes_jobs_are_never_retried_by_kubernetes(template):
    # Deliberate (infra/README.md, "When a node is lost"): one owner of re-runs, the realfake parent. A pod that
    # Kubernetes restarted would run the same flow run id again next to the parent's re-submission.
    spec = template["job_configuration"]["job_manifest"]["spec"]
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["restartPolicy"] == "Never"
    readme = (REPO / "infra" / "README.md").read_text()
    assert "backoffLimit: 0" in readme


def test_prefect_processes_started_from_the_repository_run_servers_with_analytics_off():
    # prefect.toml at the root: `make demo`'s ephemeral server and the tests' servers read it (compose sets the
    # variable itself, checked above)
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    probe = "from prefect.settings import get_current_settings as s; print(s().server.analytics_enabled)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "False"
