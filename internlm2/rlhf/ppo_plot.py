"""The curves of a PPO run (`RUN_DIR/ppo.png`): reward-model score and true reward, KL to the reference
and entropy, response length, losses, clip fraction, and where the time goes. Round boundaries are dotted
vertical lines."""

from __future__ import annotations

from pathlib import Path

from internlm2.train.plot import save_figure, series

PANELS = (
    ("reward", (("rm_score", "reward-model score"), ("true_reward", "true reward (checker)"))),
    ("KL / entropy", (("kl", "KL to reference (per response)"), ("entropy", "entropy (per token)"))),
    ("tokens", (("response_length", "response length"),)),
    ("loss", (("policy_loss", "policy"), ("value_loss", "value"), ("ptx_loss", "pretraining (PTX)"))),
    ("fraction", (("clip_fraction", "clipped ratios"), ("truncated_fraction", "responses cut at max length"))),
    ("seconds", (("time_generation_s", "generation"), ("time_experience_s", "scoring"),
                 ("time_training_s", "training"))),
)


def draw_ppo(records: list[dict], out: Path, title: str, rounds_every: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.4 * len(PANELS)), sharex=True)
    try:
        last = max((r["step"] for r in records), default=0)
        for ax, (label, keys) in zip(axes, PANELS):
            for key, name in keys:
                steps, values = series(records, key)
                if steps:
                    ax.plot(steps, values, label=name)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(loc="best", fontsize=8)
            if rounds_every:
                for boundary in range(rounds_every, last, rounds_every):
                    ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        axes[0].set_title(title)
        axes[-1].set_xlabel("iteration")
        save_figure(fig, out, dpi=100)
    finally:
        plt.close(fig)
