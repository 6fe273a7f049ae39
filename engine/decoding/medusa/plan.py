"""Which Medusa tree to verify on this device.

A tree of N nodes yields, per step, 1 + the sum over its proposal nodes of the frequency with
which that node's path of ranks is entirely right (the heads' acceptance profile, measured on
held-out replies when the heads were trained: the matching nodes form one chain). It costs one
verify step, whose time depends on N and on the device: on a GPU 64 nodes cost about what one
does, on a CPU each node adds a sizeable share of a step. So the best tree is the one with the
most expected tokens per second of measured step time (of the trees within TIE of the most, the
biggest: the timing cannot order them, while the bigger tree's extra tokens per step are no
noise), and it differs per device. Where no tree beats a plain decoding step (a CPU on which a
two-token pass costs much more than a one-token one, with weak heads), the plan is plain
decoding.

``--medusa-choices`` overrides the choice: a preset (``auto``, ``card``) or a JSON file with a
list of paths."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_ops

from engine.errors import EngineError
from engine.decoding.dmc import DMCForward
from engine.decoding.medusa.heads import Profile
from engine.decoding.medusa.tree import CARD_CHOICES, MedusaTree, build_tree
from engine.decoding.medusa.verify import DenseTarget, DMCTarget, TreeGraph, verify
from engine.paths import cache_dir

PRESETS = ("auto", "card")
TREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
TIMING = 3  # of how step times are measured: those measured another way are measured again
CLOSE, CLOSE_REPS = 2.0, 10  # the sizes timed again (up to CLOSE one-token steps), and how often
# expected tokens/s this close to the best's are a tie, which the bigger tree wins: on a 2-core CPU the
# small trees' rates (relative to a one-token step) moved by up to 10 % between four measurements
# in a row, and their order with them, while each tree's tokens per step are fixed by the profile
TIE = 0.03
STALE = 2.0  # a stored table is measured again when a one-token step now differs from it by this factor


@dataclass
class Plan:
    tree: MedusaTree | None  # None: no tree is faster than plain decoding on this device
    choices: str  # how it was chosen, for the model info
    expected_tokens_per_step: float | None = None
    step_ms: float | None = None
    plain_step_ms: float | None = None


def read_choices(spec: str, num_heads: int) -> list[list[int]]:
    """A preset's or a JSON file's paths."""
    if spec == "card":
        return [c for c in CARD_CHOICES if len(c) <= num_heads]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EngineError(f"--medusa-choices {spec!r}: not a preset ({', '.join(PRESETS)}) and not a file")
    try:
        choices = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: not a JSON list of Medusa choices ({e})") from None
    if not isinstance(choices, list):
        raise EngineError(f"{path}: expected a JSON list of paths such as [[0], [0, 0], [1]]")
    return choices


def _cost_key(model, name: str) -> str:
    dev = model.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    lin = model.layers[0].qkv
    kind = type(lin).__name__ + (f"/panels-v{cpu_ops.VERSION}" if getattr(lin, "packed", None) is not None else "")
    kind += f"/head-{type(model.lm_head).__name__}"  # a large share of a small model's step
    return f"{name}|{where}|{str(model.dtype).removeprefix('torch.')}|{kind}|t{TIMING}"


def measure_step_ms(model, heads, sizes, profile: Profile | None, warmup: int = 1, reps: int = 5,
                    context: int = 256, dmc: dict | None = None, close_reps: int = CLOSE_REPS) -> dict[int, float]:
    """Time of one verify step (heads included) per tree size, with ``context`` tokens already
    in a scratch cache; size 0 is a one-token decode step. ``dmc``: the DMC settings {"init_val",
    "window"} when the tree is verified over a DMC cache (which grows by what each measured step
    keeps: merges cannot be undone), else over a dense cache.

    The sizes are timed in rounds, each size once per round, so that a busy spell of the
    machine falls on all of them alike. The sizes among which the choice is made (those whose
    step costs at most CLOSE times a one-token step: on a CPU the small trees, whose times lie a
    few percent apart, as their tokens per step do) are then timed ``close_reps`` rounds more.
    Per size the median of its rounds, then the trees' times made non-decreasing in their size (a
    bigger tree does no less work: a smaller time measured for it is noise), by pooling adjacent
    sizes that are out of order.

    The scratch cache holds ``context`` seeded random tokens, not one token repeated: over a
    DMC cache, a repeated token is hardly ever merged (a cache nearly as long as a dense one; text is
    compressed about 2x) and the trees' attention over it costs several times what it does in
    decoding. Random tokens are merged less than text, so the DMC times stay on the high side."""
    zero = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    room = max(sizes) + (warmup + reps + close_reps) * (len(sizes) + 1) * (heads.num_heads + 1) + 1
    text = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    text = text.to(model.device)
    if dmc is not None:
        scratch = DMCForward(model, 1, context + room, **dmc)
        scratch.prefill(text)
        target, one_token = DMCTarget(scratch), lambda: scratch.step(zero[0])
    else:
        cache = model.new_cache(context + room)
        model.last_hidden(text, cache, 0)
        target, one_token = DenseTarget(model, cache), lambda: model.forward(zero, cache, context)
    hidden = torch.zeros(model.cfg.hidden_size, device=model.device, dtype=model.dtype)

    def tree_step(n: int):
        paths = profile.tree_paths(n, heads.num_heads) if profile else CARD_CHOICES[:n - 1]
        tree = build_tree(paths or [[0]], heads.num_heads).to(model.device)
        graph = TreeGraph.for_device(model, tree, cache) if dmc is None else None  # as decoding runs it
        return lambda: verify(model, tree, target, 0, heads.propose(hidden, model, tree, 0), graph=graph).keep(target)

    times: dict[int, list[float]] = {n: [] for n in (0, *sizes)}

    def rounds(count: int, which: dict, first: int = 0):
        for r in range(count):
            for n, step in which.items():
                if dmc is None:
                    cache.length = context
                took = timed(model, step)
                if r >= first:
                    times[n].append(took)

    def medians() -> dict[int, float]:
        return {n: sorted(t)[len(t) // 2] * 1000 for n, t in times.items()}

    with torch.inference_mode():
        steps = {n: one_token if n == 0 else tree_step(n) for n in times}
        rounds(warmup + reps, steps, warmup)
        so_far = medians()
        rounds(close_reps, {n: step for n, step in steps.items() if so_far[n] <= CLOSE * so_far[0]})
    median = medians()
    trees = sorted(sizes)
    return {0: median[0], **dict(zip(trees, non_decreasing([median[n] for n in trees])))}


def timed(model, step) -> float:
    """Seconds that ``step()`` takes, the GPU's work included."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool-adjacent-violators): each run of
    values that goes down is replaced by its mean."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled run
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def quick_plain_ms(model, dmc: dict | None = None, context: int = 64, reps: int = 5) -> float:
    """The median time of a few one-token steps (ms) after a short prompt: whether a stored
    table's times are those of the machine as it is now."""
    zero = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    text = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    text = text.to(model.device)
    with torch.inference_mode():
        if dmc is not None:
            scratch = DMCForward(model, 1, context + reps + 1, **dmc)
            scratch.prefill(text)
            step = lambda: scratch.step(zero[0])  # noqa: E731
        else:
            cache = model.new_cache(context + 1)
            model.last_hidden(text, cache, 0)
            step = lambda: model.forward(zero, cache, context)  # noqa: E731
        step()
        times = [timed(model, step) for _ in range(reps)]
    return sorted(times)[len(times) // 2] * 1000


def step_costs(model, heads, name: str, sizes, profile: Profile | None, dmc: dict | None = None) -> dict[int, float]:
    """Measured once per model, device, weight format and cache (dense or DMC), then read from
    the cache folder; measured again when a quick one-token step now takes less than half or
    more than twice the stored one (the table was measured while the machine was busier or
    quieter than now). The plan compares the trees' times with each other and with the plain
    step's: only their ratios matter, and those a uniformly busy machine leaves as they are."""
    file = cache_dir() / "medusa_step_ms.json"
    key = _cost_key(model, name) + ("|dmc" if dmc is not None else "")
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    have = {int(n): float(ms) for n, ms in known.get(key, {}).items()}
    if all(n in have for n in (0, *sizes)):
        now = quick_plain_ms(model, dmc)
        if not have[0] / STALE <= now <= have[0] * STALE:  # measured on a busier (or quieter) machine
            have = {}
    if not all(n in have for n in (0, *sizes)):
        have = measure_step_ms(model, heads, sizes, profile, dmc=dmc)
        known[key] = {str(n): round(ms, 3) for n, ms in have.items()}
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(known, indent=1) + "\n")
    return have


