"""A text space for real documents: any Unicode string up to `max_length` characters.

Gymnasium's `spaces.Text` only accepts characters from its charset (letters and digits by
default), so documents with spaces, punctuation or accents fall outside it. This subclass keeps
`Text`'s interface (and so its vector-env batching) but accepts every string, and `sample()`
draws strings from a charset of ASCII printables, markup characters and a few non-ASCII
letters, at most `sample_max_length` long so that samples of a 1M-character space stay small.

Shared memory (AsyncVectorEnv's default) would reserve `max_length` characters per field and env:
gigabytes for a document field. Asking for it raises at once with what to do instead.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils.shared_memory import create_shared_memory

SAMPLE_CHARSET = string.printable + "éüßøñçłžЖж中文"


class UnicodeText(spaces.Text):
    def __init__(self, max_length: int, *, min_length: int = 0, sample_max_length: int = 512, seed=None):
        super().__init__(max_length=max_length, min_length=min_length, charset=SAMPLE_CHARSET, seed=seed)
        self.sample_max_length = min(sample_max_length, max_length)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def sample(self, mask=None, probability=None) -> str:
        if mask is not None or probability is not None:
            return super().sample(mask=mask, probability=probability)
        length = int(self.np_random.integers(self.min_length, self.sample_max_length + 1))
        chars = self.np_random.choice(np.array(list(SAMPLE_CHARSET)), size=length)
        return "".join(chars.tolist())

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, UnicodeText) and self.min_length == other.min_length
                and self.max_length == other.max_length)


@create_shared_memory.register(UnicodeText)
def _refuse_shared_memory(space: UnicodeText, n: int = 1, ctx=None):
    raise ValueError(
        f"AtomMem observations are text of up to {space.max_length:,} characters, too large for shared memory: "
        "use gym.make_vec(..., vectorization_mode='async', vector_kwargs={'shared_memory': False}), "
        "or AsyncVectorEnv(..., shared_memory=False)")
