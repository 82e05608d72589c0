"""Text generation backends: a local Hugging Face causal LM, or an OpenAI-compatible HTTP endpoint.

Both take a batch of chat conversations and return one `Generation` each. A failed request
(HTTP error, time-out, malformed reply) is returned as a Generation with `error` set, so a vector
of episodes goes on when one request fails; the caller decides what a failure means.
"""

from __future__ import annotations

import asyncio
import inspect
import os

import torch

from .generation import Generation, check_sampling
from .prompt import encode_prompt


def local_sampler(model, tokenizer, engine=None, **settings):
    """The one builder of a generator over a loaded model: its vLLM `engine`'s (agents.vllm_backend) when it
    has one, else transformers' decoding loop. `settings`: max_new_tokens, temperature, max_prompt_tokens."""
    if engine is not None:
        from .vllm_backend import VLLMGenerator

        return VLLMGenerator(engine, tokenizer, **settings)
    return HFGenerator(model, tokenizer, **settings)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class HFGenerator:
    """Batched, left-padded sampling with the tokenizer's chat template; keeps token ids and log-probs.

    The decoding loop is written out rather than left to `generate`, which applies whatever the
    model's generation_config carries (Qwen2.5-Instruct ships repetition_penalty=1.05, others
    min_p or top_k): the log-probs kept for GRPO must be those of the distribution sampled from,
    softmax(logits / temperature), and nothing else. It also keeps one (batch, vocab) row of
    log-probs at a time, never (batch, new tokens, vocab). temperature=0 is greedy.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0,
                 max_prompt_tokens: int | None = None):
        check_sampling(max_new_tokens, temperature)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_prompt_tokens = max_prompt_tokens
        # transformers 5.2x renamed `past_key_values` to `cache`; our floor (4.49) knows only the old name.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, gguf_file=None, adapter=None, device="auto", dtype="auto", **kwargs):
        from .models import load_causal_lm

        model, tokenizer = load_causal_lm(name_or_path, gguf_file=gguf_file, adapter=adapter, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    def encode_prompt(self, messages: list[dict]) -> tuple[list[int], int]:
        return encode_prompt(self.tokenizer, messages, self.max_prompt_tokens)

    def _next_tokens(self, logits: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampled token per row, its log-prob under softmax(logits / temperature))."""
        if self.temperature == 0:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            tokens = logprobs.argmax(-1)
        else:
            logprobs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], generator: torch.Generator | None = None) -> list[Generation]:
        if not conversations:
            return []
        encoded = [self.encode_prompt(c) for c in conversations]
        prompts = [ids for ids, _ in encoded]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        # Positions count real tokens only, as in training's left-padded forward (agents.training.pack).
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        tokens, logprobs = [], []
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for _ in range(self.max_new_tokens):
            token, logprob = self._next_tokens(out.logits[:, -1], generator)
            token = token.masked_fill(finished, pad)
            tokens.append(token)
            logprobs.append(logprob)
            finished |= token == eos
            if bool(finished.all()) or len(tokens) == self.max_new_tokens:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=token[:, None], attention_mask=attention, position_ids=positions,
                             use_cache=True, **{self._cache_argument: _cache_of(out)})
        completions = torch.stack(tokens, dim=1).cpu()
        completion_logprobs = torch.stack(logprobs, dim=1).cpu()
        results = []
        for row, (ids, cut) in enumerate(encoded):
            kept = completions[row].tolist()
            if eos in kept:
                kept = kept[:kept.index(eos) + 1]  # keep the eos: the policy learns to stop
            results.append(Generation(
                text=self.tokenizer.decode(kept, skip_special_tokens=True), prompt_ids=ids, completion_ids=kept,
                logprobs=completion_logprobs[row, :len(kept)].tolist(), prompt_tokens_cut=cut))
        return results


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible server (`vllm serve`, `transformers serve`, hosted APIs).

    `base_url` like "http://127.0.0.1:8000/v1"; the key comes from `api_key` or $OPENAI_API_KEY. A batch
    goes out concurrently (at most `max_concurrency` requests at a time) on the `openai` client, which
    retries connection errors, 429 and 5xx with exponential back-off (`max_retries`, honouring
    Retry-After). `timeout` is a total deadline per request, retries included: a server that trickles
    bytes cannot hold a request past it. Any failure comes back as a Generation with `error`.

    With `token_ids` (default) each request asks for the sampled tokens' log-probs and, through vLLM's
    `return_token_ids`, the prompt's and the completion's token ids, so a trajectory keeps what the server
    sampled, never a re-tokenisation of its text. A server without `return_token_ids` answers without them
    (the ids stay empty); one that rejects the unknown field needs `token_ids=False`.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, timeout: float = 60.0, max_retries: int = 3,
                 max_concurrency: int = 16, token_ids: bool = True):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL (or set OPENAI_BASE_URL), got {self.base_url!r}")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.model:
            raise ValueError("an OpenAI-compatible endpoint needs a model name (model= or OPENAI_MODEL)")
        if timeout <= 0 or max_retries < 0 or max_concurrency <= 0:
            raise ValueError("timeout and max_concurrency must be positive, max_retries >= 0")
        # A local server needs no key, but the client insists on one.
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "none"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.token_ids = token_ids

    async def _request(self, client, limit: asyncio.Semaphore, messages: list[dict]) -> Generation:
        import openai

        try:
            extra = {"logprobs": True, "extra_body": {"return_token_ids": True}} if self.token_ids else {}
            async with limit:
                response = await asyncio.wait_for(client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_new_tokens,
                    temperature=self.temperature, **extra), self.timeout)
            choice = response.choices[0]
            content = choice.message.content
            if content is not None and not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not text")
            return Generation(text=content or "", **self._tokens_of(response, choice))
        except asyncio.TimeoutError:
            error = f"no complete reply from {self.base_url} within {self.timeout} s"
        except openai.APIStatusError as err:
            error = f"HTTP {err.status_code} from {self.base_url}: {str(err.message)[:200]}"
        except openai.APIConnectionError as err:
            error = f"cannot reach {self.base_url} or the connection broke: {err.__cause__ or err}"
        except (openai.APIResponseValidationError, AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
            error = f"malformed reply from {self.base_url}: {err!r}"[:300]
        return Generation(text="", error=error)

    @staticmethod
    def _tokens_of(response, choice) -> dict:
        """The reply's prompt and completion token ids and the completion's log-probs, where the server sent them."""
        prompt_ids = getattr(response, "prompt_token_ids", None) or []
        completion_ids = getattr(choice, "token_ids", None) or []
        content = getattr(choice.logprobs, "content", None) or []
        logprobs = [float(item.logprob) for item in content]
        if not all(isinstance(i, int) for i in [*prompt_ids, *completion_ids]):
            raise TypeError("token ids that are not integers")
        # Log-probs count only when they cover the completion's tokens one to one.
        return {"prompt_ids": list(prompt_ids), "completion_ids": list(completion_ids),
                "logprobs": logprobs if completion_ids and len(logprobs) == len(completion_ids) else []}

    async def agenerate(self, conversations: list[list[dict]]) -> list[Generation]:
        """`generate` for callers already inside an event loop (the verifiers harness)."""
        import openai

        limit = asyncio.Semaphore(self.max_concurrency)
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=self.max_retries,
                                      timeout=self.timeout) as client:
            return list(await asyncio.gather(*[self._request(client, limit, c) for c in conversations]))

    def generate(self, conversations: list[list[dict]]) -> list[Generation]:
        return asyncio.run(self.agenerate(conversations)) if conversations else []
