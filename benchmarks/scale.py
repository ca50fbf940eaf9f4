"""ImageNet-1K scale by simulation: the factory's own cost at N images and G shard groups, GPU work replaced.

What runs is realfake's own code, end to end: ``realfake.build.plan_synthesis`` (plan, recipe check, leftovers),
the ``synthesize`` Prefect flow (preflight, version lease, the real fan-out of ``run_synthesis``: one
``synthesize-group`` task run per shard group, each holding a slot of a global concurrency limit of G slots, the
progress artifact polled meanwhile), ``realfake.build.finalize`` (index, ``_info.json``, card),
``realfake.data.card.verify_version`` and a full epoch of ``realfake.data.streaming.StreamingImages``. The one
stand-in is the generator: :class:`NullEngine` has ``SynthesisEngine``'s interface (constructor, ``max_batch``,
``oom_retries``, ``generate(items)`` yielding :class:`~realfake.data.shards.SyntheticRecord` with the engine's
provenance, per-image seeds included) but returns an 8x8 image in its class's colour instead of running a
diffusion model, so that what is left to measure is the factory's own work (the writer still encodes, hashes and
uploads every image). It is put in place of ``realfake.synthesize.SynthesisEngine`` in the processes this script
starts; nothing in the package changes.

The source is a manifest of N training images over 1,000 classes (ImageNet-1K's class count) written straight
to ``real/manifest.parquet`` (the prepare stage's output; no image is read: the null engine ignores sources).

Counted: storage requests (on the S3 API: every HTTP request, by kind, at a counting relay in front of moto's
server; on a local disk: fsspec calls, by method; the writer's own ``open``/``os.replace`` of local files are not
fsspec calls and are not counted), Prefect API calls of the process running the flow (httpx requests, by method
and route), task runs, wall time and peak RSS (``ru_maxrss``) of the parent and of each step's own process.

    .venv/bin/python benchmarks/scale.py all --sizes 10000 100000 --groups 1 16 64 --s3-sizes 100000 \
        --json benchmarks/results/scale.json

``all`` starts a Prefect server on loopback (tests/support/prefect_server.py, analytics off) and, for S3 cases,
moto's S3 server; each case runs in its own process (``case``), and finalize / verify / streaming read / the
killed build run in processes of their own (``step``), so that each peak RSS is that step's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASSES = 1000  # ImageNet-1K's class count (Tab. 5)
SHARD_IMAGES = 1000  # configs/in1k.yaml shards.max_count
BUCKET = "realfake-scale"
IMAGE_PX = 8  # the null engine's image side: a few hundred bytes per JPEG


# --------------------------------------------------------------------------------------------------------
# The stand-in generator and the synthetic source
# --------------------------------------------------------------------------------------------------------
class NullEngine:
    """``SynthesisEngine``'s interface with no model: each work item becomes an 8x8 image in its class's colour.

    The records carry what the real engine's do (key, label, class name, prompt, negative prompt, the per-image
    seed of :func:`realfake.synthesize.image_seed`, sampler settings, base model and its hash), so the shard
    writer, the index and verification handle the same fields; only the pixels cost nothing.
    """

    def __init__(self, cfg, store, components: dict | None = None, storage_options: dict | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.max_batch = cfg.synthesis.batch_size
        self.oom_retries = 0
        self._images: dict[int, Any] = {}

    def _image(self, label: int):
        from PIL import Image

        img = self._images.get(label)
        if img is None:
            colour = ((label * 97) % 256, (label * 57) % 256, (label * 31) % 256)
            img = self._images[label] = Image.new("RGB", (IMAGE_PX, IMAGE_PX), colour)
        return img

    def generate(self, items: Sequence) -> Iterator:
        from realfake.conditioning import generation_prompt
        from realfake.data.shards import SyntheticRecord
        from realfake.synthesize import image_seed

        cfg, syn = self.cfg, self.cfg.synthesis
        sampler = {"scheduler": syn.scheduler, "steps": syn.steps, "strength": syn.strength,
                   "guidance_scale": syn.guidance_scale, "lora_scale": 0.0, "resolution": syn.resolution,
                   "latent_prior": syn.latent_prior, "visual_guidance": False}
        for w in items:
            seed = image_seed(cfg.version, w.sample_id, w.replica, syn.seed)
            prompt = generation_prompt(syn, w.class_name, None)
            yield SyntheticRecord(
                key=w.key, label=w.label, class_name=w.class_name, image=self._image(w.label),
                meta={"source_sample_id": w.sample_id, "replica": w.replica, "prompt": prompt,
                      "negative_prompt": syn.negative_prompt, "seed": seed, "sampler": sampler,
                      "base_model": cfg.models.base, "base_model_hash": "null-engine", "adapter_scope": None,
                      "adapter_hash": None})


def use_null_engine() -> None:
    """Put :class:`NullEngine` where ``realfake.synthesize.synthesize`` builds its engine (this process only)."""
    import realfake.synthesize

    realfake.synthesize.SynthesisEngine = NullEngine  # type: ignore[misc,assignment]


def scale_overrides(root: str, version: str, endpoint: str | None = None) -> list[str]:
    """The demo preset (offline base model for the recipe fingerprint) with IN-1K's shard layout, CPU only, and
    the parts that need features or an adapter turned off (the null engine uses neither)."""
    over = [f"root={root}", "dataset=scale", f"version={version}", "device=cpu", "caption.enabled=false",
            "guidance.enabled=false", "finetune.enabled=false", f"shards.max_count={SHARD_IMAGES}",
            "shards.format=webdataset", "shards.image_format=jpg", f"synthesis.resolution={IMAGE_PX}",
            "synthesis.batch_size=16"]
    if endpoint:
        over += [f"storage.endpoint_url={endpoint}", "storage.region=us-west-2", "storage.addressing_style=path"]
    return over


def load_cfg(overrides: list[str]):
    from realfake.config import load_config

    return load_config(preset="demo", overrides=overrides)


def write_source(cfg, n: int) -> None:
    """``real/manifest.parquet`` with ``n`` training images over :data:`CLASSES` classes (nothing else)."""
    import hashlib

    import pyarrow as pa

    from realfake.build import store_of
    from realfake.data.manifest import MANIFEST, MANIFEST_SCHEMA

    ids = [f"img{i:08d}" for i in range(n)]
    labels = [i % CLASSES for i in range(n)]
    table = pa.table({
        "sample_id": ids,
        "split": ["train"] * n,
        "label": pa.array(labels, pa.int32()),
        "class_name": [f"class {k:04d}" for k in labels],
        "uri": [f"null://source/{k:04d}/{s}.jpg" for k, s in zip(labels, ids, strict=True)],
        "sha256": [hashlib.sha256(s.encode()).hexdigest() for s in ids],
        "width": pa.array([IMAGE_PX] * n, pa.int32()),
        "height": pa.array([IMAGE_PX] * n, pa.int32()),
        "folder": [f"n{k:08d}" for k in labels],
    }, schema=MANIFEST_SCHEMA)
    store_of(cfg).write_table(table, *MANIFEST)


# --------------------------------------------------------------------------------------------------------
# Counting: storage requests, Prefect API calls
# --------------------------------------------------------------------------------------------------------
class Counts:
    """A thread-safe counter that phases snapshot and diff."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._c)

    def since(self, before: Counter[str]) -> dict[str, int]:
        now = self.snapshot()
        return {k: now[k] - before.get(k, 0) for k in sorted(now) if now[k] - before.get(k, 0)}


