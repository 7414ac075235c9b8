"""How llama.cpp is loaded: the library (backend set up once) and the parameters of every GGUF load.

llama.cpp can load quantised weights into *extra* CPU buffer types that repack them for faster
matrix kernels: AMX tiles on Intel Xeons of the 4th generation and later, and its generic CPU
repacking (AVX2, AVX-512, NEON) elsewhere. On CPUs where llama.cpp reports AMX, the AMX buffers
crash the process with a segmentation fault at the first decode (ggml-org/llama.cpp#20824, no fix
upstream; DSPy's CI hit it, stanfordnlp/dspy#10079). With the model parameter `use_extra_bufts`
off the weights stay in plain CPU buffers and decoding works.

The setting (`EngineConfig.extra_buffers`, or `$DETOT_LLAMACPP_EXTRA_BUFFERS` when the config says
`auto`) is one of:

- `auto` (default): off where llama.cpp's system information reports AMX, on elsewhere;
- `on`: always on (a llama.cpp build whose AMX path is fixed);
- `off`: always off (plain CPU buffers everywhere; prompt processing is slower where repacking helped).

`load_library()` imports llama-cpp-python and sets its backend up once. Every GGUF load goes
through `load_model` (the engine's `LlamaContext`; it builds `model_params`) or `open_llama` (llama-cpp-python's
high-level `Llama`, used by the engine benchmark's reference row and the tests).

Example:
    >>> choice = decide_extra_buffers("auto", "CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    >>> choice.enabled, choice.reason
    (False, 'llama.cpp reports AMX_INT8, whose buffers crash at the first decode (ggml-org/llama.cpp#20824)')
    >>> decide_extra_buffers("auto", "CPU : AVX2 = 1 | REPACK = 1 |").enabled
    True
    >>> decide_extra_buffers("on", "CPU : AMX_INT8 = 1 |").enabled
    True
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detot_agent.engines.config import ExtraBuffers
from detot_agent.errors import ArtefactError, ConfigError

__all__ = ["ENV_EXTRA_BUFFERS", "BufferChoice", "choose", "decide_extra_buffers", "llama_cpp_available",
           "load_library", "load_model", "model_params", "open_llama", "requested_extra_buffers", "system_info"]

ENV_EXTRA_BUFFERS = "DETOT_LLAMACPP_EXTRA_BUFFERS"
UPSTREAM_ISSUE = "ggml-org/llama.cpp#20824"
_AMX = re.compile(r"\b(AMX\w*)\s*=\s*1\b")
_PATCH_LOCK = threading.Lock()
_INIT_LOCK = threading.Lock()
_BACKEND_READY = False


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (nothing is imported)."""
    return importlib.util.find_spec("llama_cpp") is not None


def load_library() -> Any:
    """The `llama_cpp` module with its backend set up (once per process) and its load chatter quiet.

    Raises:
        ConfigError: llama-cpp-python is not installed.
    """
    global _BACKEND_READY
    if not llama_cpp_available():
        raise ConfigError("the llama.cpp engine needs llama-cpp-python: `pip install llama-cpp-python` "
                          "(it builds from source with a C/C++ compiler and cmake), or pass engine='torch'")
    import llama_cpp

    with _INIT_LOCK:
        if not _BACKEND_READY:
            # llama.cpp's load chatter; its bindings map ggml's WARN level onto ERROR, so only CRITICAL
            # stays quiet. Our own errors (a file it cannot load, a full cache) are raised, not logged.
            logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
    return llama_cpp


@dataclass(frozen=True)
class BufferChoice:
    """What was decided for one load: `enabled` is llama.cpp's `use_extra_bufts`.

    Attributes:
        enabled: whether the weights may go into extra buffer types.
        setting: the setting that decided it (`auto`, `on` or `off`), after the environment variable.
        source: where the setting came from (`config`, `$DETOT_LLAMACPP_EXTRA_BUFFERS` or `default`).
        reason: why, in a few words.
    """

    enabled: bool
    setting: ExtraBuffers
    source: str
    reason: str

    def describe(self) -> str:
        """One line for a load message: which buffer types, and why when they are off.

        Example:
            >>> decide_extra_buffers("off", "").describe()
            'weights in plain CPU buffers (extra buffer types off: set off by config)'
        """
        if self.enabled:
            return "extra buffer types on (repacked weights where llama.cpp supports it)"
        hint = f"; {ENV_EXTRA_BUFFERS}=on overrides" if self.setting is ExtraBuffers.AUTO else ""
        return f"weights in plain CPU buffers (extra buffer types off: {self.reason}{hint})"


