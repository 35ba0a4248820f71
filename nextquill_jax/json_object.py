"""Reading a JSON file that must hold one object (a model's config.json, a safetensors index, a PEFT
adapter_config.json), with errors that name the file, what is wrong and the fix; and values made writable
as strict JSON (`nonfinite_to_null`).

Imports nothing of this package, so any layer may name it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object `path` holds.

    `fix`: the sentence that follows "Fix: " in an error (what the user does about a damaged file).

    Raises:
        ValueError: `path` is not valid JSON (or not UTF-8 text), or holds a JSON value other than an object;
            the message names the file, the problem (the parser's, with its line and column) and `fix`.
        OSError: `path` cannot be read (FileNotFoundError where it does not exist).
    """
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: {fix}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a JSON object. Fix: {fix}")
    return content


def nonfinite_to_null(value: Any) -> Any:
    """`value` (numbers nested in dicts, lists and tuples) with every non-finite float replaced by None, as
    metrics.jsonl, compare_done.json and a prepared split's `<split>.jsonl` write it: `json.dumps` would write
    NaN / Infinity, which is not JSON and which strict readers (jq, JavaScript) refuse. Other values are
    returned as they are."""
    if isinstance(value, Mapping):
        return {k: nonfinite_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nonfinite_to_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
