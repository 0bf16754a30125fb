"""Prompts to answer: rows with a ``prompt`` (text or messages) and whatever
else a scorer needs, read and checked like preference data, and their token
ids under the chat template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsa_mlx.tuner.data import Pair, encode_prompt
from rsa_mlx.tuner.sources import parse_prompt, read_rows, text_field
from rsa_mlx.util.errors import DataError, quote

__all__ = ["PromptRecord", "prompt_ids", "read_prompts"]


@dataclass
class PromptRecord:
    """A prompt to answer, with whatever else its row held (for scorers)."""

    prompt: str | tuple[dict, ...]
    system: str | None = None
    meta: dict | None = None
    where: str = ""  # "file:line", for messages

    def location(self, index: int | None = None) -> str:
        if self.where:
            return self.where
        return f"prompt row {index + 1}" if index is not None else "a prompt"

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt if m.get("role") == "user")


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Rows with a ``prompt`` field (text or messages) from a .jsonl (or
    .json, maybe compressed) file, checked like preference data."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{quote(path)}: a folder, not a prompt file")
    if not path.exists():
        raise DataError(f"{quote(path)}: no such prompt file")
    records = []
    for row, where in read_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        prompt = parse_prompt(row, where)
        system = text_field(row, "system", where, optional=True)
        records.append(PromptRecord(prompt, system, row, where))
    if not records:
        raise DataError(f"{quote(path)}: no prompts")
    return records


def prompt_ids(tokenizer, record: PromptRecord) -> list[int]:
    return encode_prompt(tokenizer, Pair(record.prompt, "", "", record.system))
