"""Analysis samples: which sequences the entropy lens, ablation, Taylor and CMA-ES look at, and which of their
tokens are scored.

- Sources: `generations` (the model's own outputs, exactly the token ids it generated in, filtered by
  correctness from evaluations.jsonl) or `reference` (the benchmark's reference solutions, teacher-forced in
  the same prompt the generator would use).
- Modes: `regular` scores the answer from its first token to the end of its code (reasoning + code; trailing prose,
  a closing fence, a continuation past the function are not scored; all of it when there is no code); `chain_code`
  keeps the reasoning in context and scores the code tokens only. A mode changes which tokens are scored, nothing
  else.
- A sample's scored tokens are input_ids[score_start:score_end]; the logits that predict token t sit at
  position t - 1 (`positions`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cli import add_flags, at_least, config_from, opt
from .results import EVALUATIONS, GENERATIONS, MODES, PAIRED, SELECTS, SOURCES, Stem, code_sha, dataset_dir
from .store import UserError, read_jsonl


@dataclass
class SampleConfig:
    source: str = opt(
        "generations",
        "generations: the model's own outputs; reference: the benchmark's reference solutions",
        choices=SOURCES,
    )
    select: str = opt(
        "correct",
        "which generations (by evaluation); *_paired: only problems with both correct and incorrect generations",
        choices=SELECTS,
    )
    mode: str = opt(
        "regular",
        "regular: score reasoning + code (up to the code's end); chain_code: reasoning in context, score code only",
        choices=MODES,
    )
    num_samples: int | None = opt(None, "how many samples (default: all)", check=at_least(1))
    seed: int = 0  # the stage's --seed
    # cap on a sample's length: keep the prompt's head (BOS, template start, system prompt) and the scored span, cut
    # the context right after the head
    # (--sample-max-tokens: --max-tokens is generation length, in generate and pruned)
    max_tokens: int | None = opt(
        None,
        "context cap of an analysed sample in tokens (cut the prompt body after BOS, the template start and the "
        "system prompt; a sample whose scored span does not fit is left out, and counted in the summary line) "
        "(default: no cap)",
        flag="sample-max-tokens",
        check=at_least(1),
    )
    # for the reference source: as the generator would prompt (the same template options and system prompt)
    prompt_style: str = opt(
        "auto", "reference source: the prompt style, as given to generate", choices=("auto", "chat", "completion")
    )
    chat_template_kwargs: dict = opt(
        help="reference source: JSON passed to the chat template, as to generate, e.g. '{\"enable_thinking\": false}'",
        factory=dict,
    )
    system_prompt: str | None = opt(None, "reference source: the system prompt, as given to generate")

    def __post_init__(self) -> None:
        for name, allowed in (("source", SOURCES), ("select", SELECTS), ("mode", MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")

    @property
    def output_stem(self) -> Stem:
        """The output name of these samples (btp.results grammar): `chain_code`, `regular-reference`, ..."""
        return Stem(self.mode, self.source, self.select)

    @property
    def stem(self) -> str:
        return str(self.output_stem)


@dataclass
class Sample:
    problem_id: str
    sample: int  # generation sample index; -1 for a reference solution
    input_ids: np.ndarray  # int64 [T]: the exact context (prompt + answer), after any left cut
    score_start: int  # scored tokens: input_ids[score_start:score_end]
    score_end: int
    cut_left: int = 0  # tokens removed by max_tokens, right after the prompt's head (`prompt_head`)

    @property
    def positions(self) -> np.ndarray:
        """Indices whose logits predict the scored tokens."""
        return np.arange(self.score_start - 1, self.score_end - 1)

    @property
    def targets(self) -> np.ndarray:
        return self.input_ids[self.score_start : self.score_end]

    @property
    def n_scored(self) -> int:
        return self.score_end - self.score_start


@dataclass
class SampleSet:
    samples: list[Sample]
    config: SampleConfig
    dataset: str
    model_id: str
    info: dict = field(default_factory=dict)
    too_long: int = 0  # samples the context cap (--sample-max-tokens) left out

    def left_out(self) -> str:
        """What the context cap left out, appended to each analysis stage's summary line ("" when nothing)."""
        return f"; {too_long_note(self.too_long, self.config.max_tokens)}" if self.too_long else ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def problem_ids(self) -> list[str]:
        return [s.problem_id for s in self.samples]

    def fields(self) -> dict[str, np.ndarray]:
        """The sample fields every analysis output carries, enough to recompute every number:
        `input_ids` (all samples concatenated), `sample_offsets` [S+1], and per scored token
        `sample_index`, `position` (index within its sample of the predicting position), `token_id`."""
        lens = [len(s.input_ids) for s in self.samples]
        return {
            "input_ids": np.concatenate([s.input_ids for s in self.samples]).astype(np.int64)
            if self.samples
            else np.zeros(0, np.int64),
            "sample_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "sample_index": np.concatenate([np.full(s.n_scored, i) for i, s in enumerate(self.samples)]).astype(
                np.int64
            )
            if self.samples
            else np.zeros(0, np.int64),
            "position": np.concatenate([s.positions for s in self.samples]).astype(np.int64)
            if self.samples
            else np.zeros(0, np.int64),
            "token_id": np.concatenate([s.targets for s in self.samples]).astype(np.int64)
            if self.samples
            else np.zeros(0, np.int64),
            "sample_problem_id": np.array(self.problem_ids, dtype=str),
            "sample_number": np.array([s.sample for s in self.samples], dtype=np.int64),
        }

    def describe(self) -> dict:
        """JSON-able description for provenance files."""
        return {
            **self.info,
            "config": asdict(self.config),
            "dataset": self.dataset,
            "model": self.model_id,
            "problem_ids": self.problem_ids,
            "samples": [[s.problem_id, s.sample] for s in self.samples],
            "n_scored_tokens": int(sum(s.n_scored for s in self.samples)),
        }

    def split(self, heldout: float | int, seed: int | None = None) -> tuple[SampleSet, SampleSet]:
        """Disjoint (scoring, held-out) sets, split by problem so that no problem is in both."""
        pids = sorted(set(self.problem_ids))
        rng = np.random.default_rng(self.config.seed if seed is None else seed)
        rng.shuffle(pids)
        n_hold = heldout if isinstance(heldout, int) else max(1, round(len(pids) * heldout))
        if not 0 < n_hold < len(pids):
            raise ValueError(f"cannot hold out {n_hold} of {len(pids)} problems; need at least 2 problems")
        hold = set(pids[:n_hold])
        a = [s for s in self.samples if s.problem_id not in hold]
        b = [s for s in self.samples if s.problem_id in hold]
        mk = lambda ss, part: SampleSet(
            ss, self.config, self.dataset, self.model_id, {**self.info, "split": part}, self.too_long
        )
        return mk(a, "scoring"), mk(b, "heldout")


