"""The chat's commands, in one table: the ``/`` parser, the help screen's list, the input's
suggestions and the command palette (Ctrl+P) are all generated from ``COMMANDS``.

A handler takes the ``ChatApp`` (typed as ``App``: ``app.py`` imports this module, not the reverse)
and the text after the command."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from textual.app import App

from .paths import unescape_path


@dataclass(frozen=True)
class Command:
    slash: str | None  # typed as ``/slash ARGS``; None: in the command palette only
    args: str  # what may follow the command, for the help screen ("" when nothing)
    title: str  # the command palette's name for it
    help: str
    run: Callable[[App, str], None]  # (the ChatApp, the argument or "")


def _image(app: App, arg: str) -> None:
    if arg:
        app.chat.attach([unescape_path(arg)])
    else:
        app.action_pick_image()


def _model(app: App, arg: str) -> None:
    if arg:
        app.load_model(arg)
    else:
        app.action_choose_model()


def _rename(app: App, arg: str) -> None:
    if arg and app.conv_id is not None:
        app.rename(app.conv_id, arg)
    else:
        app.action_rename_conversation()


COMMANDS = (
    Command("image", "PATH", "Attach image", "Pick an image file to attach", _image),
    Command("new", "", "New chat", "Start a new conversation",
            lambda app, arg: app.action_new_conversation()),
    Command("model", "PATH_OR_REPO", "Choose model", "Load another local checkpoint", _model),
    Command("rename", "TITLE", "Rename conversation", "Give this conversation a title", _rename),
    Command(None, "", "Delete conversation", "Delete this conversation",
            lambda app, arg: app.action_delete_conversation()),
    Command("settings", "", "Settings", "Temperature, top-p, max tokens, system prompt",
            lambda app, arg: app.action_settings()),
    Command(None, "", "Stop reply", "Stop the reply being written", lambda app, arg: app.action_stop()),
    Command("help", "", "Key bindings", "Show the help screen", lambda app, arg: app.action_help()),
)
SLASH = {f"/{c.slash}": c for c in COMMANDS if c.slash}


def run_command(app: App, line: str) -> None:
    """Run one ``/command [argument]`` line typed into the prompt."""
    word, _, arg = line.partition(" ")
    command = SLASH.get(word)
    if command is None:
        app.notify(f"Unknown command {word}: try {', '.join(SLASH)}", severity="warning")
    else:
        command.run(app, arg.strip())


def usage() -> str:
    """The commands as the help screen lists them: `/image PATH`, `/new`, ..."""
    return ", ".join(f"`{name} {c.args}`" if c.args else f"`{name}`" for name, c in SLASH.items())


def suggestions() -> list[str]:
    """What the prompt offers to complete a ``/`` into (a space where an argument follows)."""
    return [f"{name} " if c.args else name for name, c in SLASH.items()]