STORAGE = Counts()
API = Counts()
_LOCAL_METHODS = ("ls", "info", "cat_file", "pipe_file", "_open", "rm", "rm_file", "exists", "mkdir", "makedirs",
                  "put_file", "size")


def count_local_fs() -> None:
    """Count fsspec calls on local files by method (top-level calls only; ``cat`` of k paths counts k reads)."""
    from fsspec.implementations.local import LocalFileSystem

    depth = threading.local()

    def wrap(name: str, orig):
        def call(self, *a, **k):
            top = not getattr(depth, "n", 0)
            if top:
                STORAGE.add(name)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return orig(self, *a, **k)
            finally:
                depth.n -= 1
        return call

    for name in _LOCAL_METHODS:
        setattr(LocalFileSystem, name, wrap(name, getattr(LocalFileSystem, name)))
    orig_cat = LocalFileSystem.cat

    def cat(self, path, *a, **k):
        if not getattr(depth, "n", 0):
            STORAGE.add("cat_file", len(path) if isinstance(path, list) else 1)
        depth.n = getattr(depth, "n", 0) + 1
        try:
            return orig_cat(self, path, *a, **k)
        finally:
            depth.n -= 1

    LocalFileSystem.cat = cat


_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def count_api_calls() -> None:
    """Count this process's HTTP requests to the Prefect API (httpx, which Prefect's clients use) by route."""
    import httpx

    api = os.environ.get("PREFECT_API_URL", "")

    def route(request) -> str:
        return f"{request.method} {_ID.sub('{id}', request.url.path)}"

    orig_sync, orig_async = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, *a, **k):
        if not api or str(request.url).startswith(api):
            API.add(route(request))
        return orig_sync(self, request, *a, **k)

    async def asend(self, request, *a, **k):
        if not api or str(request.url).startswith(api):
            API.add(route(request))
        return await orig_async(self, request, *a, **k)

    httpx.Client.send = send
    httpx.AsyncClient.send = asend


