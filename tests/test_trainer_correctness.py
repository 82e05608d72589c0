"""The trainers do what their docs say: registered settings, GRPO's advantages, denominators, ratios and KL
reference, SFT's targets and clipping, resuming, and the checks that fail before any model work."""

import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import HOTPOT_HF, REPO, run_script, run_script_here, run_summary

import atommem_env
import train_grpo
import train_sft
from agents import HFGenerator, build_messages, make_policy
from agents.evaluation import episode_schedules, make_env_kwargs, make_vector_env, run_episodes
from agents.models import build_tiny_model, load_causal_lm
from agents.prompt import CUT_MARK, encode_prompt
from agents.training import (CompletionScorer, StepSample, disable_dropout, make_accelerator, pack, setup_model,
                             token_logprobs, trainer_env_kwargs)


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
    short = ["--max-prompt-tokens", "256"]  # the chunks are still cut (4000 tokens); the steps cost a quarter
    sft = run_script("train_sft.py", *data, *SFT_TINY, *short, "--save-dir", str(tmp_path / "sft"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    run, summary = run_summary(tmp_path / "sft")
    assert summary["teacher_em"] == 1.0
    label = "200docs" if "MultiQuery" in env_id else "default"
    assert summary["eval"][label]["prompt_cut_rate"] > 0  # 4000-token chunks against a 512-token budget
    args = json.loads((run / "checkpoint" / "args.json").read_text())
    assert args["chunk_tokens"] is None and args["context_tokens"] == []  # the id's own settings
    # Evaluation on the id's settings is SFT's above (the trainers share it); GRPO's would add ~40 s on 200 documents.
    grpo = run_script("train_grpo.py", *data, *GRPO_TINY, *short, "--tasks-per-iteration", "1", "--eval-episodes", "0",
                      "--model", str(run / "checkpoint"), "--save-dir", str(tmp_path / "g"))
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
    result = run_script_here("train_grpo.py", "--lora-dropout", "0.1")
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


# A group whose rewards are equal up to rounding gives no signal.
def test_groups_equal_up_to_rounding_count_as_zero_std_and_get_no_advantage():
    rewards = np.array([.8, .8, .8, 1, 0, 0])
    assert np.std(rewards[:3], ddof=1) > 0  # 1.4e-16: the exact test missed it
    advantages, zero_std = train_grpo.group_advantages(rewards, 3, True)
    assert zero_std == 0.5 and (advantages[:3] == 0).all() and (advantages[3:] != 0).all()
    _, zero_std = train_grpo.group_advantages(rewards, 3, False)
    assert zero_std == 0.5


# An id that pads by document count: lengths are refused before any model loads; none given, its own.
@pytest.mark.parametrize("script, flag", [("train_sft.py", "--context-tokens"), ("train_grpo.py", "--context-tokens"),
                                          ("train_sft.py", "--eval-context-tokens"),
                                          ("train_grpo.py", "--eval-context-tokens")])
def test_a_length_an_id_cannot_take_fails_before_the_model_loads(script, flag):
    result = run_script_here(script, "--env-id", "AtomMem/HotpotQA-MultiQuery-v0", "--data-path", str(HOTPOT_HF), flag,
                             "3000", "--model", "/no/such/model")
    assert result.returncode != 0
    assert "pads by document count" in result.stderr and "model path not found" not in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_runs_an_id_that_pads_by_document_count_on_its_registered_setting(tmp_path):
    result = run_script("eval.py", "--env-id", "AtomMem/HotpotQA-MultiQuery-v0", "--data-path", str(HOTPOT_HF),
                  "--policies", "oracle", "--num-episodes", "1", "--num-envs", "1", "--embedder", "hashing",
                  "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["oracle"]["200docs"]["em"] == 1.0


# --resume takes only its own script's checkpoints, and says so before any model work.
@pytest.mark.parametrize("script, other_state, missing", [
    ("train_grpo.py", {"optimizer": {}, "scheduler": {}, "step": 3}, "iteration, reference"),
    ("train_sft.py", {"optimizer": {}, "iteration": 2, "reference": {"model": "tiny"}}, "scheduler, step"),
])
def test_resume_refuses_the_other_trainers_checkpoint(script, other_state, missing, tmp_path):
    torch.save(other_state, tmp_path / "trainer_state.pt")
    result = run_script_here(script, "--resume", str(tmp_path), "--save-dir", str(tmp_path / "runs"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"not a {script} checkpoint (its trainer_state.pt has no {missing})" in result.stderr
    assert "give it as --model" in result.stderr
    assert not (tmp_path / "runs").exists()


# A completion cut at --max-completion-tokens does not end in eos.
def test_sft_does_not_teach_stopping_inside_a_cut_action():
    _, tokenizer = load_causal_lm("tiny", device="cpu")
    messages = [{"role": "user", "content": "q"}]
    action = "<create>" + "a long fact " * 40 + "</create>"
    args = SimpleNamespace(max_completion_tokens=16, max_prompt_tokens=None)
    _, completion, cut, _ = train_sft.tokenize({"messages": messages, "completion": action}, tokenizer, args)
    assert cut and len(completion) == 16 and tokenizer.eos_token_id not in completion
    assert completion == tokenizer(action, add_special_tokens=False)["input_ids"][:16]
    _, whole, cut, _ = train_sft.tokenize({"messages": messages, "completion": "<read>x</read>"}, tokenizer, args)
    assert not cut and whole[-1] == tokenizer.eos_token_id


# The HF backend in bf16: the old log-probs are the training forward's, not cached decoding's.
def test_hf_rollouts_in_bf16_take_the_old_logprobs_from_the_training_forward():
    generator = HFGenerator.from_pretrained("tiny", device="cpu", max_new_tokens=16, temperature=1.0)
    obs = {"question": "Who?", "chunk": "Document 1: Record 1\nSome filler text. " * 10, "scratchpad": "",
           "retrieved": "", "feedback": "", "chunk_index": 0, "num_chunks": 1, "memory_size": 0, "reads_left": 2}
    torch.manual_seed(0)
    args = SimpleNamespace(beta=0.0, micro_batch_size=8, temperature=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --bf16 True runs rollouts and scoring under
        generations = generator.generate([build_messages({**obs, "question": f"q{i}"}) for i in range(8)])
        samples = [StepSample(g.prompt_ids, g.completion_ids, g.logprobs, i, advantage=1.0)
                   for i, g in enumerate(generations)]
        train_grpo.score_old_logprobs(CompletionScorer(generator.model), samples, args, 0, "cpu")
        logprobs, _, mask = token_logprobs(CompletionScorer(generator.model), samples, 0, 1.0, "cpu")
    old = train_grpo.padded([s.old_logprobs for s in samples], logprobs)
    sampler = train_grpo.padded([s.sampler_logprobs for s in samples], logprobs)
    assert torch.equal(logprobs.detach() * mask, old)  # the first ratio is 1
    assert ((logprobs.detach() - sampler).abs() * mask).max() > 1e-4  # cached bf16 decoding is not the forward


def test_grpo_with_hf_rollouts_in_bf16_starts_at_ratio_one(tmp_path):
    flags = ["--bf16", "True", "--num-iterations", "1", "--tasks-per-iteration", "2", "--group-size", "2",
             "--max-new-tokens", "8", "--eval-episodes", "0", "--num-envs", "2", "--max-prompt-tokens", "512",
             "--minibatch-size", "1000", "--beta", "0.1", "--env-id", "AtomMem/SyntheticEasy-v0",
             "--context-tokens", "300", "--save-dir", str(tmp_path)]
    result = run_script("train_grpo.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    # One minibatch scored before the step: only the padding of other micro-batches can move a bf16 ratio.
    assert [e.value for e in logs.Scalars("losses/approx_kl")][0] < 1e-6
    assert [e.value for e in logs.Scalars("losses/clipfrac")] == [0.0]
    assert [e.value for e in logs.Scalars("rollout/logprob_diff_mean")][0] > 0  # the sampler gap, logged for hf too


# The async vector env reports a bad data path as clearly as the sync one.
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs_report_a_missing_data_file(mode):
    kwargs = {"vector_kwargs": {"shared_memory": False}} if mode == "async" else {}
    with pytest.raises(ValueError, match="data file not found: /nonexistent.json"):
        gym.make_vec("AtomMem/HotpotQA-v0", 2, vectorization_mode=mode, data_path="/nonexistent.json", **kwargs)


# Tests that now fail with their bug back.
def test_zero_advantage_samples_stay_in_the_denominators_of_the_real_update():
    """train_grpo.update with SGD(lr=1): the step is exactly the gradient of the whole minibatch's loss,
    zero-advantage samples counted in its denominator though they are never forwarded."""
    torch.manual_seed(0)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        model, _ = load_causal_lm("tiny", device="cpu")
        before = [p.detach().clone() for p in model.parameters()]
        samples = [StepSample(list(range(5 + i, 12 + i)), list(range(20 + i, 21 + i + i % 3)), [-1.0] * 3, i,
                              advantage=a, weight=w) for i, (a, w) in enumerate([(1.0, 1.0), (0.0, 0.5), (-1.0, 1.0),
                                                                                 (0.0, 0.25), (0.5, 0.5)])]
        with torch.no_grad():
            for s in samples:
                s.old_logprobs = token_logprobs(CompletionScorer(model), [s], 0, 1.0, "cpu")[0][0].tolist()
        args = SimpleNamespace(update_epochs=1, minibatch_size=8, micro_batch_size=2, beta=0.0, backend="hf",
                               loss_type=loss_type, max_new_tokens=4, temperature=1.0, epsilon=0.2, epsilon_high=None,
                               max_grad_norm=1e9, vllm_importance_sampling_cap=2.0)
        accelerator = make_accelerator(False, "cpu")
        scorer, optimizer = accelerator.prepare(CompletionScorer(model), torch.optim.SGD(model.parameters(), lr=1.0))
        forwarded = []
        model.model.register_forward_hook(lambda module, inputs, out: forwarded.append(len(out[0])))
        train_grpo.update(accelerator, scorer, optimizer, samples, None, args, np.random.RandomState(0), 0)
        assert sum(forwarded) == 3  # the two zero-advantage samples were skipped
        step = [b - p.detach() for b, p in zip(before, model.parameters())]
        # The expected step: the whole minibatch's loss at the start weights, every sample in its denominator.
        reference, _ = load_causal_lm("tiny", device="cpu")
        logprobs, _, mask = token_logprobs(CompletionScorer(reference), samples, 0, 1.0, "cpu")
        weights = torch.tensor([s.weight for s in samples])
        denominator = train_grpo.loss_denominator(weights, mask.sum(-1), loss_type, 4, float(weights.mean()))
        loss, _ = train_grpo.grpo_loss(logprobs, train_grpo.padded([s.old_logprobs for s in samples], logprobs), None,
                                       torch.tensor([s.advantage for s in samples]), weights, mask, args, denominator)
        expected = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
        for got, want in zip(step, expected):
            assert torch.allclose(got, torch.zeros_like(got) if want is None else want, atol=1e-6), loss_type


def test_disable_dropout_switches_off_every_dropout_the_model_has(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "dropout", num_layers=1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    model = AutoModelForCausalLM.from_pretrained(path).train()
    lora = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ids = torch.tensor([list(range(5, 40))])
    assert not torch.equal(lora(input_ids=ids).logits, lora(input_ids=ids).logits)  # dropout is live in training
    disable_dropout(lora)
    first, second = lora(input_ids=ids).logits, lora(input_ids=ids).logits
    assert torch.equal(first, second)
    lora.eval()
    assert torch.allclose(first, lora(input_ids=ids).logits, atol=1e-6)  # training forward = sampling forward


def test_sft_steps_clip_the_gradient():
    model, _ = load_causal_lm("tiny", device="cpu")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    accelerator = make_accelerator(False, "cpu")
    scorer, optimizer = accelerator.prepare(CompletionScorer(model), torch.optim.SGD(model.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    group = [pack([[5, 6, 7], [8, 9]], [[10, 11], [12]], 0), pack([[13, 14]], [[15, 16, 17]], 0)]
    loss, grad_norm, _, tokens = train_sft.train_step(accelerator, scorer, optimizer, scheduler, group, 1e-3)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert tokens == 6 and loss > 0 and grad_norm > 1e-2  # the raw gradient is far above the clip
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3)  # SGD's step is the clipped gradient


def test_all_weights_kl_reference_is_the_start_also_after_resume(tmp_path):
    from safetensors.torch import load_file, save_file

    start = build_tiny_model(tmp_path / "start", num_layers=1)
    flags = ["--env-id", "AtomMem/SyntheticEasy-v0", "--context-tokens", "300", "--beta", "0.1", "--lora-r", "0",
             "--num-iterations", "1", "--tasks-per-iteration", "2", "--group-size", "2", "--max-new-tokens", "8",
             "--eval-episodes", "0", "--num-envs", "2", "--minibatch-size", "1000", "--max-prompt-tokens", "512"]
    first = run_script("train_grpo.py", *flags, "--model", str(start), "--save-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "a").iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def kl(run_dir):
        logs = EventAccumulator(str(run_dir))
        logs.Reload()
        return [e.value for e in logs.Scalars("losses/kl")]

    assert kl(run) == [pytest.approx(0.0, abs=1e-6)]  # the reference is the start
    # Move the checkpoint's weights away from the start: a resumed run's KL to its start is then > 0, while a
    # reference loaded from the checkpoint (or from --model) would give 0 (or fail to load).
    checkpoint = run / "checkpoint"
    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()},
              checkpoint / "model.safetensors", metadata={"format": "pt"})
    resumed = run_script("train_grpo.py", *flags, "--num-iterations", "2", "--resume", str(checkpoint), "--model", "/gone",
                   "--save-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_b,) = (tmp_path / "b").iterdir()
    assert kl(run_b)[0] > 1e-3
    state = torch.load(run_b / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["reference"]["model"] == str(start) and state["iteration"] == 2
