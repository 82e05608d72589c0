"""Policies for the AtomMem environment, and the LLM backends they use."""

from .backends import Generation, HFGenerator, OpenAIGenerator, local_sampler
from .policies import (LLMPolicy, MemAgentPolicy, NoMemoryPolicy, NoOpPolicy, OraclePolicy, Policy, PolicyOutput,
                       RAGPolicy, RandomPolicy, unbatch)
from .prompt import build_messages

__all__ = ["Policy", "PolicyOutput", "unbatch", "build_messages", "make_policy", "make_generator", "POLICIES",
           "NoOpPolicy", "RandomPolicy", "OraclePolicy", "NoMemoryPolicy", "MemAgentPolicy", "RAGPolicy", "LLMPolicy",
           "Generation", "HFGenerator", "OpenAIGenerator", "local_sampler"]

POLICIES = ("noop", "random", "oracle", "oracle-broad", "oracle-hops", "oracle-lookup", "oracle-scan", "no-memory",
            "memagent", "rag", "write-only", "read-only", "llm")
READER_POLICIES = ("no-memory", "memagent", "rag", "write-only", "read-only")


def make_generator(model: str, *, endpoint: str | None = None, adapter: str | None = None, device: str = "auto",
                   dtype: str = "auto", max_new_tokens: int = 128, temperature: float = 0.0,
                   max_prompt_tokens: int | None = None, timeout: float = 60.0, backend: str = "hf", seed: int = 0,
                   endpoint_token_ids: bool = True, vllm_enforce_eager: bool = False):
    """An HF model (id, path, 'tiny', 'smollm2') run by transformers (backend "hf") or by a vLLM engine in this
    process ("vllm", without torch.compile if `vllm_enforce_eager`), or with `endpoint` an OpenAI-compatible server
    (asked for token ids unless `endpoint_token_ids` is False)."""
    if vllm_enforce_eager and (endpoint or backend != "vllm"):
        raise ValueError("--vllm-enforce-eager is for a local vLLM engine (--backend vllm, no --endpoint)")
    if endpoint:
        return OpenAIGenerator(endpoint, model, max_new_tokens=max_new_tokens, temperature=temperature, timeout=timeout,
                               token_ids=endpoint_token_ids)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, max_prompt_tokens=max_prompt_tokens)
    if backend == "vllm":
        from .models import load_tokenizer
        from .vllm_backend import VLLMEngine, hf_directory

        engine = VLLMEngine(hf_directory(model, adapter=adapter), dtype=dtype, seed=seed,
                            enforce_eager=vllm_enforce_eager)
        return local_sampler(None, load_tokenizer(adapter or model), engine, **settings)
    if backend != "hf":
        raise ValueError(f"backend must be hf or vllm, got {backend!r}")
    from .models import load_causal_lm

    return local_sampler(*load_causal_lm(model, adapter=adapter, device=device, dtype=dtype), **settings)


def make_policy(name: str, *, generator=None, protocol: str = "atommem", seed: int = 0,
                single_message: bool = False, enabled_ops=None) -> Policy:
    """A policy by name; reader workflows and `llm` take a generator (see make_generator); `single_message`: the
    `llm` policy sends its system prompt inside the user message; `enabled_ops`: the env's, for the oracles (which
    Create where Update is off)."""
    if name == "noop":
        return NoOpPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name in ("oracle", "oracle-broad", "oracle-hops", "oracle-lookup", "oracle-scan"):
        return OraclePolicy(protocol, look_alikes=name not in ("oracle", "oracle-scan"), enabled_ops=enabled_ops,
                            read_per_hop=name in ("oracle-hops", "oracle-lookup"), look_up=name == "oracle-lookup",
                            read_each_chunk=name == "oracle-scan")
    if name in READER_POLICIES and protocol != "atommem":
        raise ValueError(f"the {name} workflow writes the atommem protocol")
    if name == "no-memory":
        return NoMemoryPolicy(generator)
    if name == "memagent":
        return MemAgentPolicy(generator)
    if name == "rag":
        return RAGPolicy(generator)
    if name == "write-only":
        return RAGPolicy(generator, read=False)
    if name == "read-only":
        return RAGPolicy(generator, write=False)
    if name == "llm":
        if generator is None:
            raise ValueError("the llm policy needs a generator (a model)")
        return LLMPolicy(generator, protocol, single_message)
    raise ValueError(f"unknown policy {name!r}; choose from {POLICIES}")