def s3_kind(method: str, path: str) -> str:
    """The S3 request kind of a path-style request: LIST, GET, HEAD, PUT, DELETE, POST (multi-object delete)."""
    bare, _, query = path.partition("?")
    key = bare.lstrip("/").partition("/")[2]
    if method == "GET" and (not key or "list-type" in query or "prefix=" in query):
        return "LIST"
    return method


def start_counting_relay(upstream_port: int):
    """A relay in front of moto's server that counts every S3 request it forwards, by kind."""
    from tests.support.s3 import S3Interceptor

    class Counting(S3Interceptor):
        def acted(self, method: str, path: str) -> None:
            STORAGE.add(s3_kind(method, path))

    return Counting(upstream_port).start()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-west-2"}, "skip_instance_cache": True}


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak since exec (``VmHWM``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_rss_mb() -> float:
    return rss_mb("VmHWM")


class RssPeak:
    """Peak resident memory of this process during a block, over what it held at the start, sampled every 5 ms
    (a step's own growth: the process's lifetime peak ``VmHWM`` would hide it behind earlier ones)."""

    def __enter__(self) -> RssPeak:
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth_mb(self) -> float:
        return round(self.peak - self.start, 1)


def warm_imports() -> float:
    """Import what the steps import lazily (torch, diffusers through the model loader), so that no step's time
    holds the one-off import cost of its process; returns the seconds it took."""
    t = time.perf_counter()
    import realfake.data.card  # noqa: F401
    import realfake.data.streaming  # noqa: F401
    import realfake.models.demo_base  # noqa: F401 - model_fingerprint of the demo base imports it
    import realfake.synthesize  # noqa: F401

    return round(time.perf_counter() - t, 2)


def total(d: dict[str, int]) -> int:
    return sum(d.values())


# --------------------------------------------------------------------------------------------------------
# Steps in their own process (peak memory of that step alone)
# --------------------------------------------------------------------------------------------------------
def do_step(step: str, cfg) -> dict:
    """One step on the version of ``cfg`` in this process: seconds, memory growth, storage requests, findings."""
    from realfake.build import store_of

    store = store_of(cfg)
    out: dict[str, Any] = {}
    before = STORAGE.snapshot()
    t, cpu = time.perf_counter(), time.process_time()
    with RssPeak() as mem:
        if step == "finalize":  # index.parquet from the index parts, _info.json, the card
            from realfake.build import finalize

            card = finalize(cfg, {}, verify=False)
            out["index_rows"] = card["synthetic"]["index"]["rows"]
        elif step == "verify":
            from realfake.data.card import verify_version

            problems = verify_version(store)
            out["problems"] = problems[:5]
            out["problem_count"] = len(problems)
        elif step == "stream":  # one epoch of the training reader, every image decoded
            from realfake.data.streaming import StreamingImages, read_shard_entries

            entries = read_shard_entries(store)
            out["entries_s"] = round(time.perf_counter() - t, 3)
            ds = StreamingImages([e.unit() for e in entries], seed=0, check=True, shuffle=True)
            seen: set[int] = set()
            n = 0
            for _img, _label, (_epoch, index, _repeat) in ds.iter_keyed():
                seen.add(index)
                n += 1
            out["images"] = n
            out["unique"] = len(seen)
        elif step == "index-keys":  # exactly-once from the index: rows, unique keys
            from realfake.data.shards import read_index

            keys = read_index(store).column("key").to_pylist()
            out["rows"] = len(keys)
            out["unique"] = len(set(keys))
            del keys
        else:
            raise ValueError(f"unknown step {step!r}")
    out["s"] = round(time.perf_counter() - t, 3)
    out["cpu_s"] = round(time.process_time() - cpu, 3)  # this process's CPU time: steadier than wall under load
    out["rss_growth_mb"] = mem.growth_mb
    out["storage"] = STORAGE.since(before)
    return out


def step_main(a: argparse.Namespace) -> int:
    """The build the resume measurement kills: one shard group, the library's own loop, the null engine."""
    use_null_engine()
    warm_imports()
    from realfake.build import synthesize
    from realfake.config import BuildConfig

    synthesize(BuildConfig.model_validate_json(Path(a.config).read_text()))
    return 0


# --------------------------------------------------------------------------------------------------------
# One case: N images, G groups, one storage
# --------------------------------------------------------------------------------------------------------
def commit_count(cfg, local: bool, moto_endpoint: str | None) -> int:
    """Commit records written so far, read around the counting relay (the watcher's requests are not the
    factory's)."""
    from realfake.build import store_of

    if local:
        p = Path(store_of(cfg).path("synthetic", "_commits"))
        return sum(1 for n in os.listdir(p) if n.endswith(".json")) if p.exists() else 0
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(moto_endpoint))  # type: ignore[arg-type]
    path = store_of(cfg).path("synthetic", "_commits")
    try:
        return sum(1 for n in fs.ls(path, refresh=True) if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def ensure_limit(name: str, slots: int) -> None:
    """The GPU pool's global concurrency limit, sized for ``slots`` groups at once (what an operator sets for a
    pool of that many GPUs: ``prefect gcl create NAME --limit N``)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        with contextlib.suppress(Exception):
            client.delete_global_concurrency_limit_by_name(name)
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


def task_runs_of(flow_run_id: str) -> dict[str, int]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId

    with get_client(sync_client=True) as client:
        runs: list = []
        while True:  # the API pages at 200
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[r.id for r in runs])), limit=200) if runs else []
    return dict(Counter(r.name.rsplit("-", 1)[0] if r.name else "?" for r in runs)) | {"child_flow_runs": len(children)}


def case_main(a: argparse.Namespace) -> int:
    local = a.storage == "local"
    if local:
        count_local_fs()
    count_api_calls()
    use_null_engine()
    imports_s = warm_imports()
    relay = None
    endpoint = None
    if not local:
        relay = start_counting_relay(int(a.moto_endpoint.rsplit(":", 1)[1]))
        endpoint = relay.endpoint_url
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    from flows.params import FanoutParams, SynthesizeParams
    from flows.synthesize import _progress_counter, synthesize_flow
    from realfake.build import plan_synthesis, store_of
    from tasks import artifacts

    n, groups = a.n, a.groups
    version = f"n{n}-g{groups}-{uuid.uuid4().hex[:6]}"
    overrides = scale_overrides(a.root, version, endpoint)
    cfg = load_cfg(overrides)
    rec: dict[str, Any] = {"n": n, "groups": groups, "storage": a.storage, "version": version,
                           "shard_images": SHARD_IMAGES, "classes": CLASSES, "imports_s": imports_s}
    t = time.perf_counter()
    write_source(cfg, n)
    rec["source_s"] = round(time.perf_counter() - t, 2)

    # 1. plan (as the flow's plan task does, once per build, under the lease)
    s0, t, cpu = STORAGE.snapshot(), time.perf_counter(), time.process_time()
    with RssPeak() as mem:
        names = plan_synthesis(cfg)
    rec["shards"] = len(names)
    rec["plan"] = {"s": round(time.perf_counter() - t, 3), "cpu_s": round(time.process_time() - cpu, 3),
                   "storage": STORAGE.since(s0), "rss_growth_mb": mem.growth_mb}

    # 2. the synthesize flow: lease, plan task, G group task runs under a G-slot limit, progress polls
    limit = f"scale-gpu-{groups}"
    ensure_limit(limit, groups)
    polls: list[float] = []
    refresh = artifacts.ProgressReporter.refresh

    def timed_refresh(self):
        t0 = time.perf_counter()
        try:
            return refresh(self)
        finally:
            polls.append(time.perf_counter() - t0)

    artifacts.ProgressReporter.refresh = timed_refresh
    params = SynthesizeParams(preset="demo", overrides=overrides, finalize=False,
                              fanout=FanoutParams(groups=groups, gpu_limit=limit, poll_seconds=a.poll_seconds))
    s0, a0, t, cpu = STORAGE.snapshot(), API.snapshot(), time.perf_counter(), time.process_time()
    with RssPeak() as mem:
        state = synthesize_flow(params, return_state=True)
    syn_s, syn_cpu = time.perf_counter() - t, time.process_time() - cpu
    if not state.is_completed():
        raise RuntimeError(f"synthesize flow ended {state.type}: {state.message}")
    storage = STORAGE.since(s0)
    api = API.since(a0)
    rec["synthesize"] = {
        "s": round(syn_s, 2), "cpu_s": round(syn_cpu, 2), "images_per_s": round(n / syn_s, 1), "storage": storage,
        "storage_per_shard": round(total(storage) / len(names), 2),
        "api_calls": total(api), "api_by_route": api, "polls": len(polls),
        "poll_s_mean": round(sum(polls) / len(polls), 4) if polls else None,
        "task_runs": task_runs_of(str(state.state_details.flow_run_id)),
        "parent_rss_mb": mem.start, "parent_rss_growth_mb": mem.growth_mb,
    }

    # 3. progress polls with every shard committed: a fresh counter's first poll (what the parent's reporter pays
    #    once) and the next ones (what every later poll of a build costs)
    count = _progress_counter(cfg, names)
    s0, t = STORAGE.snapshot(), time.perf_counter()
    count()
    first = {"s": round(time.perf_counter() - t, 4), "storage": STORAGE.since(s0)}
    per: list[float] = []
    s0 = STORAGE.snapshot()
    for _ in range(3):
        t = time.perf_counter()
        done = count()
        per.append(time.perf_counter() - t)
    rec["poll"] = {"s": round(min(per), 4), "storage": {k: v // 3 for k, v in STORAGE.since(s0).items()},
                   "first": first, "done": list(done)}

    # 4. finalize (index + card), verify, the index's keys, one streamed epoch
    rec["finalize"] = do_step("finalize", cfg)
    rec["verify"] = do_step("verify", cfg)
    rec["index"] = do_step("index-keys", cfg)
    if a.stream:
        rec["stream"] = do_step("stream", cfg)
    rec["exactly_once"] = (rec["index"]["rows"] == n and rec["index"]["unique"] == n
                           and rec["verify"]["problem_count"] == 0
                           and (not a.stream or rec["stream"]["unique"] == rec["stream"]["images"] == n))

    # 5. resume after a kill at 90%: a fresh version, one group killed (SIGKILL) once 90% of shards committed
    if a.resume:
        rcfg = load_cfg(scale_overrides(a.root, version + "-resume", endpoint))
        write_source(rcfg, n)
        rnames = plan_synthesis(rcfg)
        target = int(0.9 * len(rnames))
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(rcfg.model_dump_json())
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "step", "synthesize", "--config",
                                 f.name], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        seen = 0
        while proc.poll() is None:
            seen = commit_count(rcfg, local, a.moto_endpoint)
            if seen >= target:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        os.unlink(f.name)
        killed_at = commit_count(rcfg, local, a.moto_endpoint)
        s0, t = STORAGE.snapshot(), time.perf_counter()
        plan_synthesis(rcfg)  # the re-run's plan: leftovers removed, committed shards found
        replan_s = time.perf_counter() - t
        replan_storage = STORAGE.since(s0)
        from realfake.build import synthesize

        s0, t = STORAGE.snapshot(), time.perf_counter()
        res = synthesize(rcfg)
        resume_s = time.perf_counter() - t
        rec["resume"] = {"killed_at_commits": killed_at, "of": len(rnames), "replan_s": round(replan_s, 3),
                         "replan_storage": replan_storage, "resume_s": round(resume_s, 2),
                         "shards_rewritten": len(res["shards_written"]), "storage": STORAGE.since(s0)}
        fin = do_step("finalize", rcfg)
        check = do_step("index-keys", rcfg)
        rec["resume"]["exactly_once"] = check["rows"] == check["unique"] == n and fin["index_rows"] == n
    rec["case_rss_peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(rec), flush=True)
    if relay is not None:
        relay.stop()
    if local and not a.keep:
        import shutil

        shutil.rmtree(store_of(cfg).path(), ignore_errors=True)
        if a.resume:
            shutil.rmtree(store_of(rcfg).path(), ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------------------
# All cases: one Prefect server (and one moto server), each case in its own process
# --------------------------------------------------------------------------------------------------------
def run_case(env: dict[str, str], n: int, groups: int, storage: str, root: str, moto: str | None, resume: bool,
             stream: bool, poll_s: float, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "case", "--n", str(n), "--groups", str(groups),
           "--storage", storage, "--root", root, "--poll-seconds", str(poll_s)]
    cmd += (["--moto-endpoint", moto] if moto else []) + (["--resume"] if resume else [])
    cmd += ["--stream"] if stream else []
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case n={n} groups={groups} {storage} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-6000:]}")
    rec = json.loads(lines[-1][len("RESULT "):])
    rec["case_s"] = round(time.perf_counter() - t, 1)
    return rec


@contextlib.contextmanager
def servers(need_s3: bool, home: Path) -> Iterator[tuple[dict[str, str], str | None]]:
    """A Prefect server on loopback (its own PREFECT_HOME, analytics off) and, when asked, moto's S3 server."""
    import s3fs

    from tests.support.prefect_server import PrefectStack
    from tests.support.s3 import MotoServer

    stack = PrefectStack(home / "prefect").start()
    moto = None
    try:
        env = stack.env(PREFECT_LOGGING_LEVEL="WARNING")
        if need_s3:
            moto = MotoServer().start()
            s3fs.S3FileSystem(**s3_options(moto.endpoint_url)).mkdir(BUCKET)
        yield env, (moto.endpoint_url if moto else None)
    finally:
        if moto is not None:
            moto.stop()
        stack.close()


def all_main(a: argparse.Namespace) -> int:
    cases: list[tuple[int, int, str]] = [(n, g, "local") for n in a.sizes for g in a.groups]
    cases += [(n, g, "s3") for n in a.s3_sizes for g in a.s3_groups]
    out = Path(a.json)
    done = json.loads(out.read_text()) if a.append and out.exists() else {"runs": []}
    load = os.getloadavg()
    done.setdefault("meta", {}).update({
        "command": " ".join(sys.argv), "cpus": os.cpu_count(), "load_at_start": [round(x, 2) for x in load],
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    with tempfile.TemporaryDirectory(prefix="realfake-scale-") as tmp, servers(any(s == "s3" for *_, s in cases),
                                                                               Path(tmp)) as (env, moto):
        for n, g, storage in cases:
            root = (str(Path(a.local_root or tmp) / "data") if storage == "local" else f"s3://{BUCKET}/scale")
            resume = g == min(a.groups if storage == "local" else a.s3_groups) and not a.no_resume
            print(f"case n={n} groups={g} {storage} resume={resume} (load {os.getloadavg()[0]:.2f})", flush=True)
            rec = run_case(env, n, g, storage, root, moto, resume, not a.no_stream, a.poll_seconds, a.timeout)
            rec["load_after"] = round(os.getloadavg()[0], 2)
            done["runs"].append(rec)
            out.write_text(json.dumps(done, indent=1))
            syn = rec["synthesize"]
            print(f"  shards {rec['shards']} plan {rec['plan']['s']}s synth {syn['s']}s "
                  f"({syn['storage_per_shard']} req/shard, {syn['api_calls']} API calls, {syn['polls']} polls) "
                  f"poll {rec['poll']['s']}s/{total(rec['poll']['storage'])} req, finalize {rec['finalize']['s']}s "
                  f"verify {rec['verify']['s']}s exactly-once {rec['exactly_once']}", flush=True)
    return 0


def _measured(fn) -> tuple[Any, dict[str, Any]]:
    """``fn()`` with its wall and CPU seconds, memory growth and storage requests."""
    s0, t, cpu = STORAGE.snapshot(), time.perf_counter(), time.process_time()
    with RssPeak() as mem:
        out = fn()
    return out, {"s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - cpu, 2),
                 "rss_growth_mb": mem.growth_mb, "storage": STORAGE.since(s0)}


def plan_main(a: argparse.Namespace) -> int:
    """Planning alone at N images (local disk): write the source, then ``plan_synthesis`` as the build's plan task,
    then the start of one shard group (group 0 of G, nothing committed yet) for each G: what ``synthesize`` does
    before its first shard, from the build's recorded plan (``read_group_plans`` + ``group_pending``) and, with
    ``--replan``, as it did before (planning the whole version: the recipe check, ``plan_work``, ``plan_pending``
    with the group's shards); prints one JSON line."""
    count_local_fs()
    imports_s = warm_imports()
    from realfake.build import _check_before_synthesis, plan_synthesis, store_of
    from realfake.data.shards import plan_pending
    from realfake.quality import may_drop
    from realfake.synthesize import MAY_GROW, group_pending, plan_work, read_group_plans, synthesis_recipe
    from tasks.gpu import split_groups

    cfg = load_cfg(scale_overrides(a.root, f"plan-n{a.n}-{uuid.uuid4().hex[:6]}"))
    store = store_of(cfg)
    t = time.perf_counter()
    write_source(cfg, a.n)
    rec: dict[str, Any] = {"n": a.n, "imports_s": imports_s, "source_s": round(time.perf_counter() - t, 2),
                           "load_at_start": round(os.getloadavg()[0], 2)}
    names, rec["plan"] = _measured(lambda: plan_synthesis(cfg))
    rec["plan"]["shards"] = len(names)
    rec["plan"]["plan_file_bytes"] = store.size("synthetic", "_plan.parquet")
    for g in a.groups:
        mine = split_groups(names, g)[0]

        def start(mine=mine):
            group = read_group_plans(cfg, store, mine)
            assert group is not None, "the recorded plan was not used"
            return group_pending(store, group, mine)

        pending, rec[f"group_start_g{g}"] = _measured(start)
        rec[f"group_start_g{g}"].update(shards=len(mine), pending=len(pending),
                                        images=sum(len(p.items) for p in pending))
        del pending
    if a.replan:
        mine = split_groups(names, a.groups[0])[0]

        def replan():
            recipe = _check_before_synthesis(cfg, store)
            items = plan_work(cfg, store)
            out = plan_pending(store, items, key=lambda w: w.key, max_count=cfg.shards.max_count, mode=cfg.mode,
                               recipe=recipe if recipe is not None else synthesis_recipe(cfg, store),
                               may_grow=MAY_GROW, may_drop=may_drop(cfg), shards=mine)
            return [p for p in out if p.name in set(mine)]

        pending, rec[f"replan_g{a.groups[0]}"] = _measured(replan)
        rec[f"replan_g{a.groups[0]}"]["pending"] = len(pending)
        del pending
    rec["load_at_end"] = round(os.getloadavg()[0], 2)
    print("RESULT " + json.dumps(rec), flush=True)
    import shutil

    shutil.rmtree(store.path(), ignore_errors=True)
    return 0


def finalize_main(a: argparse.Namespace) -> int:
    """finalize (streamed index, ``_info.json``, card) and verify of a version left on local disk (a case run with
    ``--keep``, or one stopped part way: its committed shards), each step in this process; prints one JSON line."""
    count_local_fs()
    imports_s = warm_imports()
    cfg = load_cfg(scale_overrides(a.root, a.version))
    rec: dict[str, Any] = {"version": a.version, "imports_s": imports_s, "rss_before_mb": rss_mb(),
                           "load_at_start": round(os.getloadavg()[0], 2)}
    rec["finalize"] = do_step("finalize", cfg)
    rec["verify"] = do_step("verify", cfg)
    rec["case_rss_peak_mb"] = peak_rss_mb()
    rec["load_at_end"] = round(os.getloadavg()[0], 2)
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def _poll_requests(poll: dict) -> str:
    """A poll's requests: ``first / steady`` where the first poll of a fresh counter was recorded apart, else the
    mean of three polls of a fresh counter (floor; before the fix every poll cost the same)."""
    if "first" in poll:
        return f"{total(poll['first']['storage'])} / {total(poll['storage'])}"
    return f"{total(poll['storage'])} (mean of 3)"


def table_main(a: argparse.Namespace) -> int:
    """Print the markdown table of the runs in the JSON files given (one row per case)."""
    rows = [r for path in a.files for r in json.loads(Path(path).read_text())["runs"]]
    print("| N | groups | storage | shards | plan s | synth s | synth ms/image | storage req/shard (synth) | "
          "API calls | API calls/group | polls | poll req (all committed) | poll s | finalize s | finalize MiB | "
          "verify s | verify MiB | stream s | parent MiB (+growth) | resume: replan req / s | exactly once |")
    print("|" + "---|" * 21)
    for r in sorted(rows, key=lambda r: (r["storage"], r["n"], r["groups"])):
        syn, res = r["synthesize"], r.get("resume")
        groups_run = syn["task_runs"].get("synthesize-group", 0) or 1
        print(f"| {r['n']:,} | {r['groups']} | {r['storage']} | {r['shards']} | {r['plan']['s']:.2f} | "
              f"{syn['s']:.1f} | {1000 * syn['s'] / r['n']:.2f} | {syn['storage_per_shard']:.1f} | "
              f"{syn['api_calls']} | {syn['api_calls'] / groups_run:.1f} | {syn['polls']} | "
              f"{_poll_requests(r['poll'])} | "
              f"{r['poll']['s']:.3f} | {r['finalize']['s']:.2f} | {r['finalize']['rss_growth_mb']:.0f} | "
              f"{r['verify']['s']:.2f} | {r['verify']['rss_growth_mb']:.0f} | "
              f"{r['stream']['s'] if 'stream' in r else '-'} | {syn['parent_rss_mb']:.0f} "
              f"(+{syn['parent_rss_growth_mb']:.0f}) | "
              + (f"{total(res['replan_storage'])} / {res['replan_s']:.2f}" if res else "-")
              + f" | {r['exactly_once'] and (not res or res['exactly_once'])} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pa_ = sub.add_parser("all", help="start the servers and run every case")
    pa_.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    pa_.add_argument("--groups", type=int, nargs="*", default=[1, 16, 64])
    pa_.add_argument("--s3-sizes", type=int, nargs="*", default=[])
    pa_.add_argument("--s3-groups", type=int, nargs="*", default=[16])
    pa_.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    pa_.add_argument("--append", action="store_true", help="add to the runs already in --json")
    pa_.add_argument("--local-root", default=None, help="folder for local cases (default: a temporary one)")
    pa_.add_argument("--poll-seconds", type=float, default=5.0)
    pa_.add_argument("--no-resume", action="store_true")
    pa_.add_argument("--no-stream", action="store_true")
    pa_.add_argument("--timeout", type=float, default=7200)
    pc = sub.add_parser("case", help="one case (started by 'all', with its server environment)")
    pc.add_argument("--n", type=int, required=True)
    pc.add_argument("--groups", type=int, required=True)
    pc.add_argument("--storage", choices=("local", "s3"), required=True)
    pc.add_argument("--root", required=True)
    pc.add_argument("--moto-endpoint", default=None)
    pc.add_argument("--poll-seconds", type=float, default=5.0)
    pc.add_argument("--resume", action="store_true")
    pc.add_argument("--stream", action="store_true")
    pc.add_argument("--keep", action="store_true")
    ps = sub.add_parser("step", help="one step in its own process")
    ps.add_argument("step", choices=("synthesize",))
    ps.add_argument("--config", required=True)
    pp = sub.add_parser("plan", help="planning alone at N images on local disk")
    pp.add_argument("--n", type=int, required=True)
    pp.add_argument("--root", required=True)
    pp.add_argument("--groups", type=int, nargs="*", default=[8, 64], help="group counts whose start is measured")
    pp.add_argument("--replan", action="store_true", help="also a group's start as before: the whole version")
    pf = sub.add_parser("finalize", help="finalize and verify of a version on local disk")
    pf.add_argument("--root", required=True)
    pf.add_argument("--version", required=True)
    pt = sub.add_parser("table", help="markdown table of result files")
    pt.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    return {"all": all_main, "case": case_main, "step": step_main, "plan": plan_main, "finalize": finalize_main,
            "table": table_main}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
