"""Where a LoRA fine-tuning step and a generation batch spend their time: torch.profiler over the library's code.

Runs realfake's own ``finetune`` (cached latents, per-GPU batch 8) and ``SynthesisEngine.generate`` (batch 16) on
random-weight SD v1.5 (``realfake/models/sd15.py``; ``--smoke``: the tiny twin on CPU) and writes:

* a table of where the step time goes: top ops by self CUDA time (self CPU time on CPU), the UNet forward, the
  backward, the optimizer step, LoRA's small matmuls (matmul ops with an operand of the LoRA rank), host syncs
  (``aten::_local_scalar_dense``, the device-to-host read behind ``float(t)`` / ``.item()``, and the CUDA
  synchronize calls), and the generation batch's UNet / VAE / text-encoder split;
* a chrome trace of each profiled section (``<out>.finetune.trace.json.gz``, ``<out>.generate.trace.json.gz``;
  open in chrome://tracing or https://ui.perfetto.dev);
* samples/s (images/s) and the achieved share of the card's dense bf16 peak (``gpu_synthesis.BF16_PEAK_TFLOPS``:
  989 TFLOP/s for the H200 / H100 SXM, NVIDIA's data sheets) from FLOPs *counted* by
  ``torch.utils.flop_counter.FlopCounterMode``: one fine-tune sample = one UNet forward at the training latent
  size plus the backward the LoRA weights need (input gradients through every layer after the first adapter, no
  base-weight gradients), counted on a batch of 1; issue 19 estimates it at ~1.7 TFLOP at 64 x 64 latents (about
  two forwards of ~0.85 TFLOP). One generated image = the engine's whole call for one image (UNet x steps x 2 for
  CFG, VAE encode + decode, text encoder), counted the same way (``gpu_synthesis.flops_per_image``).

Step boundaries are taken at the end of each optimizer step (a global ``register_optimizer_step_post_hook``, so
the library's loop is unchanged); on CUDA a CUDA event is recorded there, so a step's time is GPU-timeline time.
Steps: ``warm`` unprofiled (cuDNN autotuning, allocator), ``profiled`` under the profiler, ``timed`` unprofiled;
samples/s is ``batch / median(timed step)``.

On CUDA the fine-tuning step is also run with each candidate switch, each in the same process with the same seed,
its loss over the first steps compared with the library default's (eager, bf16 autocast, torch AdamW):
``fp32`` (``finetune.mixed_precision=no``, TF32 matmuls), ``bf16-weights`` (the frozen UNet passed in bf16: no
per-step fp32 -> bf16 weight casts), ``fused-adamw`` (``torch.optim.AdamW`` replaced by its ``fused=True`` form for
the call: the library has no switch for it; the change would be one argument in ``realfake/finetune.py``) and
``compile`` (``unet.compile()`` on the components passed in: the UNet's forward and backward compiled by inductor,
the adapter attached after, the optimizer eager). ``--batches`` adds the default's samples/s at 16 and 32.

    python benchmarks/gpu_profile.py --workdir /tmp/realfake-gpu-bench --out benchmarks/results/gpu_profile.json
    python benchmarks/gpu_profile.py --smoke --out /tmp/gpu_profile_smoke.json          # CPU, tiny, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_synthesis import (  # noqa: E402
    bench_device,
    build_base,
    dense_bf16_peak,
    flops_per_image,
    prepare_version,
    work_items,
)

__all__ = ["StepClock", "breakdown", "count_finetune_flops", "main", "module_ranges"]

ISSUE_TFLOP_PER_FT_SAMPLE = 1.7  # issue 19: UNet forward + input-gradient backward at 64 x 64 latents
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
FT_VARIANTS = ("default", "fp32", "bf16-weights", "fused-adamw", "compile")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Marks every optimizer step's end (CUDA events on GPU, ``perf_counter`` on CPU); optionally steps a profiler.

    A global optimizer hook: the library's training loop is measured as it is, with no change to its code.
    """

    def __init__(self, device: torch.device, prof=None) -> None:
        self.cuda = device.type == "cuda"
        self.prof = prof
        self.marks: list = []
        self.handle = None

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._hook)
        self.marks.append(self._now())  # the first step is timed from here (it includes the run's one-off work)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _hook(self, optimizer, args, kwargs) -> None:
        self.marks.append(self._now())
        if self.prof is not None:
            self.prof.step()

    def step_seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


