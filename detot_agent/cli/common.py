"""What the `detot` commands share: the consoles, the common options, quiet third-party output, atomic JSON,
loading an index folder, finding GSM8K."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["DeviceOpt", "DtypeOpt", "ModelOpt", "console", "default_gsm8k", "err_console", "load_index",
           "quiet_third_party", "write_json_atomic"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

# Third-party libraries' warnings (transformers, DSPy, LiteLLM, torch) are not the user's to act on: the one
# place that silences them for the command line. `detot --verbose ...` (or DETOT_VERBOSE=1) shows them.
_NOISY_LOGGERS = ("transformers", "dspy", "LiteLLM", "litellm", "httpx", "sentence_transformers", "accelerate")


def quiet_third_party(verbose: bool) -> None:
    """Silence other packages' warnings and info logs unless `verbose` (ours still show)."""
    import logging
    import os
    import warnings

    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars (our own progress still shows)
    import sys

    if "huggingface_hub" in sys.modules:  # already imported (the switch above is read at import): say it directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:  # it copied the switch when it was imported
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(?!detot_agent)")  # a warning raised outside this package
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or hub id; default: embedded SmolLM2-135M.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (temp file, fsync, rename)."""
    from detot_agent.io.persist import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_index(path: Path) -> Any:
    """An exemplar index folder with its own encoder (refused with the reason when it is not one)."""
    from detot_agent.io.persist import read_manifest
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    manifest = read_manifest(path, kind=ExemplarIndex.FORMAT, max_version=ExemplarIndex.FORMAT_VERSION, verify=False)
    return ExemplarIndex.load(path, encoder=Encoder(manifest["encoder"]))


def default_gsm8k(name: str) -> Path:
    for base in (os.environ.get("DETOT_DATA_DIR"), "../shared/data", "../../shared/data"):
        if base and (Path(base) / "gsm8k" / name).is_file():
            return Path(base) / "gsm8k" / name
    raise typer.BadParameter(f"GSM8K {name} not found in $DETOT_DATA_DIR/gsm8k or ../shared/data/gsm8k; pass it")
