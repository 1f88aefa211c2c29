"""`python -m btp`: the stages and the modules that run them."""
from __future__ import annotations

import importlib.util

STAGES = [
    ("generate", "btp.generate", "solutions to HumanEval / MBPP / LiveCodeBench v6 (vLLM or transformers)",
     "generations.jsonl"),
    ("evaluate", "btp.evaluate", "sandboxed execution, pass@k with bootstrap CIs", "evaluations.jsonl, summary.json"),
    ("entropy lens", "btp.entropy_lens", "per-layer entropy / CE / KL of the logit lens on scored tokens",
     "entropy/<mode>.npz"),
    ("head ablation", "btp.ablation", "exact single-head ablation matrix, knockout curves",
     "ablation/<mode>.npz, ablation/<mode>_knockout.json"),
    ("Taylor pruning", "btp.taylor", "iterative first-order Taylor head pruning", "taylor/<mode>.jsonl"),
    ("CMA-ES search", "btp.cmaes_search", "black-box head-subset search (pycma)", "cmaes/<mode>.jsonl"),
    ("OV/QK circuits", "btp.circuits", "per-head circuit similarity of a base and a distilled model",
     "circuits/<base>__<other>.csv, .npz, .json"),
    ("pruned inference", "btp.pruned", "generate and evaluate with heads removed, against controls",
     "pruned/<setting>/, pruned/comparison.json"),
    ("progress", "btp.check", "table of every model x dataset and stage (run_check.sh)", "stdout / --json"),
    ("plots", "btp.plots", "PNG/PDF figures of every result", "figures/"),
    ("benchmarks", "btp.bench", "timings of btp against the straightforward method", "stdout"),
]


def main() -> None:
    print("btp stages (python -m <module> --help for each):\n")
    w = max(len(s[0]) for s in STAGES)
    for name, mod, what, out in STAGES:
        there = importlib.util.find_spec(mod) is not None
        status = "" if there else "  [not built yet]"
        print(f"  {name:<{w}}  {mod:<18} {what}\n  {'':<{w}}  {'':<18} -> {out}{status}")
    print("\nResults live under results/<model-slug>/<dataset>/. Shell wrappers: run_inference.sh, "
          "run_evaluate.sh, run_hml.sh, run_check.sh.")


if __name__ == "__main__":
    main()
