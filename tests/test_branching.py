"""Branching rollouts (`train_grpo.py --branch-at superseded`): a group's G continuations start from one snapshot
taken where a stated fact is superseded, and only their steps are trained on."""

from types import SimpleNamespace

from conftest import run_script

from agents import Generation, Policy, PolicyOutput
from agents.evaluation import make_env_kwargs, make_vector_env
from agents.training import branch_rollout
from atommem_env.process import first_superseding_chunk
from test_trainer_correctness import GRPO_TINY, _scalars

VOLATILE = "AtomMem/SyntheticVolatileBudget-v0"


def test_the_branch_chunk_is_the_first_statement_after_a_stale_one():
    tracker = SimpleNamespace(gold=["ann lives in bree"], stale=["ann lives in dale"])
    chunks = ["Filler.", "Ann lives in Dale.", "More filler.", "Ann lives in Bree.", "Ann lives in Bree."]
    assert first_superseding_chunk(tracker, chunks) == 3
    # A stale value stated again also supersedes the first statement (versions may repeat a value).
    assert first_superseding_chunk(tracker, ["Ann lives in Dale.", "Ann lives in Dale.", "Ann lives in Bree."]) == 1
    assert first_superseding_chunk(tracker, ["Filler.", "Ann lives in Bree."]) is None  # nothing superseded
    assert first_superseding_chunk(tracker, ["Ann lives in Bree.", "Ann lives in Dale."]) is None  # stale comes last
    assert first_superseding_chunk(SimpleNamespace(gold=["ann lives in bree"], stale=[]), chunks) is None


class TracingPolicy(Policy):
    """Creates one entry at the first chunk and writes "slot:chunk" into the scratchpad at every step. Its outputs
    carry token ids, as an LLM policy's do, so the rollout makes training samples."""

    def act(self, observations, tasks=None, slots=None):
        outputs = []
        for obs, slot in zip(observations, slots):
            chunk = int(obs["chunk_index"])
            if chunk >= int(obs["num_chunks"]):
                text = "<answer>nobody</answer>"
            else:
                text = (f"<create>noted by slot {slot}</create>" if chunk == 0 else "") + \
                       f"<scratchpad>{slot}:{chunk}</scratchpad>"
            outputs.append(PolicyOutput(text, generation=Generation(text, prompt_ids=[1, 2], completion_ids=[3],
                                                                    logprobs=[-0.5])))
        return outputs


def test_each_group_continues_from_one_snapshot_at_its_branch_chunk():
    envs = make_vector_env(VOLATILE, make_env_kwargs(VOLATILE, split="train", embedder="hashing"), 4)
    tasks, group_size = [0, 1], 2
    expected = []
    for task in tasks:
        probe = envs.envs[0].unwrapped
        probe.reset(seed=0, options={"task_index": task})
        expected.append(first_superseding_chunk(probe.facts, probe.chunker))
    assert all(expected), expected  # the registered setting supersedes a fact in every task
    policy = TracingPolicy()
    samples, episodes, records, prefix_steps = branch_rollout(envs, policy, tasks, group_size, seed=5, first_episode=10)

    assert prefix_steps == expected  # one sampled step per chunk up to the branch chunk
    assert len(records) == len(episodes) == 4 and [r["slot"] for r in records] == [0, 1, 2, 3]
    for record in records:
        group = record["slot"] // group_size
        assert record["task_index"] == tasks[group]
        first_obs = record["steps"][0][0]
        assert int(first_obs["chunk_index"]) == expected[group]
        # What the root wrote just before the branch: its scratchpad (slot group * G) and its one entry.
        assert str(first_obs["scratchpad"]) == f"{group * group_size}:{expected[group] - 1}"
        assert int(first_obs["memory_size"]) == 1
        assert record["num_steps"] == int(first_obs["num_chunks"]) - expected[group] + 1  # chunks left, then answer
    # Samples are the continuations' steps only, each credited to its own episode.
    assert len(samples) == sum(r["num_steps"] for r in records)
    assert sorted({s.episode for s in samples}) == [10, 11, 12, 13]
    envs.close()


def test_a_task_with_nothing_superseded_branches_at_its_start():
    env_id = "AtomMem/SyntheticEasy-v0"
    envs = make_vector_env(env_id, make_env_kwargs(env_id, split="train", embedder="hashing"), 2)
    policy = TracingPolicy()
    _, _, records, prefix_steps = branch_rollout(envs, policy, [3], 2, seed=0, first_episode=0)
    assert prefix_steps == [0]
    for record in records:
        first_obs = record["steps"][0][0]
        assert int(first_obs["chunk_index"]) == 0 and str(first_obs["scratchpad"]) == ""
        assert record["num_steps"] == int(first_obs["num_chunks"]) + 1
    envs.close()


def test_grpo_trains_on_branched_groups_and_logs_their_prefix(tmp_path):
    result = run_script("train_grpo.py", *GRPO_TINY, "--env-id", VOLATILE, "--branch-at", "superseded",
                        "--eval-episodes", "0", "--save-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    assert _scalars(run, "rollout/branch_prefix_steps")[0] > 0
    assert _scalars(run, "charts/train_tokens_per_second")[0] > 0  # an update ran on the continuations

    bad = run_script("train_grpo.py", *GRPO_TINY, "--branch-at", "middle", "--save-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--branch-at" in bad.stderr and not (tmp_path / "bad").exists()
