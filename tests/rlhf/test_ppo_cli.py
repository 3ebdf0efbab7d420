"""`internlm2 ppo` end to end: SIGKILL mid-run and resume gives the same later rollouts and losses (across
a fast path that patched the reward model), tp=2 and dp=2 under torchrun equal one process, rounds log
their patterns, pairs and reward-model accuracy, and bad configs are one-line errors before any work."""

import json
import os
import subprocess

import pytest

from tests.rlhf.ppo_world import ROOT, make_world, metrics, ppo_command, ppo_config, responses, run_ppo
from tests.train.test_trainer import _kill_when  # SIGKILL once metrics.jsonl has logged a step
from tests.train.tiny_run import write_config

ROUNDS = {"rounds": 2, "ppo.iterations": 3, "fast_path.detectors.custom": ["tests.rlhf.ppo_world:parity_detector"],
          "fast_path.min_pairs": 2, "fast_path.rm_steps": 4, "fast_path.rm_pairs_per_step": 4,
          "fast_path.rm_lr": 1.0e-3, "fast_path.detectors.window": 0.5}
COMPARED = ("rm_score", "true_reward", "kl", "entropy", "response_length", "value_loss", "policy_loss", "ptx_loss",
            "clip_fraction", "actor_grad_norm", "critic_grad_norm")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ppo_world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The uninterrupted two-round run on one process."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_ppo(write_config(ppo_config(world, run_dir, **ROUNDS), run_dir.parent / "c.yaml"))
    return run_dir


def _learned(m: dict) -> dict:
    return {k: m[k] for k in COMPARED if k in m}


def test_rounds_log_patterns_pairs_and_a_patched_reward_model(reference):
    rounds = [json.loads(x) for x in (reference / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]  # the fast path runs between rounds, not after the last
    (pattern,) = rounds[0]["patterns"]
    assert pattern["name"] == "even text" and pattern["patched"] and pattern["pairs"] == rounds[0]["pairs"] >= 2
    pairs = [json.loads(x) for x in (reference / "rounds" / "round_1" / "patch_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == rounds[0]["pairs"]
    for pair in pairs:  # chosen: without the pattern (early); rejected: with it (late)
        assert sum(map(ord, pair["chosen"])) % 2 == 1 and sum(map(ord, pair["rejected"])) % 2 == 0
    rm = rounds[0]["reward_model"]
    assert rm["accuracy_after"]["patch_pairs"] > rm["accuracy_before"]["patch_pairs"]
    assert sorted({r["iteration"] for r in responses(reference)}) == list(range(1, 7))
    m = metrics(reference)
    assert sorted(m) == list(range(1, 7)) and [m[i]["round"] for i in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert (reference / "ppo.png").stat().st_size > 0  # the curves, drawn at the end
    # rewards are normalised by running statistics of the clipped scores, started afresh for the patched model
    scores = {i: [max(-5.0, min(5.0, r["score"])) for r in responses(reference) if r["iteration"] == i]
              for i in range(1, 7)}
    for step, seen in ((3, [1, 2, 3]), (4, [4]), (6, [4, 5, 6])):
        values = [x for i in seen for x in scores[i]]
        assert m[step]["score_mean"] == pytest.approx(sum(values) / len(values), rel=1e-6), step


def test_sigkill_then_resume_gives_the_same_rollouts_and_losses(world, reference, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(ppo_config(world, run_dir, **ROUNDS), tmp_path / "c.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(ppo_command(config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _kill_when(proc, run_dir, 5)  # in round 2: the resumed run needs the patched reward model
    assert max(metrics(run_dir)) < 6
    resumed = run_ppo(config)
    assert "resumed from" in resumed.stdout
    assert responses(run_dir) == responses(reference)
    got, want = metrics(run_dir), metrics(reference)
    assert sorted(got) == sorted(want)
    for step in want:
        assert _learned(got[step]) == _learned(want[step]), step
    assert (run_dir / "rounds.jsonl").read_text() == (reference / "rounds.jsonl").read_text()


@pytest.mark.parametrize("layout", [{"tp": 2}, {"dp": 2}], ids=["tp2", "dp2"])
def test_two_ranks_equal_one_process(world, reference, tmp_path, layout):
    run_dir = tmp_path / "run"
    config = write_config(ppo_config(world, run_dir, **ROUNDS, parallel=layout), tmp_path / "c.yaml")
    run_ppo(config, nproc=2)
    assert [r["text"] for r in responses(run_dir)] == [r["text"] for r in responses(reference)]
    got, want = metrics(run_dir), metrics(reference)
    for step in want:
        for key, value in _learned(want[step]).items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.pp": 2}, "parallel.pp=2: PPO's rollouts generate on the whole actor"),
    ({"parallel.cp": 2}, "parallel.cp=2: generation's KV cache does not split sequences"),
    ({"rollout.prompts_per_iteration": 6}, "rollout.generation_batch_size=4 does not divide the 6 prompts"),
    ({"rollout.prompts_per_iteration": 12, "rollout.micro_batch_size": 5},
     "rollout.micro_batch_size=5 does not divide the 12 prompts"),
    ({"ppo.mini_batches": 3}, "ppo.mini_batches=3 does not divide the 4 micro-batches per rank"),
    ({"checker": "tests.rlhf.ppo_world:no_such_function"}, "checker: cannot load"),
    ({"rollout.temperature": 0.0}, "rollout.temperature: PPO samples its rollouts"),
])
def test_bad_configs_are_one_line_errors(world, tmp_path, overrides, message):
    config = write_config(ppo_config(world, tmp_path / "run", **overrides), tmp_path / "c.yaml")
    result = run_ppo(config, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_models_of_the_wrong_kind_and_unknown_conditions_are_refused(world, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "ho", "condition": "poetry"}) + "\n")
    for overrides, message in (({"actor": str(world / "rm")}, "expected a causal language model"),
                               ({"reward_model": str(world / "actor")}, "expected a reward model"),
                               ({"prompts.train": str(prompts)}, f"{prompts}:2: condition 'poetry' is not one of")):
        config = write_config(ppo_config(world, tmp_path / "run", **overrides), tmp_path / "c.yaml")
        result = run_ppo(config, check=False, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
