import contextlib
import io
import json
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import pytest

# The suite runs in two xdist workers on two cores: OpenMP threads that spin while they wait would slow both 5x
# (docs/benchmarks.md, a shared CPU); set before any test imports torch, and inherited by the scripts run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the single-file scripts (train_grpo.py, ...) import as modules
DATA_DIR = REPO.parent / "shared" / "data"
HOTPOT_HF = DATA_DIR / "hotpotqa_dev_distractor_100.json"
HOTPOT_OFFICIAL = DATA_DIR / "hotpotqa_dev_distractor_official_53.json"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


SFT_TINY = ["--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300", "--num-train-episodes", "4",
            "--num-envs", "2", "--num-epochs", "1", "--batch-size", "4", "--eval-episodes", "2",
            "--eval-context-tokens", "300", "--eval-max-new-tokens", "8"]


def run_script(script: str, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python script flags...` in the repository, its output captured."""
    return subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_script_here(script: str, *flags: str) -> subprocess.CompletedProcess:
    """`script flags...` run in this process as `__main__` (runpy), its exit code and output as `run_script` gives
    them: for runs that a flag check ends before any model work, without the ~2.5 s a fresh interpreter spends
    importing torch. An exception the script does not catch is a traceback on stderr and exit code 1, as there."""
    out, err, argv, cwd, code = io.StringIO(), io.StringIO(), sys.argv, os.getcwd(), 0
    sys.argv = [script, *flags]
    sys.path.insert(0, str((REPO / script).parent))  # as `python script` puts the script's folder first
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as exit_:
                if isinstance(exit_.code, int) or exit_.code is None:
                    code = exit_.code or 0
                else:
                    code = 1
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  (what a subprocess would print)
                code = 1
                traceback.print_exc()
    finally:
        sys.argv = argv
        sys.path.pop(0)
        os.chdir(cwd)
    return subprocess.CompletedProcess([script, *flags], code, out.getvalue(), err.getvalue())


def run_summary(save_dir: Path):
    """(run directory, its summary.json) of the one run a trainer wrote under save_dir."""
    (run,) = [p for p in save_dir.iterdir() if p.is_dir()]
    return run, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """One tiny SFT run for the whole session (train_sft.py on SyntheticEasy-v0 at 300 tokens): (checkpoint, the
    teacher samples it saved). Tests only read it."""
    save_dir = tmp_path_factory.mktemp("sft")
    traj = save_dir / "traj.jsonl"
    result = run_script("train_sft.py", *SFT_TINY, "--save-dir", str(save_dir), "--save-trajectories", str(traj))
    assert result.returncode == 0, result.stderr[-3000:]
    run, summary = run_summary(save_dir)
    assert summary["teacher_em"] == 1.0 and summary["steps"] >= 1 and "300" in summary["eval"]
    assert 0 < summary["train_seconds"] and summary["train_tokens_per_second"] > 0
    assert list(run.glob("events.out.tfevents.*"))
    return run / "checkpoint", traj


@pytest.fixture(scope="session")
def hotpot_path() -> Path:
    if not HOTPOT_HF.is_file():
        pytest.fail(f"the shared HotpotQA sample is missing: expected {HOTPOT_HF} (../shared beside the checkout)")
    return HOTPOT_HF


@pytest.fixture(scope="session")
def vllm_serve(tmp_path_factory):
    """`vllm serve` on 127.0.0.1 with the tiny model, served as "tiny": its OpenAI-compatible base URL."""
    pytest.importorskip("vllm")
    from agents.vllm_backend import hf_directory

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path_factory.mktemp("vllm_serve")
    log = open(directory / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_directory("tiny"),
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--gpu-memory-utilization", "0.3", "--enforce-eager"],  # the protocol is tested, not compilation: ~25 s less
        cwd=directory, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (directory / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
