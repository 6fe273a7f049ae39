"""The chat screen: conversations with the local model (kept in the history database), replies
streamed in as Markdown, the live stats panel, and the way to the model picker and compare mode."""

from __future__ import annotations

import re
import time

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Footer, Input, OptionList
from textual.widgets.option_list import Option

from engine.events import (Done, Error, Generate, Loaded, LoadModel, ModelInfo, Progress, SamplingParams, Step,
                           Token)
from engine.hub.embedded import EMBEDDED_ID
from engine.paths import data_dir
from engine.serving.client import EngineClient
from engine.serving.worker import ProcessWorker
from engine.units import binary_size

from chatapp.compare.spec import parse_setup
from chatapp.options import load_request
from chatapp.store.history import Chat, History, HistoryError, write_new_file
from chatapp.store.settings import Settings, SettingsError, keep_invalid, read_settings, save_settings
from chatapp.tui.chat_settings import ChatSettingsScreen
from chatapp.tui.compare import CompareScreen
from chatapp.tui.stats import StatsPanel
from chatapp.tui.widgets import (AssistantMessage, Drafted, DraftView, ErrorMessage, Note, ReplyStream, StatusBar,
                                 UserMessage)

SAVE_EVERY_S = 0.5  # a streaming reply is written to the history this often (a crash loses at most this)
STATE_LABELS = {"loading": "loading…", "ready": "ready", "generating": "generating…",
                "cancelled": "cancelled", "error": "error"}


def server_figures(stats) -> str:
    """A remote server's own figures, where it publishes them (vLLM's speculative decoding and
    KV-cache usage, chatapp serve's Medusa and DMC gauges)."""
    m = getattr(stats, "server_metrics", None) or {}
    parts = []
    if "accepted_per_step" in m:
        parts.append(f"{m['accepted_per_step']:.2f} tok/step")
    if "kv_cache_usage" in m:
        parts.append(f"KV {m['kv_cache_usage'] * 100:.0f}%")
    if "kv_compression" in m:
        parts.append(f"KV {m['kv_compression']:.1f}x smaller")
    return "".join(f"  ·  {p}" for p in parts)


def stats_record(stats, reason: str, drafted: Drafted | None = None) -> dict:
    """What the history keeps of a reply's figures (and which of its characters were accepted drafts)."""
    out = {"reason": reason, "tokens": stats.n_generated, "tok_per_s": round(stats.decode_tokens_per_s, 2),
           "ttft_s": round(stats.time_to_first_token_s, 3), "steps": stats.steps, "decoding": stats.decoding,
           "model": stats.model, "device": stats.device}
    if drafted is not None and drafted.spans:
        out["drafted"] = drafted.spans
    return out


