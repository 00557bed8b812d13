"""Checking values read from files (config.json, adapter_config.json, preprocessor_config.json):
type and range per field, one line naming the file, the field, the value and what is allowed."""

from __future__ import annotations

import json
import math
import typing

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MM1Error


class ConfigError(MM1Error):
    """A file's field of the wrong type or out of range."""


def read_json(file):
    """A JSON file's value, or an MM1Error naming the file (not UTF-8, bad JSON, too deep)."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise MM1Error(f"{file} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MM1Error(f"bad JSON in {file}: {e}") from None
    except RecursionError:
        raise MM1Error(f"bad JSON in {file}: nested too deeply") from None
    except IsADirectoryError:
        raise MM1Error(f"{file} is a directory, not a JSON file") from None


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def need(ok: bool, where, field: str, value, allowed: str) -> None:
    if not ok:
        name = f"{field} = {show(value)}" if field else f"{show(value)}"
        raise ConfigError(f"{where}: {name}: must be {allowed}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(value, typ, rule, where, field: str) -> None:
    """``value`` of type ``typ`` (int, float, bool, str, list, dict, optional) and in ``rule``:
    (lo, hi) for numbers (None = open), or a collection of allowed values."""
    args = typing.get_args(typ)
    if value is None and type(None) in args:
        return
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    base = typing.get_origin(base) or base
    if base is int:
        need(is_int(value), where, field, value, "an integer")
    elif base is float:
        need(is_number(value), where, field, value, "a finite number")
    elif base is bool:
        need(isinstance(value, bool), where, field, value, "true or false")
    elif base in (str, list, dict):
        need(isinstance(value, base), where, field, value,
             {str: "a string", list: "a list", dict: "an object"}[base])
    if rule is None:
        return
    if isinstance(rule, tuple) and len(rule) == 2 and not isinstance(value, str):
        lo, hi = rule
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
        need(ok, where, field, value, f"between {lo} and {hi}" if lo is not None and hi is
             not None else (f"at least {lo}" if lo is not None else f"at most {hi}"))
    elif not isinstance(rule, tuple):
        need(value in rule, where, field, value, f"one of {', '.join(map(str, sorted(rule)))}")


def check_fields(d: dict, where, prefix: str, spec: dict) -> None:
    """Required fields of ``d``: name -> (type, lo, hi)."""
    for name, (typ, lo, hi) in spec.items():
        field = f"{prefix}.{name}" if prefix else name
        need(name in d, where, field, None, f"present ({typ.__name__})")
        check_value(d[name], float if typ is float else typ,
                    None if lo is None and hi is None else (lo, hi), where, field)


def check_dtypes(model, weights: dict) -> None:
    """A floating parameter needs floating weights (not int, bool or complex), a packed one
    (quantized) the same integer type: else the model would load and compute garbage."""
    params = dict(tree_flatten(model.parameters()))
    for k, w in weights.items():
        p = params.get(k)
        if p is None:
            continue  # load_weights(strict) names it
        floating = mx.issubdtype(p.dtype, mx.floating)
        if floating != mx.issubdtype(w.dtype, mx.floating) or (not floating and w.dtype != p.dtype):
            raise MM1Error(f"weight {k} is {w.dtype}, the model needs "
                           f"{'a floating type' if floating else p.dtype}")
