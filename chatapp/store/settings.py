"""The user's settings: ``config_dir()/settings.toml``.

::

    [model]
    default = "HuggingFaceTB/SmolLM2-360M-Instruct"   # left out: the embedded model
    device = "cuda"            # cpu | cuda; left out: cuda when available
    quantize = "fp8"           # left out: none
    decoding = "plain"         # plain | medusa | dmc
    context = 8192             # KV cache length; left out: min(model's context, 8192)

    [sampling]                 # each left out: the model's recommendation (generation_config.json)
    temperature = 0.0          # 0 = greedy
    top_p = 1.0
    top_k = 0                  # 0 = off
    max_new_tokens = 512
    seed = 42                  # left out: unseeded

    [chat]
    system_prompt = "You are a helpful assistant."

    [ui]
    theme = "textual-dark"
    show_stats = true
    show_drafts = false        # the reply as plain text, accepted drafts highlighted (F4)

    [[remote]]                 # OpenAI-compatible servers the model picker lists
    name = "lab"
    url = "http://gpu-box:8000/v1"
    model = "llama-3.1-8b"     # left out: the server's first model
    api_key_env = "LAB_API_KEY"

A missing file means the defaults. TOML has no null, so a setting whose default is "none" is
written by leaving its key out. Any error (bad TOML, an unknown section or key, a value of the
wrong type or out of range) is a :class:`SettingsError` whose message is one line naming the file
and the key; ``read_settings`` keeps every valid value and lists the problems instead. A save
never loses what the file held: the file it replaces is kept as ``settings.toml.bak``, and a file
with errors is moved aside whole (``settings.toml.bad``) rather than written over.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w

from engine.events import DECODINGS, QUANTIZE
from engine.paths import config_dir

FILENAME = "settings.toml"
DEVICES = ("cpu", "cuda")


class SettingsError(Exception):
    """settings.toml cannot be read or holds a bad value; the message names the file and key."""


@dataclass
class ModelSettings:
    default: str | None = None  # model id or checkpoint folder; None = the embedded model
    device: str | None = None  # cpu | cuda; None = cuda when available
    quantize: str | None = None  # one of QUANTIZE ("fp8", "bf16"), or None: as stored
    decoding: str = "plain"  # plain | medusa | dmc
    context: int | None = None  # KV cache length; None = min(model's context, 8192)


@dataclass
class SamplingSettings:
    """What is left out (None) is the model's own recommendation (its generation_config.json)."""

    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 = off
    max_new_tokens: int | None = None
    seed: int | None = None  # None: unseeded

    def to_dict(self) -> dict:
        """As a chat's ``params`` in the history (None values left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ChatSettings:
    system_prompt: str = ""


@dataclass
class UISettings:
    theme: str = "textual-dark"  # a Textual theme name
    show_stats: bool = True  # tokens/s etc. under each reply
    show_drafts: bool = False  # replies as plain text with the accepted drafts highlighted


@dataclass
class RemoteServer:
    name: str
    url: str  # the OpenAI-compatible API's base URL, e.g. http://host:8000/v1
    model: str | None = None  # None = the server's first model
    api_key_env: str | None = None  # the environment variable that holds the API key, if one is needed


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    ui: UISettings = field(default_factory=UISettings)
    remote: list[RemoteServer] = field(default_factory=list)


def default_path() -> Path:
    return config_dir() / FILENAME


# --- validation --------------------------------------------------------------------------------

class _Bad(Exception):
    """A value check failed; the message is what was expected."""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], float]:
    if lo is not None and hi is not None:
        what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    elif lo is not None:
        what = f"a number {'>' if lo_open else '≥'} {lo:g}"
    else:
        what = "a number"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Bad(what)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _Bad(what)
        if hi is not None and v > hi:
            raise _Bad(what)
        return float(v)
    return check


def _integer(lo: int) -> Callable[[Any], int]:
    what = f"an integer ≥ {lo}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _Bad(what)
        return v
    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    what = "one of " + ", ".join(repr(o) for o in options)

    def check(v):
        if v not in options or not isinstance(v, str):
            raise _Bad(what)
        return v
    return check


def _text(nonempty: bool = False) -> Callable[[Any], str]:
    what = "a non-empty string" if nonempty else "a string"

    def check(v):
        if not isinstance(v, str) or (nonempty and not v.strip()):
            raise _Bad(what)
        return v
    return check


def _theme(v):
    from textual.theme import BUILTIN_THEMES

    v = _text(nonempty=True)(v)
    if v not in BUILTIN_THEMES:
        raise _Bad("a theme name: " + ", ".join(sorted(BUILTIN_THEMES)))
    return v


def _boolean(v):
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _url(v):
    if not isinstance(v, str) or not re.match(r"^https?://[^\s/]+", v):
        raise _Bad("an http:// or https:// URL")
    return v


def _env_name(v):
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise _Bad("an environment variable name")
    return v


# section -> (dataclass, {key: check})
_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "model": (ModelSettings, {
        "default": _text(nonempty=True),
        "device": _choice(DEVICES),
        "quantize": _choice(QUANTIZE),
        "decoding": _choice(DECODINGS),
        "context": _integer(1),
    }),
    "sampling": (SamplingSettings, {
        "temperature": _number(lo=0),
        "top_p": _number(lo=0, hi=1, lo_open=True),
        "top_k": _integer(0),
        "max_new_tokens": _integer(1),
        "seed": _integer(0),
    }),
    "chat": (ChatSettings, {
        "system_prompt": _text(),
    }),
    "ui": (UISettings, {
        "theme": _theme,
        "show_stats": _boolean,
        "show_drafts": _boolean,
    }),
}


def sampling_value(key: str, text: str) -> float | int:
    """A sampling setting as a person types it (``0.7``, ``40``), read as TOML and checked by the
    rules of the file's [sampling] section; SettingsError("expected …, got …") otherwise."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    try:
        return _SECTIONS["sampling"][1][key](value)
    except _Bad as e:
        raise SettingsError(f"expected {e}, got {_show(value)}") from None


