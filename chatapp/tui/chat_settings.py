"""The chat settings dialog: one conversation's system prompt and sampling settings."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from chatapp.store.settings import SettingsError, sampling_value

# (field, label); the values are checked by the rules of settings.toml's [sampling]
FIELDS = [("temperature", "temperature"), ("top_p", "top p"), ("top_k", "top k"),
          ("max_new_tokens", "max new tokens"), ("seed", "seed")]


def parse_fields(values: dict[str, str]) -> tuple[dict, str]:
    """(sampling params, "") or ({}, the first problem as one line). An empty field is left out:
    the model's own recommendation (its generation_config.json) applies."""
    params = {}
    for name, label in FIELDS:
        raw = values.get(name, "").strip()
        if raw == "":
            continue
        try:
            params[name] = sampling_value(name, raw)
        except SettingsError as e:
            return {}, f"{label}: {e}"
    return params, ""


class ChatSettingsScreen(ModalScreen[tuple[str, dict] | None]):
    """Dismissed with (system prompt, sampling params), or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]
    DEFAULT_CSS = """
    ChatSettingsScreen { align: center middle; }
    ChatSettingsScreen > Vertical { width: 80; height: auto; max-height: 90%; border: round $primary;
                                    background: $surface; padding: 1 2; }
    ChatSettingsScreen TextArea { height: 6; }
    ChatSettingsScreen Grid { grid-size: 2; grid-columns: 18 1fr; grid-rows: 1; grid-gutter: 1 0; height: auto; }
        ChatSettingsScreen #problem { color: $text-error; height: auto; }
    ChatSettingsScreen Horizontal { height: auto; align-horizontal: right; }
    """

    def __init__(self, system_prompt: str, params: dict | None):
        super().__init__()
        self.system_prompt = system_prompt or ""
        self.params = dict(params or {})

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "chat settings"
            yield Label("system prompt")
            yield TextArea(self.system_prompt, id="system")
            with Grid():
                for name, label in FIELDS:
                    value = self.params.get(name)
                    yield Label(label)
                    yield Input("" if value is None else str(value), placeholder="the model's default", id=name, compact=True)
            yield Label("", id="problem")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        params, problem = parse_fields({name: self.query_one(f"#{name}", Input).value for name, _ in FIELDS})
        if problem:
            self.query_one("#problem", Label).update(problem)
            return
        self.dismiss((self.query_one("#system", TextArea).text, params))
