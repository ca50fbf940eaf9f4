"""Every train-eval data mode on a built version: real, synthetic (streamed and in memory), real+synthetic at
several ratios, and synthetic pooled from several versions (x2 / x3) when they exist.

Runs ``realfake.build.train_eval`` once per row with the version's classifier recipe and one classifier seed,
and writes a markdown table with the command. Build the version(s) first, e.g. ``make demo`` (``out/demo/v1``);
extra versions of the same dataset (``--pool v1-s1 v1-s2``) add the xK rows.

    .venv/bin/python benchmarks/data_modes.py --preset demo --out benchmarks/results/data_modes.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realfake.build import train_eval  # noqa: E402
from realfake.config import load_config  # noqa: E402


def rows_for(pool: list[str]) -> list[tuple[str, str, list[str]]]:
    """(label, data mode, overrides) of each run."""
    rows = [
        ("real", "real", []),
        ("synthetic, streamed from shards", "synthetic", ["train_data.streaming=true"]),
        ("synthetic, decoded into memory", "synthetic", ["train_data.streaming=false"]),
        ("real+synthetic, equal amounts (ratio 1)", "real+synthetic", []),
        ("real+synthetic, ratio 0.5", "real+synthetic", ["train_data.mix_ratio=0.5"]),
        ("real+synthetic, every image (ratio None)", "real+synthetic", ["train_data.mix_ratio=null"]),
    ]
    for k in range(2, len(pool) + 2):
        versions = "[" + ",".join(["SELF", *pool[: k - 1]]) + "]"
        rows.append((f"synthetic x{k} (versions)", "synthetic", [f"train_data.synthetic_versions={versions}"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--pool", nargs="*", default=[], help="more built versions of the dataset, for the xK rows")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    base = load_config(preset=a.preset, overrides=a.overrides)
    lines = ["| mode | real images | synthetic images | real-test top-1 | train s |", "|---|---:|---:|---:|---:|"]
    t_all = time.time()
    for label, data, sets in rows_for(a.pool):
        sets = [s.replace("SELF", base.version) for s in sets]
        cfg = load_config(preset=a.preset, overrides=[*a.overrides, *sets])
        run = f"modes-{label.split(',')[0].replace(' ', '').replace('+', '-')}-{len(lines)}"
        m = train_eval(cfg, data, run=run)
        lines.append(f"| {label} | {m.get('real_images', 0)} | {m.get('synthetic_images', 0)} | "
                     f"{100 * m['top1']:.1f}% | {m['train_s']:.0f} |")
        print(lines[-1], flush=True)
    head = (f"`{' '.join(['benchmarks/data_modes.py', *(argv if argv is not None else sys.argv[1:])])}` on "
            f"{base.root}/{base.dataset}/{base.version}; classifier `{base.classifier.model}`, "
            f"{base.classifier.epochs} epochs, seed {base.classifier.seed}; {platform.platform()}; "
            f"{time.time() - t_all:.0f} s in all")
    table = head + "\n\n" + "\n".join(lines) + "\n"
    print(table)
    if a.out:
        Path(a.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
