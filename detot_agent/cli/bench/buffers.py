"""`detot bench buffers`: what llama.cpp's extra buffer types cost or earn, prefill and decode.

For each setting asked for (`on`, `off`, `auto`), in a child process of its own (a setting that
crashes llama.cpp, as `on` does on CPUs with AMX, is reported as a crash instead of ending the run),
on one GGUF model through the engine's own `LlamaContext`:

- `prefill`: one prompt of `prompt_tokens` tokens decoded in one batch (logits at its last token);
- `decode_1`: `new_tokens` greedy tokens, one sequence, one token a step;
- `decode_n`: `new_tokens` tokens for each of `n` sequences that share the prompt (`seq_cp`), one
  token each a step, as a voting round decodes.

Each figure is the median of `repeats` runs, in tokens per wall-clock second; a warm-up run comes
first. The JSON also records the CPU (model name, AMX flags), llama.cpp's system line and version.

Example:
    >>> from detot_agent.cli.bench.buffers import run_buffers_bench
    >>> result = run_buffers_bench(model=None, settings=["on", "off"])  # doctest: +SKIP
    >>> result["settings"]["off"]["prefill_tok_s"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "cpu_facts", "measure", "run_buffers_bench"]

PHASES = {
    "prefill": "prompt in one batch",
    "decode_1": "decode, 1 sequence",
    "decode_n": "decode, n sequences",
}


def cpu_facts() -> dict[str, Any]:
    """The CPU's model name and its AMX flags, from /proc/cpuinfo where there is one."""
    name, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(),
            "amx_flags": sorted(f for f in flags if f.startswith("amx")),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: str, setting: str, *, prompt_tokens: int = 512, new_tokens: int = 64, n: int = 6,
            repeats: int = 3) -> dict[str, Any]:
    """The three figures for one setting, in this process (the child's work)."""
    import numpy as np

    from detot_agent.engines.llamacpp_load import load_library, system_info
    from detot_agent.engines.llamacpp_runtime import LlamaContext

    lib = load_library()
    start = time.perf_counter()
    ctx = LlamaContext(path, n_ctx=prompt_tokens + new_tokens + 8, n_seq_max=n, extra_buffers=setting)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, min(ctx.n_vocab, 20_000), size=prompt_tokens)]

    def prefill() -> int:
        ctx.clear()
        last = ctx.decode_tokens([(t, j, 0, j == len(prompt) - 1) for j, t in enumerate(prompt)])
        return int(np.argmax(ctx.logits(last[0])))

    def decode(seqs: int) -> None:
        tok = prefill()
        for s in range(1, seqs):
            ctx.seq_cp(0, s)
        toks = [tok] * seqs
        for step in range(new_tokens):
            ixs = ctx.decode_tokens([(toks[s], len(prompt) + step, s, True) for s in range(seqs)])
            toks = [int(np.argmax(ctx.logits(ix))) for ix in ixs]

    prefill_s = _timed(prefill, repeats)
    # decode figures exclude the prefill they start from
    one_s = _timed(lambda: decode(1), repeats) - prefill_s
    many_s = _timed(lambda: decode(n), repeats) - prefill_s
    out = {"setting": setting, "enabled": ctx.buffers.enabled, "reason": ctx.buffers.reason,
           "load_s": load_s, "threads": ctx.n_threads,
           "prefill_tok_s": prompt_tokens / prefill_s, "decode_1_tok_s": new_tokens / one_s,
           "decode_n_tok_s": n * new_tokens / many_s, "system_info": system_info(lib).strip(),
           "llama_cpp_python": getattr(lib, "__version__", "?")}
    ctx.close()
    return out


def _child(path: str, setting: str, **kw: Any) -> dict[str, Any]:
    """Run `measure` in a fresh interpreter; a crash (a signal) becomes a row that says so."""
    env = {**os.environ, "DETOT_LLAMACPP_EXTRA_BUFFERS": ""}  # the setting under test decides, not the caller's
    cmd = [sys.executable, "-m", "detot_agent.cli.bench.buffers", path, setting, json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 0:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return {"setting": setting, "crashed": why, "stderr_tail": proc.stderr[-2000:]}


def run_buffers_bench(*, model: str | None = None, settings: list[str] | None = None, prompt_tokens: int = 512,
                      new_tokens: int = 64, n: int = 6, repeats: int = 3) -> dict[str, Any]:
    """Measure each setting in its own process; returns the figures, CPU facts and the on/off ratios."""
    from detot_agent.engines.config import ExtraBuffers
    from detot_agent.engines.models import resolve_model_source
    from detot_agent.errors import ConfigError

    settings = settings or ["on", "off"]
    for s in settings:
        if s not in {v.value for v in ExtraBuffers}:
            raise ConfigError(f"settings must be auto, on or off; got {s!r}")
    source = resolve_model_source(model)
    if source.gguf_file is None:
        raise ConfigError(f"bench buffers measures llama.cpp on a .gguf file; {source.spec!r} is a {source.kind}")
    path = os.path.join(source.location, source.gguf_file)
    kw = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "n": n, "repeats": repeats}
    result: dict[str, Any] = {"model": source.name, **kw, **cpu_facts(),
                              "settings": {s: _child(path, s, **kw) for s in settings}}
    on, off = result["settings"].get("on"), result["settings"].get("off")
    if on and off and "crashed" not in on and "crashed" not in off:
        result["off_over_on"] = {p: off[f"{p}_tok_s"] / on[f"{p}_tok_s"] for p in PHASES}
    return result


if __name__ == "__main__":  # the child process of `_child`
    print(json.dumps(measure(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))))
