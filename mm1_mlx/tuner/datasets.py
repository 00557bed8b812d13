"""Fine-tuning datasets: the formats users already have, checked record by record.

Three record kinds, recognised per record in a ``.json`` array or a ``.jsonl`` file:

- LLaVA: ``{"image": "a.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``
- messages (mlx-vlm / LLaMA-Factory): ``{"messages": [{"role": "user", "content": "<image>..." |
  [{"type": "image"}, {"type": "text", "text": "..."}]}, {"role": "assistant", ...}],
  "images": ["a.jpg"]}``
- plain: ``{"image": "a.jpg", "prompt": "...", "response": "..."}``

Image paths are relative to the data file. A record whose text has no ``<image>`` placeholder gets one
per image at the start of its first user turn; otherwise placeholders and images must match in number.
Every problem (missing image, malformed JSON, no assistant turn, placeholder/image mismatch, sample
longer than the maximum length) is reported as ``FILE:LINE: reason``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MM1Error
from ..images import load_image
from ..processor import IMAGE_TOKEN, PreparedImage, Processor, tiles_for
from .augment import augment

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system", "bot": "assistant", "model": "assistant"}


@dataclass
class Sample:
    messages: list[dict]  # {"role", "content"} with <image> placeholders
    images: list[Path]
    where: str  # "file:line"


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]  # True where the loss applies
    images: list[Path]
    where: str


class BadRecord(ValueError):
    """One record that cannot be used (the message names what is wrong, not where)."""


def _loads(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadRecord("JSON nested too deeply")


def _records(path: Path):
    """Yield (line number, record dict or BadRecord) from a .json array or a .jsonl file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if path.suffix == ".jsonl" or text is None or not text.lstrip().startswith("["):
        for n, line in enumerate(raw.splitlines(), 1):  # a line that is not UTF-8 is one bad record
            if not line.strip():
                continue
            try:
                yield n, _loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, BadRecord(f"not UTF-8 text (byte {e.start} of the line)")
        return
    # a JSON array: decode item by item so each record keeps its line number
    dec, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        line = text.count("\n", 0, i) + 1
        if i >= len(text):
            yield line, BadRecord("malformed JSON (the array is not closed)")
            return
        if text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield e.lineno, BadRecord(f"malformed JSON ({e.msg}); the rest of the file is skipped")
            return
        except RecursionError:
            yield line, BadRecord("JSON nested too deeply; the rest of the file is skipped")
            return
        yield line, rec


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _text(content, key: str) -> str:
    """Message content -> text; content lists ({"type": "image"} / {"type": "text"}) flattened."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind in ("image", "image_url"):
                out.append(IMAGE_TOKEN + "\n")
            else:
                raise BadRecord(f"unknown content part in {key}: {str(part)[:60]}")
        return "".join(out)
    raise BadRecord(f"{key} content is {type(content).__name__}, not text")


def parse_record(rec) -> tuple[list[dict], list[str]]:
    """One record of any supported kind -> (messages, image paths as written)."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list):
            raise BadRecord("'conversations' must be a list")
        msgs = []
        for t in turns:
            if not isinstance(t, dict) or t.get("from") not in ROLES:
                raise BadRecord(f"bad conversation turn {str(t)[:60]} (needs 'from': human|gpt)")
            msgs.append({"role": ROLES[t["from"]], "content": _text(t.get("value"), "value")})
        images = _as_list(rec.get("image", rec.get("images")))
    elif "messages" in rec:
        if not isinstance(rec["messages"], list):
            raise BadRecord("'messages' must be a list")
        msgs = []
        for m in rec["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRecord(f"bad message {str(m)[:60]} (needs 'role': user|assistant|system)")
            msgs.append({"role": ROLES[m["role"]], "content": _text(m.get("content"), "content")})
        images = _as_list(rec.get("images", rec.get("image")))
    elif "prompt" in rec and "response" in rec:
        msgs = [{"role": "user", "content": _text(rec["prompt"], "prompt")},
                {"role": "assistant", "content": _text(rec["response"], "response")}]
        images = _as_list(rec.get("image", rec.get("images")))
    else:
        raise BadRecord("unknown record: expected 'conversations' (LLaVA), 'messages' (+ 'images') "
                        "or 'prompt' + 'response' (+ 'image')")
    if not all(isinstance(p, str) for p in images):
        raise BadRecord("image paths must be strings")
    return msgs, images


def check_messages(msgs: list[dict], num_images: int) -> list[dict]:
    """Place missing <image> placeholders; insist on an assistant turn and matching counts."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRecord("the conversation has no assistant turn to learn from")
    first = next(m["role"] for m in msgs if m["role"] != "system")
    if first != "user":
        raise BadRecord("the first turn is the assistant's; a conversation starts with the user")
    n = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if n == 0 and num_images:
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first is None:
            raise BadRecord("images given but the conversation has no user turn")
        msgs = [dict(m) for m in msgs]
        msgs[first]["content"] = f"{IMAGE_TOKEN}\n" * num_images + msgs[first]["content"]
    elif n != num_images:
        raise BadRecord(f"the text has {n} {IMAGE_TOKEN} placeholders but {num_images} images "
                        "are given")
    return msgs


def read_samples(path: str | Path) -> tuple[list[Sample], list[str]]:
    """All usable samples of a data file, and one ``FILE:LINE: reason`` per unusable record."""
    path = Path(path)
    if not path.is_file():
        raise MM1Error(f"data file not found (or not a regular file): {path}")
    samples, problems = [], []
    for line, rec in _records(path):
        where = f"{path}:{line}"
        try:
            if isinstance(rec, BadRecord):
                raise rec
            msgs, images = parse_record(rec)
            msgs = check_messages(msgs, len(images))
            files = [path.parent / p for p in images]
            for f in files:
                if not f.is_file():
                    raise BadRecord(f"image not found: {f}")
        except BadRecord as e:
            problems.append(f"{where}: {e}")
            continue
        samples.append(Sample(msgs, files, where))
    return samples, problems


def encode(sample: Sample, processor: Processor, max_length: int, mask_prompt: bool = True
           ) -> Encoded:
    """Token ids and loss mask; images are opened (to check them and count tiles), not kept."""
    tiles = []
    for f in sample.images:
        try:
            img = load_image(f, processor.image.max_pixels)
        except MM1Error as e:
            raise BadRecord(str(e)) from None
        tiles.append(tiles_for(*img.size, processor.image.image_size,
                               processor.image.max_image_tiles))
    # token counts only need the number of sub-images per image, not the pixels
    stand_ins = [PreparedImage(np.zeros((t, 0, 0, 3), np.float32), "") for t in tiles]
    try:
        ids, mask = processor.encode_conversation(sample.messages, stand_ins)
    except MM1Error as e:
        raise BadRecord(str(e)) from None
    if len(ids) > max_length:
        raise BadRecord(f"sample is {len(ids)} tokens, longer than the maximum length {max_length}")
    if not mask_prompt:  # every text token, prompts included; never image tokens
        mask = [i != processor.image_token_id for i in ids]
    if sum(mask[1:]) == 0:
        raise BadRecord("no tokens to learn from (empty assistant turn)")
    return Encoded(ids, mask, sample.images, sample.where)


def data_files(data: str | None, valid: str | None) -> tuple[Path, Path | None]:
    """(training, validation) files of ``--data`` / ``--valid``, checked before the (slow) model
    load; ``--data DIR`` is mlx-lm's layout, DIR/train.jsonl and DIR/valid.jsonl (used unless
    ``valid`` names another)."""
    if not data:
        raise MM1Error("no training data: pass --data FILE or a directory with train.jsonl")
    data, valid = Path(data).expanduser(), valid and Path(valid).expanduser()
    if data.is_dir():
        if not (data / "train.jsonl").is_file():
            raise MM1Error(f"--data {data} is a directory without train.jsonl (mlx-lm's "
                           "layout: train.jsonl, optionally valid.jsonl)")
        if valid is None and (data / "valid.jsonl").is_file():
            valid = data / "valid.jsonl"
        data = data / "train.jsonl"
    for name, f in (("data", data), ("valid", valid)):
        if f and not f.is_file():
            raise MM1Error(f"--{name} file not found (or not a regular file): {f}")
    return data, valid


def load_dataset(path: str | Path, processor: Processor, max_length: int, mask_prompt: bool = True,
                 on_bad_data: str = "skip", progress: bool = False
                 ) -> tuple[list[Encoded], list[str]]:
    """Read, check and tokenize a data file: (encoded samples, problems); ``progress``: a bar on
    stderr (every image is opened).

    ``on_bad_data="fail"`` raises MM1Error at the first problem; ``"skip"`` leaves bad records
    out and returns their problems for reporting.
    """
    if on_bad_data not in ("skip", "fail"):
        raise MM1Error(f"--on-bad-data takes skip or fail, got {on_bad_data!r}")
    from tqdm import tqdm

    samples, problems = read_samples(path)
    out = []
    for s in tqdm(samples, desc=f"reading {Path(path).name}", unit="sample", leave=False,
                  disable=not progress, dynamic_ncols=True):
        try:
            out.append(encode(s, processor, max_length, mask_prompt))
        except BadRecord as e:
            problems.append(f"{s.where}: {e}")
    if problems and on_bad_data == "fail":
        raise MM1Error(f"bad data: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if not out:
        raise MM1Error(f"no usable samples in {path}"
                       + (f"; first problem: {problems[0]}" if problems else ""))
    return out, problems


def report_problems(problems: list[str], name: str, listed_in: str) -> None:
    """The skipped records of the ``name`` data on stderr: the first ten, and where all are."""
    if not problems:
        return
    print(f"skipped {len(problems)} bad record(s) in the {name} data:", file=sys.stderr)
    for p in problems[:10]:
        print(f"  {p}", file=sys.stderr)
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more (all listed in {listed_in})", file=sys.stderr)


def batch_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Sample indices of global batch ``step``: epochs of seeded shuffles, a pure function of step."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(perms[epoch])
        out.append(perms[epoch][i])
    return out


def prepare_pixels(items: list[Encoded], processor: Processor, seeds: list[str] | None = None
                   ) -> np.ndarray | None:
    """Pixels of every image of ``items`` in order (the same tiles ``encode`` counted); with
    ``seeds`` (one per item), each image is a random variation (``augment``) drawn from its seed."""
    px = []
    for j, e in enumerate(items):
        for k, f in enumerate(e.images):
            try:
                img = load_image(f, processor.image.max_pixels)
                if seeds is not None:
                    img = augment(img, random.Random(f"{seeds[j]}:{k}"))
                px.append(processor.prepare_image(img).pixels)
            except MM1Error as err:
                raise MM1Error(f"{e.where}: {err}") from None
    return np.concatenate(px) if px else None
