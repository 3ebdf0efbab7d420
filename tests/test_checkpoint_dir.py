import pytest

from internlm2.train.checkpoint_dir import CheckpointDirectory, CheckpointError, check_writable


def write_files(payload):
    def write(d):
        (d / "model.bin").write_bytes(payload)
        (d / "state.json").write_text("{}")

    return write


def test_save_keeps_the_last_k_complete_checkpoints(tmp_path):
    ckpt = CheckpointDirectory(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save(step, write_files(str(step).encode()))
    assert [s for s, _ in ckpt.complete()] == [20, 30]
    assert (ckpt.latest() / "model.bin").read_bytes() == b"30"
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_midway_through_a_save_leaves_the_previous_checkpoint_latest(tmp_path):
    ckpt = CheckpointDirectory(tmp_path, keep=3)
    ckpt.save(10, write_files(b"good"))

    def crash(d):
        (d / "model.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save(20, crash)
    assert ckpt.latest().name == "step_00000010"
    assert (ckpt.latest() / "model.bin").read_bytes() == b"good"
    assert (tmp_path / ".tmp-step_00000020").exists()  # never taken for a checkpoint...
    ckpt.remove_incomplete()  # ...and cleaned at the next start
    assert not (tmp_path / ".tmp-step_00000020").exists()
    ckpt.save(20, write_files(b"retry"))
    assert (ckpt.latest() / "model.bin").read_bytes() == b"retry"


def test_stray_directories_are_not_checkpoints(tmp_path):
    (tmp_path / "step_notanumber").mkdir()
    (tmp_path / "step_00000005").write_text("a file, not a directory")
    assert CheckpointDirectory(tmp_path).latest() is None


def test_bad_keep_and_unwritable_or_full_directories_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="keep must be >= 1"):
        CheckpointDirectory(tmp_path, keep=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        check_writable(blocker / "run", 1)
    with pytest.raises(CheckpointError, match="GiB free but one checkpoint needs"):
        check_writable(tmp_path / "run", 1 << 62)