@contextlib.contextmanager
def module_ranges(modules: dict[str, torch.nn.Module]):
    """A ``record_function`` range named after each module around its forward (forward hooks; removed on exit)."""
    handles, open_ = [], {}
    for name, module in modules.items():
        def pre(m, args, name=name):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            open_.setdefault(id(m), []).append(rf)

        def post(m, args, out):
            open_[id(m)].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def fused_adamw():
    """``torch.optim.AdamW`` as its fused form for the duration (the library builds it as ``torch.optim.AdamW``)."""
    original = torch.optim.AdamW

    class FusedAdamW(original):
        def __init__(self, params, **kw):
            super().__init__(params, fused=True, **kw)

    torch.optim.AdamW = FusedAdamW
    try:
        yield
    finally:
        torch.optim.AdamW = original


def _device_time(e, cuda: bool) -> float:
    """Microseconds of an event: its kernels' time (and its children's) on CUDA, its CPU time on CPU."""
    return e.device_time_total if cuda else e.cpu_time_total


def _self_time(e, cuda: bool) -> float:
    return e.self_device_time_total if cuda else e.self_cpu_time_total


def breakdown(prof, cuda: bool, steps: int, sections: Sequence[str], rank: int | None = None, top: int = 15) -> dict:
    """Where the profiled time went: sections (record_function names / prefixes), LoRA matmuls, syncs, top ops.

    ``sections`` are matched on top-level events of every thread (the forward ranges of :func:`module_ranges`,
    ``autograd::engine::evaluate_function`` for the backward, ``Optimizer.step`` / ``Optimizer.zero_grad``); each
    takes the device time of the kernels launched inside it (CPU time on CPU). ``rank``: matmul ops with an operand
    dimension equal to it are LoRA's (forward and backward; SD's own matmuls have no such dimension).
    """
    events = prof.events()
    # the whole: the kernels' time on CUDA; on CPU the profiled steps' CPU time (every op's self time without them)
    steps_ev = [e for e in events if e.name.startswith("ProfilerStep#")]
    if cuda:
        total = sum(k.duration for e in events for k in e.kernels)
    else:
        total = sum(e.cpu_time_total for e in steps_ev) or sum(e.self_cpu_time_total for e in events)
    wall = sum(e.cpu_time_total for e in steps_ev)
    out_sections = {}
    for name in sections:
        hits = [e for e in events if e.name.startswith(name) and not _has_ancestor(e, name)]
        t = sum(_device_time(e, cuda) for e in hits)
        out_sections[name] = {"calls": len(hits), "ms": t / 1000, "share": t / total if total else None}
    lora_us, lora_calls = 0.0, 0
    if rank is not None:
        for e in events:
            if e.name in MATMUL_OPS and any(rank in tuple(s) for s in (e.input_shapes or []) if s):
                lora_us += _self_time(e, cuda)
                lora_calls += 1
    syncs = {n: sum(1 for e in events if e.name == n) for n in SYNC_OPS}
    rows = sorted(prof.key_averages(), key=lambda a: _self_time(a, cuda), reverse=True)[:top]
    table = [{"op": a.key, "calls": a.count, "self_ms": _self_time(a, cuda) / 1000,
              "share": _self_time(a, cuda) / total if total else None} for a in rows]
    return {"basis": "CUDA kernel time" if cuda else "CPU time", "profiled_steps": steps, "total_ms": total / 1000,
            "wall_ms": wall / 1000, "busy_share_of_wall": (total / wall if cuda and wall else None),
            "sections": out_sections,
            "lora_matmuls": {"calls": lora_calls, "ms": lora_us / 1000, "share": lora_us / total if total else None,
                             "rank": rank},
            # per step: on CUDA the synchronize calls (a device tensor's .item() / float() is one of them); on CPU
            # the scalar reads (``_local_scalar_dense`` also counts reads of CPU tensors, which wait for nothing)
            "host_syncs": {**syncs, "per_step": (sum(v for k, v in syncs.items() if k.startswith("cuda")) if cuda
                                                 else syncs["aten::_local_scalar_dense"]) / max(steps, 1)},
            "top_ops": table}


def _has_ancestor(e, prefix: str) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(prefix):
            return True
        p = p.cpu_parent
    return False


