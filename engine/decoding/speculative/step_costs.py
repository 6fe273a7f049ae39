"""What a verify step costs on this device, per tree size: measured once per model, device,
weight format, cache and proposer, kept in the cache folder, and measured again when the machine
has changed under it. The proposers' plans (engine/decoding/medusa/plan.py, engine/decoding/
lookup/proposer.py) compare these times with each other and with a one-token step's: only their
ratios matter."""

from __future__ import annotations

import json
import time

import torch

from kernels import cpu_ops

from engine.decoding.dmc import DMCForward
from engine.decoding.speculative.tree import draft_tree
from engine.decoding.speculative.verify import DenseTarget, DMCTarget, verify
from engine.paths import cache_dir

TIMING = 4  # of how step times are measured: those measured another way are measured again (4: a step with
# nothing drafted is a plain one-token step)
CLOSE, CLOSE_REPS = 2.0, 10  # the sizes timed again (up to CLOSE one-token steps), and how often
STALE = 2.0  # a stored table is measured again when a one-token step now differs from it by this factor
FILE = "medusa_step_ms.json"  # (named when Medusa was the only proposer)


def _cost_key(model, name: str) -> str:
    dev = model.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    lin = model.layers[0].qkv
    kind = type(lin).__name__ + (f"/panels-v{cpu_ops.VERSION}" if getattr(lin, "packed", None) is not None else "")
    kind += f"/head-{type(model.lm_head).__name__}"  # a large share of a small model's step
    return f"{name}|{where}|{str(model.dtype).removeprefix('torch.')}|{kind}|t{TIMING}"


def measure_step_ms(model, sizes, tree_step=None, accepted: int = 1, warmup: int = 1, reps: int = 5,
                    context: int = 256, dmc: dict | None = None, close_reps: int = CLOSE_REPS) -> dict[int, float]:
    """Time of one verify step per tree size, with ``context`` tokens already in a scratch
    cache; size 0 is a one-token decode step. ``tree_step(n, target)``: a step of the proposer's
    tree of ``n`` nodes over ``target`` (its drafting included: Medusa's heads), keeping at most
    ``accepted`` tokens; default: a chain of ``n`` nodes, drafted for free, keeping the root
    (lookup). ``dmc``: the DMC settings {"init_val", "window"} when the tree is verified over a
    DMC cache (which grows by what each measured step keeps: merges cannot be undone), else over
    a dense cache.

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
    room = max(sizes) + (warmup + reps + close_reps) * (len(sizes) + 1) * accepted + 1
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
    tree_step = tree_step or (lambda n, target: chain_step(model, n, target))
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
        steps = {n: one_token if n == 0 else tree_step(n, target) for n in times}
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


def chain_step(model, n: int, target):
    """A verify step of a chain of ``n`` nodes (lookup's drafts) that keeps the root."""
    tree = draft_tree(tuple(range(-1, n - 1)), str(model.device))
    proposals = torch.zeros(n - 1, dtype=torch.long, device=model.device)
    return lambda: verify(model, tree, target, 0, proposals).keep(target, 1)


def step_costs(model, name: str, sizes, tree_step=None, accepted: int = 1, dmc: dict | None = None,
               proposer: str = "medusa") -> dict[int, float]:
    """``measure_step_ms``'s table for ``proposer`` (its ``tree_step`` and ``accepted``),
    measured once per model, device, weight format and cache (dense or DMC), then read from
    the cache folder; measured again when a quick one-token step now takes less than half or
    more than twice the stored one (the table was measured while the machine was busier or
    quieter than now). The plan compares the trees' times with each other and with the plain
    step's: only their ratios matter, and those a uniformly busy machine leaves as they are."""
    file = cache_dir() / FILE
    key = _cost_key(model, name) + ("|dmc" if dmc is not None else "") + ("" if proposer == "medusa" else f"|{proposer}")
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
        have = measure_step_ms(model, sizes, tree_step, accepted, dmc=dmc)
        known[key] = {str(n): round(ms, 3) for n, ms in have.items()}
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(known, indent=1) + "\n")
    return have