# ---------------------------------------------------------------- token spans


def char_to_token_span(
    tokenizer: Any, ids: list[int], start: int, end: int, text: str | None = None
) -> tuple[int, int]:
    """Token range [i, j) of `ids` whose decoded characters overlap [start, end) of decode(ids).

    Prefix decodes are monotone in length, so both ends are found by binary search (O(log n) decodes)."""
    dec = lambda k: len(tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    if text is not None:
        full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if full != text:
            raise ValueError("decoded output token ids differ from the stored output text; cannot map code span")

    def first(pred) -> int:  # smallest k in [0, n] with pred(k)
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    i = first(lambda k: dec(k + 1) > start) if start < end else 0
    j = first(lambda k: dec(k) >= end)
    return i, max(j, i)


# ---------------------------------------------------------------- building samples


def _ranked(cands: list[tuple[str, int]], problem_order: dict[str, int], seed: int) -> list[tuple[str, int]]:
    """Deterministic preference order: problems in a seeded random order, one sample per problem first, then
    more. The first n usable candidates are the choice, so a candidate left out (too long, no code) gives way
    to the next instead of shrinking the set."""
    pids = sorted({p for p, _ in cands}, key=problem_order.__getitem__)
    perm = {p: r for r, p in enumerate(np.random.default_rng(seed).permutation(pids))}
    rank: dict[str, int] = {}
    keyed = []
    for p, s in sorted(cands, key=lambda c: (problem_order[c[0]], c[1])):
        keyed.append(((rank.get(p, 0), perm[p]), (p, s)))
        rank[p] = rank.get(p, 0) + 1
    return [c for _, c in sorted(keyed)]


def _in_order(samples: list[Sample], problem_order: dict[str, int]) -> list[Sample]:
    return sorted(samples, key=lambda s: (problem_order[s.problem_id], s.sample))


def _fit(
    ids: np.ndarray, s0: int, s1: int, max_tokens: int | None, head: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, int, int, int] | None:
    """Cut context so that len <= max_tokens: the prompt's head stays, the tokens right after it (the start of the
    prompt body, then what follows) go, and the scored span keeps its predicting position. `head`: (the whole head:
    BOS, template start, system prompt; its leading special tokens only), the second kept where the first leaves
    too little room. None when even that, the predicting position and the span do not fit."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, s0, s1, 0
    cut = len(ids) - max_tokens
    for h in head:
        h = min(h, s0 - 1)
        if cut <= s0 - 1 - h:
            return np.concatenate([ids[:h], ids[h + cut :]]), s0 - cut, s1 - cut, cut
    return None  # the head's special tokens + one context token + the scored span are longer than max_tokens


def prompt_head(
    tokenizer: Any, prompt_ids: list[int], prompt: str | None = None, body: str | None = None
) -> tuple[int, int]:
    """(tokens of the prompt before its body, its leading special tokens): the body is `body` (e.g. the user
    message) found in the `prompt` text; before it are BOS, the chat template's start and any system prompt, which a
    cut keeps (BOS is the attention sink). Without a body to find, both are the leading special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lead = next((i for i, t in enumerate(prompt_ids) if t not in special), len(prompt_ids))
    at = prompt.find(body) if prompt is not None and body else -1
    if at <= 0:
        return lead, lead
    dec = lambda k: len(
        tokenizer.decode(
            prompt_ids[:k],
            skip_special_tokens=False,  # noqa: E731
            clean_up_tokenization_spaces=False,
        )
    )
    lo, hi = 0, len(prompt_ids)  # the largest k whose decoded prefix ends at or before the body
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if dec(mid) <= at:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, lead), lead


