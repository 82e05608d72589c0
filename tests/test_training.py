import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, SFT_TINY, run_script, run_script_here, run_summary

import train_grpo
from agents import HFGenerator, build_messages
from agents.training import CompletionScorer
from train_grpo import (StepSample, group_advantages, grpo_loss, logprob_gap, loss_denominator, padded,
                        score_old_logprobs, token_logprobs)


def test_sft_smoke_writes_a_checkpoint_that_eval_loads(sft_checkpoint, tmp_path):
    checkpoint, traj = sft_checkpoint
    for name in ("config.json", "tokenizer.json", "args.json", "trainer_state.pt"):
        assert (checkpoint / name).is_file()
    records = [json.loads(line) for line in traj.read_text().splitlines()]
    assert records and all(r["messages"][0]["role"] == "system" for r in records)
    assert any("<create>" in r["completion"] for r in records)
    result = run_script("eval.py", "--policies", "llm", "--model", str(checkpoint), "--env-id",
                        "AtomMem/SyntheticEasy-v0", "--embedder", "hashing", "--num-episodes", "2", "--num-envs", "2",
                        "--context-tokens", "300", "--max-new-tokens", "8", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["llm"]["300"]["episodes"] == 2


def test_sft_lora_from_trajectories_and_resume(sft_checkpoint, tmp_path):
    _, traj = sft_checkpoint
    flags = [*SFT_TINY, "--trajectories", str(traj), "--lora-r", "4", "--eval-episodes", "0",
             "--gradient-checkpointing"]
    result = run_script("train_sft.py", *flags, "--save-dir", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    run, summary = run_summary(tmp_path / "a")
    checkpoint = run / "checkpoint"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").is_file()
    assert (checkpoint / "atommem_base.json").is_file()
    resumed = run_script("train_sft.py", *flags, "--num-epochs", "2", "--resume", str(checkpoint),
                         "--save-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, resumed_summary = run_summary(tmp_path / "b")
    assert resumed_summary["steps"] == 2 * summary["steps"]


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/model"], "model path not found"),
    (["--trajectories", "/no/such.jsonl"], "does not exist"),
    (["--env-id", "AtomMem/HotpotQA-v0"], "needs --data-path"),
    (["--dtype", "float8"], "--dtype must be"),
    (["--lora-r", "4", "--lora-target-modules", "nonexistent_proj"], "LoRA set-up failed"),
    (["--resume", "/tmp"], "not a checkpoint directory"),
    (["--learning-rate", "fast"], "learning-rate"),
    (["--env-kwargs", "[1]"], "--env-kwargs must be a JSON object"),
    (["--env-kwargs", "{top_k: 1}"], "--env-kwargs must be a JSON object"),
    (["--teacher", "bogus"], "--teacher bogus: unknown policy"),
    (["--top-k", "2", "0"], "--top-k must be positive"),
    (["--repeat-update-steps", "0"], "sizes and counts must be positive"),
    (["--repeated-ops", "read"], "--repeated-ops takes some of ['create', 'delete', 'update'], got ['read']"),
    (["--repeat-update-steps", "3", "--trajectories", "tests/fixtures/2wiki_dev_sample.json"], "needs teacher episodes"),
    (["--vllm-enforce-eager"], "--vllm-enforce-eager is for --backend vllm"),
])
def test_sft_bad_flags(flags, message, tmp_path):
    result = run_script_here("train_sft.py", *SFT_TINY, "--eval-episodes", "0", "--save-dir", str(tmp_path), *flags)
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_sft_malformed_trajectory_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [], "completion": "x"}\n{"prompt": "no"}\n')
    result = run_script("train_sft.py", *SFT_TINY, "--trajectories", str(path), "--save-dir", str(tmp_path),
                        timeout=300)
    assert result.returncode != 0 and "bad.jsonl, line 2" in result.stderr


