"""Checkpoint directories that are complete or absent, never half-written.

Every rank writes into `<root>/.tmp-step_<n>`; only after all ranks finished (a barrier) does rank 0 make it
durable (fsync) and rename it to `<root>/step_<n>` in one atomic `os.rename`. A directory named `step_<n>`
is therefore always complete, and `latest()` only ever looks at those. A crash or exception mid-save
leaves a `.tmp-*` directory that the next start removes, and the previous checkpoint stays the latest.
After each successful save the oldest checkpoints beyond `keep` are deleted.

What goes inside (model and optimizer through torch.distributed.checkpoint, trainer state, RNG states) is
the caller's business: `save(step, write)` calls `write(tmp_dir)` on every rank.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from internlm2.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8,})$")




class CheckpointDirectory:
    def __init__(self, root: str | Path, keep: int = 3, rank: int = 0, barrier: Callable[[], None] = lambda: None):
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def remove_incomplete(self) -> None:
        """Deletes leftovers of interrupted saves (rank 0; call at start-up before any save)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it; `write(tmp_dir)` writes this rank's part."""
        final = self.root / self.step_name(step)
        tmp = self.root / f".tmp-{self.step_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        write(tmp)
        self.barrier()
        if self.rank == 0:
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. after resuming from it): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)


def check_writable(directory: str | Path, needed_bytes: int) -> None:
    """Fails before training starts if `directory` cannot be written or lacks space for one checkpoint."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"run directory {directory} is not writable: {err}") from err
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise CheckpointError(
            f"run directory {directory} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
            f"{needed_bytes / 2**30:.2f} GiB"
        )


def ready_run_directory(run_dir: Path, config, needed_bytes: int, rank: int,
                        from_rank0: Callable[[object], object]) -> None:
    """Before training: rank 0 checks that `run_dir` is writable with room for one checkpoint and saves the
    resolved config there; every rank gets its verdict (`from_rank0`), so all stop at once with the reason
    instead of waiting for a collective's timeout."""
    from internlm2.config import save_yaml

    problem = None
    if rank == 0:
        try:
            check_writable(run_dir, needed_bytes)
            save_yaml(config, run_dir / "config.yaml")
        except (CheckpointError, OSError) as err:
            problem = str(err)
    problem = from_rank0(problem)
    if problem is not None:
        raise CheckpointError(problem)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
