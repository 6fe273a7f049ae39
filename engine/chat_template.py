"""Chat templates rendered as transformers renders them (Jinja's immutable sandbox, its globals
and filters), within a budget: a template comes with the checkpoint and may be hostile.

The sandbox keeps a template from reaching Python; the budget keeps it from taking the machine:

- every loop (``{% for %}``, all loops together) runs at most MAX_LOOP_STEPS items, and the
  rendering at most MAX_RENDER_S seconds;
- no value it builds (a string, a list, a number's digits) grows past MAX_RENDER_CHARS, checked
  before the value is built: repetition (``*``), concatenation (``~``, ``+``), formatting
  (``%``, ``format``, ``str.format``), powers, and the filters and string methods that widen
  (``join``, ``replace``, ``center``, ``indent``, ``ljust``...);
- what it writes is at most MAX_RENDER_CHARS characters.

Each refusal is a ``TemplateBudgetError`` that says what the template did."""

from __future__ import annotations

import json
import re
import string
import threading
import time
from datetime import datetime

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file (the published ones are a few kB)
MAX_RENDER_CHARS = 1 << 24  # what one rendering may write, and any string, list or number it builds
MAX_LOOP_STEPS = 1_000_000  # items one rendering may loop over, all loops together
MAX_RENDER_S = 5.0  # and its time
_MAX_INT_BITS = 1 << 16  # a number of about 20,000 digits


class _Budget(threading.local):
    """The budget of the rendering under way in this thread (loop steps, deadline)."""

    steps = 0
    deadline = float("inf")


_budget = _Budget()


def _over(what: str):
    from jinja2.exceptions import SecurityError

    return SecurityError(f"the template {what}; a chat template may loop over {MAX_LOOP_STEPS:,} items, build and "
                         f"write {MAX_RENDER_CHARS:,} characters and run {MAX_RENDER_S:g} s")


