"""Runs a trainer script as __main__ with two probes, for tests of what only a real run shows:

    python tests/trace_trainer.py train_sft.py --flags ...   (or under torchrun)

- the time-out each process group is created with: `TRACE process_group_timeout_s=<seconds or None>`;
- every held-out evaluation's share of this process: `TRACE rank=<r> evaluation_episodes=<n>`;
- every GRPO sample the loss scores (`agents.training.token_logprobs` once its old log-probs are set, as in the
  update): `TRACE loss_sample=<json>` with its token ids, sampler log-probs, advantage and weight.
"""

import json
import os
import runpy
import sys
from pathlib import Path

import torch.distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents.evaluation  # noqa: E402
import agents.training  # noqa: E402

_init_process_group = torch.distributed.init_process_group


def traced_init_process_group(*args, **kwargs):
    timeout = kwargs.get("timeout")
    print(f"TRACE process_group_timeout_s={timeout.total_seconds() if timeout else None}", flush=True)
    return _init_process_group(*args, **kwargs)


_run_episodes = agents.evaluation.run_episodes
_evaluate_and_log = agents.training.evaluate_and_log


def traced_evaluate_and_log(*args, **kwargs):
    counts = []

    def counted(*a, **k):
        records = _run_episodes(*a, **k)
        counts.append(len(records))
        return records

    agents.evaluation.run_episodes = counted  # evaluate_and_log imports it when called
    try:
        return _evaluate_and_log(*args, **kwargs)
    finally:
        agents.evaluation.run_episodes = _run_episodes
        print(f"TRACE rank={os.environ.get('RANK', '0')} evaluation_episodes={sum(counts)}", flush=True)


_token_logprobs = agents.training.token_logprobs


def traced_token_logprobs(scorer, samples, *args, **kwargs):
    for s in samples:
        if getattr(s, "old_logprobs", None) is None:
            continue
        print("TRACE loss_sample=" + json.dumps({
            "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "sampler_logprobs": s.sampler_logprobs,
            "advantage": s.advantage, "weight": s.weight}), flush=True)
    return _token_logprobs(scorer, samples, *args, **kwargs)


torch.distributed.init_process_group = traced_init_process_group
agents.training.token_logprobs = traced_token_logprobs
agents.training.evaluate_and_log = traced_evaluate_and_log  # before the script imports it
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
