"""Front-end options -> the engine's LoadModel request, in one place: for ``chatapp run``,
``perplexity`` and ``serve`` (the command line's options alone) and for the chat screen (what the
command line leaves out comes from the settings' [model] table)."""

from __future__ import annotations

from engine.events import LoadModel

from chatapp.store.settings import ModelSettings


def load_request(options, defaults: ModelSettings | None = None) -> LoadModel:
    """The LoadModel that ``options`` ask for: an argparse.Namespace of the command line (an option
    its command does not take counts as not given), or None for no options. What they leave
    unset is taken from ``defaults`` (none: the engine's own defaults)."""
    d = defaults or ModelSettings()

    def given(name: str, default=None):
        value = getattr(options, name, None)
        return default if value is None else value  # 0 or "" is a value given (and checked by the engine)

    return LoadModel(model=given("model", d.default), device=given("device", d.device),
                     context=given("context", d.context), quantize=given("quantize", d.quantize),
                     decoding=given("decoding", d.decoding), medusa_choices=given("medusa_choices"),
                     tokenizer=given("tokenizer"))
