"""What every text generation backend returns, and the sampling settings they all check."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Generation:
    text: str
    error: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Log-probabilities of the sampled completion tokens under the sampling distribution (temperature applied)."""
    prompt_tokens_cut: int = 0
    """Chunk tokens `encode_prompt` cut to fit the prompt budget."""


def check_sampling(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
