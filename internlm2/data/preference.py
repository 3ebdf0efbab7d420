"""Preference pairs (reward model) and prompts (PPO) from JSONL, rendered in ChatML.

Preference record: `{"prompt": ..., "chosen": ..., "rejected": ..., "condition": "code"}` where the
prompt is a string (one user turn) or a list of messages ending with a user or environment turn, the
responses are a string (one assistant turn) or a list of messages starting with an assistant turn, and
the optional condition names the domain of a conditional reward model. Prompt record:
`{"prompt": ..., "condition": ...}`.

A condition is rendered as a system message put first, with text from the `condition_prompts` mapping
the caller gives (the RLHF stage owns those texts); prompts keep the condition as metadata only, since
the actor never sees it and only the reward model does.

Files are checked when opened (bad records fail or are counted, as for corpus preparation, with file and
line); only the byte offsets of good records are kept, and records are read and tokenized on access.
"""

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import Dataset

from internlm2.data.chat import ChatFormatError, Message, check_order, parse_messages, render
from internlm2.data.errors import DataError, Skips
from internlm2.data.sources import InputFile, Span, read_records
from internlm2.data.tokenizer import Tokenizer


def _turns(value, default_role: str, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        return [Message(default_role, value)]
    return parse_messages(value, f"{where} {field}")


class _JsonlRecords(Dataset):
    """Good records of a JSONL file, checked by `parse` when opened and parsed again on access."""

    def __init__(self, path: str | os.PathLike, on_error: str):
        if on_error not in ("fail", "skip"):
            raise DataError(f"on_error {on_error!r}: expected 'fail' or 'skip'")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        self.path = str(path)
        self.skips = Skips(on_error == "fail")
        self._offsets, self._where = [], []
        for where, record in read_records(Span(InputFile.of(path), 0, path.stat().st_size), self.skips):
            try:
                self.parse(record, where)  # a Location: printed (its line counted) only in an error
            except (ChatFormatError, DataError) as e:
                self.skips.record("bad_record", str(where), str(e).removeprefix(f"{where}: "))
                continue
            self._offsets.append(where.offset)
            self._where.append(where)  # a Location: its line is counted only if printed
        if not self._offsets:
            raise DataError(f"{path}: no usable records\n{self.skips.summary()}")

    def parse(self, record, where: str):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, i: int) -> str:
        """The file and line of good record `i`, for messages."""
        return str(self._where[i])

    def raw(self, i: int):
        """Good record `i` as its JSON value (with any fields beyond the ones parsed, e.g. a PPO checker's
        reference answer)."""
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            return json.loads(f.readline())

    def record(self, i: int):
        return self.parse(self.raw(i), self._where[i])


class PreferenceDataset(_JsonlRecords):
    """Items: `chosen_ids`, `rejected_ids` (int64, ChatML with BOS), `chosen_mask`, `rejected_mask`
    (bool, the response tokens), `condition` (str or None)."""

    def __init__(self, path, tokenizer: Tokenizer, condition_prompts: Mapping[str, str] | None = None,
                 on_error: str = "fail"):
        self.tokenizer, self.condition_prompts = tokenizer, dict(condition_prompts or {})
        super().__init__(path, on_error)

    def parse(self, record, where: str):
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
            raise DataError(f"{where}: a preference record needs prompt, chosen and rejected")
        condition = record.get("condition")
        if condition is not None and condition not in self.condition_prompts:
            raise DataError(f"{where}: condition {condition!r} has no system prompt (known: "
                            f"{sorted(self.condition_prompts)})")
        prefix = [] if condition is None else [Message("system", self.condition_prompts[condition])]
        prompt = prefix + _turns(record["prompt"], "user", where, "prompt")
        check_order(prompt, ("user", "environment"), f"{where} prompt")
        pair = []
        for field in ("chosen", "rejected"):
            conversation = prompt + _turns(record[field], "assistant", where, field)
            check_order(conversation, ("assistant",), f"{where} {field}")
            pair.append(conversation)
        return pair, condition

    def __getitem__(self, i: int) -> dict:
        (chosen, rejected), condition = self.record(i)
        item = {"condition": condition}
        for name, conversation in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = render(conversation, self.tokenizer)
            item[f"{name}_ids"] = torch.tensor(ids, dtype=torch.int64)
            item[f"{name}_mask"] = torch.tensor(mask, dtype=torch.bool)
        return item


class PromptDataset(_JsonlRecords):
    """Items: `prompt_ids` (int64, ChatML with BOS, ending `<|im_start|>assistant\\n` for generation),
    `messages` (the prompt's `Message`s), `condition` (str or None, for the reward model only)."""

    def __init__(self, path, tokenizer: Tokenizer, on_error: str = "fail"):
        self.tokenizer = tokenizer
        super().__init__(path, on_error)

    def parse(self, record, where: str):
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{where}: a prompt record needs a prompt")
        condition = record.get("condition")
        if condition is not None and not isinstance(condition, str):
            raise DataError(f"{where}: condition must be a string, got {condition!r}")
        messages = _turns(record["prompt"], "user", where, "prompt")
        check_order(messages, ("user", "environment"), f"{where} prompt")
        return messages, condition

    def __getitem__(self, i: int) -> dict:
        messages, condition = self.record(i)
        ids, _ = render(messages, self.tokenizer, generation_prompt=True)
        return {"prompt_ids": torch.tensor(ids, dtype=torch.int64), "messages": messages, "condition": condition}
