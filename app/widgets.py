"""The chat screen's parts: message log, attachment bar, prompt input, sidebar, stats line."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, Input, Label, ListItem, ListView, LoadingIndicator, Markdown, Static

from .paths import image_path_in


@functools.lru_cache(maxsize=64)
def thumbnail(path: str, max_pixels: int | None = None, size: tuple[int, int] = (256, 256)):
    """A small upright RGB copy of an image file; raises ImageError (one line) for a bad file."""
    from PIL import Image

    from mm1_mlx.images import DEFAULT_MAX_PIXELS, load_image

    img = load_image(path, max_pixels or DEFAULT_MAX_PIXELS)
    img.thumbnail(size, Image.BICUBIC)
    return img


class MessageView(Vertical):
    """One chat message: who said it, its images, its text (Markdown for the assistant)."""

    def __init__(self, role: str, content: str = "", images: list[str] = (),
                 image_widget: type[Widget] | None = None, note: str | None = None):
        super().__init__(classes=f"message {role}")
        self.role, self.content, self.images = role, content, list(images)
        self.image_widget, self.note = image_widget, note

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "MM1", classes="role")
        if self.images and self.image_widget is not None:
            with Horizontal(classes="images"):
                for path in self.images:
                    try:
                        yield self.image_widget(thumbnail(path), classes="preview")
                    except Exception:  # a missing copy must not hide the conversation
                        yield Label(f"[missing image {Path(path).name}]", markup=False)
        if self.role == "assistant":
            yield Markdown(self.content, classes="body")
        else:
            yield Static(Text(self.content), classes="body")
        if self.note:
            yield Label(self.note, classes="note", markup=False)

    async def append(self, text: str) -> None:
        self.content += text
        await self.query_one(Markdown).append(text)

    def set_note(self, note: str) -> None:
        self.mount(Label(note, classes="note", markup=False))


class ChatLog(VerticalScroll):
    """The conversation, newest at the bottom, following the stream while scrolled to the end."""

    def on_mount(self) -> None:
        self.anchor()

    def clear(self) -> None:
        self.remove_children()

    def add(self, view: MessageView) -> MessageView:
        self.mount(view)
        self.scroll_end(animate=False)
        return view


class Attachment(Horizontal):
    """A pending image: preview, file name and a button to remove it before sending."""

    @dataclass
    class Removed(Message):
        attachment: Attachment

    def __init__(self, path: str, thumb, image_widget: type[Widget] | None):
        super().__init__(classes="attachment")
        self.path, self.thumb, self.image_widget = path, thumb, image_widget

    def compose(self) -> ComposeResult:
        if self.image_widget is not None:
            yield self.image_widget(self.thumb, classes="preview")
        with Vertical():
            yield Label(Path(self.path).name, classes="name", markup=False)
            yield Button("✕ remove", classes="remove", compact=True)

    @on(Button.Pressed, ".remove")
    def handle_remove(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Removed(self))


class AttachmentBar(HorizontalScroll):
    """The images that go with the next message."""

    @property
    def paths(self) -> list[str]:
        return [a.path for a in self.query(Attachment)]

    def add(self, attachment: Attachment) -> None:
        self.mount(attachment)
        self.display = True

    def clear(self) -> None:
        self.remove_children()
        self.display = False

    @on(Attachment.Removed)
    async def handle_removed(self, event: Attachment.Removed) -> None:
        await event.attachment.remove()
        self.display = bool(self.paths)


class PromptInput(Input):
    """The message box; a pasted or dropped image path is offered for attaching instead of typed."""

    @dataclass
    class PathPasted(Message):
        path: str

    def _on_paste(self, event) -> None:
        path = image_path_in(event.text)
        if path is not None:  # else Input's own handler types the text
            event.prevent_default()
            event.stop()
            self.post_message(self.PathPasted(path))


class ConversationList(ListView):
    """The sidebar: saved conversations, newest first."""

    BINDINGS = [
        Binding("delete", "app.delete_conversation", "Delete"),
        Binding("r", "app.rename_conversation", "Rename"),
    ]

    @dataclass
    class Opened(Message):
        conv_id: int

    def show(self, conversations, selected: int | None) -> None:
        self.clear()
        index = None
        for i, c in enumerate(conversations):
            item = ListItem(Label(c.title, markup=False), name=str(c.id))
            self.append(item)
            if c.id == selected:
                index = i
        self.index = index

    @on(ListView.Selected)
    def handle_selected(self, event: ListView.Selected) -> None:
        event.stop()
        self.post_message(self.Opened(int(event.item.name)))


class ModelStatus(Horizontal):
    """Which model is in use; a spinner while one loads."""

    def compose(self) -> ComposeResult:
        yield LoadingIndicator()
        yield Label("", id="model-label", markup=False)

    def show_loading(self, name: str) -> None:
        self.query_one(LoadingIndicator).display = True
        self.query_one(Label).update(f"loading {name}…")

    def show_ready(self, text: str) -> None:
        self.query_one(LoadingIndicator).display = False
        self.query_one(Label).update(text)


class StatsLine(Static):
    """Time to first token, tokens/s, memory of the last reply."""

    def show(self, chunk) -> None:
        self.update(f"TTFT {chunk.ttft_ms:.0f} ms · {chunk.generation_tps:.1f} tok/s · "
                    f"{chunk.generation_tokens} tok · prompt {chunk.prompt_tokens} tok "
                    f"({chunk.prefilled_tokens} new) · {chunk.peak_memory_gb:.2f} GB")