def test_grpo_smoke_from_the_sft_checkpoint(sft_checkpoint, tmp_path):
    checkpoint, _ = sft_checkpoint
    flags = ["--model", str(checkpoint), "--context-tokens", "300", "--num-iterations", "2", "--tasks-per-iteration",
             "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-episodes", "2", "--num-envs", "2",
             "--eval-max-new-tokens", "8", "--beta", "0.01"]
    result = run_script("train_grpo.py", *flags, "--save-dir", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    run, summary = run_summary(tmp_path / "a")
    assert [h["iteration"] for h in summary["eval_history"]] == [0, 2]
    assert (run / "checkpoint" / "trainer_state.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    for tag in ("rollout/response_length", "charts/rollout_tokens_per_second", "rollout/zero_std_group_fraction",
                "rollout/ops_create_per_episode", "losses/kl", "eval/em_300", "rollout/prompt_cut_rate"):
        assert len(logs.Scalars(tag)) == 2, tag
    # Every rollout step generates at least its end-of-turn token, whatever the rewards.
    assert all(e.value >= 1 for e in logs.Scalars("rollout/response_length"))
    resumed = run_script("train_grpo.py", *flags, "--num-iterations", "3", "--resume", str(run / "checkpoint"),
                         "--save-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "iter=3 " in resumed.stdout and "iter=1 " not in resumed.stdout
    timed = run_script("train_grpo.py", *flags, "--num-iterations", "50", "--time-limit-minutes", "0.0001",
                       "--save-dir", str(tmp_path / "c"))
    assert timed.returncode == 0, timed.stderr[-3000:]
    # The first iteration ends past the limit: evaluated and saved as the last.
    run, summary = run_summary(tmp_path / "c")
    assert summary["iterations"] == 1 and [h["iteration"] for h in summary["eval_history"]] == [0, 1]
    assert (run / "checkpoint" / "trainer_state.pt").is_file()


def _torchrun(script, *flags):
    """Two CPU processes, through tests/trace_trainer.py (it prints the process-group time-out and each process's
    share of every evaluation)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/trace_trainer.py", script, "--device", "cpu", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _shared_evaluations(stdout: str, episodes: int) -> None:
    """Both processes wait hours at collectives, and every evaluation is split between them (not main-only)."""
    # Two ranks share one stdout: a line may run into the next one's "TRACE", so the value is matched exactly.
    timeouts = re.findall(r"TRACE process_group_timeout_s=([0-9.]+|None)", stdout)
    assert len(timeouts) == 2 and all(t != "None" and float(t) >= 3600 for t in timeouts), timeouts
    shares = re.findall(r"TRACE rank=(\d) evaluation_episodes=(\d+)", stdout)
    assert shares and {rank for rank, _ in shares} == {"0", "1"}
    assert all(int(n) == episodes // 2 for _, n in shares), shares


def test_sft_and_grpo_in_two_processes(sft_checkpoint, tmp_path):
    sft = _torchrun("train_sft.py", *SFT_TINY, "--save-dir", str(tmp_path / "sft"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "2 batches per process (2 processes)" in sft.stdout  # 16 samples, batches of 4, split in two
    _shared_evaluations(sft.stdout, 2)
    run, summary = run_summary(tmp_path / "sft")
    assert (run / "checkpoint" / "model.safetensors").is_file() and "300" in summary["eval"]
    checkpoint, _ = sft_checkpoint
    # Minibatches of one sample: the second process always runs the zero-weight stand-in.
    flags = ["--model", str(checkpoint), "--context-tokens", "300", "--num-iterations", "2", "--tasks-per-iteration",
             "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-episodes", "2", "--num-envs", "2",
             "--eval-max-new-tokens", "8", "--beta", "0.01", "--minibatch-size", "1"]
    grpo = _torchrun("train_grpo.py", *flags, "--save-dir", str(tmp_path / "grpo"))
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    run, summary = run_summary(tmp_path / "grpo")  # one run directory for both processes
    assert summary["num_processes"] == 2 and [h["iteration"] for h in summary["eval_history"]] == [0, 2]
    assert (run / "checkpoint" / "trainer_state.pt").is_file()
    assert grpo.stdout.count("iter=2 ") == 1  # only the main process logs
    _shared_evaluations(grpo.stdout, 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    assert [e.value for e in logs.Scalars("charts/episodes_per_second")] and len(logs.Scalars("losses/kl")) == 2
    odd = _torchrun("train_grpo.py", "--tasks-per-iteration", "3", "--save-dir", str(tmp_path / "odd"))
    assert odd.returncode != 0 and "must be a multiple of the number of processes (2)" in odd.stderr


@pytest.mark.parametrize("flags, message", [
    (["--loss-type", "ppo"], "--loss-type"), (["--group-size", "1"], "at least 2"),
    (["--reward", "bleu"], "--reward"), (["--temperature", "0"], "--temperature"),
    (["--time-limit-minutes", "-1"], "--time-limit-minutes"),
    (["--no-answer-penalty", "-0.2"], "--no-answer-penalty must be >= 0"),
    (["--env-kwargs", '{"top_k": 2, "topk": 1}'], "['topk'] are not arguments of the env"),
    (["--vllm-enforce-eager"], "--vllm-enforce-eager is for --backend vllm"),
])
def test_grpo_bad_flags(flags, message, tmp_path):
    result = run_script_here("train_grpo.py", "--save-dir", str(tmp_path), *flags)
    assert result.returncode != 0 and message in result.stderr


def test_group_advantages():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    scaled, zero = group_advantages(rewards, 4, scale=True)
    assert zero == 0.5 and np.allclose(scaled[4:], 0)
    std = np.std([1, 0, 0, 0], ddof=1)  # Bessel's correction, as torch.std in TRL
    assert np.allclose(scaled[:4], (np.array([1, 0, 0, 0]) - 0.25) / (std + 1e-4))
    centred, _ = group_advantages(rewards, 4, scale=False)
    assert np.allclose(centred[:4], [0.75, -0.25, -0.25, -0.25])



def test_an_episode_without_an_answer_scores_below_a_wrong_one():
    from agents import NoOpPolicy, OraclePolicy
    from agents.evaluation import make_vector_env
    from agents.training import rollout

    kwargs = {"synthetic": {"hops": [1, 1], "distractors": 0, "volatility": 0}, "context_tokens": 300}
    envs = make_vector_env("AtomMem/SyntheticEasy-v0", kwargs, 2)
    answered = rollout(envs, OraclePolicy(), [0, 1], seed=0, first_episode=0)[1]
    silent = rollout(envs, NoOpPolicy(), [0, 1], seed=0, first_episode=0)[1]
    assert [e["unanswered"] for e in answered] == [0.0, 0.0] and [e["unanswered"] for e in silent] == [1.0, 1.0]
    wrong = {"em": 0.0, "f1": 0.2, "invalid_ops": 1, "unanswered": 0.0}
    episodes = [wrong, {**wrong, "unanswered": 1.0}, {**wrong, "em": 1.0, "unanswered": 0.5}]
    args = train_grpo.Args(format_penalty=0.1, no_answer_penalty=0.2)
    assert np.allclose(train_grpo.episode_rewards(episodes, args), [-0.1, -0.3, 0.8])
    assert np.allclose(train_grpo.episode_rewards(episodes, train_grpo.Args(reward="f1")), [0.2, 0.2, 0.2])


def test_only_samples_that_train_are_scored_plus_the_sync_check():
    def scorer(input_ids, target_mask, temperature, **_):  # every token's log-prob: -1 x its row in the batch
        rows = torch.arange(len(input_ids), dtype=torch.float)[:, None].expand(target_mask.shape)
        return -rows * target_mask, torch.zeros_like(rows), target_mask

    def scored(beta, sync_check):
        samples = [StepSample([1], [2, 3], [-0.5, -0.5], episode=i, advantage=a)
                   for i, a in enumerate([0, 0, 0, 1.5, -0.5, 0])]
        score_old_logprobs(scorer, samples, SimpleNamespace(beta=beta, micro_batch_size=sync_check, temperature=1.0),
                           0, "cpu")
        return samples, [s.episode for s in samples if s.old_logprobs is not None]

    assert scored(0.0, 2)[1] == [0, 1, 3, 4]  # the first micro-batch (the sync check), then non-zero advantages
    assert scored(0.04, 2)[1] == [0, 1, 2, 3, 4, 5]  # the KL term trains every sample
    samples, _ = scored(0.0, 2)
    # micro-batches [0, 1] and [3, 4]: old log-probs 0 and -1 per token; the gap to -0.5 is over scored samples only
    assert [s.old_logprobs for s in samples if s.old_logprobs] == [[0.0, 0.0], [-1.0, -1.0]] * 2
    assert logprob_gap(samples) == (0.5, 0.5)


def _args(**kw):
    base = dict(epsilon=0.2, epsilon_high=None, beta=0.0, loss_type="grpo")
    return SimpleNamespace(**{**base, **kw})


def _loss(logprobs, old, ref, adv, w, mask, args, max_completion=4):
    """grpo_loss with the denominator of this batch taken as the whole minibatch, on one process."""
    denominator = loss_denominator(w, mask.sum(-1), args.loss_type, max_completion, float(w.mean()))
    return grpo_loss(logprobs, old, ref, adv, w, mask, args, denominator)


def test_grpo_loss_types_match_hand_computation():
    # Two samples: 2 tokens and 1 token; ratio 1 everywhere, so the loss is -advantage averaged by each rule.
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, w = torch.tensor([1.0, -2.0]), torch.tensor([1.0, 1.0])
    grpo, _ = _loss(logprobs, logprobs, None, adv, w, mask, _args(loss_type="grpo"))
    assert grpo.item() == pytest.approx((-1 + 2) / 2)
    dapo, _ = _loss(logprobs, logprobs, None, adv, w, mask, _args(loss_type="dapo"))
    assert dapo.item() == pytest.approx((-1 - 1 + 2) / 3)
    dr, _ = _loss(logprobs, logprobs, None, adv, w, mask, _args(loss_type="dr_grpo"))
    assert dr.item() == pytest.approx((-1 - 1 + 2) / (2 * 4))
    weighted, _ = _loss(logprobs, logprobs, None, adv, torch.tensor([3.0, 1.0]), mask, _args())
    assert weighted.item() == pytest.approx((3 * -1 + 1 * 2) / 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_split_across_processes_averages_to_the_whole_minibatch(loss_type):
    """Each process's loss over its share, with the minibatch's denominator / world, averages to the full loss."""
    torch.manual_seed(0)
    logprobs = torch.randn(5, 4, requires_grad=True)
    old, ref = logprobs.detach() + 0.1 * torch.randn(5, 4), logprobs.detach() + 0.1 * torch.randn(5, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    adv, w = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.0]), torch.tensor([0.5, 1.0, 0.25, 1.0, 0.5])
    args = _args(loss_type=loss_type, beta=0.05)
    full, _ = _loss(logprobs, old, ref, adv, w, mask, args)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    world = 2
    denominator = loss_denominator(w, mask.sum(-1), loss_type, 4, float(w.mean())) / world
    parts = [grpo_loss(logprobs[r::world], old[r::world], ref[r::world], adv[r::world], w[r::world], mask[r::world],
                       args, denominator)[0] for r in range(world)]
    averaged = sum(parts) / world  # what DDP's gradient averaging computes
    assert averaged.item() == pytest.approx(full.item(), rel=1e-6)
    (split_grad,) = torch.autograd.grad(averaged, logprobs)
    assert torch.allclose(split_grad, full_grad, atol=1e-7)


def test_grpo_loss_clips_and_kl():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    loss, stats = _loss(new, old, None, torch.tensor([1.0]), torch.ones(1), mask, _args(), 2)
    # positive advantage: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5; only the first clip binds (TRL's count)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2) and stats["clipfrac"] == 0.5
    _, stats = _loss(new, old, None, torch.tensor([-1.0]), torch.ones(1), mask, _args(), 2)
    assert stats["clipfrac"] == 0.5  # negative advantage: the low clip binds on ratio 0.5, ratio 1.5 is free
    loss_high, _ = _loss(new, old, None, torch.tensor([1.0]), torch.ones(1), mask, _args(epsilon_high=0.28), 2)
    assert loss_high.item() == pytest.approx(-(1.28 + 0.5) / 2)
    ref = torch.zeros(1, 2)
    with_kl, stats = _loss(old, old, ref + 0.1, torch.tensor([0.0]), torch.ones(1), mask, _args(beta=0.5), 2)
    k3 = np.exp(0.1) - 0.1 - 1
    assert with_kl.item() == pytest.approx(0.5 * k3, rel=1e-5) and stats["kl"] == pytest.approx(k3, rel=1e-5)


def test_rollout_logprobs_match_the_training_forward_pass():
    generator = HFGenerator.from_pretrained("tiny", device="cpu", max_new_tokens=10, temperature=0.7)
    torch.manual_seed(0)
    obs = {"question": "Who?", "chunk": "Document 1: Record 1\nSome filler text.", "scratchpad": "", "retrieved": "",
           "feedback": "", "chunk_index": 0, "num_chunks": 1, "memory_size": 0, "reads_left": 2}
    generations = generator.generate([build_messages(obs), build_messages({**obs, "question": "Where is it?"})])
    samples = [StepSample(g.prompt_ids, g.completion_ids, g.logprobs, episode=i) for i, g in enumerate(generations)]
    logprobs, _, mask = token_logprobs(CompletionScorer(generator.model), samples, generator.tokenizer.pad_token_id,
                                       0.7, "cpu")
    for row, s in enumerate(samples):
        n = len(s.completion_ids)
        assert torch.allclose(logprobs[row, :n], torch.tensor(s.sampler_logprobs), atol=1e-4)
        assert mask[row].sum() == n


def test_grpo_updates_move_probability_towards_the_rewarded_completion():
    """A two-armed bandit on one prompt: the completion with advantage +1 gains log-probability, -1 loses it."""
    generator = HFGenerator.from_pretrained("tiny", device="cpu")
    model, tokenizer = generator.model, generator.tokenizer
    scorer = CompletionScorer(model)
    prompt = tokenizer("<create>a fact</create>")["input_ids"]
    good, bad = tokenizer(" yes")["input_ids"], tokenizer(" no")["input_ids"]

    def token_logprobs_of(completion):
        sample = StepSample(prompt, completion, [0.0] * len(completion), episode=0)
        with torch.no_grad():
            return token_logprobs(scorer, [sample], tokenizer.pad_token_id, 1.0, "cpu")[0][0, :len(completion)]

    before_good, before_bad = token_logprobs_of(good).sum(), token_logprobs_of(bad).sum()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        # old log-probs from the current policy: ratio 1, as right after a rollout
        batch = [StepSample(prompt, completion, [], episode=0, old_logprobs=token_logprobs_of(completion).tolist())
                 for completion in (good, bad)]
        logprobs, _, mask = token_logprobs(scorer, batch, tokenizer.pad_token_id, 1.0, "cpu")
        loss, _ = _loss(logprobs, padded([s.old_logprobs for s in batch], logprobs), None, torch.tensor([1.0, -1.0]), torch.ones(2),
                        mask, _args())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert token_logprobs_of(good).sum() > before_good + 0.5 and token_logprobs_of(bad).sum() < before_bad - 0.5


@pytest.mark.parametrize("lora", [False, True])
def test_completion_scorer_equals_the_full_forward_pass(lora, monkeypatch):
    """Left-padded prompts of different lengths, chunked LM head: the same log-probs and gradients as one
    forward pass per sample."""
    import agents.training
    from agents.training import pack
    from peft import LoraConfig, get_peft_model

    model = HFGenerator.from_pretrained("tiny", device="cpu").model
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    prompts = [torch.randint(5, 500, (n,)).tolist() for n in (12, 5, 9)]
    completions = [torch.randint(5, 500, (n,)).tolist() for n in (3, 8, 1)]
    expected = []
    for prompt, completion in zip(prompts, completions):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
        expected.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1))
    (expected_grad,) = torch.autograd.grad(sum(e.sum() for e in expected), [p for p in model.parameters()
                                                                            if p.requires_grad][-1])
    monkeypatch.setattr(agents.training, "LOGIT_CHUNK_ELEMENTS", 3 * 2048)  # 3 rows of the LM head at a time
    logprobs, _, _ = CompletionScorer(model)(**pack(prompts, completions, pad_id=0))
    for row, e in enumerate(expected):
        assert torch.allclose(logprobs[row, :len(e)], e, atol=1e-5)
        assert (logprobs[row, len(e):] == 0).all()
    (grad,) = torch.autograd.grad(logprobs.sum(), [p for p in model.parameters() if p.requires_grad][-1])
    assert torch.allclose(grad, expected_grad, atol=1e-5)


assert train_grpo.Args().loss_type == "grpo"


def test_trainer_env_kwargs_reach_the_teacher_episodes():
    import train_sft

    args = train_sft.Args(env_id="AtomMem/SyntheticEasy-v0", teacher="oracle-broad", num_train_episodes=4, num_envs=2,
                          env_kwargs='{"top_k": 1, "synthetic": {"hops": [1, 1], "distractors": 0, "volatility": 0}}')
    samples, stats = train_sft.collect_teacher_samples(args)
    answer_prompts = [s["messages"][-1]["content"] for s in samples if s["completion"].startswith("<answer>")]
    assert stats["teacher_em"] == 1.0 and len(answer_prompts) == 4
    assert all(text.count("[id ") == 1 for text in answer_prompts)  # top_k 1
    assert sum(s["completion"].count("<create>") for s in samples) == 4  # no look-alikes to store


def test_the_sft_teacher_hears_of_disabled_operations():
    import train_sft

    volatile = '"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 1.0}'
    completions = {}
    for ops in ("", ', "enabled_ops": ["create", "read", "delete", "scratchpad"]'):
        args = train_sft.Args(env_id="AtomMem/Synthetic-v0", teacher="oracle-hops", context_tokens=(800,),
                              chunk_tokens=256, num_train_episodes=4, num_envs=2, env_kwargs="{" + volatile + ops + "}")
        samples, stats = train_sft.collect_teacher_samples(args)
        assert stats["teacher_em"] == 1.0 and stats["teacher_episodes"] == 4
        completions[bool(ops)] = " ".join(s["completion"] for s in samples)
    assert "<update id=" in completions[False] and "<update" not in completions[True]


def test_update_steps_and_the_read_before_them_repeat_as_asked():
    """Issue 24, item 3: the Read-then-Update pair is ~8% of the samples; --repeat-update-steps weighs it more."""
    import train_sft

    kwargs = dict(env_id="AtomMem/Synthetic-v0", teacher="oracle-hops", context_tokens=(800,), chunk_tokens=256,
                  num_train_episodes=4, num_envs=2,
                  env_kwargs='{"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 1.0}}')
    once, once_stats = train_sft.collect_teacher_samples(train_sft.Args(**kwargs))
    thrice, stats = train_sft.collect_teacher_samples(train_sft.Args(**kwargs, repeat_update_steps=3))
    updates = [i for i, s in enumerate(once) if "<update id=" in s["completion"]]
    assert updates and once_stats["repeated_samples"] == 0
    assert all(once[i - 1]["completion"].startswith("<read>") for i in updates)
    pairs = {j for i in updates for j in (i - 1, i)}
    assert thrice == [s for i, s in enumerate(once) for _ in range(3 if i in pairs else 1)]
    assert stats["repeated_samples"] == 2 * len(pairs) and stats["teacher_em"] == 1.0


def test_repeated_ops_can_add_the_create_steps():
    """The oracle-scan student missed the first write as well as the Updates (docs/study_log.md section 8)."""
    import train_sft

    kwargs = dict(env_id="AtomMem/SyntheticVolatileBudget-v0", teacher="oracle-scan", num_train_episodes=2,
                  num_envs=2)
    once, _ = train_sft.collect_teacher_samples(train_sft.Args(**kwargs))
    updates_only, _ = train_sft.collect_teacher_samples(train_sft.Args(**kwargs, repeat_update_steps=2))
    writes, stats = train_sft.collect_teacher_samples(train_sft.Args(**kwargs, repeat_update_steps=2,
                                                                     repeated_ops=("create", "update")))
    creates = [i for i, s in enumerate(once) if s["completion"].startswith("<create>")]
    updates = [i for i, s in enumerate(once) if s["completion"].startswith("<update id=")]
    assert len(creates) == 2 and updates
    assert all(once[i - 1]["completion"].startswith("<read>") for i in creates + updates)

    def twice_with_the_read_before(steps):
        pairs = {j for i in steps for j in (i - 1, i)}
        return [s for i, s in enumerate(once) for _ in range(2 if i in pairs else 1)], len(pairs)

    assert updates_only == twice_with_the_read_before(updates)[0]
    assert (writes, stats["repeated_samples"]) == twice_with_the_read_before(creates + updates)


def test_sft_teacher_episodes_take_the_context_lengths_in_turn():
    import train_sft

    args = train_sft.Args(env_id="AtomMem/SyntheticEasy-v0", context_tokens=(300, 300, 600), num_train_episodes=6,
                          num_envs=2)
    samples, stats = train_sft.collect_teacher_samples(args)
    firsts = [s["messages"][-1]["content"] for s in samples if "\n\nChunk 1 of " in s["messages"][-1]["content"]]
    assert stats["teacher_episodes"] == 6
    assert sum("Chunk 1 of 2:" in text for text in firsts) == 4 and sum("Chunk 1 of 3:" in text for text in firsts) == 2


def test_sft_teacher_episodes_take_the_read_top_ks_in_turn():
    import train_sft

    args = train_sft.Args(env_id="AtomMem/SyntheticEasy-v0", teacher="oracle-broad", context_tokens=(300, 300, 600),
                          top_k=(1, 3), num_train_episodes=6, num_envs=2,
                          env_kwargs='{"top_k": 2, "synthetic": {"hops": [1, 1], "distractors": 2, "volatility": 0}}')
    samples, stats = train_sft.collect_teacher_samples(args)
    answer_prompts = [s["messages"][-1]["content"] for s in samples if s["completion"].startswith("<answer>")]
    assert stats["teacher_episodes"] == 6 and len(answer_prompts) == 6
    # tasks 0..5 take top-k 1, 3, 1, 3, 1, 3 (replacing --env-kwargs' 2) and lengths 300, 300, 600 in turn
    assert [text.count("[id ") for text in answer_prompts] == [1, 3, 1, 3, 1, 3]
    firsts = [s["messages"][-1]["content"] for s in samples if "\n\nChunk 1 of " in s["messages"][-1]["content"]]
    assert sum("Chunk 1 of 2:" in text for text in firsts) == 4


def test_bf16_is_on_by_default_only_where_it_pays(tmp_path, monkeypatch):
    import agents.training as training
    from agents.models import parameter_count
    from transformers import LlamaConfig

    big = tmp_path / "big"  # config only: the count reads no weights
    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8).save_pretrained(big)
    # 2 x 32000 x 512 (embeddings, head) + 8 x (4 x 512^2 + 3 x 512 x 1376 + 2 x 512) + 512
    assert parameter_count(str(big)) == 58_073_600
    assert parameter_count("tiny") < training.BF16_CPU_MIN_PARAMETERS
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.default_bf16(str(big), None, "cpu")
    assert not training.default_bf16("tiny", None, "cpu")
    assert not training.default_bf16(str(tmp_path / "missing"), None, "cpu")  # its loading then says why
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower
    assert not training.default_bf16(str(big), None, "cpu")


def test_bf16_asked_for_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, recwarn):
    """An AVX2 CPU trained SmolLM2 at 5 tokens/s under bf16 autocast against 131 in fp32 (docs/study_log.md)."""
    import agents.training as training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16.*--bf16 False"):
        training.warn_if_bf16_is_emulated(True, "cpu")
    recwarn.clear()
    training.warn_if_bf16_is_emulated(False, "cpu")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    training.warn_if_bf16_is_emulated(True, "cpu")
    assert not recwarn.list
