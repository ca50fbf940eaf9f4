"""Mutation check: named deliberate bugs in the mechanism and contract modules, each of which a test must catch.

Each mutant is a (file, old text, new text) patch. The working tree is copied to a temporary folder once (the
repository itself is never patched: others may be editing it); for each mutant the copy gets the patch, the
mutant's targeted tests run there (``pytest -x``: the first failure is enough), and the file is restored. A
mutant is *killed* when its tests fail, *survives* when they pass. The tests run against the copy's ``realfake``
(the working folder leads the import path; child processes the tests start are pointed at the same copy).

Run ``make mutants`` (all), or ``python benchmarks/mutants.py --only NAME[,NAME]``; ``--check`` only confirms that
every patch applies to the current tree. The latest result is written to ``benchmarks/results/mutants.md``, with
the reasons, kept below in ``HARMLESS``, for each survivor judged harmless.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# targeted tests, fastest first (pytest -x stops at the first failure)
LOSS = ["tests/test_mechanisms.py", "-k", "mmd or min_snr or realfake_loss"]
CONDITIONING = ["tests/test_mechanisms.py", "-k", "prompt or guidance or inject"]
SEEDS = ["tests/test_mechanisms.py", "-k", "seed_depends"]
SOURCES = ["tests/test_mechanisms.py", "-k", "starts_from or unet_call_count or lora_scale"]
SHARDS = ["tests/test_shards.py", "tests/test_card.py", "tests/test_s3_storage.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def m(name: str, file: str, old: str, new: str, tests: list[str], what: str) -> Mutant:
    return Mutant(name, file, old, new, tuple(tests), what)


MUTANTS = [
    # -- the four bugs of issue 21 ------------------------------------------------------------------------
    m("finetune-mmd-weight-zero", "realfake/finetune.py",
      "realfake_loss(pred, noise.to(device), w, ft.mmd_weight, ft.mmd_kernel)",
      "realfake_loss(pred, noise.to(device), w, 0.0, ft.mmd_kernel)", LOSS,
      "finetune passes mmd_weight=0.0 to the loss (issue 21)"),
    m("img2img-from-flat-grey", "realfake/synthesize.py",
      "        if not self.cfg.synthesis.latent_prior:\n            return []\n",
      "        if not self.cfg.synthesis.latent_prior:\n            return []\n"
      "        return [Image.new('RGB', (self.cfg.synthesis.resolution,) * 2, (128, 128, 128)) for w in items]\n",
      SOURCES, "img2img starts from a flat grey image instead of the source (issue 21)"),
    m("seed-from-python-hash", "realfake/synthesize.py",
      '    digest = hashlib.sha256(f"{version}\\x1f{sample_id}\\x1f{replica}\\x1f{seed}".encode()).digest()\n',
      '    return hash((version, sample_id, replica, seed)) & ((1 << 63) - 1)\n', SEEDS,
      "the image seed derived with Python's per-process hash() (issue 21)"),
    m("commit-before-shard-file", "realfake/data/shards/writer.py",
      "                self._publish(out, tmp, part_rel, nbytes)\n            finally:",
      "                if last:\n"
      "                    early = CommitRecord(name=name, format=fmt, image_format=ext, files=(*files, ShardFile(\n"
      "                        path=part_rel, count=done.count, bytes=nbytes, sha256=sha)),\n"
      "                        class_counts=dict(sorted(labels.items())), index_part=index_rel,\n"
      "                        index_sha256=hashlib.sha256(index_data).hexdigest(), writer=self.writer_id)\n"
      "                    write_record(self.store, early.to_json(), *self._commit_path(name), indent=1)\n"
      "                self._publish(out, tmp, part_rel, nbytes)\n            finally:",
      SHARDS, "the commit record written before the shard file (issue 21)"),
    # -- losses ----------------------------------------------------------------------------------------------
    m("mmd-of-means", "realfake/losses.py", "s = (weights.float()[:, None] * diff).sum(0)",
      "s = (weights.float()[:, None] * diff).mean(0)", LOSS, "linear MMD over batch means instead of sums"),
    m("mmd-unweighted", "realfake/losses.py", "s = (weights.float()[:, None] * diff).sum(0)",
      "s = diff.sum(0)", LOSS, "linear MMD without the min-SNR weights"),
    m("diffusion-unweighted", "realfake/losses.py", "diffusion = (weights.float() * per_sample).mean()",
      "diffusion = per_sample.mean()", LOSS, "diffusion loss without the min-SNR weights"),
    m("mmd-subtracted", "realfake/losses.py", "total = diffusion + mmd_weight * mmd",
      "total = diffusion - mmd_weight * mmd", LOSS, "the MMD term rewarded instead of penalised"),
    m("min-snr-inverted", "realfake/losses.py", "return torch.clamp(s, max=gamma) / s",
      "return s / torch.clamp(s, max=gamma)", LOSS, "min-SNR weight inverted"),
    m("snr-inverted", "realfake/losses.py", "return a / (1.0 - a)", "return (1.0 - a) / a", LOSS,
      "SNR as noise over signal"),
    m("rbf-cross-term-sign", "realfake/losses.py", "- 2 * k[:n, n:].mean()", "+ 2 * k[:n, n:].mean()", LOSS,
      "RBF MMD with the cross term's sign flipped"),
    # -- conditioning ------------------------------------------------------------------------------------------
    m("guidance-in-first-slot", "realfake/conditioning.py", "out[:, slot] = guidance",
      "out[:, 0] = guidance", CONDITIONING, "the guidance vector overwrites token 0, not the given slot"),
    m("no-guidance-at-generation", "realfake/synthesize.py",
      "states = inject_guidance(states, guide, cfg.guidance.slot)", "states = states", CONDITIONING,
      "generation drops the visual guidance"),
    m("no-guidance-in-finetune", "realfake/finetune.py",
      "guide[rows] if guide is not None else None,", "None,", CONDITIONING,
      "fine-tuning drops the visual guidance"),
    m("caption-dropped", "realfake/conditioning.py", 'caption = (caption or "").strip()', 'caption = ""',
      CONDITIONING, "the prompt never carries the caption"),
    # -- synthesis seeds and sources ---------------------------------------------------------------------------
    m("seed-ignores-replica", "realfake/synthesize.py", '{sample_id}\\x1f{replica}\\x1f{seed}',
      '{sample_id}\\x1f{seed}', SEEDS, "replicas of one source share a seed"),
    m("one-generator-per-batch", "realfake/synthesize.py",
      'generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]',
      'generators = torch.Generator(device="cpu").manual_seed(seeds[0])', SEEDS,
      "one generator for the whole batch: an image depends on its batch"),
    m("strength-ignored", "realfake/synthesize.py", "strength=syn.strength, **kwargs)", "strength=1.0, **kwargs)",
      SOURCES, "img2img always at full strength (source erased by noise)"),
    m("lora-scale-ignored", "realfake/synthesize.py", "self.pipe.fuse_lora(lora_scale=syn.lora_scale,",
      "self.pipe.fuse_lora(lora_scale=1.0,", SOURCES, "the adapter fused at scale 1 whatever lora_scale says"),
    # -- shard commit, index, verify ---------------------------------------------------------------------------
    m("no-size-check-after-upload", "realfake/data/shards/writer.py",
      "        if size != nbytes:\n            raise ShardIntegrityError(f\"{self.store.uri(rel)} has {size} bytes",
      "        if False:\n            raise ShardIntegrityError(f\"{self.store.uri(rel)} has {size} bytes",
      SHARDS, "the stored size is not checked after an upload"),
    m("failed-shard-files-kept", "realfake/data/shards/writer.py",
      "            self._remove_uncommitted(name, attempt.written)\n", "            pass\n", SHARDS,
      "a failed shard's files are left behind"),
    m("no-lease-fencing", "realfake/data/shards/writer.py",
      "            self.lease.check()  # fencing: a build that lost the version must not publish a commit",
      "            pass", SHARDS, "a build that lost its lease still commits"),
    m("leftovers-not-cleaned", "realfake/data/shards/plan.py", "    remove_partial_shards(store, folder)\n",
      "    pass\n", SHARDS, "a re-run does not remove a killed run's leftovers"),
    m("count-not-checked", "realfake/data/shards/reader.py", "if check and n != sf.count:", "if False:", SHARDS,
      "a shard's sample count is not compared with its commit record"),
    m("sha256-not-checked", "realfake/data/shards/reader.py",
      "if sha is not None and (digest := sha.hexdigest()) != sf.sha256:", "if False:", SHARDS,
      "a shard's sha256 is not compared with its commit record"),
    m("size-not-checked-on-read", "realfake/data/shards/reader.py",
      "            if check:\n                _check_size(store, len(src)",
      "            if False:\n                _check_size(store, len(src)", SHARDS,
      "a shard file's size is not compared before reading"),
    m("index-part-sha-not-checked", "realfake/data/shards/index.py",
      "if hashlib.sha256(blobs[p]).hexdigest() != c.index_sha256:", "if False:", SHARDS,
      "the index is built from index parts without checking them"),
    m("index-part-keys-not-compared", "realfake/data/shards/reader.py", "if idx_keys != keys:", "if False:", SHARDS,
      "verify_shard does not compare the shard's keys with its index part"),
    m("leftovers-not-listed", "realfake/data/shards/reader.py", "                if n not in keep]",
      "                if False]", SHARDS,
      "uncommitted shard files are not reported as leftovers"),
    m("verify-misses-duplicate-keys", "realfake/data/card.py", "            if key in seen:\n",
      "            if False:\n", SHARDS, "verify does not report a key in two shards"),
    m("verify-misses-unindexed-images", "realfake/data/card.py", "missing = sorted(set(seen) - set(keys))",
      "missing = []", SHARDS, "verify does not report images without an index row"),
    m("verify-misses-card-counts", "realfake/data/card.py", "if card_counts != dict(per_class):", "if False:",
      SHARDS, "verify does not compare the card's per-class counts"),
]

# Survivors judged harmless after reading them, by name: the reason (printed in the results).
HARMLESS: dict[str, str] = {}

# What earlier runs found and what was done about it (printed in the results).
NOTES = """The first full run (2026-12-02) left six survivors, all in the shard and verify checks: nothing tested a
file that lands short, a lease lost while a shard is written, a commit record whose count disagrees with its
file, an index part that is not the committed one (for `write_index`, and for `verify_shard` with a record
forged to match), or a key committed in two shards. Each got a test in `tests/test_shards.py` (named in its row
above, from the re-run), and each test fails with its check removed. The four bugs of issue 21 were caught by
tests written for them (named in their rows): the MMD test compares the adapter with an MMD-off run of the same
seed, the source test starts one image from two sources, the seed test has two other processes with other hash
salts make an image, and the chosen-point kill tests (`test_kills_at_chosen_points_keep_exactly_once_local`,
`test_kills_at_chosen_points_keep_exactly_once_on_s3`) each fail on `commit-before-shard-file` at the kill
before the shard file is in place (checked by running them alone on that mutant)."""


def copy_tree(dest: Path) -> Path:
    """The working tree (uncommitted edits included), without git data, the virtualenv or build outputs."""
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache", ".ruff_cache",
                                    "*.egg-info", "node_modules", "build", "dist")
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=ignore, symlinks=True)
    return repo


def apply(repo: Path, mu: Mutant) -> str:
    """Patch the copy; returns the file's original text (to restore)."""
    path = repo / mu.file
    text = path.read_text()
    n = text.count(mu.old)
    if n != 1:
        raise SystemExit(f"mutant {mu.name}: its old text occurs {n} times in {mu.file} (must be once); update it")
    path.write_text(text.replace(mu.old, mu.new))
    return text


