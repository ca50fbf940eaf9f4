"""Privacy audits at demo scale on CPU: LiRA with a few shadow pipelines and copy detection on the digits.

Builds the demo version (scikit-learn's real handwritten digits, the demo's cached tiny base generator), then runs
:func:`realfake.privacy.audit.run_lira` (real-trained and synthetic-trained shadow families, online and offline
LiRA) and :func:`realfake.privacy.audit.run_copy_detection` (the build's own CLIP tower as descriptor, since no
SSCD file ships with the demo), and prints the tables; ``--write`` records them with the command and timings.
The sizes are overridable so the same script runs a larger audit on a GPU node.

    python benchmarks/privacy_demo.py --write benchmarks/results/privacy.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realfake.build import build_version  # noqa: E402
from realfake.config import load_config  # noqa: E402
from realfake.privacy.audit import CopyDetectionConfig, LiraConfig, PrivacyConfig, run_copy_detection, run_lira  # noqa: E402


class _Thumbnail(torch.nn.Module):
    """Grey 16x16 thumbnail of the (normalised) input: near-duplicate detection by downsampled pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 16).flatten(1)


def _thumbnail_descriptor(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "thumbnail-descriptor.pt"
    torch.jit.script(_Thumbnail()).save(str(path))
    return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="./out/privacy-demo", help="Storage root of the audited version.")
    p.add_argument("--shadows", type=int, default=4, help="Shadow pipelines per family (paper: 16).")
    p.add_argument("--max-per-class", type=int, default=20, help="Real images per class and split.")
    p.add_argument("--finetune-steps", type=int, default=60, help="LoRA steps per version (demo: 320).")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--descriptor", choices=["clip", "thumbnail"], default="thumbnail",
                   help="copy descriptor: the demo base's (random-init) CLIP tower, or a 16x16 grey thumbnail saved "
                   "as TorchScript and loaded through the SSCD path (a classic near-duplicate descriptor for small "
                   "images; SSCD itself cannot be downloaded here)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="Extra a.b=c config overrides.")
    p.add_argument("--write", default=None, help="Markdown file to record the results in.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    overrides = [
        f"root={a.root}",
        "source.kind=demo_digits",
        f"source.max_per_class={a.max_per_class}",
        f"finetune.max_steps={a.finetune_steps}",
        "finetune.batch_size=32",
        "finetune.gradient_accumulation=1",  # one micro-batch of 32 (the demo preset splits 64 into 8 x 8)
        "finetune.epochs=null",  # --finetune-steps alone sets the length
        *a.overrides,
    ]
    cfg = load_config(preset="demo", overrides=overrides)
    copy_cfg = CopyDetectionConfig()
    if a.descriptor == "thumbnail":
        copy_cfg = CopyDetectionConfig(descriptor="sscd", descriptor_path=_thumbnail_descriptor(Path(a.root)),
                                       center=True)
    privacy = PrivacyConfig(lira=LiraConfig(n_shadows=a.shadows), copy_detection=copy_cfg)
    timings = {}
    t = time.time()
    build_version(cfg)
    timings["build version"] = time.time() - t
    t = time.time()
    lira = run_lira(cfg, privacy)
    timings["LiRA (all shadows + scoring)"] = time.time() - t
    t = time.time()
    copy = run_copy_detection(cfg, privacy)
    timings["copy detection"] = time.time() - t
    q = copy["top1_quantiles"]
    ref = copy.get("reference_quantiles") or {}
    copy_md = (
        f"| measure | value |\n|---|---|\n"
        f"| descriptor | `{copy['descriptor']}` (centred: {copy['centered']}) |\n"
        f"| synthetic / real training images | {copy['n_synthetic']} / {copy['n_real']} |\n"
        f"| share of synthetic at or above {copy['threshold']:g} | {copy['share_above_threshold']:.4f} |\n"
        f"| synthetic -> nearest real, median / p99 / max | {q['p50']:.3f} / {q['p99']:.3f} / {q['max']:.3f} |\n"
        + (f"| real -> nearest other real, median / p99 / max | {ref['p50']:.3f} / {ref['p99']:.3f} / "
           f"{ref['max']:.3f} |\n" if ref else "")
        + f"| nearest real is the synthetic image's source | {copy['share_nearest_is_source']:.3f} "
        f"(chance {copy['chance']:.4f}) |\n"
    )
    timing_md = "| stage | seconds |\n|---|---|\n" + "".join(f"| {k} | {v:.0f} |\n" for k, v in timings.items())
    command = "python benchmarks/privacy_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(lira["table"], copy_md, timing_md, sep="\n")
    if a.write:
        machine = f"{platform.machine()}, {os.cpu_count()} CPU(s), torch threads {a.threads}, device {cfg.device}"
        text = (
            "# Privacy audits at demo scale (measured)\n\n"
            f"Command: `{command}`\n\nMachine: {machine} (shared with other jobs while it ran).\n\n"
            f"Audited version: `{cfg.root}/{cfg.dataset}/{cfg.version}` (digits, {lira['n_train']} real training "
            f"images, {a.max_per_class} per class); {a.shadows} shadows per family, each on a random half; "
            f"fine-tuning {a.finetune_steps} steps per version.\n\n"
            f"## Membership inference (LiRA, leave-one-model-out)\n\n{lira['table']}\n"
            f"## Copy detection\n\n{copy_md}\n## Timings\n\n{timing_md}\n"
            "Raw results: `runs/privacy-lira/lira_results.json` and `runs/privacy-copy/copy_detection.json` of the "
            "version. With this few shadows and images the TPR at low FPR is not resolved (see the footnote); the "
            "numbers show the pipeline works end to end, not the paper's privacy claim.\n"
        )
        Path(a.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
