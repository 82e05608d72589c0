"""Ceilings of a setting: what the best scripted policy of each kind scores, so a setting shows its claim.

    python study/ceilings.py --env-id AtomMem/SyntheticVolatileBudget-v0 --num-episodes 256 \
        --out docs/results/study/ceilings_volatile_budget.json

Each probe reads perfectly and remembers nothing of its own between steps: what it knows of earlier chunks is what
the env's memory, scratchpad and Reads show it (a policy object with its own memory could answer without the env's).
It knows the question's entity and relation and finds every statement of that fact in the chunk it is shown (the
statements of a look-alike entity are not about the asked entity). The probes, for one-hop questions:

| probe | ops | what it does |
|---|---|---|
| crud | C R U | Reads the entity before writing, then Updates the entry shown (Creates the first); answers from a Read |
| append-id | C R | Creates every statement of the fact; answers with the entry of the highest id |
| append-stamped | C R | Creates every statement with its chunk number in front; answers with the latest stamp |
| write-once-optimal | C R S | one Create, where the Bayes-optimal stopping rule says (counting the statements seen in the scratchpad, the version count's prior and uniform positions given): the best a policy that cannot rewrite an entry can do once the memory holds one entry |
| scratchpad | S | keeps the latest value in the scratchpad, cut to its limit; answers from it |
| rag-reader | C R | the rag workflow (each chunk Created) with a perfect reader: the latest statement among the chunks a Read shows |

Prints a markdown table and writes a JSON report of EM per probe and setting column: the env id as registered, and the
constraints lifted one by one (`--columns`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atommem_env  # noqa: E402
from agents.evaluation import evaluate_policy, make_env_kwargs  # noqa: E402
from agents.policies import Policy, PolicyOutput, answering  # noqa: E402
from atommem_env.data.synthetic import RELATIONS  # noqa: E402

PROBES = ("crud", "append-id", "append-stamped", "write-once-optimal", "scratchpad", "rag-reader")
COLUMNS = {
    "registered": {},
    "no entry budget": {"max_entries": None},
    "no entry budget, sequential ids": {"max_entries": None, "entry_ids": "sequential"},
    "no scratchpad limit": {"max_scratchpad_chars": 4000},
}
_STAMP = re.compile(r"^\[chunk (\d+)\] ")
_ENTRY_START = re.compile(r"\[id (\d+)\] ")


def asked_fact(question: str):
    """(relation, entity) of a one-hop synthetic question; ValueError for any other question."""
    for relation in RELATIONS:
        # An entity's name starts with a capital; "the city where ..." is a further hop.
        pattern = "^What is " + re.escape(relation.phrase).replace(r"\{x\}", "(?P<x>[A-Z][^?]*)") + r"\?$"
        if match := re.match(pattern, question):
            return relation, match["x"]
    raise ValueError(f"not a one-hop synthetic question: {question!r}")


def statement_values(text: str, relation, entity: str) -> list[str]:
    """The values `text` states for (entity, relation), in order, in the first or the change wording."""
    templates = [t for t in (relation.statement, relation.change) if t]
    patterns = [re.escape(t).replace(r"\{s\}", re.escape(entity)).replace(r"\{o\}", r"(?P<o>[^.]+?)") for t in templates]
    found = [(m.start(), m["o"]) for p in patterns for m in re.finditer(r"(?:^|(?<=[\s\]]))" + p, text)]
    return [value for _, value in sorted(found)]


def _likelihood(n, v, c, j):
    """P(j of v statements fall in the first c of n chunks)."""
    return math.comb(v, j) * (c / n) ** j * (1 - c / n) ** (v - j) if j <= v else 0.0


@functools.cache
def _stopping(n: int, lo: int, hi: int):
    """The value function of keeping the last of V ~ U{lo..hi} statements, each in a chunk drawn uniformly from n,
    with one write: best(chunks seen, statements seen, written) where written is None, "last" or "stale"."""

    @functools.cache
    def best(c, j, written):
        if c == n:
            return 1.0 if written == "last" else 0.0
        weights = {v: _likelihood(n, v, c, j) for v in range(lo, hi + 1)}
        total_weight = sum(weights.values())
        value = 0.0
        for v, weight in weights.items():
            left, q = v - j, 1 / (n - c)
            for k in range(left + 1):
                p = weight / total_weight * math.comb(left, k) * q ** k * (1 - q) ** (left - k)
                if not p:
                    continue
                if k == 0:
                    value += p * best(c + 1, j, written)
                elif written:
                    value += p * best(c + 1, j + k, "stale")
                else:
                    value += p * max(best(c + 1, j + k, "last"), best(c + 1, j + k, None))
        return value

    return best


def optimal_success(n: int, lo: int, hi: int) -> float:
    """The probability that the Bayes-optimal single write keeps the last statement."""
    return _stopping(n, lo, hi)(0, 0, None)


@functools.cache
def write_value(n: int, lo: int, hi: int) -> dict:
    """The write-once rule: (chunk index, statements seen up to and in it) -> (success if the chunk's last statement
    is written now, success if the policy waits)."""
    best = _stopping(n, lo, hi)
    return {(c, j): (best(c + 1, j, "last"), best(c + 1, j, None)) for c in range(n) for j in range(1, hi + 1)
            if any(_likelihood(n, v, c + 1, j) for v in range(lo, hi + 1))}


@dataclass
class Probe(Policy):
    """One probe of the table above; `versions` is the setting's prior on the number of statements of a fact."""

    kind: str
    versions: tuple[int, int] = (2, 8)
    name: str = field(init=False)

    def __post_init__(self):
        if self.kind not in PROBES:
            raise ValueError(f"unknown probe {self.kind!r}; choose from {PROBES}")
        self.name = self.kind

    def act(self, observations, tasks=None, slots=None):
        return [PolicyOutput(self._act(obs)) for obs in observations]

    def _act(self, obs) -> str:
        relation, entity = asked_fact(obs["question"])
        if answering(obs):
            return self._answer(obs, relation, entity)
        if self.kind == "rag-reader":
            return f"<create>{obs['chunk']}</create>"
        values = statement_values(obs["chunk"], relation, entity)
        chunk = int(obs["chunk_index"])
        if not values:
            return ""
        latest = relation.statement.format(s=entity, o=values[-1])
        if self.kind == "scratchpad":
            return f"<scratchpad>{values[-1]}</scratchpad>"
        if self.kind == "append-id":
            return f"<create>{latest}</create>"
        if self.kind == "append-stamped":
            return f"<create>[chunk {chunk}] {latest}</create>"
        if self.kind == "write-once-optimal":
            seen = int(obs["scratchpad"] or 0) + len(values)
            count = f"<scratchpad>{seen}</scratchpad>"
            if int(obs["memory_size"]):
                return count
            now, wait = write_value(int(obs["num_chunks"]), *self.versions)[(chunk, seen)]
            return count + (f"<create>{latest}</create>" if now >= wait else "")
        if not obs["retrieved"]:  # crud: look the entity up first, on this chunk
            return "" if int(obs["reads_left"]) == 0 else f"<read>{entity}</read>"
        shown = [entry_id for entry_id, text in shown_entries(obs["retrieved"]) if statement_values(text, relation, entity)]
        return f'<update id="{shown[0]}">{latest}</update>' if shown else f"<create>{latest}</create>"

    def _answer(self, obs, relation, entity) -> str:
        if self.kind == "scratchpad":
            return f"<answer>{obs['scratchpad'] or 'unknown'}</answer>"
        if not obs["retrieved"] and int(obs["reads_left"]) > 1:
            return f"<read>{entity}</read>"
        candidates = []  # ((order, position in the entry), value)
        for entry_id, text in shown_entries(obs["retrieved"]):
            stamp = _STAMP.match(text)
            for position, value in enumerate(statement_values(text, relation, entity)):
                if self.kind == "append-stamped":
                    order = int(stamp[1]) if stamp else -1
                elif self.kind == "rag-reader":  # a stored chunk tells where it was by its "Document i:" headers
                    order = max((int(m[1]) for m in re.finditer(r"Document (\d+):", text[:text.rfind(value)])),
                                default=0)
                else:
                    order = entry_id
                candidates.append(((order, position), value))
        return f"<answer>{max(candidates)[1] if candidates else 'unknown'}</answer>"


