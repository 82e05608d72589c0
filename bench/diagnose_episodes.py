"""Diagnosis of an LLM policy's failed episodes: its actions step by step, and where its answer came from.

    python bench/diagnose_episodes.py    # the first SmolLM2 SFT checkpoint of docs/train_sft.md (128 episodes)

Reruns, greedy with transformers, the first six eval-split SyntheticEasy-v0 episodes (400 tokens) that
docs/results/learning/sft_128ep.json records as wrong, prints each step's question, retrieved entries and
action, then whether the answer and the gold answer appear in the document and the sentence the answer
was taken from. CK names the checkpoint (a run directory of this machine: change it for yours).
"""
import json
from agents import HFGenerator, LLMPolicy
from agents.evaluation import make_env_kwargs, make_vector_env, run_episodes
CK = "runs/AtomMem_SyntheticEasy-v0__smollm2_sft__1__1795560864/checkpoint"
recs = json.load(open("docs/results/learning/sft_128ep.json"))["results"]["llm"]["400"]["records"]
wrong = [r["task_index"] for r in recs if r["em"] == 0][:6]
gen = HFGenerator.from_pretrained(CK, device="cpu", dtype="float32", max_new_tokens=96, max_prompt_tokens=1024)
envs = make_vector_env("AtomMem/SyntheticEasy-v0", make_env_kwargs("AtomMem/SyntheticEasy-v0", split="eval", embedder="hashing", context_tokens=400), 6)
eps = run_episodes(envs, LLMPolicy(gen), [[t] for t in wrong], seed=0, keep_steps=True)
for e in eps:
    print("=== gold", e["gold"], "answer", e["answer"], "em", e["em"])
    for obs, out in e["steps"]:
        print("Q:", obs["question"][:100], "| retrieved:", obs["retrieved"][:150].replace("\n", " / "), "| ACTION:", out.text[:200].replace("\n", " / "))
print("---")
for e in eps:
    chunk = " ".join(o["chunk"] for o, _ in e["steps"])
    ans = e["answer"][0]
    import re
    print(ans, "in document:", ans in chunk, "| gold in document:", e["gold"][0][0] in chunk, "| sentence with answer:", [s for s in re.split(r"(?<=\.)\s", chunk) if ans in s][:1])
