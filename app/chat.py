"""The chat widget: the open conversation, the images for the next message, the prompt, and the
workers that check images and write replies.

``ChatView`` owns the conversation's state (which one is open, its prompt caches, whether a reply is
being written). Its workers run in threads and never touch a widget: they post messages that the
view handles on the UI thread. The view tells the app what the app shows (the title, the sidebar)
and which ``/`` command was typed, also by messages. The model and the settings come from the app
by data binding (``ChatView(...).data_bind(ChatApp.engine, ...)``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import var
from textual.suggester import SuggestFromList
from textual.widget import Widget
from textual.widgets import Input

from .commands import suggestions
from .engine import Engine, Settings, chat_messages
from .paths import split_image_paths
from .screens import ConfirmScreen
from .store import Store
from .widgets import Attachment, AttachmentBar, ChatLog, MessageView, PromptInput, StatsLine, thumbnail

FLUSH_S = 0.05  # batch streamed text into at most ~20 UI updates a second
PLACEHOLDER = "Ask about an image… (/image PATH, Ctrl+O, or paste a path)"


class ChatView(Vertical):
    """One conversation at a time: ``open(conv_id)``, ``attach(paths)``, ``send(text)``, ``stop()``."""

    engine: var[Engine | None] = var(None)  # bound to the app's: None while none is loaded
    model_loading: var[bool] = var(False)  # the app is loading a model
    settings: var[Settings] = var(Settings)

    # ---- to the app ----
    @dataclass
    class Changed(Message):
        """Another conversation was opened, or the open one was saved or got a message (``conv_id``
        None: a new conversation, not saved yet)."""

        conv_id: int | None
        title: str

    @dataclass
    class CommandEntered(Message):
        """A ``/command`` line was typed into the prompt."""

        line: str

    # ---- from the workers (handled here, on the UI thread) ----
    @dataclass
    class ImageChecked(Message, bubble=False):
        path: str
        thumb: object | None  # None: the file was refused, for ``error``
        error: str = ""

    @dataclass
    class ImagesChecked(Message, bubble=False):
        then_send: str | None
        ok: bool

    @dataclass
    class ReplyStreamed(Message, bubble=False):
        view: MessageView
        text: str

    @dataclass
    class ReplyFinished(Message, bubble=False):
        view: MessageView
        msg_id: int
        text: str
        finish: str | None  # "stop", "length", "stopped" (Esc), "error" or None
        last: object | None  # the last ``Chunk``, for the stats line
        error: Exception | None

    def __init__(self, store: Store, image_widget: type[Widget] | None, max_pixels: int | None,
                 **kwargs):
        super().__init__(**kwargs)
        self.store, self.image_widget, self.max_pixels = store, image_widget, max_pixels
        self.conv_id: int | None = None
        self.caches: dict[int, object] = {}  # one prompt cache per conversation
        self.generating = False
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield ChatLog(id="log")
        yield AttachmentBar(id="attachments")
        yield PromptInput(placeholder=PLACEHOLDER, id="prompt",
                          suggester=SuggestFromList(suggestions(), case_sensitive=True))
        yield StatsLine("", id="stats")

    def on_mount(self) -> None:
        self.query_one(AttachmentBar).display = False

    def watch_engine(self) -> None:
        self.caches.clear()  # a cache holds one model's keys and values

    def busy(self) -> bool:
        if self.generating:
            self.notify("A reply is being written: wait, or press Esc to stop it.", severity="warning")
        return self.generating

    # ---- conversations ----
    def open(self, conv_id: int | None) -> None:
        log = self.query_one(ChatLog)
        log.clear()
        self.conv_id = conv_id
        conv = self.store.conversation(conv_id) if conv_id is not None else None
        if conv is not None:
            for m in self.store.messages(conv_id):
                note = {"stopped": "(stopped)", "error": "(error)"}.get(m.finish)
                log.add(MessageView(m.role, m.content, m.images, self.image_widget, note))
        self.post_message(self.Changed(conv_id, conv.title if conv else ""))
        self.query_one(PromptInput).focus()

    def forget(self, conv_id: int) -> None:
        """A conversation was deleted: drop its prompt cache."""
        self.caches.pop(conv_id, None)

    # ---- images ----
    @on(PromptInput.PathPasted)
    def handle_pasted(self, event: PromptInput.PathPasted) -> None:
        self.app.push_screen(ConfirmScreen(f"Attach the image {event.path}?"),
                             lambda yes: yes and self.attach([event.path]))

    @on(Attachment.Removed)
    def handle_removed(self) -> None:
        self.query_one(PromptInput).focus()

    def attach(self, paths: list[str], then_send: str | None = None) -> None:
        """Add images to the next message (the bad ones are explained), then send ``then_send``."""
        self._check_images(paths, self._max_pixels(), then_send)

    @work(thread=True, group="attach")
    def _check_images(self, paths: list[str], max_pixels: int | None, then_send: str | None) -> None:
        ok = True
        for path in paths:
            try:
                self.post_message(self.ImageChecked(path, thumbnail(path, max_pixels)))
            except Exception as e:  # ImageError, or anything PIL raised that load_image missed
                ok = False
                self.post_message(self.ImageChecked(path, None, str(e).splitlines()[0]))
        self.post_message(self.ImagesChecked(then_send, ok))

    @on(ImageChecked)
    def handle_image_checked(self, event: ImageChecked) -> None:
        if event.thumb is None:
            self.notify(event.error, title="Image", severity="error", timeout=8)
        else:
            self.query_one(AttachmentBar).add(Attachment(event.path, event.thumb, self.image_widget))

    @on(ImagesChecked)
    def handle_images_checked(self, event: ImagesChecked) -> None:
        if event.then_send is None:
            return
        if event.ok:
            self.send(event.then_send)
        else:
            self.query_one(PromptInput).value = event.then_send

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
            self.post_message(self.CommandEntered(text))
            return
        rest, paths = split_image_paths(text)
        if not paths:
            self.send(text)
            return

        def done(yes: bool) -> None:
            if yes:
                event.input.value = ""
                self.attach(paths, then_send=rest)
            else:
                self.send(text)

        names = ", ".join(Path(p).name for p in paths)
        self.app.push_screen(ConfirmScreen(f"Attach {names} to this message?"), done)

    def send(self, text: str) -> None:
        """Save the message with the attached images and start the reply (or say why not)."""
        prompt, bar = self.query_one(PromptInput), self.query_one(AttachmentBar)
        if not text and not bar.paths:
            return
        if self.busy():
            prompt.value = prompt.value or text
            return
        if self.engine is None:
            prompt.value = text
            why = "is still loading" if self.model_loading else "is loaded (F3 to choose one)"
            self.notify(f"No model {why}; your message is kept in the input.", severity="warning")
            return
        try:
            stored_images = [self.store.add_image(p) for p in bar.paths]
        except OSError as e:
            prompt.value = text
            self.notify(f"Cannot keep a copy of the image: {e}", severity="error")
            return
        prompt.value = ""
        bar.clear()
        self._reply_to(text, stored_images)

    def _reply_to(self, text: str, images: list[str]) -> None:
        if self.conv_id is None:
            title = text[:40] + ("…" if len(text) > 40 else "") if text else "Image chat"
            self.conv_id = self.store.new_conversation(title, self.engine.name).id
        history = self.store.messages(self.conv_id)
        user = self.store.add_message(self.conv_id, "user", text, images)
        log = self.query_one(ChatLog)
        log.add(MessageView("user", text, images, self.image_widget))
        view = log.add(MessageView("assistant", "", (), self.image_widget))
        reply = self.store.add_message(self.conv_id, "assistant", "", finish="pending")
        messages, images = chat_messages(history + [user], self.settings.system_prompt)
        if self.conv_id not in self.caches:
            self.caches[self.conv_id] = self.engine.new_cache()
        self.post_message(self.Changed(self.conv_id, self.store.conversation(self.conv_id).title))
        self.generating = True
        self._stop.clear()
        self.generate(self.engine, view, reply.id, messages, images, self.settings,
                      self.caches[self.conv_id])

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
                        self.post_message(self.ReplyStreamed(view, "".join(pending)))
                        pending.clear()
                        flushed = time.monotonic()
                    if self._stop.is_set():
                        break
            finally:
                stream.close()
        except Exception as e:  # a bad image or a too-long prompt: keep everything, explain
            error = e
        if pending:
            self.post_message(self.ReplyStreamed(view, "".join(pending)))
        finish = ("error" if error is not None else "stopped" if self._stop.is_set()
                  else last.finish_reason if last is not None else None)
        self.post_message(self.ReplyFinished(view, msg_id, "".join(parts), finish, last, error))

    @on(ReplyStreamed)
    async def handle_streamed(self, event: ReplyStreamed) -> None:
        await event.view.append(event.text)

    @on(ReplyFinished)
    def handle_finished(self, event: ReplyFinished) -> None:
        self.generating = False
        self.store.update_message(event.msg_id, event.text, event.finish)
        if event.last is not None:
            self.query_one(StatsLine).show(event.last)
        if event.finish == "stopped":
            event.view.set_note("(stopped)")
        if event.error is not None:
            msg = str(event.error).splitlines()[0] if str(event.error) else type(event.error).__name__
            event.view.set_note(f"(error: {msg})")
            self.notify(msg, title="Generation failed", severity="error", timeout=10)

    def stop(self) -> None:
        """Stop the reply being written (what was written is kept)."""
        if self.generating:
            self._stop.set()
