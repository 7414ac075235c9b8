"""Settings: validation errors are one readable line per field."""

from __future__ import annotations

import pytest

from detot_agent.config import build
from detot_agent.engines.config import DType, EngineConfig
from detot_agent.errors import ConfigError


def test_defaults_and_overrides():
    cfg = build(EngineConfig, {"max_wait_ms": 2}, max_batch_size=4)
    assert (cfg.max_wait_ms, cfg.max_batch_size, cfg.dtype) == (2.0, 4, DType.AUTO)


def test_unknown_and_out_of_range_settings_are_listed_per_field():
    with pytest.raises(ConfigError) as err:
        EngineConfig(max_batch_size=0, max_wait_ms=-1, colour="red", dtype="float8")
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid EngineConfig:"
    assert any(line.strip().startswith("max_batch_size: Input should be greater than or equal to 1") for line in lines)
    assert any(line.strip().startswith("max_wait_ms:") for line in lines)
    assert any("colour: unknown setting" in line for line in lines)
    assert any(line.strip().startswith("dtype:") and "float8" in line for line in lines)
    assert len(lines) == 5


def test_assignment_is_validated():
    cfg = EngineConfig()
    with pytest.raises(Exception, match="max_batch_size"):
        cfg.max_batch_size = -5