def _bodies(dataset: str) -> dict[str, list[str]]:
    """problem id -> its chat user messages (one per variant): generations' prompt bodies, when the benchmark's data
    is vendored."""
    from . import benchmarks

    bench = benchmarks.get(dataset)
    if not bench.vendored:
        return {}
    try:
        out: dict[str, list[str]] = {}
        for v in bench.variants or (None,):
            for p in bench.load(variant=v):
                out.setdefault(p.problem_id, []).append(bench.user_message(p))
        return out
    except Exception:  # noqa: BLE001 - without them a cut keeps the leading special tokens only
        return {}


def load_samples(
    results_dir: str | Path,
    model_id: str,
    dataset: str,
    config: SampleConfig,
    tokenizer: Any = None,
    problems: list | None = None,
) -> SampleSet:
    """The analysis samples of a model x dataset under `results_dir`, per `config`."""
    if config.source == "generations":
        return _from_generations(results_dir, model_id, dataset, config, tokenizer)
    if tokenizer is None:
        raise ValueError("the reference source needs the model's tokenizer")
    return _from_reference(model_id, dataset, config, tokenizer, problems)


def _from_generations(results_dir, model_id, dataset, cfg: SampleConfig, tokenizer) -> SampleSet:
    d = dataset_dir(results_dir, model_id, dataset)
    gpath, epath = d / GENERATIONS, d / EVALUATIONS
    if not gpath.exists():
        raise FileNotFoundError(f"{gpath} not found — run `python -m btp.generate` first, or use --source reference")
    gens = read_jsonl(gpath)
    order = {}
    for g in gens:
        order.setdefault(g["problem_id"], len(order))
    verdict: dict[tuple[str, int], bool] = {}
    judged: dict[tuple[str, int], str | None] = {}  # the hash of the code each verdict judged
    if cfg.select != "all":
        if not epath.exists():
            raise FileNotFoundError(
                f"{epath} not found — --select {cfg.select} needs evaluations "
                f"(run `python -m btp.evaluate`), or use --select all"
            )
        for e in read_jsonl(epath):  # the last record of a (problem, sample) is its verdict
            key = (e["problem_id"], int(e["sample"]))
            verdict[key], judged[key] = bool(e["passed"]), e.get("code_sha")
    notes: list[str] = []
    by_key = {}
    n_unevaluated = n_nocode = n_other = 0
    want = PAIRED.get(cfg.select, cfg.select)
    both: dict[str, set[bool]] = {}  # verdicts of each problem's eligible generations
    for g in gens:
        key = (g["problem_id"], int(g["sample"]))
        if cfg.select != "all" and key not in verdict:
            n_unevaluated += 1
            continue
        if cfg.select != "all" and judged[key] is not None and judged[key] != code_sha(g.get("code") or ""):
            n_other += 1  # a verdict of other code (the sample was regenerated since): not this sample's
            continue
        has_code = cfg.mode != "chain_code" or bool(g.get("code"))
        if cfg.select != "all":
            if has_code:
                both.setdefault(key[0], set()).add(verdict[key])
            if verdict[key] != (want == "correct"):
                continue
        if not has_code:
            n_nocode += 1
            continue
        by_key[key] = g
    if cfg.select in PAIRED:
        keep = {p for p, v in both.items() if len(v) == 2}
        n_unpaired = len({p for p, _ in by_key} - keep)
        by_key = {k: g for k, g in by_key.items() if k[0] in keep}
        notes.append(
            f"paired: {len(keep)} problems have both correct and incorrect generations; {n_unpaired} "
            f"problems with only {want} ones left out"
        )
    if n_unevaluated:
        notes.append(f"{n_unevaluated} generations have no evaluation and were left out")
    if n_other:
        notes.append(
            f"{n_other} generations have a verdict of other code (evaluations older than the generation; "
            "rerun btp.evaluate) and were left out"
        )
    samples = []
    n_too_long = n_empty = n_mismatch = 0
    bodies: dict[str, str] | None = None  # loaded on the first cut
    for key in _ranked(list(by_key), order, cfg.seed):
        if cfg.num_samples is not None and len(samples) >= cfg.num_samples:
            break
        g = by_key[key]
        p_ids, o_ids = list(g["prompt_token_ids"]), list(g["output_token_ids"])
        if not o_ids:
            n_empty += 1
            continue
        has_code = bool(g.get("code")) and g.get("code_start", 0) >= 0
        if has_code:
            if tokenizer is None:
                raise ValueError(f"{cfg.mode} mode needs the model's tokenizer to locate the code tokens")
            start = g["output"].find(g["code"]) if "code_start" not in g else g["code_start"]
            end = g.get("code_end", start + len(g["code"]))
            try:  # the guard: offsets into the stored text only mean token positions if the tokens decode to it
                i, j = char_to_token_span(tokenizer, o_ids, start, end, text=g.get("output")) if start >= 0 else (0, 0)
            except ValueError:
                n_mismatch += 1
                continue
            has_code = j > i
        if cfg.mode == "chain_code" and not has_code:
            n_nocode += 1
            continue
        # regular: the output up to the end of its code (trailing prose or a continuation past the function is not
        # reasoning + code); all of it when there is no code
        a, b = (i, j) if cfg.mode == "chain_code" else (0, j if has_code else len(o_ids))
        ids = np.array(p_ids + o_ids, dtype=np.int64)
        head = (0, 0)
        if cfg.max_tokens is not None and len(ids) > cfg.max_tokens:
            bodies = _bodies(dataset) if bodies is None else bodies
            body = next((t for t in bodies.get(key[0], []) if t in g.get("prompt", "")), None)
            head = prompt_head(tokenizer, p_ids, g.get("prompt"), body) if tokenizer is not None else (0, 0)
        fit = _fit(ids, len(p_ids) + a, len(p_ids) + b, cfg.max_tokens, head)
        if fit is None:
            n_too_long += 1
            continue
        samples.append(Sample(key[0], key[1], *fit))
    if n_nocode:
        notes.append(f"{n_nocode} generations have no code block to score in chain_code mode and were left out")
    if n_empty:
        notes.append(f"{n_empty} generations have no output tokens and were left out")
    if n_mismatch:
        notes.append(
            f"{n_mismatch} generations left out: their output tokens do not decode to the stored output "
            "text, so the code span cannot be located in tokens"
        )
    if n_too_long:
        notes.append(too_long_note(n_too_long, cfg.max_tokens))
    return _finish(
        _in_order(samples, order), cfg, dataset, model_id, len(by_key), notes, str(gpath), n_too_long=n_too_long
    )


