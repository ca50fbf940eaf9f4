#!/usr/bin/env bash
# The whole GPU check of a lent H100/H200 node in one command (see benchmarks/README or the docstring of
# gpu_synthesis.py): wheels carried in .whl/ (diffusers, peft, transformers, pydantic) are installed into
# /tmp/site, then the eager benchmark (engine vs the reference-style loop at batch 1/8/16/32, that loop loading its
# fp16 pipeline once per process as the authors' generate.py; + fine-tuning) and a
# torch.compile pass of the engine at batch 16/32 run on the same random-weight SD v1.5 folder.
# Results land in ${OUT:-benchmarks/results}. With the argument `shard-io` it runs only the CPU shard I/O benchmark
# (local folder) on the node's cores instead (about a minute).
# Issue 19's modes (each step under its own timeout; results written as each part finishes, so a timeout keeps them):
#   profile  benchmarks/gpu_profile.py: torch.profiler over fine-tuning (batch 8, cached latents) and generation
#            (batch 16), share of peak, the fp32 / bf16-weights / fused-AdamW / compile switches (~3-4 min)
#   e2e      benchmarks/gpu_e2e.py: the build flow (ephemeral Prefect) at SD v1.5 size with a CLIP ViT-L/14-size
#            guidance model on 10 classes x 32 generated images, per-stage seconds, in-flow vs standalone
#            synthesis, peak memory, loader waits of the classifier (~3-5 min)
#   issue19  profile then e2e, one log: at most PROFILE_TIMEOUT + E2E_TIMEOUT = 230 + 300 s plus the wheel install
#            (run it with the device tool's timeout_s=600). Files back: gpu_profile.{json,md}, its two
#            *.trace.json.gz, gpu_e2e.{json,md}, gpu_session.log (7 of the tool's 8).
# The device has no prefect, diffusers or pydantic: `.venv/bin/python benchmarks/gpu_wheels.py --download` puts them
# and their missing dependencies (82 wheels) in .whl/, which every device call must carry.
set -uo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "shard-io" ]; then
  # `bash benchmarks/gpu_session.sh shard-io`: only the shard I/O benchmark (CPU, local folder), on this machine's
  # cores instead of the build machine's two: does the commit contract's hashing hide behind the writer when
  # cores are free? See benchmarks/results/shard_io.md. About a minute.
  nproc
  timeout "${SHARD_IO_TIMEOUT:-300}" python3 benchmarks/shard_io.py --images 2000 --size 256 --shard-size 1000 \
    --repeats 7 --no-durable --targets local --out "$out/shard_io.md" 2>&1 | tee "$out/shard_io.log"
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1
work=/tmp/realfake-gpu-bench
mode="${1:-}"
if [ "$mode" = "profile" ] || [ "$mode" = "e2e" ] || [ "$mode" = "issue19" ]; then
  python3 -c "import prefect; print('prefect', prefect.__version__)" || exit 1
  log="$out/gpu_session.log"
  : >"$log"
  rc=0
  if [ "$mode" != "e2e" ]; then
    timeout "${PROFILE_TIMEOUT:-230}" python3 benchmarks/gpu_profile.py --workdir "$work" --out "$out/gpu_profile.json" \
      2>&1 | grep -v "Loading weights" | tee -a "$log"
    rc=$(( rc | PIPESTATUS[0] ))
  fi
  if [ "$mode" != "profile" ]; then
    timeout "${E2E_TIMEOUT:-300}" python3 benchmarks/gpu_e2e.py --workdir "$work" --out "$out/gpu_e2e.json" 2>&1 \
      | grep -v "Loading weights" | tee -a "$log"
    rc=$(( rc | PIPESTATUS[0] ))
  fi
  exit "$rc"
fi
timeout "${EAGER_TIMEOUT:-330}" python3 benchmarks/gpu_synthesis.py --workdir "$work" --batches 2 --min-images 8 \
  --out "$out/gpu_synthesis_eager.json" 2>&1 | grep -v "Loading weights" | tee "$out/gpu_eager.log"
timeout "${COMPILE_TIMEOUT:-220}" python3 benchmarks/gpu_synthesis.py --workdir "$work" --batches 2 --min-images 8 \
  --compile --no-reference --no-finetune --batch-sizes 16 32 --out "$out/gpu_synthesis_compile.json" 2>&1 \
  | grep -v "Loading weights" | tee "$out/gpu_compile.log"