def shown_entries(retrieved: str) -> list[tuple[int, str]]:
    """(id, text) of each `[id N] text` entry a Read showed, later lines unindented."""
    entries = []
    for block in re.split(r"^(?=\[id \d+\] )", retrieved, flags=re.M):
        if match := _ENTRY_START.match(block):
            entries.append((int(match[1]), block[match.end():].rstrip("\n").replace("\n    ", "\n")))
    return entries


@dataclass
class Args:
    env_id: str = "AtomMem/SyntheticVolatileBudget-v0"
    """a synthetic env id with one-hop questions"""
    num_episodes: int = 256
    """eval-split tasks 0..N-1 per probe and column"""
    probes: tuple[str, ...] = PROBES
    """probes to run"""
    columns: tuple[str, ...] = tuple(COLUMNS)
    """setting columns: the id as registered, and its constraints lifted"""
    embedder: str = "hashing"
    """memory embedder (the probes name the entity exactly, so hashing ranks as well as MiniLM here)"""
    num_envs: int = 8
    """vector envs"""
    out: str | None = None
    """JSON report to write (its directory must exist)"""


def ceilings(args: Args) -> dict:
    """{column: {probe: EM}} over the first `num_episodes` eval tasks."""
    registered = atommem_env.ENV_IDS[args.env_id]
    versions = tuple(registered.get("synthetic", {}).get("versions", (2, 2)))
    table = {}
    for column in args.columns:
        kwargs = make_env_kwargs(args.env_id, split="eval", embedder=args.embedder, extra=COLUMNS[column])
        table[column] = {probe: evaluate_policy(Probe(probe, versions), args.env_id, kwargs, args.num_episodes,
                                                args.num_envs, seed=0)["em"] for probe in args.probes}
    return table


