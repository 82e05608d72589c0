"""AtomMem as a verifiers (v1) environment: evaluate or train on it from prime-rl, SkyRL's verifiers integration or
the Environments Hub (`pip install -e ".[verifiers]"`; docs/verifiers.md).

- `AtomMemTaskset`: one task per task of a registered AtomMem id's split (question and gold answers in the data).
- `AtomMemHarness`: plays one episode through the Gymnasium env, in process: each step's prompt is the `llm`
  policy's (`agents.prompt.build_messages`), sent to the endpoint verifiers gives it (its interception server,
  which records every call, token ids and log-probs included, for the trainer). Each chunk is a fresh prompt, so
  one episode is several samples with one reward: prime-rl starts a new sample wherever a prompt does not extend
  the previous one.
- The reward is the env's return (EM; the official score under the paper protocol); metrics em, f1, sub_em.
- `AtomMemEnv` runs the harness on the local subprocess runtime (it executes no model-written code).

    vf-eval atommem-verifiers --env.taskset.env-id AtomMem/Synthetic-v0 -m <served model> \\
        --client.base-url http://127.0.0.1:8000/v1 --client.api-key-var OPENAI_API_KEY --no-push -n 64

A failed, timed-out or non-text model reply ends that episode (the harness exits 1 with the reason, which verifiers
keeps on the trace); the run goes on.
"""

from __future__ import annotations

import asyncio
import json

import gymnasium as gym
import verifiers.v1 as vf
from pydantic import Field

import atommem_env
from agents.backends import OpenAIGenerator
from agents.evaluation import make_env_kwargs, protocol_of
from agents.prompt import build_messages

__all__ = ["AtomMemTaskset", "AtomMemHarness", "AtomMemEnv", "load_environment"]
TASKSET_ID = "atommem-verifiers"
GENERATED_TASKS = 1000
"""Tasks listed for ids that generate their tasks (synthetic) unless num_tasks says otherwise."""


class AtomMemTaskData(vf.TaskData):
    env_id: str
    env_kwargs: dict
    """gym.make's keyword arguments, split included: the episode's env is built from these alone."""
    task_index: int
    seed: int = 0
    gold_answers: list[list[str]] = Field(default_factory=list)
    """per question"""


class AtomMemTask(vf.Task[AtomMemTaskData]):
    @vf.reward
    async def env_reward(self, trace) -> float:
        return float(trace.info["atommem"]["reward"])

    @vf.metric
    async def scores(self, trace) -> dict:
        result = trace.info["atommem"]
        return {key: float(result[key]) for key in ("em", "f1", "sub_em")}


class AtomMemTasksetConfig(vf.TasksetConfig):
    env_id: str = "AtomMem/SyntheticEasy-v0"
    """a registered AtomMem id (atommem_env.ENV_IDS)"""
    env_kwargs: dict = Field(default_factory=dict)
    """gym.make keyword arguments over the id's registered ones: data_path, embedder, context_tokens, protocol, ..."""
    split: str = "eval"
    """task split: all, train or eval"""
    num_tasks: int | None = None
    """tasks 0..N-1 of the split (None: all of a data file's split, 1000 of a generated one)"""
    seed: int = 0
    """the envs' reset seed"""


class AtomMemTaskset(vf.Taskset[AtomMemTask, AtomMemTasksetConfig]):
    def load(self):
        config = self.config
        try:
            env_kwargs = make_env_kwargs(config.env_id, split=config.split, extra=config.env_kwargs)
            env = gym.make(config.env_id, **env_kwargs)
        except (ValueError, TypeError, OSError) as err:
            raise ValueError(f"atommem-verifiers: {err}") from err
        source = env.unwrapped.task_source
        available = source.num_tasks
        count = config.num_tasks or available or GENERATED_TASKS
        if available is not None and count > available:
            raise ValueError(f"num_tasks {count} is more than the {available} tasks of the {config.split} split")
        env.close()
        for index in range(count):
            task = source.get(index)
            yield AtomMemTask(AtomMemTaskData(
                id=str(task.task_id), prompt="\n".join(q.question for q in task.questions), env_id=config.env_id,
                env_kwargs=env_kwargs, task_index=index, seed=config.seed,
                gold_answers=[list(q.answers) for q in task.questions]), config.task)


