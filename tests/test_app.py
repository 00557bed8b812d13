"""The terminal chat UI: every flow driven with Pilot, bad inputs, snapshots, and a real terminal (tmux)."""

import mm1_mlx  # noqa: F401, I001  (binds OpenBLAS before mlx.core loads)

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from textual import events
from textual.app import App
from textual.reactive import var
from textual.widgets import Input, Markdown, TextArea
from textual.widgets.markdown import MarkdownBlock
from textual.worker import WorkerCancelled
from textual_image.widget import UnicodeImage

from app.app import ChatApp
from app.chat import ChatView
from app.commands import COMMANDS, SLASH, usage
from app.engine import Settings, chat_messages, load_engine, local_models
from app.paths import image_path_in, split_image_paths, unescape_path
from app.screens import ConfirmScreen, FilePicker, HelpScreen, ModelPicker, SettingsScreen
from app.store import MIGRATIONS, Store, StoredMessage
from app.widgets import Attachment, AttachmentBar, ChatLog, ConversationList, MessageView, StatsLine
from mm1_mlx.checkpoint import bundled_models
from mm1_mlx.errors import MM1Error
from mm1_mlx.generate import Chunk

pytestmark = pytest.mark.anyio  # async tests run with anyio's pytest plugin

SIZE = (100, 32)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def chunk(text, n, finish=None):
    return Chunk(text, None, 12, 12 if n <= 1 else 3, 1.0, 100.0, 42.0, n, 25.0, 0.12, finish)


class FakeEngine:
    """Streams a fixed reply word by word; ``endless`` keeps going until the app closes the stream."""

    def __init__(self, reply="A **red** square on a white background.", endless=False, delay=0.0):
        self.name, self.words, self.endless, self.delay = "fake", reply.split(" "), endless, delay
        self.processor = SimpleNamespace(image=SimpleNamespace(max_pixels=50_000_000))
        self.calls, self.caches, self.closed = [], [], threading.Event()

    def new_cache(self):
        return {"turns": 0}

    def stream(self, messages, images, settings, cache):
        self.calls.append((messages, list(images), settings))
        self.caches.append(cache)
        cache["turns"] += 1
        try:
            n = 0
            while True:
                for w in self.words:
                    n += 1
                    time.sleep(self.delay)
                    yield chunk(w + " ", n)
                if not self.endless:
                    break
            yield chunk("", n, "stop")
        finally:
            self.closed.set()


def make_app(tmp_path, engine=None, loader=None, **kw):
    engine = engine or FakeEngine()
    kw.setdefault("picker_root", tmp_path / "pics")
    return ChatApp(loader=loader or (lambda spec, adapter: engine), data_dir=tmp_path / "data",
                   image_widget=UnicodeImage, **kw)


@pytest.fixture
def pics(tmp_path):
    d = tmp_path / "pics"
    d.mkdir()
    img = Image.new("RGB", (48, 32), "white")
    img.paste((220, 30, 30), (12, 8, 36, 24))
    img.save(d / "red square.png")
    Image.new("RGB", (32, 32), (30, 60, 220)).save(d / "blue.jpg")
    (d / "notes.jpg").write_text("not really a picture")
    Image.new("RGB", (200, 200), "green").save(d / "big.png")
    return d


async def ready(app, pilot):
    await settle(app, pilot)


async def settle(app, pilot):
    """Wait for the app's own workers (DirectoryTree keeps a loader worker running forever)."""
    for _ in range(3):
        await pilot.pause()
        mine = [w for w in app.workers if w.group in ("model", "attach", "generate", "preview")]
        for worker in mine:  # (wait_for_complete([]) would wait for every worker)
            try:
                await worker.wait()
            except WorkerCancelled:  # an exclusive worker replaced by a newer one
                pass
        await pilot.pause()


async def type_and_send(app, pilot, text):
    app.query_one("#prompt").value = text
    await pilot.press("enter")
    await settle(app, pilot)


def notifications(app):
    return [n.message for n in app._notifications]


