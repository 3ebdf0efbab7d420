"""The one exception the data pipeline raises for bad input, and the counter of skipped records."""

from collections import Counter

from internlm2.errors import UserError


class DataError(UserError):
    """Bad input to the data pipeline: a corrupt shard, a malformed record, a missing file, a bad option.

    The message names the file (and line, for JSONL) and what is wrong with it."""


class Skips:
    """Records that were left out, counted by reason, keeping the first example of each.

    With `fail=True` a recorded problem raises `DataError` at once instead (`--on-error fail`); empty
    documents are never fatal (`fatal=False`), they are only counted."""

    def __init__(self, fail: bool):
        self.fail = fail
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def record(self, reason: str, where: str, detail: str, fatal: bool = True) -> None:
        if fatal and self.fail:
            raise DataError(f"{where}: {detail}")
        self.counts[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}")

    def merge(self, counts: dict[str, int], examples: dict[str, str]) -> None:
        self.counts.update(counts)
        for reason, example in examples.items():
            self.examples.setdefault(reason, example)

    def summary(self) -> str:
        """One line per reason: count and first example; empty string when nothing was skipped."""
        return "\n".join(
            f"  skipped {n} ({reason}), first: {self.examples[reason]}" for reason, n in sorted(self.counts.items())
        )
