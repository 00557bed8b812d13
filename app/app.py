"""The chat app: wires the widgets, the store and the model workers together."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Header, Input, Label

from .engine import Engine, Loader, Settings, chat_messages, load_engine, local_models
from .paths import split_image_paths
from .screens import ConfirmScreen, FilePicker, HelpScreen, ModelPicker, SettingsScreen, TextPrompt
from .store import Store
from .widgets import (
    Attachment,
    AttachmentBar,
    ChatLog,
    ConversationList,
    MessageView,
    ModelStatus,
    PromptInput,
    StatsLine,
    thumbnail,
)

FLUSH_S = 0.05  # batch streamed text into at most ~20 UI updates a second


def default_image_widget() -> type[Widget]:
    # picks Kitty / Sixel / half-cell / Unicode for this terminal
    from textual_image.widget import Image

    return Image


class ChatApp(App):
    """``ChatApp(model=None)`` loads the bundled default model; ``loader`` swaps in another engine."""

    CSS_PATH = "chat.tcss"
    TITLE = "MM1 chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+o", "pick_image", "Image"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("f1", "help", "Help"),
        Binding("f2", "rename_conversation", "Rename"),
        Binding("f3", "choose_model", "Model"),
        Binding("f4", "settings", "Settings"),
    ]

    def __init__(self, model: str | None = None, adapter: str | None = None, *,
                 loader: Loader = load_engine, data_dir: str | Path | None = None,
                 image_widget: type[Widget] | None = None, max_pixels: int | None = None,
                 picker_root: str | Path | None = None, models_dir: str | Path | None = None,
                 settings: dict | None = None):
        super().__init__()
        self.model_spec, self.adapter, self.loader = model, adapter, loader
        self.store = Store(data_dir)
        self.image_widget = image_widget or default_image_widget()
        self.max_pixels = max_pixels
        self.picker_root = Path(picker_root or Path.cwd())
        self.models_dir = Path(models_dir) if models_dir else self.store.dir / "models"
        # the saved settings, with this session's command-line ones on top
        self.settings = Settings.from_dict({**(self.store.get_setting("settings") or {}),
                                            **(settings or {})})
        self.engine: Engine | None = None
        self.loading = False
        self.conv_id: int | None = None
        self.caches: dict[int, object] = {}
        self.generating = False
        self._stop = threading.Event()

    # ---- layout ----
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="title")
                yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield ModelStatus(id="model-status")
                yield ChatLog(id="log")
                yield AttachmentBar(id="attachments")
                yield PromptInput(placeholder="Ask about an image… (/image PATH, Ctrl+O, or paste a path)",
                                  id="prompt")
                yield StatsLine("", id="stats")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(AttachmentBar).display = False
        self.refresh_sidebar()
        if self.store.recovered is not None:
            self.notify(f"The chat database was damaged; it was moved to {self.store.recovered.name} "
                        "and a fresh one was started.", title="Database", severity="warning",
                        timeout=15)
        self.query_one(PromptInput).focus()
        self.load_model(self.model_spec, self.adapter)

    # ---- model ----
    @work(thread=True, exclusive=True, group="model")
    def load_model(self, spec: str | None, adapter: str | None = None) -> None:
        name = spec or "the default model"
        self.loading = True
        self.call_from_thread(self.query_one(ModelStatus).show_loading, name)
        try:
            engine = self.loader(spec, adapter)
        except Exception as e:  # any failure: say so, keep the app and the previous model
            self.call_from_thread(self._model_failed, name, e)
        else:
            self.call_from_thread(self._model_ready, spec, engine)
        finally:
            self.loading = False

    def _model_ready(self, spec: str | None, engine: Engine) -> None:
        self.engine, self.model_spec = engine, spec
        self.caches.clear()
        recent = [spec or engine.name] + [s for s in self.store.get_strings("recent_models")
                                          if s != (spec or engine.name)]
        self.store.set_setting("recent_models", recent[:10])
        self.query_one(ModelStatus).show_ready(f"model: {engine.name}")
        self.notify(f"{engine.name} is ready", timeout=3)

    def _model_failed(self, name: str, error: Exception) -> None:
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        current = f"still using {self.engine.name}" if self.engine else "no model loaded — F3 to choose one"
        self.query_one(ModelStatus).show_ready(f"model: {self.engine.name if self.engine else 'none'}")
        self.notify(f"Could not load {name}: {msg} ({current})", title="Model", severity="error",
                    timeout=10)

    # ---- conversations ----
    def refresh_sidebar(self) -> None:
        self.query_one(ConversationList).show(self.store.conversations(), self.conv_id)

    def _busy(self) -> bool:
        if self.generating:
            self.notify("A reply is being written: wait, or press Esc to stop it.", severity="warning")
        return self.generating

    @on(ConversationList.Opened)
    def handle_open(self, event: ConversationList.Opened) -> None:
        if event.conv_id != self.conv_id and not self._busy():
            self.open_conversation(event.conv_id)

    def open_conversation(self, conv_id: int | None) -> None:
        log = self.query_one(ChatLog)
        log.clear()
        self.conv_id = conv_id
        conv = self.store.conversation(conv_id) if conv_id is not None else None
        self.sub_title = conv.title if conv else ""
        if conv is not None:
            for m in self.store.messages(conv_id):
                note = {"stopped": "(stopped)", "error": "(error)"}.get(m.finish)
                log.add(MessageView(m.role, m.content, m.images, self.image_widget, note))
        self.refresh_sidebar()
        self.query_one(PromptInput).focus()

    def action_new_conversation(self) -> None:
        if not self._busy():
            self.open_conversation(None)

    def action_rename_conversation(self) -> None:
        conv_id = self._target_conversation()
        if conv_id is None:
            self.notify("No conversation to rename yet.", severity="warning")
            return

        def done(title: str | None) -> None:
            if title:
                self.store.rename(conv_id, title)
                if conv_id == self.conv_id:
                    self.sub_title = title
                self.refresh_sidebar()

        self.push_screen(TextPrompt("New title", self.store.conversation(conv_id).title), done)

    def action_delete_conversation(self) -> None:
        conv_id = self._target_conversation()
        if conv_id is None or (conv_id == self.conv_id and self._busy()):
            return
        conv = self.store.conversation(conv_id)

        def done(yes: bool) -> None:
            if yes:
                self.store.delete(conv_id)
                self.caches.pop(conv_id, None)
                if conv_id == self.conv_id:
                    self.open_conversation(None)
                else:
                    self.refresh_sidebar()
                self.notify(f"Deleted “{conv.title}”", timeout=3)

        self.push_screen(ConfirmScreen(f"Delete the conversation “{conv.title}”?"), done)

    def _target_conversation(self) -> int | None:
        """The highlighted sidebar entry when the sidebar has focus, else the open conversation."""
        sidebar = self.query_one(ConversationList)
        if sidebar.has_focus and sidebar.highlighted_child is not None:
            return int(sidebar.highlighted_child.name)
        return self.conv_id

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    # ---- images ----
    def action_pick_image(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.attach([path])

        self.push_screen(FilePicker(self.picker_root, self.image_widget), done)

    @on(PromptInput.PathPasted)
    def handle_pasted(self, event: PromptInput.PathPasted) -> None:
        self.push_screen(ConfirmScreen(f"Attach the image {event.path}?"),
                         lambda yes: yes and self.attach([event.path]))

    @on(Attachment.Removed)
    def handle_removed(self) -> None:
        self.query_one(PromptInput).focus()

    @work(thread=True, group="attach")
    def attach(self, paths: list[str], then_send: str | None = None) -> None:
        """Check each image off the UI thread; add the good ones, explain the bad ones."""
        ok = True
        for path in paths:
            try:
                thumb = thumbnail(path, self._max_pixels())
            except Exception as e:  # ImageError, or anything PIL raised that load_image missed
                ok = False
                self.call_from_thread(self.notify, str(e).splitlines()[0], title="Image",
                                      severity="error", timeout=8)
                continue
            self.call_from_thread(self.query_one(AttachmentBar).add,
                                  Attachment(path, thumb, self.image_widget))
        if then_send is not None:
            self.call_from_thread(self._after_attach, then_send, ok)

    def _after_attach(self, text: str, ok: bool) -> None:
        if ok:
            self.send(text)
        else:
            self.query_one(PromptInput).value = text

    def _max_pixels(self) -> int | None:
        if self.max_pixels is not None:
            return self.max_pixels
        return self.engine.processor.image.max_pixels if self.engine is not None else None

    # ---- sending ----
    @on(Input.Submitted, "#prompt")
    def handle_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text.startswith("/"):
            event.input.value = ""
            self.run_command(text)
            return
        rest, paths = split_image_paths(text)
        if paths:
            names = ", ".join(Path(p).name for p in paths)

            def done(yes: bool) -> None:
                if yes:
                    event.input.value = ""
                    self.attach(paths, then_send=rest)
                else:
                    self.send(text)

            self.push_screen(ConfirmScreen(f"Attach {names} to this message?"), done)
            return
        self.send(text)

    def run_command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd == "/image" and arg:
            from .paths import unescape_path

            self.attach([unescape_path(arg)])
        elif cmd == "/image":
            self.action_pick_image()
        elif cmd == "/new":
            self.action_new_conversation()
        elif cmd == "/model" and arg:
            self.load_model(arg)
        elif cmd == "/model":
            self.action_choose_model()
        elif cmd == "/rename" and arg and self.conv_id is not None:
            self.store.rename(self.conv_id, arg)
            self.sub_title = arg
            self.refresh_sidebar()
        elif cmd == "/rename":
            self.action_rename_conversation()
        elif cmd == "/settings":
            self.action_settings()
        elif cmd == "/help":
            self.action_help()
        else:
            self.notify(f"Unknown command {cmd}: try /image, /new, /model, /rename, /settings, /help",
                        severity="warning")

    def send(self, text: str) -> None:
        prompt = self.query_one(PromptInput)
        bar = self.query_one(AttachmentBar)
        paths = bar.paths
        if not text and not paths:
            return
        if self._busy():
            prompt.value = prompt.value or text
            return
        if self.engine is None:
            prompt.value = text
            why = "is still loading" if self.loading else "is loaded (F3 to choose one)"
            self.notify(f"No model {why}; your message is kept in the input.", severity="warning")
            return
        try:
            stored_images = [self.store.add_image(p) for p in paths]
        except OSError as e:
            prompt.value = text
            self.notify(f"Cannot keep a copy of the image: {e}", severity="error")
            return
        if self.conv_id is None:
            title = text[:40] + ("…" if len(text) > 40 else "") if text else "Image chat"
            self.conv_id = self.store.new_conversation(title, self.engine.name).id
            self.sub_title = title
        history = self.store.messages(self.conv_id)
        user = self.store.add_message(self.conv_id, "user", text, stored_images)
        prompt.value = ""
        bar.clear()
        log = self.query_one(ChatLog)
        log.add(MessageView("user", text, stored_images, self.image_widget))
        view = log.add(MessageView("assistant", "", (), self.image_widget))
        reply = self.store.add_message(self.conv_id, "assistant", "", finish="pending")
        messages, images = chat_messages(history + [user], self.settings.system_prompt)
        cache = self.caches.get(self.conv_id)
        if cache is None:
            cache = self.caches[self.conv_id] = self.engine.new_cache()
        self.refresh_sidebar()
        self.generating = True
        self._stop.clear()
        self.generate(self.engine, view, reply.id, messages, images, self.settings, cache)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, engine: Engine, view: MessageView, msg_id: int, messages: list[dict],
                 images: list[str], settings: Settings, cache) -> None:
        parts, pending, last, error = [], [], None, None
        flushed = time.monotonic()
        try:
            stream = engine.stream(messages, images, settings, cache)
            try:
                for chunk in stream:
                    last = chunk
                    parts.append(chunk.text)
                    pending.append(chunk.text)
                    if time.monotonic() - flushed > FLUSH_S:
                        self.call_from_thread(view.append, "".join(pending))
                        pending.clear()
                        flushed = time.monotonic()
                    if self._stop.is_set():
                        break
            finally:
                stream.close()
        except Exception as e:  # a bad image or a too-long prompt: keep everything, explain
            error = e
        if pending:
            self.call_from_thread(view.append, "".join(pending))
        finish = ("error" if error is not None else "stopped" if self._stop.is_set()
                  else last.finish_reason if last is not None else None)
        self.call_from_thread(self._reply_done, view, msg_id, "".join(parts), finish, last, error)

    def _reply_done(self, view: MessageView, msg_id: int, text: str, finish: str | None, last,
                    error: Exception | None) -> None:
        self.generating = False
        self.store.update_message(msg_id, text, finish)
        if last is not None:
            self.query_one(StatsLine).show(last)
        if finish == "stopped":
            view.set_note("(stopped)")
        if error is not None:
            msg = str(error).splitlines()[0] if str(error) else type(error).__name__
            view.set_note(f"(error: {msg})")
            self.notify(msg, title="Generation failed", severity="error", timeout=10)

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    # ---- modals ----
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        def done(settings: Settings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.store.set_setting("settings", settings.to_dict())
                self.notify("Settings saved", timeout=3)

        self.push_screen(SettingsScreen(self.settings), done)

    def action_choose_model(self) -> None:
        models = local_models(self.models_dir, self.store.get_strings("recent_models"))

        def done(spec: str | None) -> None:
            if spec:
                if self._busy():
                    return
                self.load_model(spec)

        self.push_screen(ModelPicker(models, self.model_spec or (self.engine and self.engine.name)),
                         done)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New chat", "Start a new conversation", self.action_new_conversation)
        yield SystemCommand("Attach image", "Pick an image file to attach", self.action_pick_image)
        yield SystemCommand("Choose model", "Load another local checkpoint", self.action_choose_model)
        yield SystemCommand("Settings", "Temperature, top-p, max tokens, system prompt",
                            self.action_settings)
        yield SystemCommand("Rename conversation", "Give this conversation a title",
                            self.action_rename_conversation)
        yield SystemCommand("Delete conversation", "Delete this conversation",
                            self.action_delete_conversation)
        yield SystemCommand("Stop reply", "Stop the reply being written", self.action_stop)
        yield SystemCommand("Key bindings", "Show the help screen", self.action_help)

    def on_unmount(self) -> None:
        self.store.close()