def count_finetune_flops(comps: dict, cfg, device: torch.device) -> float:
    """FLOPs of one fine-tune sample: UNet forward + the LoRA backward at the training latent size, batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from realfake.finetune import add_lora

    unet, vae = comps["unet"], comps["vae"]
    ft = cfg.finetune
    side = ft.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    add_lora(unet, ft.rank, ft.alpha)
    try:
        z = torch.randn(1, vae.config.latent_channels, side, side, device=device)
        states = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
        counter = FlopCounterMode(display=False)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with counter:
            with amp:
                pred = unet(z, torch.tensor([500], device=device), states).sample
            pred.float().square().mean().backward()
        return float(counter.get_total_flops())
    finally:
        unet.zero_grad(set_to_none=True)
        unet.unload_lora()


def _ft_config(cfg, batch: int, steps: int, precision: str):
    ft = cfg.finetune.model_copy(update={"batch_size": batch, "max_steps": steps, "epochs": None,
                                         "gradient_accumulation": 1, "checkpoint_every": 100_000,
                                         "mixed_precision": precision, "cache_latents": True})
    return cfg.model_copy(update={"finetune": ft})


def run_finetune(cfg, store, comps: dict, device: torch.device, batch: int, warm: int, profiled: int, timed: int,
                 precision: str = "bf16", optimizer=contextlib.nullcontext, trace: Path | None = None) -> dict:
    """One ``finetune`` call of warm + profiled + timed steps; step times, the loss curve, the profile if asked."""
    from realfake.finetune import adapter_dir, finetune

    c = _ft_config(cfg, batch, warm + profiled + timed, precision)
    cuda = device.type == "cuda"
    prof = None
    if profiled and trace is not None:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(activities=acts, record_shapes=True,
                                      schedule=torch.profiler.schedule(wait=max(warm - 1, 0), warmup=1,
                                                                       active=profiled, repeat=1))
    ranges = module_ranges({"unet.forward": comps["unet"]}) if prof is not None else contextlib.nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with optimizer(), ranges, (prof if prof is not None else contextlib.nullcontext()), StepClock(device, prof) as clk:
        finetune(c, store, components=comps)
    _sync(device)
    wall = time.perf_counter() - t0
    times = clk.step_seconds()
    history = store.read_json(*adapter_dir("all"), "train_log.json")["history"]
    timed_s = times[warm + profiled:] or times[warm:]
    med = statistics.median(timed_s)
    out = {"batch": batch, "steps": len(times), "call_s": wall, "first_step_s": times[0], "median_step_s": med,
           "samples_per_s": batch / med, "loss": [h["loss"] for h in history]}
    if prof is not None:
        out["profile"] = breakdown(prof, cuda, profiled, ["unet.forward", "autograd::engine::evaluate_function",
                                                          "Optimizer.step", "Optimizer.zero_grad"],
                                   rank=cfg.finetune.rank)
        prof.export_chrome_trace(str(trace))
        out["trace"] = trace.name
    return out


def profile_generation(cfg, store, device: torch.device, batch: int, trace: Path, peak: float | None) -> dict:
    """One warm-up batch, one profiled batch, one timed batch of the resident engine at ``batch``."""
    from realfake.synthesize import SynthesisEngine

    engine = SynthesisEngine(cfg, store)
    engine.cfg.synthesis.batch_size = batch
    engine.max_batch = batch
    items = work_items(cfg, store, 3 * batch)
    flops = flops_per_image(engine, items[0])
    list(engine.generate(items[:batch]))  # warm-up: kernels, autotuning, allocator
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    pipe = engine.pipe
    modules = {"unet": pipe.unet, "vae.encode": pipe.vae.encoder, "vae.decode": pipe.vae.decoder,
               "text_encoder": pipe.text_encoder}
    with module_ranges(modules), torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        with torch.profiler.record_function("ProfilerStep#0"):
            list(engine.generate(items[batch : 2 * batch]))
        _sync(device)
    table = breakdown(prof, cuda, 1, list(modules), rank=None)
    table["unet_calls_per_batch"] = table["sections"]["unet"]["calls"]
    prof.export_chrome_trace(str(trace))
    _sync(device)
    t0 = time.perf_counter()
    list(engine.generate(items[2 * batch :]))
    _sync(device)
    ips = batch / (time.perf_counter() - t0)
    del engine
    return {"batch": batch, "steps": cfg.synthesis.steps, "strength": cfg.synthesis.strength,
            "flops_per_image": flops, "images_per_s": ips, "tflops": ips * flops / 1e12,
            "peak_fraction": ips * flops / 1e12 / peak if peak else None, "profile": table, "trace": trace.name}


def _variant(name: str, cfg, store, device, batch, steps, base_comps, load):
    """Run one candidate switch; returns its row (the components it changes are loaded afresh)."""
    warm, _, timed = steps
    if name == "fp32":
        return run_finetune(cfg, store, base_comps, device, batch, warm, 0, timed, precision="no")
    if name == "fused-adamw":
        return run_finetune(cfg, store, base_comps, device, batch, warm, 0, timed, optimizer=fused_adamw)
    comps = load()
    if name == "bf16-weights":
        comps["unet"].to(torch.bfloat16)
    elif name == "compile":
        comps["unet"].compile()
    return run_finetune(cfg, store, comps, device, batch, warm, 0, timed)


def _loss_gap(a: Sequence[float], b: Sequence[float], n: int) -> float:
    """Largest relative difference of two loss curves over their first ``n`` steps."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n], strict=False))


