"""Reading a JSON file that must hold one object (a model's config.json, a safetensors index, a PEFT
adapter_config.json), with errors that name the file, what is wrong and the fix.

Imports nothing of this package, so any layer may name it.
"""

from __future__ import annotations

import json
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
        content = json.loads(Path(path).read_text())
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: {fix}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a JSON object. Fix: {fix}")
    return content
