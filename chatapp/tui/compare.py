"""The compare screen: one prompt answered by two decoding set-ups, side by side, with their
figures in a table. One GPU: the set-ups run one after the other through the same engine client
(load A, answer, load B, answer); the chat's own model has to be loaded again afterwards."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Markdown, Static
from textual.worker import Worker, WorkerCancelled, WorkerError, WorkerFailed

from engine.events import Done, Error, Generate, GenerationStats, Loaded, ModelInfo, Progress, Step, Token
from engine.serving.client import EngineClient

from chatapp.compare.figures import compare_figures, summary
from chatapp.compare.spec import Setup

from chatapp.tui.widgets import ErrorMessage, ReplyStream

KEYS = ("a", "b")


class PaneHeader(Static):
    """The pane's two lines, as plain text: its letter, set-up and model; its state."""

    def __init__(self, **kwargs):
        super().__init__("", markup=False, **kwargs)

    @property
    def text(self) -> str:
        return str(self.content)


class PaneBody(VerticalScroll):
    """The reply's scroller. While ``follow`` is on it anchors itself to the bottom once the
    reply overflows it (anchored while the reply still fits, Textual scrolls it to a negative
    offset), so a long reply stays in view as it streams in."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.follow = False
        self.following = False  # anchored by follow

    def stop_following(self) -> None:
        self.follow = self.following = False
        self.anchor(False)

    def catch_up(self) -> None:
        if not self.follow:
            return
        overflows = self.max_scroll_y > 0
        if overflows and not self.following:
            self.following = True
            self.anchor()
        elif not overflows and self.following:  # anchored on a size that was measured before a reset
            self.following = False
            self.anchor(False)
            self.scroll_home(animate=False, immediate=True)

    def watch_virtual_size(self) -> None:  # the reply grew (or the pane changed size)
        self.call_after_refresh(self.catch_up)


class ComparePane(Vertical):
    """One set-up: a header line and its reply, streamed in as Markdown."""

    def __init__(self, key: str, setup: Setup):
        super().__init__(id=f"pane-{key}", classes="pane")
        self.key = key
        self.setup = setup
        self.state = "waiting"
        self.info: ModelInfo | None = None
        self.running = False

    def compose(self) -> ComposeResult:
        yield PaneHeader(classes="pane-header")
        with PaneBody(classes="pane-body"):
            yield Markdown(classes="pane-reply")

    def on_mount(self) -> None:
        self.paint()

    @property
    def header(self) -> PaneHeader:
        return self.query_one(PaneHeader)

    @property
    def body(self) -> PaneBody:
        return self.query_one(PaneBody)

    @property
    def reply(self) -> Markdown:
        return self.query_one(".pane-reply", Markdown)

    @property
    def errors(self) -> list[str]:
        return [str(w.content) for w in self.query(ErrorMessage)]

    def paint(self) -> None:
        marker = "▶ " if self.running else ""
        model = f" · {self.info.name} on {self.info.device}" if self.info is not None else ""
        tree = self.info.medusa_tree if self.info is not None else None
        if tree:  # how Medusa's tree was chosen: on a slow device no tree may beat plain steps
            model += " · tree: none, plain steps are faster here" if tree.startswith("auto (plain") \
                else f" · tree: {tree}"
        self.header.update(f"{marker}{self.key.upper()}: {self.setup.label}{model}\n{self.state}")
        self.set_class(self.running, "-running")
        self.set_class(self.state.startswith("error"), "-error")

    def set_state(self, state: str, *, running: bool | None = None) -> None:
        self.state = state
        if running is not None:
            self.running = running
        self.paint()

    async def reset(self) -> None:
        """Back to "waiting", with an empty reply."""
        self.info = None
        self.running = False
        self.body.stop_following()
        await self.body.remove_children()
        await self.body.mount(Markdown(classes="pane-reply"))
        self.body.scroll_home(animate=False, immediate=True)
        self.set_state("waiting")

    async def fail(self, message: str) -> None:
        await self.body.mount(ErrorMessage(message))
        self.set_state(f"error: {message}", running=False)


class CompareScreen(Screen):
    """Two set-ups answer the same prompt; ``dismiss(loaded_any)`` on leaving."""

    DEFAULT_CSS = """
    CompareScreen #compare-prompt { margin: 0 1; }
    CompareScreen #panes { height: 1fr; }
    CompareScreen .pane { width: 1fr; height: 1fr; border: round $panel-lighten-2; margin: 0 1; }
    CompareScreen .pane.-running { border: heavy $accent; }
    CompareScreen .pane.-error { border: round $error; }
    CompareScreen .pane-header { height: 2; padding: 0 1; background: $panel; text-style: bold; }
    CompareScreen .pane.-running .pane-header { background: $accent 30%; }
    CompareScreen .pane-body { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    CompareScreen .pane-body ErrorMessage { margin: 1 0 0 0; padding: 0 1; border: round $error;
        border-title-color: $error; color: $text-error; }
    CompareScreen #figures { height: auto; margin: 0 1; }
    CompareScreen #summary { height: 1; padding: 0 1; background: $panel; color: $text; }
    """

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "rerun", "Re-run"),
        Binding("q", "leave", "Back"),
        Binding("ctrl+w", "leave", "Back", priority=True),  # the Input's ctrl+w (delete a word) yields to it
    ]

    def __init__(self, client: EngineClient, a: Setup, b: Setup, prompt: str | None = None, *,
                 autorun: bool = False):
        super().__init__()
        self.client = client
        self.setups = {"a": a, "b": b}
        self.initial_prompt = prompt or ""
        self.autorun = autorun and bool(self.initial_prompt.strip())  # start at once, without Enter
        self.prompt_text = ""  # of the comparison shown
        self.loaded_any = False  # True once a set-up was sent to the engine: the chat's model is gone
        self.running = False
        self.results: dict[str, GenerationStats | None] = dict.fromkeys(KEYS)
        self.outcome: dict[str, str] = dict.fromkeys(KEYS, "waiting")  # waiting|done|cancelled|error|stopped
        self._stop = False
        self._worker: Worker | None = None
        self._run_id = 0

    # ---- layout ------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Input(self.initial_prompt, placeholder="Prompt for both set-ups (Enter to compare)",
                    id="compare-prompt")
        with Horizontal(id="panes"):
            for key in KEYS:
                yield ComparePane(key, self.setups[key])
        yield DataTable(id="figures", show_cursor=False, zebra_stripes=True)
        yield Static("Enter: compare the two set-ups on this prompt", id="summary", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.fill_table()
        self.prompt_input.focus()
        if self.autorun:
            self.start(self.initial_prompt)

    @property
    def prompt_input(self) -> Input:
        return self.query_one("#compare-prompt", Input)

    @property
    def table(self) -> DataTable:
        return self.query_one("#figures", DataTable)

    @property
    def summary_line(self) -> Static:
        return self.query_one("#summary", Static)

    @property
    def summary_text(self) -> str:
        return str(self.summary_line.content)

    def pane(self, key: str) -> ComparePane:
        return self.query_one(f"#pane-{key}", ComparePane)

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.setups.values())

    # ---- actions -----------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.running
        if action == "rerun":
            return bool(self.prompt_text or self.prompt_input.value.strip())
        return True

    @on(Input.Submitted, "#compare-prompt")
    def submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.start(event.value)

    def action_rerun(self) -> None:
        prompt = self.prompt_input.value.strip() or self.prompt_text
        if prompt:
            self.start(prompt)

    def action_stop(self) -> None:
        """Stop the comparison: the running reply ends within a step, the rest is not run."""
        if self.running:
            self._stop = True
            self.client.cancel()

    def action_leave(self) -> None:
        if self.running:
            self._stop = True
            self.client.cancel()
        self.dismiss(self.loaded_any)

    def start(self, prompt: str) -> None:
        """Run (or run again) the comparison on ``prompt``; a running one is stopped first."""
        if self.running:
            self.client.cancel()
        self.prompt_text = prompt.strip()
        self._run_id += 1
        self._worker = self.compare(self.prompt_text, self._run_id, self._worker)
        self.pane("a").body.focus()  # so that q, escape and ctrl+r reach the screen

    # ---- the comparison ----------------------------------------------------------------------
    def fill_table(self) -> None:
        table = self.table
        table.clear(columns=True)  # new columns: their widths follow the new figures
        for label, key in (("figure", "figure"), ("A", "a"), ("B", "b"), ("B/A", "ratio")):
            table.add_column(label, key=key)
        # the rows are always there ("—" until known): the layout stays put
        table.add_rows(compare_figures(self.results["a"], self.results["b"], self.greedy))

    def final_summary(self) -> str:
        if any(self.outcome[k] in ("cancelled", "stopped") for k in KEYS):
            return "stopped: no comparison"
        return summary(self.results["a"], self.results["b"], self.greedy)

    @work(exclusive=True, group="compare")
    async def compare(self, prompt: str, run_id: int, previous: Worker | None) -> None:
        if previous is not None:
            try:  # let the stopped run finish its clean-up before the panes are reused
                await previous.wait()
            except (WorkerCancelled, WorkerFailed, WorkerError):
                pass
        self._stop = False
        self.running = True
        self.results = dict.fromkeys(KEYS)
        self.outcome = dict.fromkeys(KEYS, "waiting")
        self.fill_table()
        for key in KEYS:
            await self.pane(key).reset()
        try:
            for key in KEYS:
                if self._stop:
                    self.outcome[key] = "stopped"
                    self.pane(key).set_state("not run (stopped)")
                    continue
                self.summary_line.update(f"running {key.upper()}: {self.setups[key].label}…")
                await self.run_setup(key, prompt)
                self.fill_table()
        except NoMatches:  # the screen was taken down under the run
            return
        finally:
            if run_id == self._run_id:
                self.running = False
                try:
                    for key in KEYS:
                        self.pane(key).set_state(self.pane(key).state, running=False)
                    self.refresh_bindings()
                except NoMatches:  # the screen is being taken down
                    pass
        self.summary_line.update(self.final_summary())

    async def run_setup(self, key: str, prompt: str) -> None:
        pane, setup = self.pane(key), self.setups[key]
        pane.set_state("loading…", running=True)
        self.refresh_bindings()
        self.loaded_any = True
        async for event in self.client.load(setup.load):
            if isinstance(event, Progress):
                percent = f" {event.fraction:.0%}" if event.fraction is not None else ""
                pane.set_state(f"loading… {event.message}{percent}")
            elif isinstance(event, Loaded):
                pane.info = event.info
            elif isinstance(event, Error):
                self.outcome[key] = "error"
                await pane.fail(event.message)
                return
        if self._stop:
            self.outcome[key] = "stopped"
            pane.set_state("stopped before it generated", running=False)
            return

        pane.set_state("generating…")
        stream = ReplyStream(pane.reply)
        pane.body.follow = True
        rate = ""
        end: Done | Error | None = None
        request = Generate(messages=[{"role": "user", "content": prompt}], params=setup.params)
        try:
            async for event in self.client.generate(request):
                if isinstance(event, Token):
                    stream.add(event.text)
                elif isinstance(event, Step):
                    rate = f" {event.tok_per_s:.1f} tok/s"
                elif isinstance(event, (Done, Error)):
                    end = event
                    continue
                if stream.due:  # the header is repainted with the reply, as seldom
                    if await stream.flush():
                        pane.body.catch_up()
                    pane.set_state(f"generating…{rate}")
        finally:
            await stream.stop()

        if isinstance(end, Done):
            s = end.stats
            if end.reason == "cancelled":
                self.outcome[key] = "cancelled"
                pane.set_state(f"cancelled · {s.n_generated} tokens", running=False)
            else:
                self.outcome[key] = "done"
                self.results[key] = s
                pane.set_state(f"done · {s.decode_tokens_per_s:.1f} tok/s", running=False)
        elif isinstance(end, Error):
            self.outcome[key] = "error"
            await pane.fail(end.message)
