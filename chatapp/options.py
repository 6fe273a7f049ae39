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

    def given(name: str):
        return getattr(options, name, None)

    return LoadModel(model=given("model") or d.default, device=given("device") or d.device,
                     context=given("context") or d.context, quantize=given("quantize") or d.quantize,
                     decoding=given("decoding") or d.decoding, medusa_choices=given("medusa_choices"),
                     tokenizer=given("tokenizer"))