def markdown(r: dict) -> str:
    def f(v, p=3):
        return "n/a" if v is None else (f"{v:.{p}g}" if isinstance(v, float) else str(v))

    lines = [f"device: {r['device']}; torch {r['torch']}; command: `{r['command']}`",
             f"peak (dense bf16, data sheet): {f(r['peak_tflops'])} TFLOP/s; FLOPs counted "
             f"(torch.utils.flop_counter) per fine-tune sample: {r['flops_per_ft_sample'] / 1e12:.3g} TFLOP at "
             f"{r['ft_latent']} latents (issue 19's estimate: {ISSUE_TFLOP_PER_FT_SAMPLE} at 64 x 64)", ""]
    ft = r.get("finetune", {})
    if ft:
        lines += ["## LoRA fine-tuning (realfake.finetune, cached latents)", "",
                  "| variant | batch | samples/s | median step ms | TFLOP/s | share of peak | max rel. loss gap "
                  "(first steps) vs default |", "|---|---|---|---|---|---|---|"]
        for name, row in ft.items():
            if "error" in row:
                lines.append(f"| {name} | | failed: {row['error'][:200]} | | | | |")
                continue
            lines.append(f"| {name} | {row['batch']} | {f(row['samples_per_s'])} | {f(row['median_step_s'] * 1e3)} "
                         f"| {f(row['tflops'])} | {f(row['peak_fraction'])} | {f(row.get('loss_gap'))} |")
        prof = ft.get("default", {}).get("profile")
        if prof:
            lines += ["", _profile_md(prof, "fine-tune step")]
    gen = r.get("generation")
    if gen:
        lines += ["", f"## Generation (SynthesisEngine), batch {gen['batch']}, {gen['steps']} steps x strength "
                  f"{gen['strength']}: {f(gen['images_per_s'])} images/s, {f(gen['tflops'])} TFLOP/s, share of peak "
                  f"{f(gen['peak_fraction'])} ({gen['flops_per_image'] / 1e12:.3g} TFLOP/image counted)", "",
                  _profile_md(gen["profile"], "generation batch")]
    return "\n".join(lines)