def check_args(args: Args) -> None:
    if args.env_id not in atommem_env.ENV_IDS or atommem_env.ENV_IDS[args.env_id].get("dataset") != "synthetic":
        raise SystemExit(f"error: --env-id must be a registered synthetic id, got {args.env_id!r}")
    unknown = sorted(set(args.probes) - set(PROBES)) + sorted(set(args.columns) - set(COLUMNS))
    if unknown:
        raise SystemExit(f"error: unknown probes or columns {unknown}; probes {PROBES}, columns {tuple(COLUMNS)}")
    if args.num_episodes <= 0 or args.num_envs <= 0:
        raise SystemExit("error: --num-episodes and --num-envs must be positive")
    if args.out and not Path(args.out).parent.is_dir():
        raise SystemExit(f"error: --out: no directory {Path(args.out).parent}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    table = ceilings(args)
    print(f"| probe | {' | '.join(args.columns)} |\n|---|{'---|' * len(args.columns)}")
    for probe in args.probes:
        print(f"| {probe} | " + " | ".join(f"{table[c][probe]:.3f}" for c in args.columns) + " |")
    if args.out:
        report = {"env_id": args.env_id, "split": "eval", "tasks": [0, args.num_episodes],
                  "env_kwargs": {c: COLUMNS[c] for c in args.columns}, "em": table,
                  "command": "python study/ceilings.py " + " ".join(sys.argv[1:])}
        Path(args.out).write_text(json.dumps(report, indent=1))
