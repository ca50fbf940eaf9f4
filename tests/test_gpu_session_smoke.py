"""CPU smoke runs of issue 19's GPU session scripts (benchmarks/gpu_profile.py, benchmarks/gpu_e2e.py) with tiny models.

Each runs as the device session runs it (a separate process, the script's own command line) on the tiny SD twin,
so a script that breaks against the library is caught here rather than in the few minutes a GPU is lent. The
checks are on what the scripts must produce, not on timings: every section of the profile present and non-empty,
the UNet's ops named, the chrome traces readable, every stage of the flow timed, images/s positive.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_profile_mode_names_where_the_step_time_goes(tmp_path):
    out = tmp_path / "res" / "gpu_profile.json"
    _run("gpu_profile.py", "--workdir", str(tmp_path / "work"), "--out", str(out), "--variants", "default",
         "--ft-steps", "1", "1", "1", "--gen-batch", "4")
    r = json.loads(out.read_text())
    assert r["flops_per_ft_sample"] > 0
    ft = r["finetune"]["default"]
    assert ft["samples_per_s"] > 0 and ft["steps"] == 3 and len(ft["loss"]) == 3
    p = ft["profile"]
    assert p["profiled_steps"] == 1 and p["total_ms"] > 0
    assert p["sections"]["unet.forward"]["calls"] == 1 and p["sections"]["unet.forward"]["ms"] > 0
    assert p["sections"]["autograd::engine::evaluate_function"]["ms"] > 0  # the backward
    assert p["sections"]["Optimizer.step"]["calls"] == 1
    assert p["lora_matmuls"]["rank"] == 4 and p["lora_matmuls"]["calls"] > 0 and 0 < p["lora_matmuls"]["share"] < 1
    assert isinstance(p["host_syncs"]["aten::_local_scalar_dense"], int)
    ops = [t["op"] for t in p["top_ops"]]
    assert any("convolution" in o for o in ops), ops  # the UNet's own ops lead the table
    g = r["generation"]
    assert g["images_per_s"] > 0 and g["flops_per_image"] > 0
    sections = g["profile"]["sections"]
    assert sections["unet"]["calls"] == int(4 * 0.75)  # 4 steps at strength 0.75, one UNet call each (CFG batched)
    assert sections["vae.decode"]["calls"] >= 1 and sections["text_encoder"]["calls"] >= 1
    table = out.with_suffix(".md").read_text()
    assert "unet.forward" in table and "LoRA matmuls" in table and "host syncs" in table
    for name in (ft["trace"], g["trace"]):
        trace = json.loads(gzip.decompress((out.parent / name).read_bytes()))
        assert any(e.get("name") == "unet.forward" or e.get("name") == "unet" for e in trace["traceEvents"])


def test_e2e_mode_times_every_stage_of_the_build_flow(tmp_path):
    out = tmp_path / "res" / "gpu_e2e.json"
    _run("gpu_e2e.py", "--workdir", str(tmp_path / "work"), "--out", str(out), "--classes", "3", "--per-class", "8",
         "--standalone-images", "4")
    r = json.loads(out.read_text())
    assert r["flow_exit"] == 0, r.get("error")
    for stage in ("prepare", "finetune", "synthesize", "finalize"):
        assert r["stage_s"][stage] > 0, r["stage_s"]
    assert r["stage_s"]["train-eval real"] > 0 and r["stage_s"]["train-eval realfake"] > 0
    assert r["images"]["synthetic"] == 3 * 6  # one per real training image (8 per class, a quarter held out)
    s = r["synthesis"]
    assert s["in_flow_images_per_s"] > 0 and s["standalone"]["images_per_s"] > 0 and s["in_flow_share"] > 0
    assert set(r["train_eval"]) == {"real", "realfake"}
    assert all(row["train_s"] > 0 for row in r["train_eval"].values())
    assert any(w["batches"] > 0 for w in r["loader_waits"].values())
    assert "| finetune |" in out.with_suffix(".md").read_text()
