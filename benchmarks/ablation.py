"""The paper's ablation rows on the demo preset: baseline, + latent prior, + LoRA, + MMD, + visual guidance.

Each row is its own dataset version (built with the library, no Prefect), measured by the same three
numbers as the demo report: real-test accuracy of a classifier trained on it, label fidelity (accuracy of
the real-trained classifier on it) and the MMD / Frechet distance to the real test set in that classifier's
feature space. Several generation seeds give mean +- std.

    .venv/bin/python benchmarks/ablation.py --seeds 0 1 2 --out benchmarks/results/ablation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROWS = [
    # name, latent_prior, lora, mmd, guidance
    ("baseline (text-to-image)", False, False, False, False),
    ("+ latent prior", True, False, False, False),
    ("+ LoRA", True, True, False, False),
    ("+ MMD", True, True, True, False),
    ("+ visual guidance (Real-Fake)", True, True, True, True),
]


def main() -> int:
    from realfake.build import ablation_config, build_version, prepare, store_of, synthetic_dataset, train_eval
    from realfake.classify import extract_features
    from realfake.config import load_config
    from realfake.data.loaders import RealImages
    from realfake.measure import feature_mmd, frechet_distance, label_fidelity
    from realfake.models.loading import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="./out/ablation")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
    ap.add_argument("--out", default="benchmarks/results/ablation.md")
    args = ap.parse_args()

    base = load_config(args.preset, overrides=[f"root={args.root}", *args.set])
    device = resolve_device(base.device)
    t0 = time.time()
    real_cfg = ablation_config(base, latent_prior=False, lora=False, mmd=False, guidance=False, version="real")
    prepare(real_cfg)
    real = train_eval(real_cfg, "real", return_model=True)
    real_model = real.pop("model")
    test_feats = extract_features(real_model, RealImages(store_of(base.model_copy(update={"version": "real"})),
                                                         "test"), device)
    results: dict[str, list[dict]] = {name: [] for name, *_ in ROWS}
    for seed in args.seeds:
        for name, lp, lora, mmd, guide in ROWS:
            cfg = ablation_config(base, latent_prior=lp, lora=lora, mmd=mmd, guidance=guide,
                                  version=f"{'-'.join(str(int(x)) for x in (lp, lora, mmd, guide))}-s{seed}")
            cfg = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"seed": seed})})
            t = time.time()
            build_version(cfg)
            m = train_eval(cfg, "synthetic")
            syn = synthetic_dataset(store_of(cfg))
            feats = extract_features(real_model, syn, device)
            row = {"seed": seed, "top1": m["top1"], "label_fidelity": label_fidelity(real_model, syn, 10, device),
                   "mmd": feature_mmd(test_feats, feats), "frechet": frechet_distance(test_feats, feats),
                   "seconds": round(time.time() - t, 1)}
            results[name].append(row)
            print(name, json.dumps(row), flush=True)

    def ms(vals: list[float], pct: bool) -> str:
        f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.4f}")
        if len(vals) == 1:
            return f(vals[0])
        return f"{f(statistics.mean(vals))} +- {f(statistics.stdev(vals))}"

    lines = [
        f"# Ablation on the `{args.preset}` preset ({len(args.seeds)} generation seed(s): {args.seeds})",
        "",
        f"Real-trained classifier on the real test split: top-1 {100 * real['top1']:.1f} "
        f"({real['train_images']} real training images).",
        "",
        "| row | real-test top-1 (%) | label fidelity (%) | MMD to real test | Frechet to real test |",
        "|---|---|---|---|---|",
    ]
    for name, *_ in ROWS:
        r = results[name]
        lines.append(f"| {name} | {ms([x['top1'] for x in r], True)} | {ms([x['label_fidelity'] for x in r], True)}"
                     f" | {ms([x['mmd'] for x in r], False)} | {ms([x['frechet'] for x in r], False)} |")
    lines += ["", f"Total {time.time() - t0:.0f} s on {device}. Command:", "",
              f"    .venv/bin/python benchmarks/ablation.py --preset {args.preset} --seeds "
              f"{' '.join(map(str, args.seeds))}" + "".join(f" --set {s}" for s in args.set)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