def _profile_md(p: dict, what: str) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [f"Profile of {p['profiled_steps']} {what}(s), basis {p['basis']}: {p['total_ms']:.1f} ms"
             + (f" busy of {p['wall_ms']:.1f} ms wall ({pct(p['busy_share_of_wall'])})" if p.get("busy_share_of_wall")
                else ""), "", "| section | calls | ms | share |", "|---|---|---|---|"]
    for name, s in p["sections"].items():
        lines.append(f"| {name} | {s['calls']} | {s['ms']:.2f} | {pct(s['share'])} |")
    lo = p["lora_matmuls"]
    if lo["rank"] is not None:
        lines.append(f"| LoRA matmuls (rank {lo['rank']} operand) | {lo['calls']} | {lo['ms']:.2f} "
                     f"| {pct(lo['share'])} |")
    hs = p["host_syncs"]
    lines += ["", "host syncs: " + ", ".join(f"{k} {v}" for k, v in hs.items() if k != "per_step")
              + f" ({hs['per_step']:.1f} per step: CUDA synchronize calls on GPU, scalar reads on CPU)",
              "", "| top op (self time) | calls | ms | share |",
              "|---|---|---|---|"]
    lines += [f"| {t['op'][:90]} | {t['calls']} | {t['self_ms']:.2f} | {pct(t['share'])} |" for t in p["top_ops"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model: proves the script runs (~1 min)")
    p.add_argument("--workdir", default=None, help="models and data (shared with gpu_synthesis.py's)")
    p.add_argument("--out", required=True, help="results JSON; the table (.md) and traces are written beside it")
    p.add_argument("--ft-batch", type=int, default=8, help="per-GPU fine-tune batch (authors': 8)")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="also time the default at these batches "
                   "(default 16 32 on CUDA, none on CPU)")
    p.add_argument("--ft-steps", type=int, nargs=3, default=None, metavar=("WARM", "PROFILED", "TIMED"),
                   help="default 3 3 10 (smoke 1 2 2)")
    p.add_argument("--variants", nargs="*", default=None, choices=FT_VARIANTS,
                   help=f"default on CUDA: all of {', '.join(FT_VARIANTS)}; on CPU: default fused-adamw")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-steps", type=int, default=None, help="sampling steps before strength (default 10, "
                   "about 7 UNet calls: the per-call picture; smoke 4)")
    p.add_argument("--no-generation", action="store_true")
    a = p.parse_args(argv)

    cuda, device = bench_device(a.smoke, cpu_threads=1)  # CPU: tiny ops, more threads only contend on a shared CPU
    res = 32 if a.smoke else 512
    steps = tuple(a.ft_steps or ((1, 2, 2) if a.smoke else (3, 3, 10)))
    variants = a.variants if a.variants is not None else (list(FT_VARIANTS) if cuda else ["default", "fused-adamw"])
    if "default" not in variants:
        variants = ["default", *variants]
    batches = a.batches if a.batches is not None else ([16, 32] if cuda else [])
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} " \
        "threads)"
    peak = dense_bf16_peak(name) if cuda else None
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="realfake-gpu-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    print(f"# {name}; workdir {work}", flush=True)
    t0 = time.perf_counter()
    base = str(build_base(work / ("tiny-sd" if a.smoke else "sd15-random"), a.smoke))
    cfg, store = prepare_version(work, base, res, device.type, a.gen_batch, a.gen_steps or (4 if a.smoke else 10),
                                 ft_resolution=res, version="profile")
    print(f"# setup {time.perf_counter() - t0:.1f} s", flush=True)
    from realfake.models.loading import load_sd_components

    def load():
        comps = load_sd_components(cfg.models.base, cfg.models.base_revision, device)
        if cuda:
            comps["unet"].to(memory_format=torch.channels_last)
        return comps

    comps = load()
    ft_flops = count_finetune_flops(comps, cfg, device)
    side = res // 8 if not a.smoke else res // 4
    result = {"device": name, "peak_tflops": peak, "torch": torch.__version__, "resolution": res,
              "ft_latent": f"{side} x {side}", "flops_per_ft_sample": ft_flops, "ft_steps": list(steps),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "finetune": {}}
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        pass

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str))
        stem.with_suffix(".md").write_text(markdown(result) + "\n")

    def add(name: str, row: dict) -> None:
        if "samples_per_s" in row:
            row["tflops"] = row["samples_per_s"] * ft_flops / 1e12
            row["peak_fraction"] = row["tflops"] / peak if peak else None
            ref = result["finetune"].get("default", {}).get("loss")
            if ref and name != "default":
                row["loss_gap"] = _loss_gap(row["loss"], ref, min(len(ref), len(row["loss"])))
        result["finetune"][name] = row
        save()
        print(f"# finetune {name}: {json.dumps({k: v for k, v in row.items() if k != 'profile'}, default=str)}",
              flush=True)

    trace = Path(f"{stem}.finetune.trace.json.gz")
    add("default", run_finetune(cfg, store, comps, device, a.ft_batch, *steps, trace=trace))
    for b in batches:
        add(f"default@{b}", run_finetune(cfg, store, comps, device, b, steps[0], 0, steps[2]))
    if not a.no_generation:  # before the slow compile variant: a timeout then costs only that
        gen_trace = Path(f"{stem}.generate.trace.json.gz")
        result["generation"] = profile_generation(cfg, store, device, a.gen_batch, gen_trace, peak)
        save()
        print(f"# generation: {result['generation']['images_per_s']:.3g} images/s", flush=True)
    for v in variants:
        if v == "default":
            continue
        try:
            add(v, _variant(v, cfg, store, device, a.ft_batch, steps, comps, load))
        except Exception as e:  # noqa: BLE001 - a failed candidate is a result, the others still run
            add(v, {"error": f"{type(e).__name__}: {e}"})
    table = markdown(result)
    save()
    print(table, flush=True)
    return result


if __name__ == "__main__":
    main()
