"""Quality card and gates on a preset: what measuring costs, and what the gate does to synthetic-only top-1.

For each generation seed, two versions of the preset are built end to end (prepare, finetune, synthesize, finalize)
with ``quality.enabled``: ``q-s{seed}-off`` without gates (the images an ungated build makes, measured) and
``q-s{seed}-gate`` with ``quality.min_label_agreement`` (and ``quality.attempts``). Each is then trained on
(synthetic only) and evaluated on the real test split, as the report's synthetic rows. Recorded per version: stage
seconds, the quality measure's seconds (judge training where it was not cached yet, scoring, per-class measures),
the gate's scoring and regeneration seconds, the images regenerated / failed / dropped, the per-class table and
the real-test top-1.

    .venv/bin/python benchmarks/quality.py --preset demo --seeds 0 1 2 --root /tmp/quality-bench \\
        --out benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realfake.build import build_version, store_of, train_eval  # noqa: E402
from realfake.config import load_config  # noqa: E402
from realfake.quality import format_quality_table  # noqa: E402


def one(preset: str, root: str, seed: int, gate: float | None, attempts: int, extra: list[str],
        adapter_from: Path | None = None, finetune_s: float = 0.0) -> dict:
    name = f"q-s{seed}-{'gate' if gate is not None else 'off'}"
    overrides = [f"root={root}", f"version={name}", f"synthesis.seed={seed}", "quality.enabled=true",
                 f"quality.attempts={attempts}", *extra]
    if gate is not None:
        overrides.append(f"quality.min_label_agreement={gate}")
    cfg = load_config(preset, overrides=overrides)
    if adapter_from is not None:  # the same adapter recipe (it does not depend on the version or synthesis seed)
        shutil.copytree(adapter_from, Path(store_of(cfg).path("adapters")), dirs_exist_ok=True)
    t0 = time.time()
    built = build_version(cfg)
    build_s = time.time() - t0
    card = built["card"]
    q = card["quality"]
    syn = built["synthesis"]
    gate_stats = syn.get("quality_gate", {})
    t1 = time.time()
    run = train_eval(cfg, "synthetic")
    quality_s = q["seconds"] + gate_stats.get("score_s", 0.0)
    # a build whose adapter was copied in is charged the first build's fine-tuning, as if it had trained its own
    whole_s = build_s + (finetune_s if adapter_from is not None else 0.0)
    return {
        "version": name, "seed": seed, "gate_threshold": gate, "attempts": attempts,
        "build_s": round(build_s, 2), "stages_s": built["timings_s"],
        "quality_measure_s": q["seconds"], "judge_s": q["judge_s"], "gate": gate_stats,
        "adapter_copied": adapter_from is not None, "build_with_finetune_s": round(whole_s, 2),
        "quality_s": round(quality_s, 2), "quality_share": round(quality_s / whole_s, 4),
        "quality_share_cached_judge": round((quality_s - q["judge_s"]) / whole_s, 4),
        "synthesize_s": syn["seconds"], "images": syn["images"],
        "top1": run["top1"], "train_eval_s": round(time.time() - t1, 2),
        "agreement": q["agreement"], "regenerated": q["regenerated"], "dropped": q["dropped"],
        "quality": q, "table": format_quality_table(q), "uri": store_of(cfg).uri(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="/tmp/realfake-quality-bench")
    ap.add_argument("--gate", type=float, default=0.5, help="quality.min_label_agreement of the gated versions")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="further dotted overrides")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--reuse-adapter", action="store_true",
                    help="fine-tune once (first version) and copy its adapter into the others (same recipe)")
    args = ap.parse_args()
    rows: list[dict] = []
    for seed in args.seeds:
        for gate in (None, args.gate):
            first = rows[0] if rows and args.reuse_adapter else None
            r = one(args.preset, args.root, seed, gate, args.attempts, args.extra,
                    adapter_from=Path(first["uri"], "adapters") if first else None,
                    finetune_s=first["stages_s"]["finetune"] if first else 0.0)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("quality", "table")}), flush=True)
    off = [r for r in rows if r["gate_threshold"] is None]
    on = [r for r in rows if r["gate_threshold"] is not None]

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    summary = {
        "preset": args.preset, "seeds": args.seeds, "gate": args.gate, "attempts": args.attempts,
        "top1_off": ms([r["top1"] for r in off]), "top1_gate": ms([r["top1"] for r in on]),
        "quality_share_off": ms([r["quality_share"] for r in off]),
        "quality_share_gate": ms([r["quality_share"] for r in on]),
        "regenerated_share": ms([r["gate"]["regenerated_images"] / r["images"] for r in on]),
        "extra_synthesize_s": ms([b["synthesize_s"] - a["synthesize_s"] for a, b in zip(off, on, strict=True)]),
    }
    print(json.dumps(summary, indent=2))
    for r in rows:
        print(f"\n## {r['version']}\n{r['table']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