class AtomMemHarnessConfig(vf.HarnessConfig):
    id: str = TASKSET_ID
    max_new_tokens: int = Field(96, gt=0)
    """generation budget per step (eval.py --max-new-tokens); the eval's --sampling.max-tokens overrides it"""
    temperature: float = Field(0.0, ge=0)
    """sampling temperature (0: greedy); the eval's --sampling.temperature overrides it"""
    request_timeout: float = Field(60.0, gt=0)
    """seconds before a model request counts as failed"""
    max_retries: int = Field(3, ge=0)
    single_message: bool = False
    """one user message holding the system prompt and the step's prompt (the official AtomMem harness)"""
    token_ids: bool = True
    """ask for token ids and log-probs (vLLM's return_token_ids)"""


_idle_envs: dict[str, list[gym.Env]] = {}
"""Envs between episodes, by their gym.make arguments: a concurrent episode never shares one."""


def _borrow_env(data: AtomMemTaskData) -> tuple[str, gym.Env]:
    key = json.dumps([data.env_id, data.env_kwargs], sort_keys=True)
    idle = _idle_envs.setdefault(key, [])
    return key, idle.pop() if idle else gym.make(data.env_id, **data.env_kwargs)


async def play_episode(data: AtomMemTaskData, generator, single_message: bool = False) -> dict:
    """One episode of task `data` with `generator` (its async `agenerate`) writing each step's action.

    Returns the env's outcome; a failed request ends the episode with `failed` set and reward 0, as in eval.py.
    """
    protocol = protocol_of(data.env_id, json.dumps(data.env_kwargs))
    key, env = _borrow_env(data)
    try:
        obs, _ = await asyncio.to_thread(env.reset, seed=data.seed, options={"task_index": data.task_index})
        total, replies, done, info = 0.0, [], False, {}
        while not done:
            (generation,) = await generator.agenerate([build_messages(obs, protocol, single_message)])
            if generation.error:
                return {"task_id": str(env.unwrapped.task.task_id), "failed": generation.error, "reward": 0.0,
                        "em": 0.0, "f1": 0.0, "sub_em": 0.0, "replies": replies, "num_steps": len(replies) + 1}
            replies.append(generation.text)
            obs, reward, terminated, truncated, info = await asyncio.to_thread(env.step, generation.text)
            total += float(reward)
            done = terminated or truncated
        return {"task_id": info["task_id"], "failed": None, "reward": total, "em": float(info["em"]),
                "f1": float(info["f1"]), "sub_em": float(info["sub_em"]), "answers": info["answers"],
                "gold_answers": info["gold_answers"], "ops": {k: int(v) for k, v in info["op_counts"].items()},
                "invalid_ops": int(info["total_invalid_ops"]), "replies": replies, "num_steps": len(replies)}
    finally:
        _idle_envs[key].append(env)


class AtomMemHarness(vf.Harness[AtomMemHarnessConfig]):
    """Runs the episode in process: every model call goes through `endpoint` with `secret`, as the contract asks."""

    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data) -> vf.ProgramResult:
        config = self.config
        generator = OpenAIGenerator(endpoint, ctx.model, api_key=secret, max_new_tokens=config.max_new_tokens,
                                    temperature=config.temperature, timeout=config.request_timeout,
                                    max_retries=config.max_retries, token_ids=config.token_ids)
        result = await play_episode(data, generator, config.single_message)
        trace.info["atommem"] = result
        if result["failed"]:
            return vf.ProgramResult(exit_code=1, stdout="", stderr=f"episode failed: {result['failed']}")
        return vf.ProgramResult(exit_code=0, stdout=json.dumps(result["answers"]), stderr="")


class AtomMemEnvConfig(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig(runtime=vf.SubprocessConfig())
    """the one seat; the subprocess runtime by default (the harness runs no model-written code)"""


class AtomMemEnv(vf.Env[AtomMemEnvConfig]):
    async def run(self, task, agents) -> None:
        await agents.agent.run(task)


def load_environment(env_id: str = "AtomMem/SyntheticEasy-v0", *, split: str = "eval", num_tasks: int | None = None,
                     seed: int = 0, **env_kwargs) -> AtomMemEnv:
    """The verifiers env over a registered AtomMem id; `env_kwargs` go to gym.make (data_path, embedder, ...)."""
    if env_id not in atommem_env.ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; registered: {sorted(atommem_env.ENV_IDS)}")
    taskset = AtomMemTasksetConfig(id=TASKSET_ID, env_id=env_id, env_kwargs=env_kwargs, split=split,
                                   num_tasks=num_tasks, seed=seed)
    return AtomMemEnv(AtomMemEnvConfig(taskset=taskset))
