"""Soft-prompt registry: versions, history, validation, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from detot_agent.errors import SoftPromptError
from detot_agent.softprompt.registry import SoftPromptRegistry, check_soft_prompt


def test_versions_bump_and_old_versions_stay_resolvable_up_to_keep():
    reg = SoftPromptRegistry(keep=2)
    for i in range(3):
        assert reg.register("t", torch.full((2, 4), float(i))) == i + 1
    assert reg.current_version("t") == 3
    assert float(reg.resolve("t")[1][0, 0]) == 2.0
    assert float(reg.resolve("t", 2)[1][0, 0]) == 1.0
    with pytest.raises(SoftPromptError, match="kept versions: \\[2, 3\\]"):
        reg.resolve("t", 1)


def test_registered_tensor_is_a_copy():
    reg = SoftPromptRegistry()
    t = torch.zeros(2, 4)
    reg.register("t", t)
    t += 1
    assert float(reg.resolve("t")[1].sum()) == 0.0


def test_explicit_version_must_increase():
    reg = SoftPromptRegistry()
    reg.register("t", torch.zeros(1, 4), version=5)
    with pytest.raises(SoftPromptError, match="not newer than current 5"):
        reg.register("t", torch.zeros(1, 4), version=5)


@pytest.mark.parametrize("bad", [torch.zeros(0, 4), torch.tensor([[float("inf"), 0.0]]), "tensor"])
def test_malformed_soft_prompts_are_refused(bad):
    with pytest.raises(SoftPromptError):
        check_soft_prompt(bad)


def test_concurrent_registration_gives_unique_versions():
    reg = SoftPromptRegistry(keep=100)
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            v = reg.register("t", torch.zeros(1, 2))
            with lock:
                seen.append(v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 41))
