"""How llama.cpp loads a GGUF: the extra-buffer decision (AMX crashes), its overrides, and that it reaches llama.cpp."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from detot_agent import LlamaCppEngine
from detot_agent.engines.config import EngineConfig, ExtraBuffers
from detot_agent.engines.llamacpp_load import (
    ENV_EXTRA_BUFFERS,
    choose,
    decide_extra_buffers,
    load_library,
    model_params,
    open_llama,
    requested_extra_buffers,
    system_info,
)
from detot_agent.engines.llamacpp_runtime import LlamaContext
from detot_agent.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "detot_agent"
# llama.cpp 0.3.36's system line, from a Xeon with AMX and from this project's AMD machine
AMX_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
            "REPACK = 1 |")
PLAIN_INFO = AMX_INFO.replace("AMX_INT8 = 1 | ", "")


def test_auto_turns_extra_buffers_off_where_llama_cpp_reports_amx_and_on_elsewhere():
    off = decide_extra_buffers("auto", AMX_INFO)
    assert not off.enabled and "AMX_INT8" in off.reason and "ggml-org/llama.cpp#20824" in off.reason
    assert "plain CPU buffers" in off.describe() and f"{ENV_EXTRA_BUFFERS}=on" in off.describe()
    assert decide_extra_buffers("auto", PLAIN_INFO).enabled
    assert decide_extra_buffers("auto", PLAIN_INFO.replace("REPACK", "AMX_INT8 = 0 | REPACK")).enabled  # = 0 is no AMX
    assert decide_extra_buffers("auto", "").enabled


def test_an_explicit_setting_wins_in_both_directions():
    assert decide_extra_buffers("on", AMX_INFO).enabled  # a user whose llama.cpp build is fixed
    assert not decide_extra_buffers("off", PLAIN_INFO).enabled
    assert decide_extra_buffers(ExtraBuffers.ON, AMX_INFO).describe().startswith("extra buffer types on")


def test_the_environment_decides_only_when_the_config_says_auto():
    assert requested_extra_buffers("auto", {}) == (ExtraBuffers.AUTO, "default")
    assert requested_extra_buffers("auto", {ENV_EXTRA_BUFFERS: "off"}) == (ExtraBuffers.OFF, f"${ENV_EXTRA_BUFFERS}")
    assert requested_extra_buffers("auto", {ENV_EXTRA_BUFFERS: " ON "}) == (ExtraBuffers.ON, f"${ENV_EXTRA_BUFFERS}")
    assert requested_extra_buffers("auto", {ENV_EXTRA_BUFFERS: ""}) == (ExtraBuffers.AUTO, "default")
    assert requested_extra_buffers("on", {ENV_EXTRA_BUFFERS: "off"}) == (ExtraBuffers.ON, "config")
    assert requested_extra_buffers("off", {ENV_EXTRA_BUFFERS: "on"}) == (ExtraBuffers.OFF, "config")


def test_an_invalid_value_is_a_config_error_naming_the_accepted_values(monkeypatch):
    with pytest.raises(ConfigError, match=rf"\${ENV_EXTRA_BUFFERS} must be one of auto, on, off; got 'yes'"):
        requested_extra_buffers("auto", {ENV_EXTRA_BUFFERS: "yes"})
    with pytest.raises(ConfigError, match="extra_buffers must be one of auto, on, off; got 'maybe'"):
        requested_extra_buffers("maybe", {})
    with pytest.raises(ConfigError, match=r"extra_buffers: Input should be 'auto', 'on' or 'off'"):
        EngineConfig(extra_buffers="sometimes")
    monkeypatch.setenv(ENV_EXTRA_BUFFERS, "1")
    with pytest.raises(ConfigError, match="must be one of auto, on, off"):
        choose(load_library())


def test_model_params_carry_the_decision_to_llama_cpp(monkeypatch):
    lib = load_library()
    monkeypatch.setenv(ENV_EXTRA_BUFFERS, "off")
    params, choice = model_params(lib)
    assert params.use_extra_bufts is False and not choice.enabled and choice.source == f"${ENV_EXTRA_BUFFERS}"
    params, choice = model_params(lib, "on")
    assert params.use_extra_bufts is True and choice.enabled and choice.source == "config"
    monkeypatch.delenv(ENV_EXTRA_BUFFERS)
    params, choice = model_params(lib)  # this machine's own line decides
    assert params.use_extra_bufts is choice.enabled is decide_extra_buffers("auto", system_info(lib)).enabled


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    from detot_agent.testing import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4_0.gguf", quantization="q4_0")


def _loader_log(path: Path, setting: str, capfd) -> tuple[LlamaContext, str]:
    log = logging.getLogger("llama-cpp-python")
    capfd.readouterr()
    log.setLevel(logging.DEBUG)  # llama.cpp's load lines, printed by llama-cpp-python's log callback
    try:
        ctx = LlamaContext(path, n_ctx=256, n_seq_max=2, extra_buffers=setting)
    finally:
        log.setLevel(logging.CRITICAL)
    return ctx, capfd.readouterr().err


def test_the_decision_reaches_llama_cpp_repacked_buffers_with_on_plain_ones_with_off(q4_gguf, capfd):
    info = system_info(load_library())
    if "AVX2 = 1" not in info and "AMX" not in info:
        pytest.skip("no CPU repacking for Q4_0 on this CPU: nothing to tell on from off")
    on, on_log = _loader_log(q4_gguf, "on", capfd)  # loaded only: decoding on AMX buffers is what crashes
    on.close()
    off, off_log = _loader_log(q4_gguf, "off", capfd)
    assert on.buffers.enabled and not off.buffers.enabled
    extra = r"(CPU_REPACK|AMX) model buffer size"
    assert re.search(extra, on_log), on_log[-2000:]
    assert not re.search(extra, off_log) and "CPU_Mapped model buffer size" in off_log
    ids = off.decode_tokens([(5, 0, 0, False), (6, 1, 0, True)])  # plain buffers decode everywhere
    assert off.logits(ids[0]).shape == (off.n_vocab,)
    off.close()


def test_the_engine_reads_the_environment_and_says_so_in_its_load_line(tiny_gguf, monkeypatch):
    monkeypatch.setenv(ENV_EXTRA_BUFFERS, "off")
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=2)
    try:
        assert not engine.buffers.enabled
        assert "plain CPU buffers (extra buffer types off: set off by $DETOT_LLAMACPP_EXTRA_BUFFERS)" in engine.device
        assert engine.dump_state()["extra_buffers"] == "auto"  # the environment is not baked into saved state
    finally:
        engine.close()
    engine = LlamaCppEngine(str(tiny_gguf), max_batch_size=2, extra_buffers="on")  # config beats environment
    try:
        assert engine.buffers.enabled and "extra buffer types on" in engine.device
        assert engine.dump_state()["extra_buffers"] == "on"
    finally:
        engine.close()


def test_open_llama_loads_with_the_same_decision(tiny_gguf, monkeypatch):
    monkeypatch.setenv(ENV_EXTRA_BUFFERS, "off")
    llm, choice = open_llama(tiny_gguf, n_ctx=128, verbose=False)
    assert llm.model_params.use_extra_bufts is False and not choice.enabled
    llm.close()
    llm, choice = open_llama(tiny_gguf, extra_buffers="on", n_ctx=128, verbose=False)
    assert llm.model_params.use_extra_bufts is True and choice.enabled
    llm.close()
    import llama_cpp

    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # the swap was undone


def _calls(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_every_gguf_load_goes_through_llamacpp_load():
    """No second path: only `llamacpp_load.py` builds model parameters or a high-level `Llama`."""
    roots = [PACKAGE, PACKAGE.parent / "tests", PACKAGE.parent / "evals", PACKAGE.parent / "programs"]
    offenders = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if path.name in ("llamacpp_load.py", "test_llamacpp_load.py"):
                continue
            calls = _calls(ast.parse(path.read_text()))
            offenders += [f"{path.name}: {c}" for c in calls
                          if c in ("llama_model_default_params", "llama_model_load_from_file", "Llama")]
    assert offenders == []


def test_the_load_path_check_catches_a_direct_load():
    source = "import llama_cpp\nllm = llama_cpp.Llama('m.gguf')\np = lib.llama_model_default_params()\n"
    assert {"Llama", "llama_model_default_params"} <= set(_calls(ast.parse(source)))
