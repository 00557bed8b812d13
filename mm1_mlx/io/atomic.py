"""Output directories that never destroy a user's data: checked, locked, written aside, swapped in.

A tool writes a directory only

- where nothing exists yet (or an empty directory is), or where a directory of exactly the kind
  it writes already sits (a checkpoint, an adapter, ...: recognised by its file names), and then
  only when replacing is what the user asked (``force``: ``--force``, or ``--resume`` for adapters);
- never at, around or inside one of its inputs (source model, adapter, data file), nor inside the
  installed package (its bundled models), nor through a symlink.

A lock file beside the output (``.NAME.lock``, ``fcntl.flock``) refuses a second writer. The new
content goes to a temporary sibling that is swapped in with one atomic exchange (Linux
``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``); where neither works, two renames
with the previous version kept as ``.NAME.old.PID``, which the next use restores if a kill came
between them. Stale temporaries of ours (``.NAME.*.tmp*``) are removed on the next use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import fnmatch
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import MM1Error

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # mm1_mlx/ (this file is mm1_mlx/io/atomic.py)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json"]
# what each writer puts in its directory: (files that must be there, every name allowed)
KINDS = {
    "checkpoint": (["config.json"], ["config.json", "model*.safetensors",
                                     "model.safetensors.index.json", "preprocessor_config.json",
                                     "processor_config.json", "generation_config.json",
                                     "loss.png", "quantization_report.json",
                                     "quantization_report.md", *TOKENIZER_FILES]),
    "adapter": (["adapter_config.json"], ["adapter_config.json", "adapters.safetensors",
                                          "training_state.safetensors", "training_log.json",
                                          "loss.png"]),
    "train-state": (["progress.json"], ["progress.json", "model.safetensors", "head.safetensors",
                                        "optimizer.safetensors"]),
    "tokenizer": (["tokenizer_config.json"], TOKENIZER_FILES),
    "mlpackage": (["Manifest.json"], ["Manifest.json", "Data"]),
    "run": ([], ["state", "tokenizer", "loss.png", "model", "*.png"]),
}
_held: dict[Path, list] = {}  # output path -> [lock fd, depth, claimed]


class OutputError(MM1Error):
    """An output path the tool must not write."""


def _abs(path: str | os.PathLike) -> Path:
    """Absolute path with its parent's symlinks resolved, the last component kept as given."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return p if p.parent == p else p.parent.resolve() / p.name


def _related(a: Path, b: Path) -> str | None:
    """How ``a`` (an output) relates to ``b`` (something to protect): equal/inside/contains."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def _ours(name: str, entry: str) -> bool:
    """A hidden temporary, backup or lock of ours (as the savers inside a run directory leave)."""
    return entry.startswith(".") and (entry.endswith((".lock", ".tmp")) or ".tmp" in entry
                                      or ".old." in entry)


def _entries(path: Path, kind: str) -> list[str]:
    """What ``path`` holds; a run directory's own locks and temporaries (of its state,
    tokenizer, model) do not count."""
    return [e for e in os.listdir(path) if kind != "run" or not _ours(path.name, e)]


def recognised(path: Path, kind: str) -> bool:
    """Whether the directory ``path`` holds exactly what a writer of ``kind`` writes."""
    required, allowed = KINDS[kind]
    try:
        entries = _entries(path, kind)
    except OSError:
        return False
    if not all(e in entries for e in required):
        return False
    return all(any(fnmatch.fnmatchcase(e, pat) for pat in allowed) for e in entries)


def check_output(path: str | os.PathLike, kind: str, inputs=(), force: bool = False,
                 flag: str = "--out", allow_package: bool = False) -> Path:
    """Refuse an output path (OutputError, one line) that would lose or touch something the
    user has; returns the absolute path. See the module docstring for the rules."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    p = _abs(path)
    if p.parent == p or not p.name or p.name in (".", ".."):
        raise OutputError(f"{flag} {path}: not a directory that can be written (a root)")
    for inp in inputs:
        if inp is None:
            continue
        rel = _related(p, _abs(inp)) or _related(p.resolve(), _abs(inp).resolve())
        if rel:
            raise OutputError(f"{flag} {path} {rel} the input {inp}; choose another output path")
    rel = _related(p.resolve(), PACKAGE_DIR)
    if rel and not allow_package:
        raise OutputError(f"{flag} {path} {rel} the installed package ({PACKAGE_DIR}); choose "
                          "another output path")
    if p.is_symlink():
        raise OutputError(f"{flag} {path} is a symlink; give the directory it points to or a new "
                          "path")
    if p.exists():
        _check_existing(p, path, kind, force, flag)
    return p


