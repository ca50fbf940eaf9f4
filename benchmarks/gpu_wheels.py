"""The wheels a lent H200 needs for benchmarks/gpu_session.sh, downloaded into .whl/ (it has no network).

The device image has torch, transformers, peft, accelerate, timm, pyarrow and more (the package list in
/work/.library/device/KINDS.md, copied below as DEVICE_HAS), but not prefect, diffusers or pydantic. This walks the
requirements of ``realfake`` and ``prefect`` as installed in this checkout's venv (their pinned versions), drops
what the device has, adds the packages whose device version is older than the pins (CARRY_ANYWAY, as the earlier
sessions carried them), leaves out the S3 client stack (the benchmarks write local folders) and prints or fetches
the rest for CPython 3.12 on manylinux x86-64 (the device's python3):

    .venv/bin/python benchmarks/gpu_wheels.py            # list: name==version, one a line
    .venv/bin/python benchmarks/gpu_wheels.py --download # pip download --no-deps into .whl/ (about 40-50 MB)

Then every device call carries ``.whl`` (``carry: [".whl"]``); gpu_session.sh installs them into /tmp/site.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# KINDS.md, "Python packages already there" (nvidia-h200, read 2026-11-17)
DEVICE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
CARRY_ANYWAY = ("transformers", "peft")  # device: transformers 5.17, older than the pin (5.24); peft likewise carried
LEAVE_OUT = ("s3fs", "aiobotocore", "botocore", "aioitertools", "jmespath")  # S3 only; ~15 MB of wheels
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(roots: tuple[str, ...] = ("realfake", "prefect")) -> dict[str, str]:
    """name -> version of every installed requirement of ``roots`` (markers for Python 3.12) the device lacks."""
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}
    seen: dict[str, str] = {}
    stack: list[tuple[str, tuple[str, ...]]] = [(r, ()) for r in roots]
    while stack:
        name, extras = stack.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        key = _norm(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (extras or ("",))):
                stack.append((req.name, tuple(req.extras)))
    have = {_norm(n) for n in DEVICE_HAS} - set(CARRY_ANYWAY)
    return {k: v for k, v in sorted(seen.items()) if k not in have and k not in LEAVE_OUT and k not in roots[:1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--download", action="store_true", help="fetch them into --dest with pip download")
    p.add_argument("--dest", default=".whl")
    a = p.parse_args(argv)
    pins = [f"{k}=={v}" for k, v in needed().items()]
    print("\n".join(pins))
    if not a.download:
        return 0
    Path(a.dest).mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[x for plat in PLATFORMS for x in ("--platform", plat)], "-d", a.dest, *pins]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
