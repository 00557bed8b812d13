"""Modal screens: file picker, confirmation, text prompt, settings, model picker, help."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import (
    Button,
    DirectoryTree,
    Input,
    Label,
    Markdown,
    OptionList,
    Static,
    TextArea,
)
from textual.widgets.option_list import Option

from .commands import usage
from .engine import Settings
from .paths import IMAGE_SUFFIXES


class Modal(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(Modal):
    """A yes/no question; dismisses with True or False."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__(classes="dialog")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label(self.question, markup=False, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("Yes", variant="primary", id="yes")
                yield Button("No", id="no")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed)
    def handle_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPrompt(Modal):
    """Ask for one line of text (e.g. a new title)."""

    def __init__(self, title: str, value: str = ""):
        super().__init__(classes="dialog")
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label(self.title_text, markup=False)
            yield Input(self.value, id="text")

    @on(Input.Submitted)
    def handle_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class ImageTree(DirectoryTree):
    """Folders and image files only."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and
                (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES)]


class FilePicker(Modal):
    """Browse for an image with a live preview of the highlighted file; dismisses with its path."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, root: str | Path, image_widget: type[Widget]):
        super().__init__(classes="dialog")
        self.root, self.image_widget = Path(root), image_widget
        self.highlighted: Path | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="box wide"):
            yield Label("Attach an image", classes="title")
            with Horizontal(id="picker"):
                yield ImageTree(self.root, id="tree")
                with Vertical(id="preview-pane"):
                    yield Static("", id="preview-info", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Attach", variant="primary", id="attach")
                yield Button("Cancel", id="cancel")

    @on(DirectoryTree.FileSelected)
    def handle_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    @on(DirectoryTree.NodeHighlighted)
    def handle_highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is not None and entry.path.is_file():
            self.highlighted = entry.path
            self.show_preview(entry.path)

    @work(thread=True, exclusive=True, group="preview")
    def show_preview(self, path: Path) -> None:
        from PIL import Image

        from .widgets import thumbnail

        try:
            with Image.open(path) as im:
                info = f"{path.name}\n{im.width}×{im.height} {im.format}"
            thumb = thumbnail(str(path))
        except Exception as e:
            thumb, info = None, f"{path.name}\ncannot preview: {str(e).splitlines()[0]}"
        self.app.call_from_thread(self._set_preview, path, thumb, info)

    async def _set_preview(self, path: Path, thumb, info: str) -> None:
        if path != self.highlighted:  # a slower preview of a file highlighted before: drop it
            return
        pane = self.query_one("#preview-pane")
        await pane.query(".preview").remove()
        if thumb is not None:
            await pane.mount(self.image_widget(thumb, classes="preview"), before=0)
        self.query_one("#preview-info", Static).update(info)

    @on(Button.Pressed, "#attach")
    def handle_attach(self) -> None:
        self.dismiss(str(self.highlighted) if self.highlighted else None)

    @on(Button.Pressed, "#cancel")
    def handle_cancel(self) -> None:
        self.dismiss(None)


class SettingsScreen(Modal):
    """Sampling settings and the system prompt; dismisses with new Settings or None."""

    def __init__(self, settings: Settings):
        super().__init__(classes="dialog")
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="box wide"):
            yield Label("Settings", classes="title")
            with Grid(id="settings-grid"):
                yield Label("Temperature")
                yield Input(str(s.temperature), id="temperature", type="number")
                yield Label("Top-p")
                yield Input(str(s.top_p), id="top_p", type="number")
                yield Label("Max tokens")
                yield Input(str(s.max_tokens), id="max_tokens", type="integer")
            yield Label("System prompt")
            yield TextArea(s.system_prompt, id="system_prompt")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def read(self) -> Settings:
        def value(name, kind, lo, hi):
            text = self.query_one(f"#{name}", Input).value
            try:
                v = kind(text)
            except ValueError:
                raise ValueError(f"{name.replace('_', ' ')}: {text!r} is not a number") from None
            if not lo <= v <= hi:
                raise ValueError(f"{name.replace('_', ' ')} must be between {lo} and {hi}")
            return v

        return Settings(value("temperature", float, 0.0, 5.0), value("top_p", float, 0.0, 1.0),
                        value("max_tokens", int, 1, 100_000),
                        self.query_one("#system_prompt", TextArea).text)

    @on(Button.Pressed, "#save")
    def handle_save(self) -> None:
        try:
            self.dismiss(self.read())
        except ValueError as e:
            self.notify(str(e), severity="error")

    @on(Button.Pressed, "#cancel")
    def handle_cancel(self) -> None:
        self.dismiss(None)


class ModelPicker(Modal):
    """Local checkpoints (bundled, models folder, recent) or a typed path / hub id."""

    def __init__(self, models: list[tuple[str, str]], current: str | None):
        super().__init__(classes="dialog")
        self.models, self.current = models, current

    def compose(self) -> ComposeResult:
        with Vertical(classes="box wide"):
            yield Label("Choose a model", classes="title")
            options = [Option(("● " if spec == self.current else "  ") + label, id=spec)
                       for label, spec in self.models]
            yield OptionList(*options, id="models")
            if not options:
                yield Label("No local checkpoints found.", classes="note")
            yield Input(placeholder="or a checkpoint path / hub id, then Enter", id="spec")

    @on(OptionList.OptionSelected)
    def handle_picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @on(Input.Submitted, "#spec")
    def handle_typed(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


HELP = """\
# MM1 chat

Chat with an on-device multimodal model about your images.

| Key | Action |
|---|---|
| Enter | send the message |
| Esc | stop the reply being written (keeps the text) |
| Ctrl+N | new conversation |
| Ctrl+O | attach an image with the file picker |
| Ctrl+B | show / hide the conversation list |
| F1 | this help |
| F2 | rename the conversation |
| F3 | choose a model |
| F4 | settings (temperature, top-p, max tokens, system prompt) |
| Ctrl+P | command palette |
| Ctrl+Q | quit |
| Delete / r | (in the list) delete / rename the highlighted conversation |

**Images**: type `/image PATH`, press Ctrl+O, or paste / drop a file path into the input
(you are asked to confirm). Attach several before sending; click *remove* to drop one.

**Commands**: {usage}.
"""


class HelpScreen(Modal):
    BINDINGS = [Binding("escape,f1,q", "cancel", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="box wide"):
            yield Markdown(HELP.format(usage=usage()))
            yield Button("Close", id="close")

    @on(Button.Pressed, "#close")
    def handle_close(self) -> None:
        self.dismiss(None)
