"""`python -m btp`: the stages and the modules that run them. `btp <stage> ...` (the console script) runs one."""

from __future__ import annotations

import importlib
import importlib.util
import sys

STAGES = [
    (
        "generate",
        "btp.generate",
        "solutions to HumanEval / MBPP / LiveCodeBench v6 (vLLM or transformers)",
        "generations.jsonl",
    ),
    ("evaluate", "btp.evaluate", "sandboxed execution, pass@k with bootstrap CIs", "evaluations.jsonl, summary.json"),
    (
        "entropy lens",
        "btp.entropy_lens",
        "per-layer entropy / CE / KL of the logit lens on scored tokens",
        "entropy/<mode>.npz",
    ),
    (
        "head ablation",
        "btp.ablation",
        "exact single-head ablation matrix, knockout curves",
        "ablation/<mode>.npz, ablation/<mode>_knockout.json",
    ),
    ("Taylor pruning", "btp.taylor", "iterative first-order Taylor head pruning", "taylor/<mode>.jsonl"),
    ("CMA-ES search", "btp.cmaes_search", "black-box head-subset search (pycma)", "cmaes/<mode>.jsonl"),
    (
        "OV/QK circuits",
        "btp.circuits",
        "per-head circuit similarity of a base and a distilled model",
        "circuits/<base>__<other>.csv, .npz, .json",
    ),
    (
        "pruned inference",
        "btp.pruned",
        "generate and evaluate with heads removed, against controls",
        "pruned/<setting>/, pruned/comparison.json",
    ),
    (
        "merge shards",
        "btp.merge",
        "combine the --shard i/N parts of an analysis into its outputs",
        "the outputs of one unsharded run",
    ),
    ("progress", "btp.check", "table of every model x dataset and stage (run_check.sh)", "stdout / --json"),
    ("plots", "btp.plots", "PNG/PDF figures of every result", "figures/"),
]


def available() -> list[tuple[str, str, str, str]]:
    """The stages whose modules exist (a list that only names what runs)."""
    return [s for s in STAGES if importlib.util.find_spec(s[1]) is not None]


def listing() -> str:
    stages = available()
    w = max(len(s[0]) for s in stages)
    out = ["btp stages (`btp <stage> --help` or `python -m <module> --help` for each):", ""]
    for name, mod, what, dest in stages:
        out += [f"  {name:<{w}}  {mod:<18} {what}", f"  {'':<{w}}  {'':<18} -> {dest}"]
    out += [
        "",
        "Results live under results/<model-slug>/<dataset>/. Shell wrappers: run_inference.sh, "
        "run_evaluate.sh, run_hml.sh, run_check.sh.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """`btp` / `python -m btp`: the listing; `btp <stage> ARGS` runs the stage (`btp check --help`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return
    mods = {m.removeprefix("btp."): m for _, m, _, _ in available()}
    stage = argv[0].replace("-", "_")
    if stage not in mods:
        print(f"btp: error: no stage {argv[0]!r} — choose from {', '.join(mods)}", file=sys.stderr)
        sys.exit(2)
    mod = importlib.import_module(mods[stage])
    from .cli import entry

    sys.argv = [f"btp {stage}", *argv[1:]]  # what the stage's parser and --debug read
    entry(stage, mod.main)


if __name__ == "__main__":
    main()
