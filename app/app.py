"""The chat app: composes the sidebar, the model line and the chat widget; loads models; runs commands.

The conversation itself (messages, attachments, the reply worker) lives in ``chat.ChatView``, the
``/`` commands and the command palette's entries in ``commands.COMMANDS``, the dialogs in ``screens``."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Header, Label

from .chat import ChatView
from .commands import COMMANDS, run_command
from .engine import Engine, Loader, Settings, load_engine, local_models
from .screens import ConfirmScreen, FilePicker, HelpScreen, ModelPicker, SettingsScreen, TextPrompt
from .store import Store
from .widgets import ConversationList, ModelStatus


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

    engine: var[Engine | None] = var(None)  # the loaded model; the chat view's is bound to it
    model_loading: var[bool] = var(False)
    settings: var[Settings] = var(Settings)

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

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="title")
                yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield ModelStatus(id="model-status")
                yield ChatView(self.store, self.image_widget, self.max_pixels, id="chat").data_bind(
                    ChatApp.engine, ChatApp.model_loading, ChatApp.settings)
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_sidebar()
        if self.store.recovered is not None:
            self.notify(f"The chat database was damaged; it was moved to {self.store.recovered.name} "
                        "and a fresh one was started.", title="Database", severity="warning",
                        timeout=15)
        self.query_one("#prompt").focus()
        self.load_model(self.model_spec, self.adapter)

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def conv_id(self) -> int | None:
        """The open conversation (None: a new one, not saved yet)."""
        return self.chat.conv_id

    @property
    def generating(self) -> bool:
        return self.chat.generating

    # ---- model ----
    def load_model(self, spec: str | None, adapter: str | None = None) -> None:
        name = spec or "the default model"
        self.model_loading = True
        self.query_one(ModelStatus).show_loading(name)
        self._load(spec, adapter, name)

    @work(thread=True, exclusive=True, group="model")
    def _load(self, spec: str | None, adapter: str | None, name: str) -> None:
        try:
            engine = self.loader(spec, adapter)
        except Exception as e:  # any failure: say so, keep the app and the previous model
            self.call_from_thread(self._model_failed, name, e)
        else:
            self.call_from_thread(self._model_ready, spec, engine)

    def _model_ready(self, spec: str | None, engine: Engine) -> None:
        self.engine, self.model_spec, self.model_loading = engine, spec, False
        recent = [spec or engine.name] + [s for s in self.store.get_strings("recent_models")
                                          if s != (spec or engine.name)]
        self.store.set_setting("recent_models", recent[:10])
        self.query_one(ModelStatus).show_ready(f"model: {engine.name}")
        self.notify(f"{engine.name} is ready", timeout=3)

    def _model_failed(self, name: str, error: Exception) -> None:
        self.model_loading = False
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        current = f"still using {self.engine.name}" if self.engine else "no model loaded — F3 to choose one"
        self.query_one(ModelStatus).show_ready(f"model: {self.engine.name if self.engine else 'none'}")
        self.notify(f"Could not load {name}: {msg} ({current})", title="Model", severity="error",
                    timeout=10)

    # ---- conversations ----
    def refresh_sidebar(self) -> None:
        self.query_one(ConversationList).show(self.store.conversations(), self.conv_id)

    @on(ChatView.Changed)
    def handle_changed(self, event: ChatView.Changed) -> None:
        self.sub_title = event.title
        self.refresh_sidebar()

    @on(ConversationList.Opened)
    def handle_open(self, event: ConversationList.Opened) -> None:
        if event.conv_id != self.conv_id and not self.chat.busy():
            self.chat.open(event.conv_id)

    def action_new_conversation(self) -> None:
        if not self.chat.busy():
            self.chat.open(None)

    def rename(self, conv_id: int, title: str) -> None:
        self.store.rename(conv_id, title)
        if conv_id == self.conv_id:
            self.sub_title = title
        self.refresh_sidebar()

    def action_rename_conversation(self) -> None:
        conv_id = self._target_conversation()
        if conv_id is None:
            self.notify("No conversation to rename yet.", severity="warning")
            return
        self.push_screen(TextPrompt("New title", self.store.conversation(conv_id).title),
                         lambda title: title and self.rename(conv_id, title))

    def action_delete_conversation(self) -> None:
        conv_id = self._target_conversation()
        if conv_id is None or (conv_id == self.conv_id and self.chat.busy()):
            return
        conv = self.store.conversation(conv_id)

        def done(yes: bool) -> None:
            if yes:
                self.store.delete(conv_id)
                if conv_id == self.conv_id:
                    self.chat.open(None)  # (the sidebar follows the chat's Changed message)
                else:
                    self.refresh_sidebar()
                self.chat.forget(conv_id)
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

    # ---- commands, images, replies ----
    @on(ChatView.CommandEntered)
    def handle_command(self, event: ChatView.CommandEntered) -> None:
        run_command(self, event.line)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for command in COMMANDS:
            yield SystemCommand(command.title, command.help, partial(command.run, self, ""))

    def action_pick_image(self) -> None:
        self.push_screen(FilePicker(self.picker_root, self.image_widget),
                         lambda path: path and self.chat.attach([path]))

    def action_stop(self) -> None:
        self.chat.stop()

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
            if spec and not self.chat.busy():
                self.load_model(spec)

        self.push_screen(ModelPicker(models, self.model_spec or (self.engine and self.engine.name)),
                         done)

    def on_unmount(self) -> None:
        self.store.close()