def _size(value, limit: int = MAX_RENDER_CHARS) -> int:
    """About how many characters ``str(value)`` would have, counted no further than just past
    ``limit`` (so that a list holding itself many times over is not walked to its end)."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 + 2 * len(v)
            if total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _check(size: int, what: str = "builds") -> None:
    if size > MAX_RENDER_CHARS:
        raise _over(f"{what} a value of {size:,} characters")


def _budgeted_iter(iterable):
    """What every ``{% for %}`` loops over: counted against the loop steps and the deadline."""
    for x in iterable:
        _budget.steps += 1
        if _budget.steps > MAX_LOOP_STEPS:
            raise _over("loops too long")
        if not _budget.steps & 1023 and time.monotonic() > _budget.deadline:
            raise _over("runs too long")
        yield x


def _budgeted_range(*args):
    items = range(*args)
    if len(items) > MAX_LOOP_STEPS:
        raise _over(f"asks for a range of {len(items):,} items")
    return items


def _budgeted_concat(parts) -> str:
    """``a ~ b ~ c``."""
    _check(_total(parts))
    return "".join(map(str, parts))


_WIDTH = re.compile(r"\d+")


def _format_widths(fmt: str) -> int:
    """The widths and precisions a %-format or a str.format() string asks for, all together."""
    if "{" in fmt:
        try:
            specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
        except ValueError:
            return 0  # str.format raises its own error for it
    else:
        specs = re.findall(r"%[-+ #0]*([\d*]*(?:\.[\d*]*)?)", fmt)
    return sum(int(n) for spec in specs for n in _WIDTH.findall(spec))


def _check_format(fmt: str, args) -> None:
    ints = [a for a in (args if isinstance(args, (tuple, list)) else (args,)) if isinstance(a, int)]
    _check(len(fmt) + _size(args) + _format_widths(fmt) + sum(abs(i) for i in ints if abs(i) > 4096), "formats")


def _replaced_size(s: str, old: str, new: str, count=None) -> int:
    hits = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _total(values) -> int:
    """_size of each of ``values``, summed, counted no further than just past MAX_RENDER_CHARS."""
    total = 0
    for v in values:
        total += _size(v, MAX_RENDER_CHARS - total)
        if total > MAX_RENDER_CHARS:
            break
    return total


def _check_join(items: list, sep: str) -> None:
    _check(_total(items) + len(sep) * max(0, len(items) - 1))


def _width(n) -> int:
    return n if isinstance(n, int) else len(str(n))


# str methods that make a longer string: checked before they run (other methods are bounded by the string).
_STR_GROWTH = {
    "ljust": lambda s, width=0, *a: _width(width),
    "rjust": lambda s, width=0, *a: _width(width),
    "center": lambda s, width=0, *a: _width(width),
    "zfill": lambda s, width=0: _width(width),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * _width(tabsize),
    "replace": lambda s, old="", new="", count=-1: _replaced_size(s, str(old), str(new), count),
    "format": lambda s, *a, **k: len(s) + _format_widths(s) + _size(a) + _size(k),
    "format_map": lambda s, m=None: len(s) + _format_widths(s) + _size(m),
}


def _guarded(original, check):
    """``original`` (a Jinja filter) after ``check`` of its arguments (without the context, eval
    context or environment Jinja passes first); ``check`` may return the arguments to use instead
    (an iterator it had to read, as a list)."""
    from jinja2.utils import _PassArg

    passes = _PassArg.from_obj(original)

    def run(lead, args, kwargs):
        checked = check(*args, **kwargs)
        if checked is not None:
            args = checked
        return original(*lead, *args, **kwargs)

    if passes is None:
        return lambda *args, **kwargs: run((), args, kwargs)

    def with_first(first, *args, **kwargs):
        return run((first,), args, kwargs)

    with_first.jinja_pass_arg = passes
    return with_first


def _as_list(value):
    return value if isinstance(value, (list, tuple, str)) else list(_budgeted_iter(value))


def _check_join_filter(value, d="", attribute=None):
    items = _as_list(value)
    _check_join(items, str(d))
    return (items, d, attribute)


def _check_sum(iterable, attribute=None, start=0):
    items = _as_list(iterable)
    if not isinstance(start, (int, float)) or any(not isinstance(x, (int, float)) for x in items[:1]):
        _check(_total([start, *items]))
    return (items, attribute, start)


def _check_replace(s, old, new, count=None):
    _check(_size(s))  # before str(s): a value too large to write out is refused as it is
    _check(_replaced_size(str(s), str(old), str(new), count))


def _check_indent(s, width=4, first=False, blank=False):
    n = _size(s)
    _check(n)
    _check(n + (str(s).count("\n") + 1) * _width(width))


def _check_wordwrap(s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    n = _size(s)
    _check(n + (n // max(1, _width(width)) + 1) * len(wrapstring or "\n"))


def _check_slices(value, slices, fill_with=None):
    if _width(slices) > MAX_LOOP_STEPS:
        raise _over(f"asks for {_width(slices):,} slices")


def _check_sized(value, *args, **kwargs):
    _check(_size(value))


_FILTER_CHECKS = {
    "join": _check_join_filter,
    "sum": _check_sum,
    "replace": _check_replace,
    "center": lambda value, width=80: _check(max(_size(value), _width(width))),
    "indent": _check_indent,
    "format": lambda value, *args, **kwargs: _check_format(str(value), args or tuple(kwargs.values())),
    "wordwrap": _check_wordwrap,
    "batch": lambda value, linecount, fill_with=None: _check(_width(linecount) if fill_with is not None else 0),
    "slice": _check_slices,
    "string": _check_sized,
    "pprint": _check_sized,
    "truncate": lambda s, length=255, killwords=False, end="...", leeway=None: _check(_size(s) + len(str(end))),
}


def template_env():
    """Jinja's immutable sandbox with transformers' globals and filters, and the budget above."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace
    from jinja2.visitor import NodeTransformer

    class Budgeted(NodeTransformer):
        """Every loop's items through _budgeted_iter, every ``~`` through _budgeted_concat."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Call(nodes.Name("_budgeted_iter", "load"), [node.iter], [], None, None)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Call(nodes.Name("_budgeted_concat", "load"), [nodes.List(node.nodes)], [], None, None)

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def _parse(self, source, name, filename):
            return Budgeted().visit(super()._parse(source, name, filename))

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        _check(len(seq) * n if len(seq) * n <= MAX_RENDER_CHARS else _size(seq) * n)
                if isinstance(left, int) and isinstance(right, int) and \
                        left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise _over(f"multiplies numbers of {left.bit_length() + right.bit_length():,} bits")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        (right > 4096 or left.bit_length() * right > _MAX_INT_BITS):
                    raise _over(f"raises a number to the power {right}")
            elif operator == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    _check(_size(left) + _size(right))
            elif operator == "%" and isinstance(left, str):
                _check_format(left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format and format_map
            owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
            if isinstance(owner, str) and name in _STR_GROWTH:
                try:
                    size = _STR_GROWTH[name](owner, *args, **kwargs)
                except TypeError:  # bad arguments: str raises its own error for them
                    size = 0
                _check(size)
            elif isinstance(owner, str) and name == "join" and args:
                items = _as_list(args[0])
                _check_join(items, owner)
                args = (items, *args[1:])
            return super().call(__context, __obj, *args, **kwargs)

    class BudgetedNamespace(Namespace):
        def __setitem__(self, name, value):
            _check(_size(value))
            super().__setitem__(name, value)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        _check(_size(x))
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _guarded(env.filters[name], check)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       range=_budgeted_range, namespace=BudgetedNamespace, _budgeted_iter=_budgeted_iter,
                       _budgeted_concat=_budgeted_concat)
    return env


def render(template, **values) -> str:
    """``template`` (made by template_env()) rendered within the budget."""
    _budget.steps, _budget.deadline = 0, time.monotonic() + MAX_RENDER_S
    parts, size = [], 0
    for piece in template.generate(**values):
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise _over("writes too much")
        if time.monotonic() > _budget.deadline:
            raise _over("runs too long")
        parts.append(piece)
    return "".join(parts)