_REMOTE_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _text(nonempty=True),
    "url": _url,
    "model": _text(nonempty=True),
    "api_key_env": _env_name,
}
_REMOTE_REQUIRED = ("name", "url")


def _from_dict(data: dict, where: str, problems: list[str] | None = None) -> Settings:
    """Settings from parsed TOML; errors name ``where`` (the file) and the key. The first error is
    raised, or with ``problems`` each is appended there and what it names is left at its default
    (a [[remote]] entry with an error is left out whole)."""
    def fail(section: str, key: str | None, message: str):
        place = f"{section} {key}" if key else section
        raise SettingsError(f"{where}: {place}: {message}")

    def report(e: SettingsError) -> None:
        if problems is None:
            raise e
        problems.append(str(e))

    def fields(section: str, table: Any, checks: dict, lenient: bool) -> dict:
        if not isinstance(table, dict):
            fail(section, None, f"expected a table, got {_show(table)}")
        out = {}
        for key, value in table.items():
            try:
                if key not in checks:
                    fail(section, key, f"unknown key (known: {', '.join(checks)})")
                try:
                    out[key] = checks[key](value)
                except _Bad as e:
                    fail(section, key, f"expected {e}, got {_show(value)}")
            except SettingsError as e:
                if not lenient:
                    raise
                report(e)
        return out

    settings = Settings()
    known = [*_SECTIONS, "remote"]
    for name, table in data.items():
        try:
            if name == "remote":
                if not isinstance(table, list):
                    fail("[[remote]]", None, f"expected an array of tables ([[remote]]), got {_show(table)}")
                names: set[str] = set()
                for i, entry in enumerate(table, start=1):
                    section = f"[[remote]] #{i}"
                    try:
                        values = fields(section, entry, _REMOTE_KEYS, lenient=False)
                        for key in _REMOTE_REQUIRED:
                            if key not in values:
                                fail(section, key, "missing (every [[remote]] needs a name and a url)")
                        if values["name"] in names:
                            fail(section, "name", f"{values['name']!r} is used by an earlier [[remote]]")
                    except SettingsError as e:
                        report(e)
                        continue
                    names.add(values["name"])
                    settings.remote.append(RemoteServer(**values))
            elif name in _SECTIONS:
                cls, checks = _SECTIONS[name]
                setattr(settings, name, cls(**fields(f"[{name}]", table, checks, lenient=True)))
            else:
                fail(f"[{name}]", None, f"unknown section (known: {', '.join(f'[{k}]' for k in known)})")
        except SettingsError as e:
            report(e)
    return settings


