"""A checkpoint written under (tp=2, pp=2) continues under other layouts: one process, and dp=2.

Runs torchrun with CPU gloo processes; the continued losses must match the original run's own next steps."""

import pytest

from tests.train.tiny_run import losses, make_data, run_pretrain, tiny_config, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


def test_tp2_pp2_checkpoint_resumes_on_one_process_and_on_dp2(data_dir, tmp_path):
    source_run = tmp_path / "tp2pp2"
    cfg = tiny_config(data_dir, source_run, parallel={"tp": 2, "pp": 2, "sequence_parallel": True},
                      **{"checkpoint.every": 3})
    run_pretrain(write_config(cfg, tmp_path / "a.yaml"), nproc=4)
    original = losses(source_run)
    assert sorted(original) == list(range(1, 11))
    checkpoint = source_run / "checkpoints" / "step_00000006"  # the end of the first stage
    for name, layout, nproc in [("single", {}, 1), ("dp2", {"dp": 2}, 2)]:
        run_dir = tmp_path / name
        cfg = tiny_config(data_dir, run_dir, parallel=layout, **{"checkpoint.load": str(checkpoint)})
        run_pretrain(write_config(cfg, tmp_path / f"{name}.yaml"), nproc=nproc)
        continued = losses(run_dir)
        assert sorted(continued) == list(range(7, 11)), name
        for step in range(7, 11):
            assert abs(continued[step] - original[step]) <= 1e-5, (name, step, continued[step], original[step])
