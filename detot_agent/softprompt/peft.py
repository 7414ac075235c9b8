"""PEFT interchange: the prompt-tuning adapter folder format, written and read from plain values.

The folder holds `adapter_config.json` and `adapter_model.safetensors` (one tensor under
`prompt_embeddings`), which `peft.PeftModel.from_pretrained` loads. An export is written
through the shared persistence path (`io/persist.py`): the folder is swapped in whole and
carries a `manifest.json` with checksums, which `read_adapter` verifies when it is there
(adapters made by PEFT itself have none and are read as they are). `SoftPrompt.export_peft`
and `SoftPrompt.from_peft` (`softprompt/prompt.py`) are the user-facing calls; this module does
not know the `SoftPrompt` class, so the two files do not import each other.

Example:
    >>> import tempfile, torch
    >>> folder = write_adapter(tempfile.mkdtemp() + "/a", torch.ones(2, 4), task="arith", model_id="tiny")
    >>> read_adapter(folder).vectors.shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detot_agent.errors import ArtefactError, SoftPromptError
from detot_agent.io.persist import MANIFEST, atomic_dir, read_manifest
from detot_agent.softprompt.registry import check_soft_prompt

__all__ = ["PEFT_KIND", "PeftAdapter", "read_adapter", "write_adapter"]

PEFT_KIND = "peft-prompt-tuning"
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftAdapter:
    """What a PEFT prompt-tuning adapter holds: `vectors` `(k, hidden)` and how they were initialised."""

    vectors: torch.Tensor
    text_init: bool
    init_text: str | None
    base_model: str


def write_adapter(path: str | Path, vectors: torch.Tensor, *, task: str, model_id: str, text_init: bool = False,
                  init_text: str | None = None, base_model: str | None = None) -> Path:
    """Write a PEFT prompt-tuning adapter (`adapter_config.json` + `adapter_model.safetensors`), atomically."""
    from safetensors.torch import save_file

    k, hidden = (int(n) for n in vectors.shape)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": k,
        "token_dim": hidden, "num_transformer_submodules": 1, "inference_mode": True,
        "prompt_tuning_init": "TEXT" if text_init else "RANDOM",
        "prompt_tuning_init_text": init_text, "tokenizer_name_or_path": model_id,
        "base_model_name_or_path": base_model or model_id,
    }
    folder = Path(path)
    with atomic_dir(folder, kind=PEFT_KIND, version=1, meta={"task": task}) as tmp:
        save_file({"prompt_embeddings": vectors.detach().contiguous()}, str(tmp / _WEIGHTS))
        (tmp / _CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def read_adapter(path: str | Path, *, hidden_size: int | None = None) -> PeftAdapter:
    """Read a PEFT prompt-tuning adapter folder (checksums first when this package wrote it).

    Raises:
        ArtefactError: not a readable prompt-tuning adapter, or its vectors are malformed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / MANIFEST).is_file():  # exported here: checksums first
        read_manifest(folder, kind=PEFT_KIND, max_version=1)
    try:
        config = json.loads((folder / _CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / _WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ArtefactError(f"{folder} is not a readable PEFT adapter: {exc}") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ArtefactError(f"{folder} is a {config.get('peft_type')!r} adapter, not PROMPT_TUNING")
    if "prompt_embeddings" not in tensors:
        raise ArtefactError(f"{folder}/{_WEIGHTS} has no 'prompt_embeddings' tensor")
    vec = tensors["prompt_embeddings"]
    try:
        check_soft_prompt(vec, hidden_size=hidden_size, where=f"{folder} prompt_embeddings")
    except SoftPromptError as exc:
        raise ArtefactError(str(exc)) from None
    return PeftAdapter(vec, config.get("prompt_tuning_init") == "TEXT", config.get("prompt_tuning_init_text"),
                       str(config.get("base_model_name_or_path") or "unknown"))


def __getattr__(name: str) -> Any:
    """Deprecated since 0.4.0: `export_peft(prompt, path)` and `from_peft(path, task=...)` are
    `SoftPrompt.export_peft` and `SoftPrompt.from_peft`."""
    if name in ("export_peft", "from_peft"):
        warnings.warn(f"detot_agent.softprompt.peft.{name} is deprecated; use SoftPrompt.{name} "
                      "(detot_agent.SoftPrompt)", DeprecationWarning, stacklevel=2)
        from detot_agent.softprompt.prompt import SoftPrompt

        if name == "export_peft":
            return lambda prompt, path, **kw: SoftPrompt.export_peft(prompt, path, **kw)
        return SoftPrompt.from_peft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