def _to_dict(settings: Settings) -> dict:
    """The TOML document for ``settings``: None values left out, empty sections too."""
    doc: dict[str, Any] = {}
    for name in _SECTIONS:
        values = {k: v for k, v in dataclasses.asdict(getattr(settings, name)).items() if v is not None}
        if values:
            doc[name] = values
    remotes = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in settings.remote]
    if remotes:
        doc["remote"] = remotes
    return doc


# --- files -------------------------------------------------------------------------------------

def read_settings(path: str | os.PathLike | None = None) -> tuple[Settings, list[str]]:
    """The settings in ``path`` (default ``config_dir()/settings.toml``) keeping every valid value,
    and the problems found: one line each, naming the file and the key, whose value is left at its
    default. A file that cannot be read or parsed gives the defaults and one problem; no file, the
    defaults and none."""
    path = Path(path) if path is not None else default_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Settings(), []
    except OSError as e:
        return Settings(), [f"{path}: cannot read it: {e.strerror or e}"]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Settings(), [f"{path}: not UTF-8 text (byte {e.start})"]
    except tomllib.TOMLDecodeError as e:
        return Settings(), [f"{path}: invalid TOML: {e}"]
    problems: list[str] = []
    return _from_dict(data, str(path), problems), problems


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """The settings in ``path`` (default ``config_dir()/settings.toml``); the defaults when there
    is no such file. Raises :class:`SettingsError` naming the file and the key of the first problem."""
    settings, problems = read_settings(path)
    if problems:
        raise SettingsError(problems[0])
    return settings


def keep_invalid(path: str | os.PathLike | None = None) -> Path | None:
    """A settings file that does not load is moved aside whole (to ``settings.toml.bad``, or
    ``.bad.1``, ``.bad.2``... when taken) so that no save writes over it; returns where it went,
    None when the file loads or is not there."""
    path = Path(path) if path is not None else default_path()
    if not path.exists() and not path.is_symlink():
        return None
    if not read_settings(path)[1]:
        return None
    for n in range(1000):
        aside = path.with_name(path.name + (".bad" if n == 0 else f".bad.{n}"))
        if not aside.exists() and not aside.is_symlink():
            os.replace(path, aside)
            return aside
    raise SettingsError(f"{path}: has errors, and {path.name}.bad … .bad.999 are all taken: not overwriting it")


def save_settings(settings: Settings, path: str | os.PathLike | None = None) -> Path:
    """Write ``settings`` to ``path`` (default ``config_dir()/settings.toml``) atomically: a reader,
    or a crash, sees the old file or the new one, never part of one. Values are checked first, as
    load_settings checks them, so what is written always loads back equal. Nothing is lost: the
    file written over is kept as ``settings.toml.bak``, and one that does not load is never written
    over (``keep_invalid`` moves it aside first). Returns the path."""
    path = Path(path) if path is not None else default_path()
    doc = _to_dict(settings)
    _from_dict(doc, str(path))  # refuse to write what could not be read back
    # multi-line strings (a system prompt) read best as """...""" blocks, but tomli_w writes
    # those with \n line ends whatever the string had, so a string with a \r keeps its escapes
    multiline = not any("\r" in v for v in _strings(doc))
    text = "# chatapp settings\n\n" + tomli_w.dumps(doc, multiline_strings=multiline)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        keep_invalid(path)
        if path.is_file():  # keep the mode of the file it replaces (mkstemp's is 0600), and the file
            os.chmod(tmp, path.stat().st_mode & 0o777)
            backup = path.with_name(path.name + ".bak")
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