def requested_extra_buffers(setting: ExtraBuffers | str = ExtraBuffers.AUTO,
                            environ: Mapping[str, str] | None = None) -> tuple[ExtraBuffers, str]:
    """The setting in force and where it came from: the config's unless it is `auto`, then the environment's.

    Raises:
        ConfigError: the config value or `$DETOT_LLAMACPP_EXTRA_BUFFERS` is not `auto`, `on` or `off`.

    Example:
        >>> requested_extra_buffers("auto", {"DETOT_LLAMACPP_EXTRA_BUFFERS": "off"})
        (<ExtraBuffers.OFF: 'off'>, '$DETOT_LLAMACPP_EXTRA_BUFFERS')
    """
    accepted = ", ".join(v.value for v in ExtraBuffers)
    try:
        chosen = ExtraBuffers(setting)
    except ValueError:
        raise ConfigError(f"extra_buffers must be one of {accepted}; got {setting!r}") from None
    if chosen is not ExtraBuffers.AUTO:
        return chosen, "config"
    raw = (os.environ if environ is None else environ).get(ENV_EXTRA_BUFFERS)
    if raw is None or not raw.strip():
        return ExtraBuffers.AUTO, "default"
    try:
        return ExtraBuffers(raw.strip().lower()), f"${ENV_EXTRA_BUFFERS}"
    except ValueError:
        raise ConfigError(f"${ENV_EXTRA_BUFFERS} must be one of {accepted}; got {raw!r} "
                          f"(unset it for the default, auto)") from None


def decide_extra_buffers(setting: ExtraBuffers | str, info: str, *, source: str = "config") -> BufferChoice:
    """Decide `use_extra_bufts` from a setting and llama.cpp's system information line (no environment read).

    `auto` turns extra buffers off when `info` reports an AMX feature (`AMX_INT8 = 1`), on otherwise.
    """
    chosen = ExtraBuffers(setting)
    if chosen is ExtraBuffers.ON:
        return BufferChoice(True, chosen, source, f"set on by {source}")
    if chosen is ExtraBuffers.OFF:
        return BufferChoice(False, chosen, source, f"set off by {source}")
    found = _AMX.search(info)
    if found:
        return BufferChoice(False, chosen, source,
                            f"llama.cpp reports {found.group(1)}, whose buffers crash at the first decode "
                            f"({UPSTREAM_ISSUE})")
    return BufferChoice(True, chosen, source, "llama.cpp reports no AMX")


def system_info(lib: Any) -> str:
    """llama.cpp's feature line for this build and CPU (`... AVX2 = 1 | AMX_INT8 = 1 | ...`)."""
    raw = lib.llama_print_system_info()
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")


def choose(lib: Any, setting: ExtraBuffers | str = ExtraBuffers.AUTO) -> BufferChoice:
    """The decision for this process: setting, then environment, then llama.cpp's system information."""
    chosen, source = requested_extra_buffers(setting)
    return decide_extra_buffers(chosen, system_info(lib) if chosen is ExtraBuffers.AUTO else "", source=source)


def model_params(lib: Any, setting: ExtraBuffers | str = ExtraBuffers.AUTO) -> tuple[Any, BufferChoice]:
    """llama.cpp's default model parameters with `use_extra_bufts` decided by `choose`."""
    params = lib.llama_model_default_params()
    choice = choose(lib, setting)
    params.use_extra_bufts = choice.enabled
    return params, choice


def load_model(lib: Any, path: str | Path, setting: ExtraBuffers | str = ExtraBuffers.AUTO) -> tuple[Any, BufferChoice]:
    """Load a GGUF with `model_params`: llama.cpp's model handle (free it with `llama_model_free`) and the decision.

    Raises:
        ArtefactError: llama.cpp cannot load the file.
    """
    params, choice = model_params(lib, setting)
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ArtefactError(f"llama.cpp cannot load {path}: not a valid GGUF model file (or an architecture "
                            "this llama.cpp does not know)")
    return model, choice


@contextlib.contextmanager
def _default_params(params: Any) -> Iterator[None]:
    """Make `llama_model_default_params()` return `params` while a high-level `Llama` is built.

    `Llama.__init__` starts from that function and offers no `use_extra_bufts` argument
    (llama-cpp-python 0.3.x); the lock keeps two threads from swapping it at once.
    """
    from llama_cpp import llama_cpp as low

    with _PATCH_LOCK:
        original = low.llama_model_default_params
        low.llama_model_default_params = lambda: params
        try:
            yield
        finally:
            low.llama_model_default_params = original


def open_llama(path: str | Path, *, extra_buffers: ExtraBuffers | str = ExtraBuffers.AUTO,
               **kwargs: Any) -> tuple[Any, BufferChoice]:
    """llama-cpp-python's high-level `Llama` on `path`, loaded with the same buffer decision as the engine.

    Example:
        >>> llm, choice = open_llama("model.gguf", n_ctx=256, verbose=False)  # doctest: +SKIP
    """
    llama_cpp = load_library()
    params, choice = model_params(llama_cpp, extra_buffers)
    with _default_params(params):
        llm = llama_cpp.Llama(str(path), **kwargs)
    if bool(llm.model_params.use_extra_bufts) != choice.enabled:  # a llama-cpp-python that builds its own
        raise ConfigError(f"llama-cpp-python {llama_cpp.__version__} did not take the extra-buffer decision "
                          f"({choice.describe()}); load through LlamaContext instead")
    return llm, choice
