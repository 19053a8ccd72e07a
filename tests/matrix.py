"""The options a run combines, with their values, in one place; an all-pairs covering set of
them; and each combination as config overrides (tests/test_matrix.py runs them).

Each value is the overrides it adds. A combination is valid unless one of its pairs is refused
by the launcher's table (train/refusals.py) or does not apply (`NOT_APPLICABLE`: mode dp runs
one process whatever the worker count; comm hooks are DDP's): the generator covers every pair
that can occur, each at least once, with valid combinations only.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

from tests.workers import DEFAULT_CONFIG
from train.config import load_config
from train.refusals import refusal_for

# A name per value; a value's overrides may name paths as {data} (the fixture's folder).
OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "mode": {"ddp": ("mode=ddp",), "zero": ("mode=ddp", "ddp.zero=true"), "dp": ("mode=dp",),
             "ring": ("mode=scratch", "scratch.algorithm=ring", "scratch.bucket_mb=0.01"),
             "naive": ("mode=scratch", "scratch.algorithm=naive"), "fsdp": ("mode=fsdp",)},
    "data": {"synthetic": ("data.name=synthetic", "data.loader=memory"),
             "idx": ("data.name=mnist", "data.root={data}/idx", "data.download=false"),
             "stream": ("data.name=imagefolder", "data.root={data}/images", "data.loader=stream",
                        "data.image_size=16"),
             "cache": ("data.name=imagefolder", "data.root={data}/images", "data.loader=stream",
                       "data.image_size=16", "data.cache=decoded"),
             "python": ("data.name=python", "data.factory=tests.matrix_workers:python_dataset",
                        "data.image_size=16")},
    "precision": {"fp32": ("perf.precision=fp32",), "bf16": ("perf.precision=bf16",)},
    "accum": {"1": ("train.grad_accum_steps=1",), "2": ("train.grad_accum_steps=2",)},
    "recipe": {"plain": ("optim.name=sgd",),
               "rich": ("optim.name=adamw", "optim.lr=0.004", "optim.clip_grad_norm=0.3",
                        "train.label_smoothing=0.1", "train.mixup_alpha=0.4",
                        "train.cutmix_alpha=1.0", "train.ema_decay=0.9")},
    "compile": {"off": ("perf.compile=off",),
                "on": ("perf.compile=on", "perf.compile_backend=aot_eager")},
    "hook": {"none": ("ddp.comm_hook=none",), "bf16": ("ddp.comm_hook=bf16",),
             "powersgd": ("ddp.comm_hook=powersgd", "ddp.powersgd_start_step=2")},
    "workers": {"1": (), "2": (), "3": ()},
    "channels_last": {"off": ("perf.channels_last=false",), "on": ("perf.channels_last=true",)},
}
# Every run: 48 samples, a global batch of 12 (4 steps, one epoch, a checkpoint at step 3 inside
# it); 21 test samples in batches of 5 (ranks hold different numbers of evaluation batches).
COMMON = ("data.synthetic.train_samples=48", "data.synthetic.test_samples=21",
          "train.batch_size=12", "train.eval_batch_size=5", "train.epochs=1",
          "optim.warmup_steps=0", "optim.warmup_epochs=0", "checkpoint.every_steps=3",
          "checkpoint.keep=10", "data.num_workers=0", "log.every_steps=1", "log.progress=off",
          "wandb.mode=disabled", "dist.timeout_s=120")

Combo = dict[str, str]


def not_applicable(combo: Combo) -> str | None:
    """Why a (partial) combination does not exist, apart from the launcher's refusals."""
    mode, workers, hook = combo.get("mode"), combo.get("workers"), combo.get("hook")
    if mode == "dp" and workers not in (None, "1"):
        return "mode dp runs one process (DataParallel over the GPUs it drives)"
    if mode not in (None, "ddp", "zero") and hook not in (None, "none"):
        return "ddp.comm_hook is DDP's"  # refused too: the matrix checks the table's row
    return None


def refused(combo: Combo) -> str | None:
    """The launcher table's line for a (partial) combination, if it refuses it."""
    return _refused(tuple(combo.items()))


@functools.cache
def _refused(items: tuple[tuple[str, str], ...]) -> str | None:
    cfg = load_config(DEFAULT_CONFIG, [*COMMON, *overrides(dict(items), "/nowhere")])
    found = refusal_for(cfg)
    return None if found is None else found.line.format(mode=cfg.mode)


def overrides(combo: Combo, data: str = "{data}") -> list[str]:
    return [o.format(data=data) for name, value in combo.items()
            for o in OPTIONS[name][value]]


def all_pairs(options: dict[str, dict], allowed: Callable[[Combo], bool]) -> list[Combo]:
    """A covering set: every allowed pair of values of two options occurs together in at least
    one combination. Greedy and deterministic: start from the first uncovered pair, then give
    each other option the value that covers the most uncovered pairs (ties: the first)."""
    names = list(options)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in options[a] for y in options[b] if allowed({a: x, b: y})}
    combos: list[Combo] = []
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(
            p[1][0]), list(options[p[0][0]]).index(p[0][1]), list(options[p[1][0]]).index(
                p[1][1])))
        combo = {a: x, b: y}
        for name in names:
            if name in combo:
                continue
            best = max((v for v in options[name] if allowed({**combo, name: v})),
                       key=lambda v: sum(((n, combo[n]), (name, v)) in uncovered or
                                         ((name, v), (n, combo[n])) in uncovered
                                         for n in combo))
            combo[name] = best
        combo = {n: combo[n] for n in names}
        uncovered -= {((p, combo[p]), (q, combo[q])) for p, q in itertools.combinations(names, 2)}
        combos.append(combo)
    return combos


def valid(combo: Combo) -> bool:
    """No pair of it refused or inapplicable (every constraint here is between two options)."""
    return all(not_applicable(dict(p)) is None and refused(dict(p)) is None
               for p in itertools.combinations(combo.items(), 2))


def name_of(combo: Combo) -> str:
    return "-".join(f"{v}" if k in ("mode", "data") else f"{k}={v}" for k, v in combo.items())


COMBOS = all_pairs(OPTIONS, valid)