def _check_existing(p: Path, given, kind: str, force: bool, flag: str) -> None:
    if not p.is_dir():
        raise OutputError(f"{flag} {given} exists and is not a directory; choose another path")
    if not _entries(p, kind):
        return  # an empty directory: nothing to lose
    if not recognised(p, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise OutputError(f"{flag} {given} exists and is not {article} {kind} directory (it "
                          "holds other files); nothing was written, choose a new path")
    if not force:
        how = "--resume to continue or --force" if kind == "adapter" else "--force"
        raise OutputError(f"{flag} {given} already holds a {kind}; pass {how} to replace it")


# ---- locking ----
def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _acquire(path: Path) -> int:
    """An exclusive flock on ``.NAME.lock`` (the file removed again on release), or OutputError."""
    lp = lock_path(path)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{path} is being written by another process (lock {lp.name}); "
                              "wait for it to finish") from None
        try:  # the holder before us may have removed the file we opened: lock the current one
            if os.fstat(fd).st_ino == os.stat(lp).st_ino:
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, claimed: bool = False):
    """Hold the output lock of ``path`` (re-entrant within this process). ``claimed``: the
    content checks are done, later ``atomic_dir`` calls in the block may replace the path."""
    p = _abs(path)
    held = _held.get(p)
    if held is not None:
        held[1] += 1
        try:
            yield p
        finally:
            held[1] -= 1
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    _held[p] = [_acquire(p), 1, claimed]
    try:
        yield p
    finally:
        fd = _held.pop(p)[0]
        with contextlib.suppress(OSError):
            os.unlink(lock_path(p))  # while still locked: no one can be waiting on this inode
        os.close(fd)


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, kind: str, inputs=(), force: bool = False,
                 flag: str = "--out", allow_package: bool = False):
    """Check and lock an output for a long run (training): a second writer is refused at once,
    and saves inside the block (``atomic_dir``) replace it without further checks."""
    p = _abs(path)
    check_output(p, kind, inputs, force=True, flag=flag, allow_package=allow_package)
    with output_lock(p, claimed=True):
        recover(p)
        check_output(path, kind, inputs, force, flag, allow_package)
        yield p


# ---- recovery and swap ----
def recover(path: str | os.PathLike) -> bool:
    """Restore the previous version if a kill hit between the two renames of the fallback swap
    (the path is gone, ``.NAME.old.PID`` remains) and remove stale temporaries of ours. Call with
    the lock held (``atomic_dir`` does). Returns True when something was restored."""
    p = _abs(path)
    if not p.parent.is_dir():
        return False
    olds = sorted(p.parent.glob(f".{glob_escape(p.name)}.old.*"), key=lambda q: q.stat().st_mtime)
    restored = False
    if not os.path.lexists(p) and olds:
        os.replace(olds.pop(), p)
        restored = True
    for stale in olds + list(p.parent.glob(f".{glob_escape(p.name)}.*.tmp*")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return restored


def recover_if_interrupted(path: str | os.PathLike) -> None:
    """For readers: restore an interrupted swap of ``path`` unless someone is writing it."""
    p = _abs(path)
    if os.path.lexists(p) or not p.parent.is_dir() or \
            not any(p.parent.glob(f".{glob_escape(p.name)}.old.*")):
        return
    with contextlib.suppress(OutputError, OSError), output_lock(p):
        recover(p)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot (then nothing moved)."""
    libc = _libc()
    if libc is None:
        return False
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = lambda: libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # noqa: E731
    elif hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        call = lambda: libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd,  # noqa: E731
                                      os.fsencode(b), rename_exchange)
    else:
        return False
    if call() == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, path: Path) -> None:
    """Put the finished ``tmp`` at ``path``; the path is never missing, except in the fallback
    between its two renames (``recover`` repairs that)."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
    elif exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
    else:
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = "checkpoint", inputs=(),
               force: bool = False, flag: str = "--out", allow_package: bool = False):
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    The path is checked (``check_output``) and locked first; ``force`` allows replacing a
    directory of the same ``kind``. Inside ``claim_output`` the checks were already made."""
    p = _abs(path)
    claimed = _held.get(p, [None, 0, False])[2]
    if not claimed:
        check_output(p, kind, inputs, force=True, flag=flag, allow_package=allow_package)
    with output_lock(p):
        recover(p)
        if not claimed:
            check_output(path, kind, inputs, force, flag, allow_package)
        suffix = ".tmp" + (p.suffix if kind == "mlpackage" else "")
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary dir
        try:
            yield tmp
            swap_in(tmp, p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
