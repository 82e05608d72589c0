"""Regression tests of the trainers' review: each item of the trainer-correctness issue, by number."""

import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import HOTPOT_HF, REPO, run_script, run_summary

import atommem_env
import train_grpo
import train_sft
from agents import HFGenerator, build_messages, make_policy
from agents.evaluation import episode_schedules, make_env_kwargs, make_vector_env, run_episodes
from agents.models import build_tiny_model, load_causal_lm
from agents.prompt import CUT_MARK, encode_prompt
from agents.training import CompletionScorer, make_accelerator, pack, setup_model, trainer_env_kwargs


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    return [e.value for e in logs.Scalars(tag)]


TINY_RUN = ["--num-envs", "2", "--eval-episodes", "2", "--eval-max-new-tokens", "8", "--max-prompt-tokens", "512"]
GRPO_TINY = [*TINY_RUN, "--num-iterations", "1", "--tasks-per-iteration", "2", "--group-size", "2",
             "--max-new-tokens", "8"]
SFT_TINY = [*TINY_RUN, "--num-train-episodes", "2", "--num-epochs", "1", "--batch-size", "4"]


# 1 and 2: dataset ids, with their registered chunking, in both trainers (CI's runs on real data).
@pytest.mark.parametrize("env_id", ["AtomMem/HotpotQA-v0", "AtomMem/HotpotQA-MultiQuery-v0"])
def test_both_trainers_run_on_dataset_ids_with_their_registered_settings(env_id, hotpot_path, tmp_path):
    data = ["--env-id", env_id, "--data-path", str(hotpot_path)]
    sft = run_script("train_sft.py", *data, *SFT_TINY, "--save-dir", str(tmp_path / "sft"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    run, summary = run_summary(tmp_path / "sft")
    assert summary["teacher_em"] == 1.0
    label = "200docs" if "MultiQuery" in env_id else "default"
    assert summary["eval"][label]["prompt_cut_rate"] > 0  # 4000-token chunks against a 512-token budget
    args = json.loads((run / "checkpoint" / "args.json").read_text())
    assert args["chunk_tokens"] is None and args["context_tokens"] == []  # the id's own settings
    # Evaluation on the id's settings is SFT's above (the trainers share it); GRPO's would add ~40 s on 200 documents.
    grpo = run_script("train_grpo.py", *data, *GRPO_TINY, "--eval-episodes", "0", "--model", str(run / "checkpoint"),
                      "--save-dir", str(tmp_path / "g"))
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    _, summary = run_summary(tmp_path / "g")
    # Tasks are drawn inside the split: 100 questions, ~80 in the train split (a random index used to crash).
    assert 0 < summary["num_train_tasks"] < 100


def test_one_env_argument_builder_keeps_each_ids_registered_settings():
    for env_id, registered in atommem_env.ENV_IDS.items():
        kwargs = make_env_kwargs(env_id, split="train", embedder="hashing")
        assert "chunk_tokens" not in kwargs and "context_tokens" not in kwargs
    env = gym.make("AtomMem/HotpotQA-MultiQuery-v0", **make_env_kwargs(
        "AtomMem/HotpotQA-MultiQuery-v0", split="train", data_path=str(HOTPOT_HF), embedder="hashing"))
    assert env.unwrapped.chunk_tokens == 4000 and env.unwrapped.protocol == "paper"
    # An id padded by document count says how to change it instead of clashing with a token length.
    with pytest.raises(ValueError, match="pads by document count"):
        make_env_kwargs("AtomMem/HotpotQA-MultiQuery-v0", split="train", context_tokens=3000)
    assert make_env_kwargs("AtomMem/HotpotQA-MultiQuery-v0", split="eval", context_tokens=0) == {"split": "eval"}
    trainer_args = SimpleNamespace(env_id="AtomMem/Synthetic-v0", data_path=None, embedder="hashing",
                                   chunk_tokens=None, context_tokens=None, env_kwargs="{}")
    env = gym.make("AtomMem/Synthetic-v0", **trainer_env_kwargs(trainer_args, "train", None))
    assert env.unwrapped.chunk_tokens == 512


# 3: generation keeps one (batch, vocab) row of log-probs at a time.
def test_generation_never_holds_logits_of_every_new_token():
    path = build_tiny_model(vocab_size=2048, padded_vocab_size=16_384, num_layers=1)
    model, tokenizer = load_causal_lm(str(path), device="cpu", dtype="float32")
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    big = []
    original = torch.stack

    def watched_stack(tensors, *a, **k):  # the old code stacked every step's logits into (batch, new, vocab)
        result = original(tensors, *a, **k)
        big.append(result.numel())
        return result

    generator = HFGenerator(model, tokenizer, max_new_tokens=40, temperature=1.0)
    torch.stack = watched_stack
    try:
        generations = generator.generate([[{"role": "user", "content": "hi"}]] * 3)
    finally:
        torch.stack = original
    assert max(len(g.completion_ids) for g in generations) > 1
    assert all(shape[1] == 1 for shape in shapes)  # only the last position goes through the LM head
    assert max(big) < 3 * 16_384  # nothing of size batch x new tokens x vocab is ever built


# 4: the KL reference is the starting policy.
def test_grpo_from_a_lora_sft_checkpoint_starts_at_zero_kl_and_resumes_with_the_same_reference(tmp_path):
    sft = run_script("train_sft.py", *SFT_TINY, "--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300",
                     "--lora-r", "4", "--lora-dropout", "0.5", "--learning-rate", "0.05", "--eval-episodes", "0",
                     "--save-dir", str(tmp_path / "sft"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    start = run_summary(tmp_path / "sft")[0] / "checkpoint"
    flags = [*GRPO_TINY, "--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300", "--beta", "0.1",
             "--lora-r", "4", "--minibatch-size", "1000", "--eval-episodes", "0"]
    grpo = run_script("train_grpo.py", *flags, "--model", str(start), "--save-dir", str(tmp_path / "a"))
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    run, _ = run_summary(tmp_path / "a")
    # One minibatch, scored before the optimizer step: the policy *is* the reference (base + SFT adapter, merged),
    # and with dropout off the first ratio is 1. With the bare base as reference the KL was > 0.
    assert _scalars(run, "losses/kl") == [pytest.approx(0.0, abs=1e-6)]
    assert _scalars(run, "losses/approx_kl") == [pytest.approx(0.0, abs=1e-6)]
    checkpoint = run / "checkpoint"
    base = json.loads((checkpoint / "atommem_base.json").read_text())
    assert base["model"] == "tiny" and base["merged_adapters"] == ["merged_adapter_0"]
    assert (checkpoint / "merged_adapter_0" / "adapter_config.json").is_file()
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["reference"]["model"] == str(start)
    # The checkpoint is self-contained: it loads without the SFT run, as base + merged SFT adapter + GRPO adapter.
    resumed = run_script("train_grpo.py", *flags, "--num-iterations", "2", "--resume", str(checkpoint),
                         "--model", "/gone", "--save-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_b, _ = run_summary(tmp_path / "b")
    state = torch.load(run_b / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["reference"]["model"] == str(start) and state["iteration"] == 2


def test_full_fine_tuning_reference_is_loaded_in_the_policys_precision(tmp_path):
    from agents.training import load_reference

    reference = load_reference({"model": "tiny"}, "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    policy, _, _ = setup_model("tiny", None, None, 0, 32, 0.0, ("q_proj",), False, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in policy.parameters())  # --dtype bfloat16 (item 8)


# 5: one truncation rule that never cuts the memory.
def test_prompt_truncation_shortens_only_the_chunk():
    _, tokenizer = load_causal_lm("tiny", device="cpu")
    obs = {"question": "Who founded Qzarbl Works?", "scratchpad": "SCRATCH notes kept", "feedback": "created entry 3",
           "retrieved": "[id 3] RETRIEVED fact about Qzarbl", "chunk": "filler words here. " * 400,
           "chunk_index": 0, "num_chunks": 2, "memory_size": 1, "reads_left": 2}
    messages = build_messages(obs)
    ids, cut = encode_prompt(tokenizer, messages, 400)
    text = tokenizer.decode(ids)
    assert len(ids) <= 400 and cut > 0 and CUT_MARK in text
    for kept in ("Qzarbl Works", "SCRATCH notes kept", "RETRIEVED fact", "created entry 3"):
        assert kept in text
    assert encode_prompt(tokenizer, messages, None) == (encode_prompt(tokenizer, messages, 10**6)[0], 0)
    # Generation, SFT and eval share the rule.
    generator = HFGenerator(load_causal_lm("tiny", device="cpu")[0], tokenizer, max_prompt_tokens=400)
    assert generator.encode_prompt(messages) == (ids, cut)
    sft_args = SimpleNamespace(max_completion_tokens=16, max_prompt_tokens=400)
    assert train_sft.tokenize({"messages": messages, "completion": "<create>x</create>"}, tokenizer, sft_args)[0] == ids
    # An answer-phase prompt has no chunk to shorten: it stays whole rather than lose memory.
    answer_phase = build_messages({**obs, "chunk": "", "chunk_index": 2, "num_chunks": 2,
                                   "scratchpad": "long memory " * 200})
    ids, cut = encode_prompt(tokenizer, answer_phase, 400)
    assert cut == 0 and len(ids) > 400 and tokenizer.decode(ids).count("long memory") == 200


# 6: the stored log-probs are the sampling distribution, whatever the model's generation_config says.
def test_sampling_ignores_the_models_generation_config_processors():
    generator = HFGenerator.from_pretrained("tiny", device="cpu", max_new_tokens=24, temperature=1.0)
    config = generator.model.generation_config
    config.top_k, config.repetition_penalty, config.min_p, config.no_repeat_ngram_size = 1, 1.3, 0.3, 2
    torch.manual_seed(0)
    generations = generator.generate([[{"role": "user", "content": f"question {i}"}] for i in range(4)])
    scorer = CompletionScorer(generator.model)
    samples = [train_grpo.StepSample(g.prompt_ids, g.completion_ids, g.logprobs, 0) for g in generations]
    with torch.no_grad():
        logprobs, _, mask = train_grpo.token_logprobs(scorer, samples, generator.tokenizer.pad_token_id, 1.0, "cpu")
    old = train_grpo.padded([s.sampler_logprobs for s in samples], logprobs)
    assert torch.allclose(logprobs * mask, old, atol=1e-4)
    # top_k=1 from the config would make every sampled token the argmax: a random tiny model's argmax has
    # probability ~1e-3, so sampling from softmax(logits / T) picks it almost never.
    assert np.mean([lp > -1.0 for g in generations for lp in g.logprobs]) < 0.2
    # Greedy decoding is the argmax of the raw logits at every step: no penalty, no n-gram ban moved it.
    config.no_repeat_ngram_size = 1
    generator.temperature = 0.0
    samples = [train_grpo.StepSample(g.prompt_ids, g.completion_ids, g.logprobs, 0)
               for g in generator.generate([[{"role": "user", "content": f"question {i}"}] for i in range(4)])]
    with torch.no_grad():
        _, _, is_argmax = scorer(**pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0))
    assert all(is_argmax[row, :len(s.completion_ids)].all() for row, s in enumerate(samples))


# 7: multi-process SFT survives long evaluations.
def test_trainers_allow_hours_for_collective_waits():
    accelerator = make_accelerator(False, "cpu")
    assert accelerator.init_handler.timeout.total_seconds() >= 3600
    assert episode_schedules(10, 2, 0, 2) == [[0, 4, 8], [1, 5, 9]]  # evaluation is shared, not main-only
    assert episode_schedules(10, 2, 1, 2) == [[2, 6], [3, 7]]


# 8: update memory scales with the micro-batch; no logits of the whole width.
def test_scorer_puts_only_completion_tokens_through_the_lm_head(monkeypatch):
    import agents.training

    model, _ = load_causal_lm("tiny", device="cpu")
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    monkeypatch.setattr(agents.training, "LOGIT_CHUNK_ELEMENTS", 4 * 2048)
    # One long and one short prompt: the old layout put width - shortest prompt + 1 positions through the head.
    batch = pack([list(range(10, 300)), [10, 11]], [[12, 13, 14], [15]], pad_id=0)
    logprobs, _, _ = CompletionScorer(model)(**batch)
    logprobs.sum().backward()
    assert sum(rows) == 2 * 4 and max(rows) <= 4  # 4 completion tokens, forward + recomputation, 4 rows at a time


def test_micro_batches_accumulate_to_the_minibatch_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(6, 3, requires_grad=True)
    old = logprobs.detach() + 0.05 * torch.randn(6, 3)
    mask = torch.ones(6, 3)
    mask[1, 2] = mask[4, 1:] = 0
    adv, weights = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5]), torch.tensor([0.5, 0.5, 1.0, 0.25, 0.25, 1.0])
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        args = SimpleNamespace(epsilon=0.2, epsilon_high=None, beta=0.0, loss_type=loss_type)
        denominator = train_grpo.loss_denominator(weights, mask.sum(-1), loss_type, 3, 0.6)
        whole, _ = train_grpo.grpo_loss(logprobs, old, None, adv, weights, mask, args, denominator)
        # Zero-advantage samples (row 3) skip the forward but stay in the denominator: the same gradient.
        parts = [train_grpo.grpo_loss(logprobs[rows], old[rows], None, adv[rows], weights[rows], mask[rows], args,
                                      denominator)[0] for rows in ([0, 1], [2, 4], [5])]
        assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
        (g1,) = torch.autograd.grad(whole, logprobs)
        (g2,) = torch.autograd.grad(sum(parts), logprobs)
        assert torch.allclose(g1, g2, atol=1e-7)


# 9: departures from TRL that were aligned.
def test_grpo_denominator_does_not_depend_on_which_samples_share_a_minibatch():
    # "equal" episode weighting: weights 1/steps. TRL's grpo divides by the number of samples; ours by
    # samples x the rollout batch's mean weight, a constant for a given minibatch size.
    light, heavy = torch.tensor([0.1, 0.1]), torch.tensor([1.0, 1.0])
    lengths = torch.tensor([3, 3])
    assert train_grpo.loss_denominator(light, lengths, "grpo", 8, 0.5) == train_grpo.loss_denominator(
        heavy, lengths, "grpo", 8, 0.5) == 1.0
    assert train_grpo.loss_denominator(heavy, lengths, "dr_grpo", 8, 1.0) == 16


def test_sft_loss_weighs_every_token_of_an_optimizer_step_the_same():
    model, _ = load_causal_lm("tiny", device="cpu")
    scorer = CompletionScorer(model)
    prompts = [[20, 21, 22], [30, 31], [40], [50, 51, 52, 53]]
    completions = [[23], [32, 33, 34, 35, 36, 37], [41, 42], [54]]
    total = sum(map(len, completions))
    whole, _, _ = train_sft.sft_loss(scorer, pack(prompts, completions, 0), total, 1)
    # Uneven micro-batches (1 token, then 9): the old per-micro-batch mean gave the lone token half the weight.
    first, _, _ = train_sft.sft_loss(scorer, pack(prompts[:1], completions[:1], 0), total, 1)
    rest, _, _ = train_sft.sft_loss(scorer, pack(prompts[1:], completions[1:], 0), total, 1)
    assert (first + rest).item() == pytest.approx(whole.item(), rel=1e-5)
    # Two processes, each half of the tokens: DDP averages, so each scales by the number of processes.
    half, _, _ = train_sft.sft_loss(scorer, pack(prompts[:1], completions[:1], 0), total, 2)
    assert half.item() == pytest.approx(2 * first.item(), rel=1e-6)


def test_grpo_has_no_lora_dropout_flag():
    # LoRA dropout made the first ratio != 1 (rollouts sample in eval mode): GRPO no longer takes the flag.
    result = run_script("train_grpo.py", "--lora-dropout", "0.1", timeout=120)
    assert result.returncode != 0 and "lora-dropout" in result.stderr


# 10: one episode runner.
def test_run_episodes_follows_the_schedules_and_keeps_steps():
    envs = make_vector_env("AtomMem/SyntheticEasy-v0", make_env_kwargs("AtomMem/SyntheticEasy-v0", split="train",
                                                                       embedder="hashing"), 3)
    episodes = run_episodes(envs, make_policy("oracle"), [[4, 7], [5], []], seed=0, keep_steps=True)
    envs.close()
    assert sorted((e["slot"], e["task_index"]) for e in episodes) == [(0, 4), (0, 7), (1, 5)]
    assert all(e["em"] == 1.0 and len(e["steps"]) == e["num_steps"] > 0 for e in episodes)
    for name in ("rollout", "collect_teacher_samples"):
        source = (REPO / ("agents/training.py" if name == "rollout" else "train_sft.py")).read_text()
        body = source[source.index(f"def {name}"):]
        assert "run_episodes(" in body.split("\ndef ")[0] and "envs.step(" not in body.split("\ndef ")[0]