# ---- pure helpers ----
def test_paths_unescape_quoting(tmp_path, pics):
    p = str(pics / "red square.png")
    assert unescape_path(f"'{p}'") == p
    assert unescape_path(f'"{p}" ') == p
    assert unescape_path(p.replace(" ", "\\ ")) == p
    assert unescape_path("file://" + p.replace(" ", "%20")) == p
    assert image_path_in(p.replace(" ", "\\ ")) == p
    assert image_path_in(str(pics / "missing.png")) is None
    assert image_path_in("just some words") is None
    rest, paths = split_image_paths(f"what is in {p.replace(' ', chr(92) + ' ')} and '{pics / 'blue.jpg'}' ?")
    assert paths == [p, str(pics / "blue.jpg")] and rest == "what is in and ?"


def test_chat_messages_place_one_placeholder_per_image():
    hist = [StoredMessage("user", "hi", ["a.png", "b.png"]), StoredMessage("assistant", "yes"),
            StoredMessage("user", "more")]
    msgs, images = chat_messages(hist, "be brief")
    assert msgs == [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "<image>\n<image>\nhi"},
                    {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"}]
    assert images == ["a.png", "b.png"]


def test_store_schema_and_images_by_content(tmp_path, pics):
    store = Store(tmp_path / "d")
    assert store.version == len(MIGRATIONS)
    c = store.new_conversation("t")
    copy = store.add_image(pics / "blue.jpg")
    moved = tmp_path / "elsewhere.jpg"
    shutil.move(pics / "blue.jpg", moved)  # the original moves: the conversation still has its copy
    assert store.add_image(moved) == copy  # same content, same stored file
    store.add_message(c.id, "user", "hello", [copy])
    store.close()
    again = Store(tmp_path / "d")  # reopening runs no migration twice
    assert again.version == len(MIGRATIONS)
    [m] = again.messages(c.id)
    assert (m.role, m.content, m.images) == ("user", "hello", [copy]) and os.path.exists(copy)


# ---- flows ----
async def test_attach_by_command_send_and_stream(tmp_path, pics):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await type_and_send(app, pilot, f"/image {pics / 'red square.png'}")
        assert app.query_one(AttachmentBar).paths == [str(pics / "red square.png")]
        await type_and_send(app, pilot, "What is in the picture?")
        (messages, images, _), = engine.calls
        assert messages == [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
        stored = Path(images[0])
        assert stored.parent == tmp_path / "data" / "images" and stored.read_bytes() == (
            pics / "red square.png").read_bytes()
        views = list(app.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[1].content == "A **red** square on a white background. "
        assert len(views[0].query(UnicodeImage)) == 1  # the inline preview
        assert "TTFT 42 ms" in str(app.query_one(StatsLine).render())
        assert not app.query_one(AttachmentBar).paths and app.query_one("#prompt").value == ""
        [conv] = app.store.conversations()
        assert conv.title == "What is in the picture?"
        assert [(m.role, m.finish) for m in app.store.messages(conv.id)] == [("user", None),
                                                                          ("assistant", "stop")]


async def test_ui_streams_while_generating_and_esc_stops(tmp_path):
    engine = FakeEngine("word", endless=True, delay=0.005)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.query_one("#prompt").value = "count forever"
        await pilot.press("enter")
        view = None
        for _ in range(200):  # the UI keeps processing events while the worker streams
            await pilot.pause(0.02)
            views = list(app.query(MessageView))
            if len(views) == 2 and views[1].content.count("word") >= 5:
                view = views[1]
                break
        assert view is not None and app.generating
        await pilot.press("escape")
        await settle(app, pilot)
        assert engine.closed.is_set() and not app.generating
        [_, reply] = app.store.messages(app.conv_id)
        assert reply.finish == "stopped" and reply.content == view.content
        assert reply.content.count("word") >= 5
        assert any(str(n.render()) == "(stopped)" for n in view.query(".note"))


async def test_file_picker_previews_and_attaches(tmp_path, pics):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        picker = app.screen
        assert isinstance(picker, FilePicker)
        tree = picker.query_one("#tree")
        await pilot.pause(0.2)
        tree.focus()
        for _ in range(4):  # big.png is the first file once the tree has loaded
            if picker.highlighted == pics / "big.png":
                break
            await pilot.press("down")
            await settle(app, pilot)
        assert picker.highlighted == pics / "big.png"
        assert len(picker.query(UnicodeImage)) == 1  # live preview of the highlighted file
        await pilot.click("#attach")
        await settle(app, pilot)
        assert app.query_one(AttachmentBar).paths == [str(pics / "big.png")]


async def test_pasted_path_is_confirmed_then_attached(tmp_path, pics):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        prompt = app.query_one("#prompt")
        escaped = str(pics / "red square.png").replace(" ", "\\ ")
        prompt.post_message(events.Paste(escaped))  # as a terminal delivers a dropped file
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and prompt.value == ""
        await pilot.press("y")
        await settle(app, pilot)
        assert app.query_one(AttachmentBar).paths == [str(pics / "red square.png")]
        prompt.post_message(events.Paste("plain text"))  # ordinary pastes are typed as usual
        await pilot.pause()
        assert prompt.value == "plain text"


async def test_path_typed_in_message_is_confirmed_attached_and_sent(tmp_path, pics):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.query_one("#prompt").value = f"describe '{pics / 'blue.jpg'}' please"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#yes")
        await settle(app, pilot)
        (messages, images, _), = engine.calls
        assert messages[-1]["content"] == "<image>\ndescribe please" and len(images) == 1


async def test_several_images_one_removed_before_sending(tmp_path, pics):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await type_and_send(app, pilot, f"/image {pics / 'blue.jpg'}")
        await type_and_send(app, pilot, f"/image {pics / 'red square.png'}")
        await type_and_send(app, pilot, f"/image {pics / 'big.png'}")
        assert len(app.query(Attachment)) == 3
        await pilot.click(list(app.query(Attachment))[1].query_one(".remove"))
        await settle(app, pilot)
        assert [Path(p).name for p in app.query_one(AttachmentBar).paths] == ["blue.jpg", "big.png"]
        await type_and_send(app, pilot, "compare them")
        (messages, images, _), = engine.calls
        assert messages[-1]["content"] == "<image>\n<image>\ncompare them" and len(images) == 2


async def test_reopen_saved_conversation_and_follow_up(tmp_path, pics):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await type_and_send(app, pilot, f"/image {pics / 'red square.png'}")
        await type_and_send(app, pilot, "first question")
        await pilot.press("ctrl+n")
        await type_and_send(app, pilot, "second chat")
        assert [c.title for c in app.store.conversations()] == ["second chat", "first question"]
    engine = FakeEngine("It is red.")
    app = make_app(tmp_path, engine)  # a fresh start: everything comes back from the database
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        sidebar = app.query_one(ConversationList)
        assert [str(item.query_one("Label").render()) for item in sidebar.children] == [
            "second chat", "first question"]
        await pilot.click("ConversationList ListItem:last-of-type")
        await settle(app, pilot)
        views = list(app.query(MessageView))
        assert [(v.role, v.content) for v in views] == [
            ("user", "first question"), ("assistant", "A **red** square on a white background. ")]
        assert len(views[0].query(UnicodeImage)) == 1
        await type_and_send(app, pilot, "what color?")
        await type_and_send(app, pilot, "are you sure?")
        (m1, im1, _), (m2, im2, _) = engine.calls
        assert m1[0]["content"] == "<image>\nfirst question" and m1[-1]["content"] == "what color?"
        assert len(m2) == 5 and im1 == im2 and len(im1) == 1  # the whole history, its image each turn
        assert engine.caches[0] is engine.caches[1]  # one prompt cache per conversation


async def test_rename_and_delete_from_the_sidebar(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await type_and_send(app, pilot, "hello")
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#text").value = "Greetings"
        await pilot.press("enter")
        await pilot.pause()
        assert [c.title for c in app.store.conversations()] == ["Greetings"]
        app.query_one(ConversationList).focus()
        await pilot.press("delete")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert app.store.conversations() == [] and app.conv_id is None
        assert not app.query(MessageView)


async def test_settings_modal_saves_and_applies(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        screen.query_one("#temperature").value = "hot"
        await pilot.click("#save")
        await pilot.pause()
        assert app.screen is screen and any("not a number" in m for m in notifications(app))
        screen.query_one("#temperature").value = "0.7"
        screen.query_one("#max_tokens").value = "32"
        screen.query_one("#system_prompt").text = "Answer briefly."
        screen.query_one("#save").press()  # (a second click this soon would count as a double click)
        await pilot.pause()
        await type_and_send(app, pilot, "hi")
    assert engine.calls[0][2] == Settings(0.7, 1.0, 32, "Answer briefly.")
    assert engine.calls[0][0][0] == {"role": "system", "content": "Answer briefly."}
    assert Store(tmp_path / "data").get_setting("settings")["temperature"] == 0.7


async def test_model_picker_lists_local_models_and_loads_choice(tmp_path, tiny_checkpoint):
    models = tmp_path / "models"
    shutil.copytree(tiny_checkpoint, models / "my-tiny")
    loaded = []

    def loader(spec, adapter):
        loaded.append(spec)
        return FakeEngine()

    app = make_app(tmp_path, loader=loader, models_dir=models)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, ModelPicker)
        options = app.screen.query_one("#models")
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert str(models / "my-tiny") in ids and all(b in ids for b in bundled_models())
        options.focus()
        options.highlighted = ids.index(str(models / "my-tiny"))
        await pilot.press("enter")
        await ready(app, pilot)
    assert loaded == [None, str(models / "my-tiny")]
    assert local_models(models, [str(models / "my-tiny"), "gone/dir/x"])[-1][1] == str(models / "my-tiny")


async def test_command_palette_and_help(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"settings")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("escape")
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_one_command_table_drives_parser_help_palette_and_suggestions(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        assert list(SLASH) == ["/image", "/new", "/model", "/rename", "/settings", "/help"]
        await type_and_send(app, pilot, "/nonsense")
        assert f"Unknown command /nonsense: try {', '.join(SLASH)}" in notifications(app)
        prompt = app.query_one("#prompt")
        await pilot.press(*"/se")
        await pilot.pause()
        await pilot.press("right")  # accepts the prompt's suggestion
        assert prompt.value == "/settings"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("escape")
        await type_and_send(app, pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        help_text = app.screen.query_one(Markdown).source
        assert usage() == ("`/image PATH`, `/new`, `/model PATH_OR_REPO`, `/rename TITLE`, `/settings`, "
                           "`/help`")
        assert f"**Commands**: {usage()}." in help_text
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert all(c.title in titles for c in COMMANDS)  # the palette offers every command
        await type_and_send(app, pilot, "hello")
        await type_and_send(app, pilot, "/rename  Greetings ")
        assert [c.title for c in app.store.conversations()] == ["Greetings"] and app.sub_title == "Greetings"


async def test_chat_view_needs_only_a_bound_engine(tmp_path):
    """The chat widget owns its conversation, caches and worker: any app that binds it a model can
    host it, and hears about conversations by messages."""
    engine = FakeEngine("fine thanks")

    class Host(App):
        engine = var(None)
        model_loading = var(False)
        settings = var(Settings)

        def __init__(self):
            super().__init__()
            self.store, self.changed = Store(tmp_path / "data"), []

        def compose(self):
            yield ChatView(self.store, None, None).data_bind(Host.engine, Host.model_loading,
                                                             Host.settings)

        def on_chat_view_changed(self, event: ChatView.Changed):
            self.changed.append((event.conv_id, event.title))

    host = Host()
    async with host.run_test(size=SIZE) as pilot:
        chat = host.query_one(ChatView)
        chat.send("hi")
        await pilot.pause()
        assert any("No model is loaded" in m for m in notifications(host)) and host.changed == []
        host.engine = engine
        chat.send("how are you?")
        assert chat.generating
        await settle(host, pilot)
        assert [v.content for v in chat.query(MessageView)] == ["how are you?", "fine thanks "]
        assert host.changed == [(chat.conv_id, "how are you?")] and not chat.generating
        assert engine.caches == [chat.caches[chat.conv_id]]
        host.engine = FakeEngine()  # another model: the old model's caches are dropped
        assert chat.caches == {}
    host.store.close()


# ---- bad input: a notification, the app keeps running, nothing lost ----
@pytest.mark.parametrize("name, expected", [
    ("missing.png", "image not found"),
    ("notes.jpg", "not an image file"),
    ("big.png", "image too large"),
])
async def test_bad_images_are_refused_with_a_notification(tmp_path, pics, name, expected):
    app = make_app(tmp_path, max_pixels=10_000)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.query_one("#prompt").value = "draft"
        await type_and_send(app, pilot, f"/image {pics / name}")
        assert any(expected in m for m in notifications(app)), notifications(app)
        assert app.query_one(AttachmentBar).paths == [] and app.is_running
        await type_and_send(app, pilot, f"/image {pics / 'blue.jpg'}")  # still works after
        assert len(app.query_one(AttachmentBar).paths) == 1


async def test_model_that_fails_to_load_keeps_the_message(tmp_path):
    def loader(spec, adapter):
        raise MM1Error(f"model not found: {spec}")

    app = make_app(tmp_path, loader=loader, model="no/such-model")
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        assert any("Could not load no/such-model: model not found" in m for m in notifications(app))
        await type_and_send(app, pilot, "an important question")
        assert app.query_one("#prompt").value == "an important question"  # kept for later
        assert any("No model is loaded" in m for m in notifications(app))
        assert app.store.conversations() == [] and app.is_running


async def test_generation_error_keeps_the_conversation(tmp_path):
    class Failing(FakeEngine):
        def stream(self, messages, images, settings, cache):
            yield chunk("partial ", 1)
            raise MM1Error("prompt is 900 tokens, longer than the model's context (512)")

    app = make_app(tmp_path, Failing())
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await type_and_send(app, pilot, "a long question")
        assert any("longer than the model's context" in m for m in notifications(app))
        user, reply = app.store.messages(app.conv_id)
        assert user.content == "a long question" and (reply.content, reply.finish) == ("partial ", "error")
        await type_and_send(app, pilot, "again")  # the app keeps going
        assert len(app.store.messages(app.conv_id)) == 4


async def test_corrupted_database_is_moved_aside(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.db").write_bytes(b"this is not a database" * 100)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        assert any("database was damaged" in m for m in notifications(app))
        await type_and_send(app, pilot, "hello")
        assert [c.title for c in app.store.conversations()] == ["hello"]
    [aside] = data.glob("chat.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    assert sqlite3.connect(data / "chat.db").execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2


# ---- the real generation path with a tiny random model ----
async def test_tiny_model_streams_and_reuses_the_image_prefix(tmp_path, pics, tiny_checkpoint):
    app = make_app(tmp_path, loader=load_engine, model=str(tiny_checkpoint))
    app.settings = Settings(max_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        assert app.engine is not None and app.engine.name == str(tiny_checkpoint)
        await type_and_send(app, pilot, f"/image {pics / 'red square.png'}")
        await type_and_send(app, pilot, "what color is the square ?")
        first = app.query_one(StatsLine).render()
        await type_and_send(app, pilot, "where is it ?")
        second = str(app.query_one(StatsLine).render())
        reply = app.store.messages(app.conv_id)[-1]
        assert reply.role == "assistant" and reply.finish in ("stop", "length")
        assert reply.content == app.query(MessageView).last().content
        # the follow-up prefilled only the new tokens: the image and first turn came from the cache
        total, new = (int(x) for x in second.split("prompt ")[1].split(" tok (")[0:1] +
                      [second.split("tok (")[1].split(" new")[0]])
        assert new < total - app.engine.processor.num_image_tokens, (first, second)


# ---- snapshots ----
# A snapshot must not depend on how fast the machine is: every step waits for what it started
# (workers, mounts, the directory tree, markdown), the cursor does not blink, no toast is left.
@pytest.fixture
def steady_cursor(monkeypatch):
    """Keep text cursors steady (shown while focused): a blink every 0.5 s would make the cursor's
    state in the screenshot depend on how long the steps before it took."""
    for cls, toggle in ((Input, "_toggle_cursor"), (TextArea, "_toggle_cursor_blink_visible")):
        assert callable(getattr(cls, toggle, None)), f"textual renamed {cls.__name__}.{toggle}"
        monkeypatch.setattr(cls, toggle, lambda self: None)


def snapshot_app(tmp_path, pics):
    return make_app(tmp_path, FakeEngine("A **red** square on a *white* background.\n\n- one shape"))


async def until(pilot, condition, what, timeout=30.0):
    """Pause until ``condition()`` holds (a loaded machine can take far longer than an idle one)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await pilot.pause(0.05)


async def snapshot_ready(pilot):
    """The last step before a screenshot: nothing running, nothing animating, no notifications."""
    app = pilot.app
    await settle(app, pilot)
    await pilot.wait_for_scheduled_animations()
    for markdown in app.screen.query(Markdown):  # Markdown parses off the UI thread
        await until(pilot, lambda m=markdown: m.source.strip() == "" or m.query(MarkdownBlock),
                    "the markdown to render")
    await no_toasts(pilot)
    await pilot.pause()


async def no_toasts(pilot):
    """Clear the notifications (say, "fake is ready", which would expire by itself after 3 s).

    Only the current screen's toasts go: call this before opening a modal too."""
    app = pilot.app
    app.clear_notifications()
    await until(pilot, lambda: not any(s.query("Toast") for s in app.screen_stack), "the toasts to go")


async def open_modal(pilot, key, screen_type):
    await no_toasts(pilot)
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, screen_type), screen_type.__name__)


async def _chat(pilot):
    app = pilot.app
    await ready(app, pilot)
    await type_and_send(app, pilot, f"/image {app.picker_root / 'red square.png'}")
    await type_and_send(app, pilot, "What is in the picture?")
    await type_and_send(app, pilot, f"/image {app.picker_root / 'blue.jpg'}")
    assert [Path(p).name for p in app.query_one(AttachmentBar).paths] == ["blue.jpg"]
    assert not app.generating and app.query_one(StatsLine).render()
    app.query_one("#prompt").value = "and this one?"
    app.query_one(ChatLog).scroll_end(animate=False)
    await snapshot_ready(pilot)


def test_snapshot_chat_screen(snap_compare, steady_cursor, tmp_path, pics):
    assert snap_compare(snapshot_app(tmp_path, pics), terminal_size=SIZE, run_before=_chat)


def test_snapshot_file_picker(snap_compare, steady_cursor, tmp_path, pics):
    async def run_before(pilot):
        app = pilot.app
        await ready(app, pilot)
        await open_modal(pilot, "ctrl+o", FilePicker)
        picker = app.screen
        tree = picker.query_one("#tree")
        await until(pilot, lambda: len(tree.root.children) == 4, "the directory tree to load")
        tree.focus()
        target = app.picker_root / "red square.png"
        for _ in range(8):  # step down the tree until the file is highlighted
            if picker.highlighted == target:
                break
            await pilot.press("down")
            await settle(app, pilot)
        assert picker.highlighted == target
        await until(pilot, lambda: str(picker.query_one("#preview-info").render()).startswith(
            "red square.png") and picker.query(UnicodeImage), "the preview")
        await snapshot_ready(pilot)

    assert snap_compare(snapshot_app(tmp_path, pics), terminal_size=SIZE, run_before=run_before)


def test_snapshot_settings(snap_compare, steady_cursor, tmp_path, pics):
    async def run_before(pilot):
        await ready(pilot.app, pilot)
        await open_modal(pilot, "f4", SettingsScreen)
        await snapshot_ready(pilot)

    assert snap_compare(snapshot_app(tmp_path, pics), terminal_size=SIZE, run_before=run_before)


def test_snapshot_help(snap_compare, steady_cursor, tmp_path, pics):
    async def run_before(pilot):
        await ready(pilot.app, pilot)
        await open_modal(pilot, "f1", HelpScreen)
        await snapshot_ready(pilot)

    assert snap_compare(snapshot_app(tmp_path, pics), terminal_size=SIZE, run_before=run_before)


# ---- the real app in a real terminal ----
def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and "--model" in out.stdout and "--adapter" in out.stdout


def run_in_tmux(tmp_path, image: Path, question: str, app_args: str = "") -> str:
    """Start ``python -m app`` in a real terminal, attach ``image``, ask, return the screen's reply."""
    # a private server, named afresh each call: nothing else is touched, and a server left by a
    # killed earlier run (a reused pid) cannot answer "duplicate session"
    session = f"mm1chat{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", session]

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_for(pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            text = pane()
            if pred(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"timed out; the screen shows:\n{pane()}")

    env = f"MM1_CHAT_DATA_DIR={tmp_path / 'data'} TERM=xterm-256color"
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    f"cd {REPO} && env {env} {sys.executable} -m app {app_args}; sleep 5"], check=True)
    subprocess.run([*tmux, "resize-window", "-t", session, "-x", "120", "-y", "40"])
    try:
        wait_for(lambda t: "model: " in t and "loading" not in t, 120)
        subprocess.run([*tmux, "send-keys", "-t", session, f"/image {image}", "Enter"], check=True)
        wait_for(lambda t: "remove" in t, 30)
        subprocess.run([*tmux, "send-keys", "-t", session, question, "Enter"], check=True)
        screen = wait_for(lambda t: "tok/s" in t, 120)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    # the reply's visible lines: upwards from the input box to the "MM1" label or the top
    lines = [line.split("▌")[0] for line in screen.splitlines()]  # (cut off any toast on the right)
    end = max(i for i, line in enumerate(lines) if "▔▔▔" in line)
    start = end
    while start > 0 and "█" in lines[start - 1] and not re.search(r"█ MM1\s*$", lines[start - 1]):
        start -= 1
    text = " ".join(line.split("█", 1)[1] for line in lines[start:end])
    return " ".join(re.sub(r"[▀▄█▐▌▕▎▊▁▔]+", " ", text).split())  # (minus the scrollbar)


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install -y tmux)")


@needs_tmux
def test_real_terminal_streams_with_a_tiny_random_model(tmp_path, pics, tiny_checkpoint):
    reply = run_in_tmux(tmp_path, pics / "red square.png", "what color is the square ?",
                        f"--model {tiny_checkpoint}")
    [conv] = Store(tmp_path / "data").conversations()
    stored = Store(tmp_path / "data").messages(conv.id)[-1].content
    words = reply.split()
    assert words and stored.split()[-len(words):] == words  # what streamed is what was saved


@pytest.mark.slow
@needs_tmux
@pytest.mark.skipif("mm1-tiny" not in bundled_models(),
                    reason="the default model mm1-tiny is not bundled yet (mm1_mlx/weights/mm1-tiny)")
def test_real_terminal_streams_an_answer_about_an_image(tmp_path):
    import random

    from mm1_mlx.shapes.world import random_scene

    scene = random_scene(random.Random(3), n=1)
    image = tmp_path / "shape.png"
    scene.image.save(image)
    reply = run_in_tmux(tmp_path, image, "How many shapes are there?")
    # a streamed answer about the image, in the form the model was fine-tuned to give
    assert re.fullmatch(r"There (is|are) (one|two|three|four|five) shapes?\.", reply), reply
