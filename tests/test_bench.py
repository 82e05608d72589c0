import subprocess
import sys

from torch.utils.tensorboard import SummaryWriter

from conftest import REPO


def _plot(*flags):
    return subprocess.run([sys.executable, "bench/plot_runs.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_plot_runs_draws_each_tag_and_prints_first_and_last_values(tmp_path):
    runs = []
    for seed, rewards in ((1, [0.1, 0.2, 0.4]), (2, [0.0, 0.5])):
        run = tmp_path / f"run{seed}"
        with SummaryWriter(str(run)) as writer:
            for step, reward in enumerate(rewards):
                writer.add_scalar("rollout/reward_mean", reward, step)
        runs.append(str(run))
    out = tmp_path / "fig.png"
    result = _plot("--runs", *runs, "--labels", "a", "b", "--tags", "rollout/reward_mean", "eval/em_400",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "a: rollout/reward_mean 0.100 (step 0) -> 0.400 (step 2), 3 points" in result.stdout
    assert "b: rollout/reward_mean 0.000 (step 0) -> 0.500 (step 1), 2 points" in result.stdout
    assert "a: no eval/em_400" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_rejects_a_directory_without_events_and_mismatched_labels(tmp_path):
    result = _plot("--runs", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "holds no TensorBoard event file" in result.stderr
    result = _plot("--runs", str(tmp_path), "--labels", "a", "b", "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "one --labels entry per run" in result.stderr
    assert not (tmp_path / "x.png").exists()
