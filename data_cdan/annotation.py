"""Streaming reader of R2Gen's `annotation.json` (`{"train": [...], "val": [...], "test": [...]}`)."""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import CdanDataError, canonical_split


_WHITESPACE = re.compile(r"[ \t\r\n]*")
_JSON_DECODER = json.JSONDecoder()


class _JsonTextStream:
    """A UTF-8 text file read in chunks, from which JSON values are decoded one at a time."""

    def __init__(self, file, path: Path, chunk_chars: int):
        self.file = file
        self.path = path
        self.chunk_chars = chunk_chars
        self.buffer = ""
        self.position = 0
        self.offset = 0
        self.at_end = False

    def error(self, message: str, position: int | None = None) -> CdanDataError:
        where = self.offset + (self.position if position is None else position)
        return CdanDataError(
            f"{self.path} is not an R2Gen annotation file: {message} at character {where}.",
            problem="bad_report",
            path=str(self.path),
        )

    def read_more(self) -> bool:
        if self.at_end:
            return False
        try:
            chunk = self.file.read(self.chunk_chars)
        except UnicodeDecodeError as error:
            raise CdanDataError(f"{self.path} is not valid UTF-8: {error}.", path=str(self.path)) from error
        if not chunk:
            self.at_end = True
            return False
        self.buffer = self.buffer[self.position :] + chunk
        self.offset += self.position
        self.position = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace (the position is then on it)."""
        if self.at_file_end():
            raise self.error("unexpected end of file")
        return self.buffer[self.position]

    def at_file_end(self) -> bool:
        """Whether only whitespace is left in the file (the position is then past it)."""
        while True:
            self.position = _WHITESPACE.match(self.buffer, self.position).end()
            if self.position < len(self.buffer):
                return False
            if not self.read_more():
                return True

    def take(self, expected: str) -> str:
        character = self.peek()
        if character not in expected:
            wanted = " or ".join(repr(item) for item in expected)
            raise self.error(f"expected {wanted}, found {character!r}")
        self.position += 1
        return character

    def decode(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.buffer, self.position)
                if end < len(self.buffer) or self.at_end:
                    self.position = end
                    return value
            except json.JSONDecodeError as error:
                if self.at_end:
                    raise self.error(f"invalid JSON ({error.msg})", error.pos) from None
            self.read_more()


def iter_r2gen_annotation(path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, int, Any]]:
    """
    Stream the entries of an R2Gen `annotation.json` (`{"train": [...], "val": [...], "test": [...]}`).

    Memory stays bounded by the largest entry and `chunk_chars`, whatever the number of entries (MIMIC-CXR's file
    has ~270k); entries are decoded one at a time with `json.JSONDecoder.raw_decode`.

    Args:
        path (`str` or `os.PathLike`): the annotation file (UTF-8).
        chunk_chars (`int`, *optional*): characters read at a time.

    Yields:
        `tuple[str, int, Any]`: the split key as written in the file, the entry's index in that split, the entry.

    Raises:
        `CdanDataError`: the file is not valid UTF-8 JSON in this layout, or has text after its closing `}` (the
            message names the file and position), or holds no entry at all.
    """
    path = Path(path)
    entry_count = 0
    with open(path, encoding="utf-8") as file:
        stream = _JsonTextStream(file, path, chunk_chars)
        stream.take("{")
        closed = stream.peek() == "}"
        if closed:
            stream.take("}")
        while not closed:
            key = stream.decode()
            if not isinstance(key, str):
                raise stream.error("expected a split name")
            stream.take(":")
            stream.take("[")
            index = 0
            if stream.peek() == "]":
                stream.take("]")
            else:
                while True:
                    yield key, index, stream.decode()
                    index += 1
                    entry_count += 1
                    if stream.take(",]") == "]":
                        break
            closed = stream.take(",}") == "}"
        if not stream.at_file_end():
            raise stream.error("text after the closing '}' (remove it; is the file two files joined?)")
    if entry_count == 0:
        raise CdanDataError(
            f"No studies found in {path}: every split list is empty or missing. Pass an R2Gen annotation file "
            '{"train": [...], "val": [...], "test": [...]} with at least one entry.',
            path=str(path),
        )


def annotation_entry_split(key: str, entry: Any) -> tuple[str | None, str | None]:
    """
    The canonical split of an annotation entry: that of the key it is filed under.

    Returns:
        `tuple[str | None, str | None]`: the split (None for an unknown key) and, when the entry's own `split` field
        names another split than its key, the message of that `unknown_split` problem (the split is then None).
    """
    key_split = canonical_split(key)
    if key_split is None or not isinstance(entry, dict) or "split" not in entry:
        return key_split, None
    if canonical_split(entry["split"]) == key_split:
        return key_split, None
    disagreement = (
        f"the entry's split field {entry['split']!r} disagrees with the key {key!r} it is filed under; "
        "file the entry under the key of its split, or correct its split field"
    )
    return None, disagreement


__all__ = ["annotation_entry_split", "iter_r2gen_annotation"]