def _from_reference(model_id, dataset, cfg: SampleConfig, tokenizer, problems) -> SampleSet:
    from . import benchmarks

    if cfg.select != "all" and cfg.select != "correct":
        raise UserError("reference solutions are all correct — use --select correct or all with --source reference")
    probs = problems if problems is not None else benchmarks.get(dataset).load()
    probs = [p for p in probs if p.reference is not None]
    if not probs:
        raise UserError(f"{dataset} has no reference solutions — use --source generations")
    order = {p.problem_id: i for i, p in enumerate(probs)}
    by_id = {p.problem_id: p for p in probs}
    samples, notes, n_too_long, n_nocode = [], [], 0, 0
    for pid, _ in _ranked([(p.problem_id, -1) for p in probs], order, cfg.seed):
        if cfg.num_samples is not None and len(samples) >= cfg.num_samples:
            break
        ids, a, b, head = reference_tokens(by_id[pid], tokenizer, cfg)
        if b <= a:
            n_nocode += 1
            continue
        fit = _fit(ids, a, b, cfg.max_tokens, head)
        if fit is None:
            n_too_long += 1
            continue
        samples.append(Sample(pid, -1, *fit))
    if n_nocode:
        notes.append(f"{n_nocode} references have no tokens to score ({cfg.mode}) and were left out")
    if n_too_long:
        notes.append(too_long_note(n_too_long, cfg.max_tokens))
    return _finish(
        _in_order(samples, order), cfg, dataset, model_id, len(probs), notes, "btp.benchmarks", n_too_long=n_too_long
    )