def plan(model, heads, name: str, choices: str | None, profile: Profile | None, dmc: dict | None = None) -> Plan:
    """The tree to verify: the user's choice, or (``auto``) the best for this device and cache
    (``dmc``: the DMC settings when the tree is verified over a DMC cache)."""
    choices = choices or "auto"
    if choices != "auto":
        tree = build_tree(read_choices(choices, heads.num_heads), heads.num_heads)
        ranks = heads.vocabulary(model.lm_head)
        if max(tree.topk) > ranks:
            raise EngineError(f"--medusa-choices {choices}: a path ranks token {max(tree.topk) - 1}, but the heads "
                              f"score {ranks} tokens")
        return Plan(tree.to(model.device), choices)
    if profile is None:  # no acceptance figures for these heads: the reference tree
        return Plan(build_tree(read_choices("card", heads.num_heads), heads.num_heads).to(model.device), "card")
    most = len([p for p, _ in profile.paths if len(p) <= heads.num_heads]) + 1
    sizes = sorted({n for n in TREE_SIZES if 2 <= n < most} | {most})
    costs = step_costs(model, heads, name, sizes, profile, dmc)

    def rate(n):
        return profile.expected_tokens(profile.tree_paths(n, heads.num_heads)) / costs[n]

    best = max(sizes, key=rate)
    if rate(best) <= 1.0 / costs[0]:
        return Plan(None, f"auto (plain: no tree beats plain decoding here; best {best} nodes, "
                          f"{rate(best) * costs[0]:.2f}x)", 1.0, costs[0], costs[0])
    tie = max((1 - TIE) * rate(best), 1.0 / costs[0])
    best = max(n for n in sizes if rate(n) >= tie)  # of the ties, the most tokens per step
    paths = profile.tree_paths(best, heads.num_heads)
    return Plan(build_tree(paths, heads.num_heads).to(model.device), f"auto ({best} nodes)",
                profile.expected_tokens(paths), costs[best], costs[0])
