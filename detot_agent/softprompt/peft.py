"""PEFT interchange: a `SoftPrompt` to and from PEFT's prompt-tuning adapter folder.

The folder holds `adapter_config.json` and `adapter_model.safetensors` (one tensor under
`prompt_embeddings`), which `peft.PeftModel.from_pretrained` loads. An export is written
through the shared persistence path (`io/persist.py`): the folder is swapped in whole and
carries a `manifest.json` with checksums, which `from_peft` verifies when it is there
(adapters made by PEFT itself have none and are read as they are).

Example:
    >>> import tempfile, torch
    >>> from detot_agent.softprompt.prompt import SoftPrompt
    >>> folder = export_peft(SoftPrompt("arith", torch.ones(2, 4), model_id="tiny"), tempfile.mkdtemp() + "/a")
    >>> from_peft(folder, task="arith").vectors.shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from detot_agent.errors import ArtefactError, SoftPromptError
from detot_agent.io.persist import MANIFEST, atomic_dir, read_manifest
from detot_agent.softprompt.registry import check_soft_prompt

if TYPE_CHECKING:
    from detot_agent.softprompt.prompt import SoftPrompt

__all__ = ["PEFT_KIND", "export_peft", "from_peft"]

PEFT_KIND = "peft-prompt-tuning"
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


def export_peft(prompt: SoftPrompt, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT prompt-tuning adapter (`adapter_config.json` + `adapter_model.safetensors`), atomically."""
    from safetensors.torch import save_file

    from detot_agent.softprompt.prompt import SoftPromptInit

    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.k,
        "token_dim": prompt.hidden_size, "num_transformer_submodules": 1, "inference_mode": True,
        "prompt_tuning_init": "TEXT" if prompt.init_kind is SoftPromptInit.TEXT else "RANDOM",
        "prompt_tuning_init_text": prompt.init_text, "tokenizer_name_or_path": prompt.model_id,
        "base_model_name_or_path": base_model_name_or_path or prompt.model_id,
    }
    folder = Path(path)
    with atomic_dir(folder, kind=PEFT_KIND, version=1, meta={"task": prompt.task}) as tmp:
        save_file({"prompt_embeddings": prompt.vectors.contiguous()}, str(tmp / _WEIGHTS))
        (tmp / _CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def from_peft(path: str | Path, *, task: str, hidden_size: int | None = None) -> SoftPrompt:
    """Read a PEFT prompt-tuning adapter folder into a soft prompt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from detot_agent.softprompt.prompt import SoftPrompt, SoftPromptInit

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
    kind = SoftPromptInit.TEXT if config.get("prompt_tuning_init") == "TEXT" else SoftPromptInit.RANDOM
    return SoftPrompt(task, vec, model_id=str(config.get("base_model_name_or_path") or "unknown"), init_kind=kind,
                      init_text=config.get("prompt_tuning_init_text"))