def reference_tokens(p, tokenizer: Any, cfg: SampleConfig) -> tuple[np.ndarray, int, int, tuple[int, int]]:
    """(prompt + answer ids, scored start, scored end, prompt head (`prompt_head`)) of a reference, teacher-forced
    as the generator would have prompted (template options, system prompt) and as the chat template renders a
    finished answer: any think block the prompt opened closed empty, the turn closed by the template's own turn
    end."""
    from .prompts import assistant_turn, build_prompt, encode_prompt, extract, reference_output

    prompt, style = build_prompt(p, tokenizer, cfg.prompt_style, cfg.chat_template_kwargs or None, cfg.system_prompt)
    p_ids = encode_prompt(prompt, tokenizer, style)
    answer = reference_output(p, style)
    turn_end = ""
    if style == "chat":
        answer, turn_end = assistant_turn(
            p, tokenizer, prompt, answer, cfg.chat_template_kwargs or None, cfg.system_prompt
        )
    o_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    end_ids = list(tokenizer(turn_end, add_special_tokens=False)["input_ids"]) if turn_end else []
    ex = extract(p, answer, style, prompt)
    i, j = char_to_token_span(tokenizer, o_ids, ex.code_start, ex.code_end) if ex.code_start >= 0 else (0, 0)
    a, b = (i, j) if cfg.mode == "chain_code" else (0, j if j > i else len(o_ids) + len(end_ids))
    from . import benchmarks

    body = benchmarks.get(p.dataset).user_message(p) if style == "chat" else None
    head = prompt_head(tokenizer, p_ids, prompt, body)
    return np.array(p_ids + o_ids + end_ids, dtype=np.int64), len(p_ids) + a, len(p_ids) + b, head


def too_long_note(n: int, cap: int | None) -> str:
    """What the context cap left out, as each analysis stage's summary line and the samples' notes say it."""
    return f"{n} sample{'s' if n != 1 else ''} left out: longer than --sample-max-tokens {cap}"


def _finish(samples, cfg, dataset, model_id, available, notes, source_file, n_too_long=0) -> SampleSet:
    asked = cfg.num_samples
    if asked is not None and len(samples) < asked:
        notes.append(
            f"asked for {asked} samples, only {len(samples)} exist ({cfg.source}, select={cfg.select}, "
            f"mode={cfg.mode}); using those"
        )
    for n in notes:
        warnings.warn(f"[btp.samples] {dataset}: {n}", stacklevel=2)
    if not samples:
        raise UserError(
            f"no analysis samples for {model_id} / {dataset} ({cfg.source}, select={cfg.select}, "
            f"mode={cfg.mode}; {'; '.join(notes) or 'nothing eligible'}) — generate and evaluate more "
            "samples, or choose another --select / --source"
        )
    info = {
        "source": cfg.source,
        "population": f"{cfg.source}:{cfg.select}",
        "eligible": available,
        "used": len(samples),
        "asked": asked,
        "notes": notes,
        "source_file": source_file,
        "cut_left": [s.cut_left for s in samples],
    }
    return SampleSet(samples, cfg, dataset, model_id, info, too_long=n_too_long)


def add_sample_args(p) -> None:
    """The sample flags shared by every analysis stage's CLI (`--seed` is the stage's own)."""
    add_flags(p, SampleConfig, skip=("seed",))


def config_from_args(args) -> SampleConfig:
    return config_from(SampleConfig, args)