class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "chatapp"
    BINDINGS = [
        Binding("escape", "cancel", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "models", "Models"),
        Binding("ctrl+t", "compare", "Compare"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("f3", "chat_settings", "Chat settings"),
        Binding("f4", "toggle_drafts", "Drafts", show=False),
        Binding("ctrl+b", "chats", "Chats"),
        Binding("ctrl+g", "toggle_stats", "Stats", show=False),
        Binding("ctrl+y", "copy_reply", "Copy reply", show=False),
        Binding("ctrl+s", "export", "Export", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    state: reactive[str] = reactive("loading", bindings=True, init=False)
    """loading, ready, generating, cancelled or error."""

    def __init__(self, options=None, *, client: EngineClient | None = None, history: History | None = None,
                 settings: Settings | None = None, compare: tuple | None = None, remote: bool = False):
        """``options``: the command line's (an argparse.Namespace: --model, --device, --quantize...),
        or None; the model is loaded as they say, and as the settings say where they say nothing."""
        super().__init__()
        self.settings_error = ""
        if settings is None:
            settings, problems = read_settings()
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                self.settings_error = (f"{problems[0]}{more}: left at the default; the other settings are used, "
                                       "and the file is kept whole when settings are next saved")
        self.settings = settings
        self.load_request = load_request(options, settings.model)
        self.remote = remote
        self.client = client or EngineClient(ProcessWorker())
        self.history_error = ""
        if history is None:
            try:
                history = History()
            except HistoryError as e:
                self.history_error = f"{e}: this session's chats are not saved"
        self.history = history
        self.compare_request = compare
        self.info: ModelInfo | None = None  # set once the model is loaded
        self.chat_record: Chat | None = None  # the conversation on screen, once it has a message
        self.conversation: list[dict] = []  # [{"role": ..., "content": ...}], as sent to the engine
        self.error = ""  # the last error message

    # ---- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield OptionList(id="sidebar")
            with Vertical(id="center"):
                yield VerticalScroll(id="chat")
                yield Input(placeholder="Loading the model…", disabled=True, id="prompt")
            yield StatsPanel(id="stats")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def chat(self) -> VerticalScroll:
        return self.query_one("#chat", VerticalScroll)

    @property
    def prompt(self) -> Input:
        return self.query_one("#prompt", Input)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def stats(self) -> StatsPanel:
        return self.query_one(StatsPanel)

    @property
    def sidebar(self) -> OptionList:
        return self.query_one("#sidebar", OptionList)

    def on_mount(self) -> None:
        self.theme = self.settings.ui.theme
        self.stats.display = self.settings.ui.show_stats
        self.chat.set_class(self.settings.ui.show_drafts, "-drafts")
        self.chat.anchor()
        self.status_bar.set(model=self.load_request.model or EMBEDDED_ID, state=STATE_LABELS["loading"])
        self.refresh_sidebar()
        for problem in (self.settings_error, self.history_error):
            if problem:
                self.notify(problem, severity="warning", timeout=10)
        if self.history is not None and self.history.recovered_from is not None:
            self.notify(f"the history database was unreadable; it was kept as {self.history.recovered_from} "
                        f"and a new one started", severity="warning", timeout=10)
        if self.compare_request is not None:
            a, b, prompt = self.compare_request
            self.open_compare(a, b, prompt, autorun=bool(prompt))  # `chatapp compare --prompt`: runs at once
        else:
            self.load_model()

    def on_unmount(self) -> None:
        self.client.close()
        if self.history is not None:
            self.history.close()

    def watch_theme(self, theme: str) -> None:
        if self.settings.ui.theme != theme:
            self.settings.ui.theme = theme
            self.save_settings()

    def save_settings(self) -> None:
        try:
            kept = keep_invalid() if self.settings_error else None  # save_settings keeps one too, silently
            save_settings(self.settings)
        except (OSError, SettingsError) as e:
            self.notify(f"settings not saved: {e}", severity="warning")
            return
        if kept is not None:
            self.notify(f"the settings file had errors: kept as {kept}; the settings are saved without them",
                        severity="warning", timeout=10)

    def watch_state(self, state: str) -> None:
        label = f"error: {self.error}" if state == "error" else STATE_LABELS[state]
        self.status_bar.set(state=label)
        prompt = self.prompt
        prompt.disabled = self.info is None or state in ("generating", "loading")
        if self.info is None:
            prompt.placeholder = "No model loaded (Ctrl+O: models)" if state == "error" else "Loading the model…"
        else:
            prompt.placeholder = "Message (Enter to send)"
        if not prompt.disabled and self.screen is self.screen_stack[0]:
            prompt.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.state == "generating"
        if action in ("regenerate",):
            return self.state in ("ready", "cancelled", "error") and self.info is not None and any(
                m["role"] == "assistant" for m in self.conversation)
        if action in ("new_chat", "models", "compare", "chat_settings"):
            return self.state != "generating"
        return True

    # ---- the model ------------------------------------------------------------------------------
    @work(group="engine", exclusive=True)
    async def load_model(self) -> None:
        self.info = None
        self.state = "loading"
        self.status_bar.set(model=self.load_request.model or EMBEDDED_ID, device="", speed="", memory="")
        async for event in self.client.load(self.load_request):
            if isinstance(event, Progress):
                percent = f" {event.fraction:.0%}" if event.fraction is not None else ""
                self.status_bar.set(state=f"{event.message}{percent}")
            elif isinstance(event, Loaded):
                self.info = event.info
                device = event.info.device + (f" · {event.info.quantization}" if event.info.quantization else "")
                if event.info.decoding != "plain":
                    device += f" · {event.info.decoding}"
                self.status_bar.set(model=event.info.name, device=device)
                self.stats.model_loaded(event.info)
                self.state = "ready"
            elif isinstance(event, Error):
                await self.show_error(event.message)

    def switch_model(self, request: LoadModel, client: EngineClient | None = None, remote: bool = False) -> None:
        """Load another model (the engine frees the current one first)."""
        if client is not None:
            self.client.close()
            self.client = client
            self.remote = remote
        self.load_request = request
        self.load_model()

    # ---- errors -------------------------------------------------------------------------------
    async def show_error(self, message: str) -> None:
        self.error = message
        await self.chat.mount(ErrorMessage(message))
        self.chat.anchor()
        self.state = "error"

    # ---- conversations ------------------------------------------------------------------------
    def refresh_sidebar(self) -> None:
        sidebar = self.sidebar
        sidebar.clear_options()
        sidebar.border_title = "chats"
        if self.history is None:
            sidebar.add_option(Option("(history off)", disabled=True))
            return
        chats = self.history.chats()
        for c in chats:
            sidebar.add_option(Option(c.title, id=str(c.id)))
        if not chats:
            sidebar.add_option(Option("(no chats yet)", disabled=True))
        if self.chat_record is not None:
            try:
                sidebar.highlighted = sidebar.get_option_index(str(self.chat_record.id))
            except Exception:  # the chat is not in the list (deleted)
                pass

    @on(OptionList.OptionSelected, "#sidebar")
    async def _open_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None and self.state != "generating":
            await self.open_chat(int(event.option.id))

    async def open_chat(self, chat_id: int) -> None:
        """Show a saved conversation; the next message continues it."""
        assert self.history is not None
        record = self.history.chat(chat_id)
        messages = self.history.messages(chat_id)
        await self.chat.remove_children()
        self.chat_record = record
        self.conversation = []
        # a turn whose reply failed is shown but not sent again (as when it failed)
        failed = {i for i, m in enumerate(messages) if m.role == "assistant" and (m.stats or {}).get("error")}
        failed |= {i - 1 for i in failed if i > 0 and messages[i - 1].role == "user"}
        widgets = []
        for i, m in enumerate(messages):
            if m.role == "user":
                widgets.append(UserMessage(m.content))
            elif m.role == "assistant":
                widgets.append(AssistantMessage(m.content, Drafted(m.content, (m.stats or {}).get("drafted", ()))))
                if not m.complete:
                    reason = (m.stats or {}).get("reason")
                    widgets.append(Note("(cancelled)" if reason == "cancelled" else "(incomplete)"))
            if m.role in ("user", "assistant") and i not in failed:
                self.conversation.append({"role": m.role, "content": m.content})
        await self.chat.mount_all(widgets)
        await self._sync_draft_views()
        self.chat.anchor()
        self.sub_title = record.title
        if self.info is not None and self.state in ("cancelled", "error"):
            self.state = "ready"

    async def action_new_chat(self) -> None:
        await self.chat.remove_children()
        self.chat_record = None
        self.conversation = []
        self.sub_title = ""
        self.refresh_sidebar()
        if self.info is not None:
            self.state = "ready"
        self.prompt.focus()

    def _record(self) -> Chat | None:
        """The history's record of the conversation on screen, created with its first message."""
        if self.history is None:
            return None
        if self.chat_record is None:
            s = self.settings
            self.chat_record = self.history.new_chat(
                model=self.info.name if self.info else (self.load_request.model or EMBEDDED_ID),
                system_prompt=s.chat.system_prompt, params=s.sampling.to_dict(), decoding=self.load_request.decoding)
        return self.chat_record

    def _messages_to_send(self) -> list[dict]:
        record = self.chat_record
        system = record.system_prompt if record is not None else self.settings.chat.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + list(self.conversation)

    def _sampling(self) -> SamplingParams | None:
        params = self.chat_record.params if self.chat_record is not None else self.settings.sampling.to_dict()
        return SamplingParams(**params) if params else None

    # ---- sending and streaming ------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.info is None or self.state in ("generating", "loading"):
            return
        event.input.clear()
        self.conversation.append({"role": "user", "content": text})
        record = self._record()
        user_id = self.history.add_message(record.id, "user", text).id if record is not None else None
        if record is not None and self.sub_title != (title := self.history.chat(record.id).title):
            self.sub_title = title
            self.refresh_sidebar()
        self.state = "generating"
        await self.chat.mount(UserMessage(text))
        self.reply(user_id)

    @work(group="engine")
    async def reply(self, user_id: int | None = None) -> None:
        reply = AssistantMessage()
        await self.chat.mount(reply)
        await self._sync_draft_views()
        self.chat.anchor()
        record = self.chat_record
        saved = self.history.add_message(record.id, "assistant", "", complete=False) if record is not None else None
        stream = ReplyStream(reply)
        received: list[str] = []
        saved_at = 0.0
        end: Done | Error | None = None
        self.stats.reply_started()
        try:
            request = Generate(messages=self._messages_to_send(), params=self._sampling())
            async for event in self.client.generate(request):
                if isinstance(event, Token):
                    if not received:
                        self.stats.first_token()
                    received.append(event.text)
                    reply.drafted.add(event.text, event.drafted_chars)
                    self.stats.token(event)
                    stream.add(event.text)
                    if stream.due:
                        await stream.flush()
                        if reply.draft_view is not None:
                            reply.draft_view.show()
                    now = time.monotonic()
                    if saved is not None and now - saved_at >= SAVE_EVERY_S:
                        self.history.update_message(saved.id, content="".join(received))
                        saved_at = now
                elif isinstance(event, Step):
                    # a remote engine reports no memory (vram_total 0): no memory field then
                    memory = f"{binary_size(event.vram_used)} / {binary_size(event.vram_total)}" \
                        if event.vram_total else ""
                    self.status_bar.set(speed=f"{event.tok_per_s:.1f} tok/s", memory=memory)
                    self.stats.step(event)
                elif isinstance(event, (Done, Error)):
                    end = event
        finally:
            await stream.stop()
            text = "".join(received)
            if saved is not None:
                if isinstance(end, Done):
                    self.history.update_message(saved.id, content=text, complete=end.reason != "cancelled",
                                                stats=stats_record(end.stats, end.reason, reply.drafted))
                elif isinstance(end, Error) and not received:
                    self.history.delete_messages_from(record.id, user_id if user_id is not None else saved.id)
                else:  # an error, or the reply was abandoned (the app is closing)
                    self.history.update_message(saved.id, content=text, complete=False,
                                                stats={"error": end.message} if isinstance(end, Error) else None)

        if not reply.is_attached:  # the app is closing
            return
        if isinstance(end, Done):
            await reply.update(text)  # the whole text once more: a stream can leave a fence half-drawn
            if reply.draft_view is not None:
                reply.draft_view.show()
            self.status_bar.set(speed=f"{end.stats.decode_tokens_per_s:.1f} tok/s" + server_figures(end.stats))
            self.stats.finished(end.stats)
            self.conversation.append({"role": "assistant", "content": text})
            if end.reason == "cancelled":
                await self.chat.mount(Note("(cancelled)"))
                self.state = "cancelled"
            else:
                self.state = "ready"
        elif isinstance(end, Error):
            self.conversation.pop()  # the failed turn is left out of what is sent next
            if not received:
                await reply.remove()
            await self.show_error(end.message)
        self.refresh_sidebar()

    def action_cancel(self) -> None:
        self.client.cancel()

    async def action_regenerate(self) -> None:
        """Drop the last reply and ask again."""
        replies = list(self.chat.query(AssistantMessage))
        if not replies or not self.conversation or self.conversation[-1]["role"] != "assistant":
            return
        last = replies[-1]
        for widget in list(self.chat.children)[list(self.chat.children).index(last):]:
            await widget.remove()
        self.conversation.pop()
        if self.chat_record is not None:
            saved = [m for m in self.history.messages(self.chat_record.id) if m.role == "assistant"]
            if saved:
                self.history.delete_messages_from(self.chat_record.id, saved[-1].id)
        self.state = "generating"
        self.reply()

    def action_copy_reply(self) -> None:
        replies = [m for m in self.conversation if m["role"] == "assistant"]
        if replies:
            self.copy_to_clipboard(replies[-1]["content"])
            self.notify("last reply copied to the clipboard")

    def action_export(self) -> None:
        if self.chat_record is None or self.history is None:
            self.notify("nothing to export yet", severity="warning")
            return
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.chat_record.title).strip("-").lower()[:40] or "chat"
        try:
            path = write_new_file(data_dir() / "exports", f"chat-{self.chat_record.id}-{slug}", ".md",
                                  self.history.export_markdown(self.chat_record.id))
        except OSError as e:
            self.notify(f"export failed: {e.filename or ''}: {e.strerror}", severity="error")
            return
        self.notify(f"exported to {path}")

    def action_chats(self) -> None:
        """To the list of chats (shown if hidden); from it, back to the prompt."""
        sidebar = self.sidebar
        if sidebar.has_focus:
            self.prompt.focus()
            return
        sidebar.display = True
        if sidebar.highlighted is None and sidebar.option_count:
            sidebar.highlighted = 0
        sidebar.focus()

    def action_toggle_sidebar(self) -> None:
        self.sidebar.display = not self.sidebar.display

    def action_toggle_stats(self) -> None:
        self.stats.display = not self.stats.display
        self.settings.ui.show_stats = self.stats.display
        self.save_settings()

    async def action_toggle_drafts(self) -> None:
        """Replies as plain text with the tokens that arrived as accepted drafts highlighted, or as
        Markdown (the default)."""
        self.settings.ui.show_drafts = not self.settings.ui.show_drafts
        self.chat.set_class(self.settings.ui.show_drafts, "-drafts")
        await self._sync_draft_views()
        self.save_settings()

    async def _sync_draft_views(self) -> None:
        """A DraftView after each reply while drafts are shown, none otherwise."""
        for message in list(self.chat.query(AssistantMessage)):
            if self.settings.ui.show_drafts and message.draft_view is None:
                message.draft_view = DraftView(message)
                await self.chat.mount(message.draft_view, after=message)
            elif not self.settings.ui.show_drafts and message.draft_view is not None:
                await message.draft_view.remove()
                message.draft_view = None

    def action_chat_settings(self) -> None:
        record = self.chat_record
        system = record.system_prompt if record else self.settings.chat.system_prompt
        params = record.params if record else self.settings.sampling.to_dict()

        def done(result) -> None:
            if result is None:
                return
            new_system, new_params = result
            record = self._record()  # a new chat is saved once it has settings of its own
            if record is not None:
                self.history.update_chat(record.id, system_prompt=new_system, params=new_params)
                self.chat_record = self.history.chat(record.id)
            self.notify("chat settings saved")

        self.push_screen(ChatSettingsScreen(system, params), done)

    # ---- other screens --------------------------------------------------------------------------
    def action_models(self) -> None:
        from chatapp.tui.picker import PickerScreen

        self.push_screen(PickerScreen(self.settings, current=self.load_request), self._picked)

    def _picked(self, result) -> None:
        """The picker's choice: (LoadModel, a new client or None, remote), or None."""
        if result is not None:
            request, client, remote = result
            self.switch_model(request, client, remote)

    def action_compare(self) -> None:
        model = None if self.remote else self.load_request.model
        a = parse_setup("plain", model=model, device=self.load_request.device)
        b = parse_setup("medusa", model=model, device=self.load_request.device)
        last_prompt = next((m["content"] for m in reversed(self.conversation) if m["role"] == "user"), None)
        self.open_compare(a, b, last_prompt)

    def open_compare(self, a, b, prompt: str | None, autorun: bool = False) -> None:
        def back(loaded_any) -> None:
            if loaded_any or self.info is None:
                self.load_model()  # compare mode loaded its own models: the chat's comes back

        self.push_screen(CompareScreen(self.client, a, b, prompt, autorun=autorun), back)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for name, help_text, action in [
            ("New chat", "Start a new conversation", self.action_new_chat),
            ("Models", "Pick, download and load a model", self.action_models),
            ("Compare", "Run one prompt with two decoding set-ups side by side", self.action_compare),
            ("Regenerate", "Drop the last reply and ask again", self.action_regenerate),
            ("Copy reply", "Copy the last reply to the clipboard", self.action_copy_reply),
            ("Export to Markdown", "Write this chat to a new Markdown file in the data folder's exports/",
             self.action_export),
            ("Chat settings", "System prompt and sampling settings of this chat", self.action_chat_settings),
            ("Toggle stats", "Show or hide the stats panel", self.action_toggle_stats),
            ("Toggle chats", "Show or hide the list of chats", self.action_toggle_sidebar),
            ("Delete chat", "Delete this conversation from the history", self.action_delete_chat),
        ]:
            yield SystemCommand(name, help_text, action)

    async def action_delete_chat(self) -> None:
        if self.chat_record is not None and self.history is not None and self.state != "generating":
            self.history.delete_chat(self.chat_record.id)
            await self.action_new_chat()
