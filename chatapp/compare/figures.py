"""Comparing two decoding set-ups on one prompt: the figures side by side, and the headless run
behind `chatapp compare --json`. No UI here; the compare screen uses the same functions."""

from __future__ import annotations

from collections.abc import Callable

from engine.events import Done, GenerationStats
from chatapp.compare.spec import Setup
from engine.units import binary_size

NONE = "—"  # a figure that is missing (the set-up failed or has not run)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not a:
        return NONE
    return f"{b / a:.2f}x"


def tokens_per_step(s: GenerationStats) -> float:
    steps = s.accepted_per_step
    return sum(steps) / len(steps) if steps else 0.0


def speedup(a: GenerationStats | None, b: GenerationStats | None) -> float | None:
    """B's decode rate over A's (None when either is missing or A has no rate)."""
    if a is None or b is None or not a.decode_tokens_per_s:
        return None
    return b.decode_tokens_per_s / a.decode_tokens_per_s


def first_difference(a: GenerationStats, b: GenerationStats) -> int | None:
    """The index of the first token where the two replies part, when that can be told: both come
    from the same model (so the same tokenizer) and their texts differ. None otherwise."""
    if a.text == b.text or a.model != b.model:
        return None
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x != y:
            return i
    n = min(len(a.token_ids), len(b.token_ids))
    return n if len(a.token_ids) != len(b.token_ids) else None


def identical_text(a: GenerationStats | None, b: GenerationStats | None, greedy: bool) -> bool | None:
    """Whether the two replies are the same text; None when they are not comparable (sampling,
    or a reply is missing)."""
    if not greedy or a is None or b is None:
        return None
    return a.text == b.text


def text_verdict(a: GenerationStats | None, b: GenerationStats | None, greedy: bool) -> str:
    """A few words on the replies: "greedy texts identical", "greedy texts differ at token 17"..."""
    if not greedy:
        return "sampling: texts not compared"
    same = identical_text(a, b, greedy)
    if same is None:
        return "texts not compared"
    if same:
        return "greedy texts identical"
    at = first_difference(a, b)
    return "greedy texts differ" + (f" at token {at + 1}" if at is not None else "")


def compare_figures(a: GenerationStats | None, b: GenerationStats | None, greedy: bool) -> list[tuple[str, str, str, str]]:
    """Rows (figure, A, B, B/A), all text; a missing set-up's column reads "—"."""

    def row(name: str, get: Callable[[GenerationStats], float], fmt: Callable[[float], str]):
        va = get(a) if a is not None else None
        vb = get(b) if b is not None else None
        return (name, fmt(va) if va is not None else NONE, fmt(vb) if vb is not None else NONE, _ratio(va, vb))

    rows = [
        row("decode tok/s", lambda s: s.decode_tokens_per_s, lambda v: f"{v:.1f}"),
        row("time to first token", lambda s: s.time_to_first_token_s, lambda v: f"{v:.2f} s"),
        row("tokens generated", lambda s: s.n_generated, lambda v: f"{v:d}"),
        row("steps", lambda s: s.steps, lambda v: f"{v:d}"),
        row("tokens per step", tokens_per_step, lambda v: f"{v:.2f}"),
        row("KV cache", lambda s: s.kv_cache_bytes, binary_size),
        row("KV compression", lambda s: s.kv_compression, lambda v: f"{v:.2f}x"),
        row("peak memory", lambda s: s.peak_memory_bytes, binary_size),
    ]
    if a is None or b is None:
        verdict = NONE
    elif not greedy:
        verdict = "not compared (sampling)"
    else:
        verdict = text_verdict(a, b, greedy).removeprefix("greedy texts ")
    rows.append(("same text", NONE if a is None else "", NONE if b is None else "", verdict))
    return rows


def summary(a: GenerationStats | None, b: GenerationStats | None, greedy: bool) -> str:
    """One line: "B is 1.43x faster than A · greedy texts identical"."""
    failed = [name for name, s in (("A", a), ("B", b)) if s is None]
    if failed:
        return f"no comparison: {' and '.join(failed)} failed"
    x = speedup(a, b)
    if x is None:
        return text_verdict(a, b, greedy)
    speed = f"B is {x:.2f}x faster than A" if x >= 1 else f"A is {1 / x:.2f}x faster than B"
    return f"{speed} · {text_verdict(a, b, greedy)}"


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def run_one(setup: Setup, prompt: str, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Load one set-up, answer the prompt, free the model. Returns its stats as a dict with its
    label, or {"label", "error"} when the engine refused it."""
    from engine.session import Session  # torch is imported here, not where the UI imports this module

    progress(f"[{setup.label}] loading")
    session = None
    try:
        session = Session.load(setup.load, lambda msg: progress(f"[{setup.label}] {msg}"))
        progress(f"[{setup.label}] generating")
        done = None
        for ev in session.generate(_messages(prompt), setup.params):
            if isinstance(ev, Done):
                done = ev
        return {"label": setup.label, "reason": done.reason, **done.stats.to_dict()}
    except Exception as e:  # noqa: BLE001 - one set-up failing must not stop the other
        import traceback

        from engine.errors import EngineError
        from engine.serving.worker import describe

        if not isinstance(e, EngineError):
            traceback.print_exc()
        message = describe(e)
        progress(f"[{setup.label}] error: {message}")
        return {"label": setup.label, "error": message}
    finally:
        if session is not None:
            session.close()  # one model at a time: free this one before the next loads


def _stats(d: dict) -> GenerationStats | None:
    if "error" in d:
        return None
    fields = GenerationStats.__dataclass_fields__
    return GenerationStats(**{k: v for k, v in d.items() if k in fields})


def run_compare(a: Setup, b: Setup, prompt: str, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Both set-ups one after the other (A loaded, answered and freed before B loads):
    {"a": stats, "b": stats, "speedup": B/A decode rate, "identical": bool|None, "rows": [...],
    "summary": str}. A set-up the engine refused reads {"label", "error"}; the other still runs."""
    ra = run_one(a, prompt, progress)
    rb = run_one(b, prompt, progress)
    sa, sb = _stats(ra), _stats(rb)
    greedy = a.greedy and b.greedy
    return {"prompt": prompt, "a": ra, "b": rb, "speedup": speedup(sa, sb), "identical": identical_text(sa, sb, greedy),
            "rows": [list(r) for r in compare_figures(sa, sb, greedy)], "summary": summary(sa, sb, greedy)}
