"""The review findings on the trainers and the env (issue 23), by item number; each test failed before its fix."""

import importlib
import json
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

from conftest import HOTPOT_HF, REPO

import atommem_env  # noqa: F401  (registers the ids)
import train_grpo
import train_sft
from agents import HFGenerator, build_messages
from agents.models import build_tiny_model, load_causal_lm
from agents.training import CompletionScorer, StepSample, disable_dropout, make_accelerator, pack, token_logprobs

SCRIPTS = {"train_sft.py": "train_sft", "train_grpo.py": "train_grpo", "eval.py": "eval"}
COMMAND = re.compile(r"(?:python|accelerate launch|torchrun)\b[^`#]*?\b(train_sft|train_grpo|eval)\.py\b")


def _run(script, *flags, timeout=300):
    return subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _shell_variables(lines: list[str]) -> dict:
    """`NAME=value` assignments and `for NAME in first ...` loops of a code block: what its commands expand."""
    values = {}
    for line in lines:
        if m := re.match(r"\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$", line):
            values[m.group(1)] = " ".join(shlex.split(m.group(2)))
        if m := re.search(r"\bfor\s+([A-Za-z_]\w*)\s+in\s+(\S+)", line):
            values[m.group(1)] = m.group(2)
    return values


def _commands(text: str, variables: dict) -> list[str]:
    """The argument lists of every trainer / eval.py command in `text`, as the shell would split them."""
    found = []
    for m in COMMAND.finditer(text):
        rest = text[m.end():]
        rest = re.sub(r"<[^<>\n]*>", "x", rest.split("\n")[0])  # placeholders such as <sft run>
        rest = re.split(r"\s(?:&&|\||;|2>&1|>)\s|;\s*done|`", rest + " ")[0]
        # "$VAR" stays one word; a bare $VAR splits into words, as in the shell.
        rest = re.sub(r'"\$\{?([A-Za-z_]\w*)\}?"', lambda v: shlex.quote(variables.get(v.group(1), "1")), rest)
        rest = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda v: variables.get(v.group(1), "1"), rest)
        expanded = []
        for word in shlex.split(rest, comments=True):
            word = re.sub(r"\{([^{},]*),[^{}]*\}", r"\1", word) if not word.startswith("{\"") else word  # {1,2,3}
            if word != "...":
                expanded.append(word)
        found.append((m.group(1) + ".py", expanded))
    return found


def documented_commands():
    """(file, script, arguments) for every command in README.md and docs/*.md; a continuation line that no
    command owns (a comment swallowed the backslash before it) is reported as a command of its own."""
    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
        for block in blocks:
            joined = []
            for line in block.splitlines():
                code = line.split(" #")[0].rstrip()
                if joined and joined[-1].endswith("\\"):
                    joined[-1] = joined[-1][:-1] + " " + code.strip()
                else:
                    joined.append(code)
            variables = _shell_variables(joined)
            for line in joined:
                if line.strip().startswith("--"):
                    commands.append((path.name, "orphan", line.strip()))
                for script, words in _commands(line, variables):
                    commands.append((path.name, script, words))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for script, words in _commands(span, {}):
                commands.append((path.name, script, words))
    return commands


# 1. Every documented command parses with its script's own tyro parser.
def test_every_documented_command_parses():
    commands = documented_commands()
    assert sum(script == "train_sft.py" for _, script, _ in commands) >= 5
    assert sum(script == "eval.py" for _, script, _ in commands) >= 10
    failures = []
    for source, script, words in commands:
        if script == "orphan":
            failures.append(f"{source}: a continuation line outside any command: {words}")
            continue
        module = importlib.import_module(SCRIPTS[script])
        try:
            tyro.cli(module.Args, args=words)
        except SystemExit:
            failures.append(f"{source}: {script} {' '.join(words)}")
    assert not failures, "\n".join(failures)


