"""Tokenizer helpers: loading, prompt and chat encoding, EOS ids.

Incremental detokenization with stop strings lives in ``engine/detokenizer.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(
    path: str | os.PathLike, gguf_file: str | None = None, hf_config: Any = None
) -> PreTrainedTokenizerBase:
    """A transformers tokenizer from a local HF folder, or from a GGUF file.

    ``path`` may name the ``.gguf`` file itself, or a folder with ``gguf_file`` naming the file
    inside it (the tokenizer and chat template are read from the GGUF metadata). ``hf_config``, the
    folder's already loaded model config, spares transformers reading config.json again.
    """
    path = os.fspath(path)
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.split(os.path.abspath(path))
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(path, **({"config": hf_config} if hf_config is not None else {}))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids with the special tokens the model expects (BOS where the tokenizer adds one)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return list(tokenizer(prompt).input_ids)


CHAT_ROLES = ("system", "user", "assistant")  # what chat templates render; tool calling is not served


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Renders ``messages`` with the tokenizer's chat template and encodes the result.

    The template writes BOS and other special tokens itself, so encoding adds none.
    Raises ValueError when the tokenizer has no chat template, a message is malformed, or the
    template rejects the conversation.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
    _check_messages(messages)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja2 TemplateError and the template's own raise_exception(...)
        raise ValueError(f"chat template rejected the messages: {e}") from e
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            shown = repr(role) if len(repr(role)) <= 64 else repr(role)[:61] + "..."
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {shown}")
        if "content" not in message:
            raise ValueError(f"messages[{i}].content is missing")
        content = message["content"]
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"messages[{i}].content[{j}] must be an object with a string 'type'")
        elif not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}"
            )


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> tuple[int, ...]:
    """Every id that ends generation, the tokenizer's EOS first (the one to use as "the" EOS id).

    ``generation_config`` is a transformers GenerationConfig, a dict (generation_config.json), a
    model folder holding generation_config.json, or None. Its ``eos_token_id`` may be an int or a
    list (Llama 3 lists several). Empty when neither names one.
    """
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    if isinstance(generation_config, (str, os.PathLike)):
        generation_config = _read_generation_config(generation_config)
    if isinstance(generation_config, dict):
        extra = generation_config.get("eos_token_id")
    else:
        extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        extra = [extra]
    for token_id in extra or ():
        if int(token_id) not in ids:
            ids.append(int(token_id))
    return tuple(ids)


def eos_token_id(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> int | None:
    """The main EOS id (first of ``eos_token_ids``), or None when the model names none."""
    ids = eos_token_ids(tokenizer, generation_config)
    return ids[0] if ids else None


def _read_generation_config(model_dir: str | os.PathLike) -> dict | None:
    path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