def run_tests(repo: Path, tests: tuple[str, ...], timeout_s: int) -> tuple[str, float, str]:
    """``killed`` / ``survived`` / ``timeout``, seconds, and the last lines of pytest's output."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t, ""
    tail = (done.stdout + done.stderr).strip().splitlines()
    last = tail[-1] if tail else ""
    failed = next((line.split()[1].split("::")[-1] for line in tail if line.startswith(("FAILED ", "ERROR "))), "")
    last = f"{failed} ({last})" if failed else last
    if done.returncode == 0:
        return "survived", time.monotonic() - t, last
    if done.returncode == 5:  # nothing collected: the selection is wrong, not the mutant caught
        return "error", time.monotonic() - t, last
    # 1: a test failed; 2: the mutant broke collection (an import error): caught either way
    return "killed", time.monotonic() - t, last


def report(rows: list[tuple[Mutant, str, float, str]], baseline_s: float, command: str) -> str:
    """The results file. ``command``: how it was produced (the commands and when they ran)."""
    killed = sum(r[1] in ("killed", "timeout") for r in rows)
    lines = [
        "# Mutation check", "",
        f"Command: {command}",
        f"on {os.cpu_count()} cores shared with other work. Script: `benchmarks/mutants.py`.", "",
        f"Kill rate: **{killed}/{len(rows)}** mutants killed by their targeted tests "
        f"(unmutated copy: all targeted tests pass, {baseline_s:.0f} s).", "",
        "| mutant | file | the bug | result | s | first failure / summary |",
        "|---|---|---|---|---|---|",
    ]
    for mu, result, secs, last in rows:
        lines.append(f"| `{mu.name}` | {mu.file} | {mu.what} | {result} | {secs:.0f} | "
                     f"{last.replace('|', '/')[:110]} |")
    survivors = [(mu, r) for mu, r, _, _ in rows if r not in ("killed", "timeout")]
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for mu, r in survivors:
        lines.append(f"- `{mu.name}` ({r}): {HARMLESS.get(mu.name, 'NOT YET EXPLAINED')}")
    lines += ["", "## Notes", "", NOTES]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def recorded(path: Path) -> tuple[list[tuple[Mutant, str, float, str]], float, str]:
    """The rows, baseline seconds and command line of a results file."""
    import re

    text = path.read_text()
    by_name = {mu.name: mu for mu in MUTANTS}
    rows = []
    for line in text.splitlines():
        if cells := re.match(r"\| `([^`]+)` \| [^|]* \| .* \| (\w+) \| (\d+) \| (.*) \|$", line):
            name, result, secs, last = cells.groups()
            rows.append((by_name[name], result, float(secs), last))
    baseline = re.search(r"all targeted tests pass, (\d+) s", text)
    command = re.search(r"^Command: (.*)$", text, re.MULTILINE)
    line = command.group(1) if command else "`make mutants`"
    line = re.sub(r" \(run ([^,]+), \d+ cores.*$", r" (run \1),", line)  # the first results' one-line header
    return rows, float(baseline.group(1)) if baseline else 0.0, line


def rerender(path: Path) -> str:
    """The results file again, its recorded rows with the current ``HARMLESS`` reasons (no test is run)."""
    return report(*recorded(path))


def merged(path: Path, new_rows: list[tuple[Mutant, str, float, str]], command: str) -> str:
    """A full run's results with the rows of a partial re-run (``--only``) replaced, both commands named."""
    rows, baseline, first = recorded(path)
    again = {row[0].name: row for row in new_rows}
    rows = [again.pop(row[0].name, row) for row in rows] + list(again.values())
    order = {mu.name: i for i, mu in enumerate(MUTANTS)}
    rows.sort(key=lambda r: order[r[0].name])
    return report(rows, baseline, f"{first.rstrip(',')}, then `{command}` (run {_now()}) for the rows it re-ran,")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    ap.add_argument("--check", action="store_true", help="only confirm that every patch applies to the tree")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per mutant's test run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutants.md"))
    ap.add_argument("--rerender", action="store_true",
                    help="rewrite --out from its recorded rows with the current survivor reasons, running nothing")
    args = ap.parse_args()
    if args.rerender:
        Path(args.out).write_text(rerender(Path(args.out)))
        return
    chosen = [mu for mu in MUTANTS if not args.only or mu.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {mu.name for mu in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant(s): {sorted(unknown)}; --check lists what exists")
    with tempfile.TemporaryDirectory(prefix="realfake-mutants-") as tmp:
        repo = copy_tree(Path(tmp))
        for mu in chosen:
            (repo / mu.file).write_text(apply(repo, mu))
        if args.check:
            print("\n".join(f"{mu.name}: applies to {mu.file}" for mu in chosen))
            return
        groups = sorted({mu.tests for mu in chosen})
        t = time.monotonic()
        for tests in groups:  # the unmutated copy must pass every targeted test, or no result means anything
            result, _, last = run_tests(repo, tests, args.timeout)
            if result != "survived":
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)} ({result}): {last}")
        baseline_s = time.monotonic() - t
        rows = []
        for mu in chosen:
            original = apply(repo, mu)
            try:
                result, secs, last = run_tests(repo, mu.tests, args.timeout)
            finally:
                (repo / mu.file).write_text(original)
            rows.append((mu, result, secs, last))
            print(f"{mu.name:32s} {result:9s} {secs:6.0f}s  {last}", flush=True)
    command = "make mutants" if not args.only else f"python benchmarks/mutants.py --only {args.only}"
    out = Path(args.out)
    if args.only and out.exists():  # a partial re-run updates its rows of the last full run
        out.write_text(merged(out, rows, command))
    else:
        out.write_text(report(rows, baseline_s, f"`{command}` (run {_now()}),"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