def test_the_command_extractor_sees_what_the_shell_sees():
    line = 'python eval.py --env-kwargs "$KW" --model runs/<run>/checkpoint --seed {1,2}  # x'
    ((script, words),) = _commands(line, _shell_variables(["KW='{\"top_k\": 3}'"]))
    assert script == "eval.py" and words == ["--env-kwargs", '{"top_k": 3}', "--model", "runs/x/checkpoint",
                                             "--seed", "1"]
    with pytest.raises(SystemExit):  # a bare --bf16 (bool | None) is what broke docs/train_sft.md
        tyro.cli(train_sft.Args, args=["--bf16"])


# 2. A group whose rewards are equal up to rounding gives no signal.
def test_groups_equal_up_to_rounding_count_as_zero_std_and_get_no_advantage():
    rewards = np.array([.8, .8, .8, 1, 0, 0])
    assert np.std(rewards[:3], ddof=1) > 0  # 1.4e-16: the exact test missed it
    advantages, zero_std = train_grpo.group_advantages(rewards, 3, True)
    assert zero_std == 0.5 and (advantages[:3] == 0).all() and (advantages[3:] != 0).all()
    _, zero_std = train_grpo.group_advantages(rewards, 3, False)
    assert zero_std == 0.5


# 3. and 8. An id that pads by document count: lengths are refused before any model loads; none given, its own.
@pytest.mark.parametrize("script, flag", [("train_sft.py", "--context-tokens"), ("train_grpo.py", "--context-tokens"),
                                          ("train_sft.py", "--eval-context-tokens"),
                                          ("train_grpo.py", "--eval-context-tokens")])
def test_a_length_an_id_cannot_take_fails_before_the_model_loads(script, flag):
    result = _run(script, "--env-id", "AtomMem/HotpotQA-MultiQuery-v0", "--data-path", str(HOTPOT_HF), flag, "3000",
                  "--model", "/no/such/model")
    assert result.returncode != 0
    assert "pads by document count" in result.stderr and "model path not found" not in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_runs_an_id_that_pads_by_document_count_on_its_registered_setting(tmp_path):
    result = _run("eval.py", "--env-id", "AtomMem/HotpotQA-MultiQuery-v0", "--data-path", str(HOTPOT_HF),
                  "--policies", "oracle", "--num-episodes", "1", "--num-envs", "1", "--embedder", "hashing",
                  "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["oracle"]["200docs"]["em"] == 1.0


# 4. --resume takes only its own script's checkpoints, and says so before any model work.
@pytest.mark.parametrize("script, other_state, missing", [
    ("train_grpo.py", {"optimizer": {}, "scheduler": {}, "step": 3}, "iteration, reference"),
    ("train_sft.py", {"optimizer": {}, "iteration": 2, "reference": {"model": "tiny"}}, "scheduler, step"),
])
def test_resume_refuses_the_other_trainers_checkpoint(script, other_state, missing, tmp_path):
    torch.save(other_state, tmp_path / "trainer_state.pt")
    result = _run(script, "--resume", str(tmp_path), "--save-dir", str(tmp_path / "runs"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"not a {script} checkpoint (its trainer_state.pt has no {missing})" in result.stderr
    assert "give it as --model" in result.stderr
    assert not (tmp_path / "runs").exists()


# 5. A completion cut at --max-completion-tokens does not end in eos.
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


# 6. The HF backend in bf16: the old log-probs are the training forward's, not cached decoding's.
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
    result = _run("train_grpo.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(run))
    logs.Reload()
    # One minibatch scored before the step: only the padding of other micro-batches can move a bf16 ratio.
    assert [e.value for e in logs.Scalars("losses/approx_kl")][0] < 1e-6
    assert [e.value for e in logs.Scalars("losses/clipfrac")] == [0.0]
    assert [e.value for e in logs.Scalars("rollout/logprob_diff_mean")][0] > 0  # the sampler gap, logged for hf too


# 7. The async vector env reports a bad data path as clearly as the sync one.
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
    first = _run("train_grpo.py", *flags, "--model", str(start), "--save-dir", str(tmp_path / "a"))
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
    resumed = _run("train_grpo.py", *flags, "--num-iterations", "2", "--resume", str(checkpoint), "--model", "/gone",
                   "--save-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_b,) = (tmp_path / "b").iterdir()
    assert kl(run_b)[0] > 1e-3
    state = torch.load(run_b / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["reference"]["model"] == str(start) and state["iteration"] == 2
