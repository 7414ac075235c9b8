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


@pytest.mark.parametrize(("build_it", "fields"), [
    (lambda: __import__("detot_agent").ControllerConfig(holdout_every=0, margin=-5), ["holdout_every", "margin"]),
    (lambda: __import__("detot_agent").ControllerConfig(min_evidence=2, holdout_every=3), ["min_evidence (2)"]),
    (lambda: __import__("detot_agent").Monitor(window=0, agreement_threshold=1.5), ["window", "agreement_threshold"]),
    (lambda: __import__("detot_agent").UpdateConfig(head_lr=0, dropout=1.0), ["head_lr", "dropout"]),
    (lambda: __import__("detot_agent").ExemplarIndex(encoder_name="e", dim=3, target_recall=0), ["target_recall"]),
])
def test_every_settings_object_refuses_bad_values_when_built(build_it, fields):
    # validated at construction, so nothing fails later inside a background thread
    with pytest.raises(ConfigError) as err:
        build_it()
    text = str(err.value)
    assert text.startswith("invalid ") and all(f in text for f in fields)


def test_a_detot_with_a_bad_loop_setting_fails_before_serving():
    from detot_agent.detot.controller import ControllerConfig

    with pytest.raises(ConfigError, match="dropout"):
        ControllerConfig(update={"dropout": -0.1})
    cfg = ControllerConfig()
    with pytest.raises(ConfigError, match="steps"):
        cfg.update.steps = 0  # assignment is validated too, nested settings included


def test_the_loop_settings_nest_and_the_old_flat_names_still_build_with_a_warning():
    from detot_agent.detot.controller import ControllerConfig
    from detot_agent.detot.judging import ReplayRules
    from detot_agent.embedding.update import UpdateConfig

    cfg = ControllerConfig()
    assert isinstance(cfg.update, UpdateConfig) and isinstance(cfg.replay, ReplayRules)
    assert (cfg.update.steps, cfg.update.retrieval_steps) == (20, 40)  # the loop's own defaults, as before
    # no setting is declared twice: the loop's training and judging fields live only in their own configs; the
    # one shared name is a budget at each level (the loop's whole re-optimization; the update's own, which the
    # loop replaces with train_share of its budget)
    shared = set(ControllerConfig.model_fields) & (set(UpdateConfig.model_fields) | set(ReplayRules.model_fields))
    assert shared == {"max_seconds"}
    with pytest.warns(DeprecationWarning, match=r"soft_prompt_steps=...\) is deprecated; use ControllerConfig\("
                                                r"update=\{'steps': ...\}\)"):
        old = ControllerConfig(soft_prompt_steps=7, soft_prompt_lr=0.01, alpha=0.02, good_agreement=0.9)
    assert (old.update.steps, old.update.head_lr, old.update.retrieval_steps) == (7, 0.01, 40)
    assert (old.replay.alpha, old.replay.good_agreement, old.replay.max_flip) == (0.02, 0.9, 0.1)
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="alpha"):
        ControllerConfig(alpha=2)  # an old name with a bad value is still refused, by its new home


def test_the_monitor_thresholds_are_declared_once_with_one_set_of_defaults():
    from detot_agent.detot.monitor import Monitor, MonitorConfig
    from detot_agent.detot.task import Adjustments

    for name in MonitorConfig.THRESHOLDS:
        mine, theirs = Adjustments.model_fields[name], MonitorConfig.model_fields[name]
        assert (mine.default, mine.metadata) == (theirs.default, theirs.metadata), name
    assert Adjustments().monitor_config() == MonitorConfig()  # a task's monitor and a plain Monitor agree
    assert Monitor().config.min_count == Adjustments().min_count == 10
    with pytest.raises(ConfigError, match="cooldown"):
        Adjustments(cooldown=-1)  # the limits come along with the defaults


def test_a_loop_config_unpickled_from_a_0_3_program_is_rebuilt_in_the_new_shape():
    from detot_agent.detot.controller import ControllerConfig
    from detot_agent.detot.controller_config import upgraded

    old = ControllerConfig.__new__(ControllerConfig)  # what unpickling a 0.3 program restores: flat attributes
    object.__setattr__(old, "__dict__", {"evidence_size": 50, "min_evidence": 6, "holdout_every": 3,
                                         "soft_prompt_steps": 9, "alpha": 0.01, "max_seconds": 30.0})
    with pytest.warns(DeprecationWarning):
        new = upgraded(old)
    assert (new.evidence_size, new.update.steps, new.replay.alpha, new.max_seconds) == (50, 9, 0.01, 30.0)
    current = ControllerConfig()
    assert upgraded(current) is current


def test_0_3_names_of_the_training_settings_still_work_with_a_warning():
    import detot_agent.embedding.update as update_module
    from detot_agent.detot.controller import Controller
    from detot_agent.embedding.update import TrainingItem, UpdateConfig

    with pytest.warns(DeprecationWarning, match="couple=...\\) is deprecated; the setting is lm_moves_retrieval"):
        cfg = UpdateConfig(couple=True, steps=3)
    assert cfg.lm_moves_retrieval is True and cfg.steps == 3
    assert "couple" not in UpdateConfig.model_fields  # declared once, under the new name
    with pytest.raises(ConfigError, match="lm_moves_retriev"):
        UpdateConfig(lm_moves_retrieval="sometimes")
    with pytest.warns(DeprecationWarning, match="Feedback is deprecated; it is TrainingItem"):
        assert update_module.Feedback is TrainingItem
    with pytest.raises(AttributeError):
        _ = update_module.Feedbacks
    ctl = Controller.__new__(Controller)
    ctl.judgements_spent = 4
    with pytest.warns(DeprecationWarning, match="tests_run is deprecated; it is judgements_spent"):
        assert ctl.tests_run == 4
