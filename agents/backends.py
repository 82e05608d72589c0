"""Text generation backends: a local Hugging Face causal LM, or an OpenAI-compatible HTTP endpoint.

Both take a batch of chat conversations and return one `Generation` each. A failed request
(HTTP error, time-out, malformed reply) is returned as a Generation with `error` set, so a vector
of episodes goes on when one request fails; the caller decides what a failure means.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    text: str
    error: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Log-probabilities of the sampled completion tokens under the sampling distribution (temperature applied)."""


def truncate_middle(ids: list[int], max_tokens: int | None) -> list[int]:
    """Cuts an over-long prompt in the middle: the head (system prompt, question) and the tail
    (end of the chunk, generation prompt) matter most. Training and generation both use this."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    head = max_tokens // 4
    return ids[:head] + ids[len(ids) - (max_tokens - head):]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class HFGenerator:
    """Batched, left-padded generation with the tokenizer's chat template; keeps token ids and log-probs."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 max_prompt_tokens: int | None = None):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, gguf_file=None, adapter=None, device="auto", dtype="auto", **kwargs):
        from .models import load_causal_lm

        model, tokenizer = load_causal_lm(name_or_path, gguf_file=gguf_file, adapter=adapter, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, messages)
        return truncate_middle(list(ids), self.max_prompt_tokens)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]]) -> list[Generation]:
        if not conversations:
            return []
        prompts = [self.encode_prompt(c) for c in conversations]
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        device = next(self.model.parameters()).device
        sample = self.temperature > 0
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=self.max_new_tokens,
            do_sample=sample, temperature=self.temperature if sample else None, top_p=self.top_p if sample else None,
            top_k=0 if sample else None, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True, output_logits=True)
        completions = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (batch, new tokens, vocab), before processors
        logprobs = torch.log_softmax(logits / (self.temperature if sample else 1.0), dim=-1)
        token_logprobs = logprobs.gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, ids in enumerate(prompts):
            tokens = completions[row].tolist()
            length = len(tokens)
            if self.tokenizer.eos_token_id in tokens:
                length = tokens.index(self.tokenizer.eos_token_id) + 1  # keep the eos: the policy learns to stop
            kept = tokens[:length]
            results.append(Generation(
                text=self.tokenizer.decode(kept, skip_special_tokens=True), prompt_ids=ids, completion_ids=kept,
                logprobs=token_logprobs[row, :length].tolist()))
        return results


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible server (vLLM, `transformers serve`, hosted APIs).

    `base_url` like "http://127.0.0.1:8000/v1"; the key comes from `api_key` or $OPENAI_API_KEY.
    Requests go one by one with a time-out and `max_retries` retries on connection errors and 5xx.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, timeout: float = 60.0, max_retries: int = 1):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL (or set OPENAI_BASE_URL), got {self.base_url!r}")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.model:
            raise ValueError("an OpenAI-compatible endpoint needs a model name (model= or OPENAI_MODEL)")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.max_retries = max_retries

    def _request(self, messages: list[dict]) -> Generation:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error = ""
        for _ in range(self.max_retries + 1):
            request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                return Generation(text=payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:200]
                error = f"HTTP {err.code} from {self.base_url}: {detail}"
                if err.code < 500:
                    break
            except (socket.timeout, TimeoutError):
                error = f"no reply from {self.base_url} within {self.timeout} s"
            except urllib.error.URLError as err:
                error = f"cannot reach {self.base_url}: {err.reason}"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                error = f"malformed reply from {self.base_url}: {err!r}"
                break
        return Generation(text="", error=error)

    def generate(self, conversations: list[list[dict]]) -> list[Generation]:
        return [self._request(c) for c in conversations]
