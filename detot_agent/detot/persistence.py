"""How a `DETOT` is saved, loaded, copied and pickled: `PersistentModule`, the base `DETOT` gets these from.

DSPy's JSON state with a `detot` block, a side folder of tensors, or the whole program pickled into a
directory. Every write goes through the atomic persistence path (`io/persist.py`); every read is validated
before anything changes. Copies (DSPy's optimizers deep-copy programs) and pickles carry the serving state,
never the running loop: each gets a fresh monitor and controller (`_start_loop`).

Where the learned state lives (since 0.4.0): inside the inner predictor's own DSPy state, under `detot`
(`CarryingPredict`), so it travels with **every** DSPy save: `detot.save("p.json")`, and the `save`/`load` /
`dump_state`/`load_state` of any program that holds a DETOT (DSPy saves a parent by its named parameters, and
the inner predictor is one). The block holds the task profile, adjustments, serving version and policy, the
index's encoder and size, the monitor's statistics, the loop's spent error budget (`judgements_spent`), and the
serving task embedding as safetensors bytes in base64 with their sha256 (`embedding`). Loading validates all of
it (checksum, shapes, finiteness, encoder, the model's width) before anything changes. Size: about 1.37x the
raw float32 tensors (base64); a static 8 x 896 soft prompt with its anchor and the 384-wide retrieval weights
is about 80 KB of JSON.

Saves of 0.3 and before (a top-level `detot` block, tensors in `p.json.tensors/`) still load.

Example:
    >>> json_target("runs/p.json").name
    'p.json'
    >>> json_target("runs/p")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    detot_agent.errors.ConfigError: DETOT saves its state as one JSON file: ... (got 'runs/p')
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import dspy

from detot_agent.detot.controller import Controller, ControllerConfig
from detot_agent.detot.controller_config import upgraded
from detot_agent.detot.monitor import Monitor
from detot_agent.detot.records import TaskState
from detot_agent.detot.task import Adjustments, Policy, TaskProfile
from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.engines.lm import serving_engine, training_engine
from detot_agent.errors import ArtefactError, ConfigError, DetotError
from detot_agent.retrieval.index import ExemplarIndex

__all__ = ["TENSORS_KIND", "CarryingPredict", "PersistentModule", "decode_embedding", "detot_block",
           "embedding_bytes", "encode_embedding", "json_target", "read_block", "read_side", "write_program_dir"]

TENSORS_KIND = "detot-program-tensors"


def detot_block(task: TaskProfile, adjustments: Adjustments, state: TaskState, index: ExemplarIndex,
                monitor_stats: dict[str, Any], judgements_spent: int) -> dict[str, Any]:
    """The `detot` block of the JSON state (everything but the tensors)."""
    return {"task": task.model_dump(mode="json"), "adjustments": adjustments.model_dump(mode="json"),
            "version": state.version,
            "policy": None if state.policy is None else state.policy.model_dump(mode="json", exclude_none=True),
            "index": {"encoder": index.encoder_name, "dim": index.dim, "count": len(index)},
            "monitor": monitor_stats,
            # the loop's error budget: a reloaded program must not test afresh at the first alpha
            "judgements_spent": judgements_spent}


def read_block(extra: dict[str, Any], index: ExemplarIndex) -> tuple[TaskProfile, Adjustments, Policy | None, int]:
    """`(task, adjustments, policy, judgements_spent)` from a `detot` block, refused for another encoder or width."""
    info = extra.get("index", {})
    if info.get("encoder") != index.encoder_name or info.get("dim") != index.dim:
        raise ArtefactError(f"saved DETOT state used encoder {info.get('encoder')!r} ({info.get('dim')} "
                            f"dims); this index uses {index.encoder_name!r} ({index.dim} dims)")
    policy = Policy(**extra["policy"]) if extra.get("policy") else None
    return (TaskProfile(**extra["task"]), Adjustments(**extra["adjustments"]), policy,
            int(extra.get("judgements_spent", extra.get("tests_run", 0))))  # 0.3: tests_run


def json_target(path: str | Path) -> Path:
    """The `.json` file `save` writes; other suffixes are refused."""
    target = Path(path)
    if target.suffix != ".json":
        raise ConfigError(f"DETOT saves its state as one JSON file: pass a path ending in .json, "
                          f"or a directory with save_program=True (got {str(path)!r})")
    return target


def read_side(path: str | Path, *, encoder_name: str, hidden: int | None) -> tuple[int, TaskEmbedding | None]:
    """`(version, task embedding)` from `<path>.tensors/` (this release's or the first release's), validated:
    shapes, finiteness, the encoder and the soft prompts' width (`hidden`, None: unchecked)."""
    from detot_agent.io.persist import load_tensors

    side = Path(str(path) + ".tensors")
    m, tensors = load_tensors(side, kind=TENSORS_KIND, max_version=2)
    where = str(side / "tensors.safetensors")
    embedding = None
    parts = {k.removeprefix("embedding."): v for k, v in tensors.items() if k.startswith("embedding.")}
    if parts:
        emeta = m.get("embedding") or {**m, "dim": int(parts["t"].shape[0])}  # first release: fields at the top
        embedding = TaskEmbedding.from_tensors(emeta, parts, where=where, encoder_name=encoder_name,
                                               hidden_size=hidden)
    soft = tensors.get("soft_prompt")  # first release: a static prompt beside the embedding
    if soft is not None and embedding is not None:
        from detot_agent.softprompt.registry import check_soft_prompt

        try:
            check_soft_prompt(soft, hidden_size=hidden, where=f"{where}: soft_prompt")
        except DetotError as exc:
            raise ArtefactError(str(exc)) from None
        embedding.attach_head(soft, components=0, model_id="unknown")
    return int(m["version"]), embedding


def write_program_dir(program: Any, path: str | Path, meta_bytes: bytes) -> None:
    """`save_program=True`: the whole program pickled (cloudpickle) with DSPy's `metadata.json`, into a
    directory swapped in whole; read back with `dspy.load(path, allow_pickle=True)`."""
    import cloudpickle

    from detot_agent.io.persist import atomic_dir

    target = Path(path)
    if target.suffix:
        raise ConfigError(f"save_program=True saves a directory: pass a path without a suffix (got {str(path)!r})")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{str(path)!r} exists and is not a directory")
    with atomic_dir(target, kind="detot-program", version=1, meta={}) as tmp:
        with open(tmp / "program.pkl", "wb") as f:
            cloudpickle.dump(program, f)
        (tmp / "metadata.json").write_bytes(meta_bytes)


def embedding_bytes(embedding: TaskEmbedding) -> tuple[dict[str, Any], bytes]:
    """`(meta, safetensors bytes)`: the task embedding serialised once, for the saved state and its digest."""
    from safetensors.torch import save

    meta, tensors = embedding.to_tensors()
    return meta, save({k: v.detach().contiguous() for k, v in tensors.items()})


def encode_embedding(embedding: TaskEmbedding) -> dict[str, Any]:
    """The task embedding as JSON: its meta, and its tensors as safetensors bytes in base64 with their sha256."""
    meta, raw = embedding_bytes(embedding)
    return {"meta": meta, "format": "safetensors+base64", "sha256": hashlib.sha256(raw).hexdigest(),
            "data": base64.b64encode(raw).decode("ascii")}


def decode_embedding(data: dict[str, Any], *, encoder_name: str, hidden: int | None,
                     where: str = "DETOT state") -> TaskEmbedding:
    """Inverse of `encode_embedding`, validated: checksum, shapes, finiteness, encoder, the model's width.

    Raises:
        ArtefactError: naming what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if data.get("format") != "safetensors+base64":
        raise ArtefactError(f"{where}: embedding format {data.get('format')!r} is not safetensors+base64")
    try:
        raw = base64.b64decode(str(data["data"]), validate=True)
    except (KeyError, ValueError) as exc:
        raise ArtefactError(f"{where}: the embedding's tensors are not valid base64 ({exc})") from None
    if hashlib.sha256(raw).hexdigest() != data.get("sha256"):
        raise ArtefactError(f"{where}: the embedding's tensors do not match their checksum (corrupted or edited)")
    try:
        tensors = load(raw)
    except SafetensorError as exc:
        raise ArtefactError(f"{where}: the embedding's tensors cannot be read ({exc})") from None
    return TaskEmbedding.from_tensors(dict(data.get("meta") or {}), tensors, where=where, encoder_name=encoder_name,
                                      hidden_size=hidden)


class CarryingPredict(dspy.Predict):
    """DETOT's inner predictor: a `dspy.Predict` whose DSPy state also carries its DETOT's learned state.

    Optimizers see an ordinary `Predict` (demos, instructions, traces); DSPy's save of any program that holds
    the DETOT writes the learned state with it, and its load restores it.
    """

    _owner: Any = None  # a weak reference to the DETOT (set by it; never saved, pickled or copied as a link)

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """`Predict`'s state plus `detot`: the owner's learned state (see the module docstring)."""
        state = super().dump_state(json_mode=json_mode)
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            state["detot"] = owner.learned_state()
        return state

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> CarryingPredict:
        """`Predict`'s state; a `detot` block is validated and restored into the owner (first, so a bad block
        changes nothing)."""
        state = dict(state)
        block = state.pop("detot", None)
        owner = self._owner() if self._owner is not None else None
        if block is not None and owner is not None:
            owner.restore_learned_state(block)
        super().load_state(state, **kwargs)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k != "_owner"}


def _carried(predictor: Any) -> bool:
    """Whether a saved state of 0.4.0 or later: the inner predictor's state holds the `detot` block."""
    return isinstance(predictor, dict) and "detot" in predictor


class PersistentModule(dspy.Module):
    """Saving, loading, copying and pickling for `DETOT` (its base class); the rest of DETOT is in `module.py`."""

    TENSORS_KIND = TENSORS_KIND
    # what these methods read of the program (set by DETOT.__init__ and DETOT._start_loop)
    task: TaskProfile
    adjustments: Adjustments
    index: ExemplarIndex
    predictor: Any
    lm: Any
    monitor: Monitor
    controller: Controller

    def _inner(self) -> dspy.Predict:
        raise NotImplementedError

    def _lm(self) -> Any:
        raise NotImplementedError

    def _start_loop(self, state: TaskState, monitor_config: Any, log_path: Any, config: ControllerConfig,
                    engine: Any) -> None:
        raise NotImplementedError

    def _link(self) -> None:
        """Point the inner predictor at this program (after building, copying or unpickling)."""
        inner = self._inner()
        if isinstance(inner, CarryingPredict):
            inner._owner = weakref.ref(self)

    def learned_state(self) -> dict[str, Any]:
        """What the loop (or the user) changed, as JSON: the `detot` block with the serving task embedding."""
        state = self.controller.state
        block = detot_block(self.task, self.adjustments, state, self.index, self.monitor.stats(),
                            self.controller.judgements_spent)
        block["embedding"] = None if state.embedding is None else encode_embedding(state.embedding)
        if self.controller.shadow is not None:  # shadow judging's evidence and error budget travel too
            block["shadow"] = self.controller.shadow.to_json()
        return block

    def _hidden(self) -> int | None:
        """The serving model's width, which loaded soft prompts must have (None: no batched engine to check)."""
        engine = serving_engine(self._lm())
        return None if engine is None else engine.hidden_size

    def restore_learned_state(self, block: dict[str, Any]) -> None:
        """Serve what `learned_state` wrote, the task embedding included; every part is validated before anything
        changes (`ArtefactError` naming what is wrong)."""
        data = block.get("embedding")
        embedding = None if data is None else decode_embedding(data, encoder_name=self.index.encoder_name,
                                                               hidden=self._hidden())
        self._serve_block(block, embedding)

    def _serve_block(self, block: dict[str, Any], embedding: TaskEmbedding | None) -> None:
        """Serve a `detot` block's settings with `embedding` (validated by the caller)."""
        task, adjustments, policy, judgements_spent = read_block(block, self.index)
        if block.get("shadow") is not None and self.controller.shadow is not None:  # validated before any change
            self.controller.shadow.restore(block["shadow"])
        self.task, self.adjustments = task, adjustments
        self.controller.judgements_spent = max(self.controller.judgements_spent, judgements_spent)
        self.controller.restore(TaskState(int(block.get("version", 0)), embedding, policy))
        self.controller.resume_shadow_trial()  # a policy trial a restart interrupted goes on

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """DSPy state: the inner predictor's (demos, instructions, and the learned state under `detot`).

        The LM is not part of the state (DETOT is loaded into an object built with its LM and index): the
        inner predictor's `lm` is saved as None, and loading keeps the LM the object has."""
        state = super().dump_state(json_mode=json_mode)
        for part in state.values():
            if isinstance(part, dict) and "lm" in part:
                part["lm"] = None
        return state

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> PersistentModule:
        """Restore `dump_state`; a 0.3 state's top-level `detot` block is read too (its tensors: see `load`)."""
        legacy = state.get("detot")
        inner = {k: v for k, v in state.items() if k != "detot"}
        kept = self._inner().lm
        super().load_state(inner, **kwargs)
        self._inner().lm = kept
        if legacy and not any(_carried(v) for v in inner.values()):
            st = self.controller.state
            self._serve_block({**legacy, "version": st.version}, st.embedding)  # 0.3: tensors in the side folder
        return self

    def save(self, path: str | Path, save_program: bool = False, **kwargs: Any) -> None:
        """Save to `path`: one DSPy JSON file, the learned state (task embedding included) inside it.

        The file is replaced in one rename, so a crash leaves the old program loadable. A program that holds
        this DETOT saves it too, through DSPy's own `save` (see the module docstring).

        With `save_program=True`, `path` is a directory (no suffix) that receives the whole program as
        DSPy writes it (`program.pkl` by cloudpickle, `metadata.json`), swapped in whole; read it back with
        `dspy.load(path, allow_pickle=True)`. The pickle holds the index, the task embedding and the
        predictor; the LM's engine and the encoder are stored as their settings and load their models again.

        Example:
            >>> detot.save("runs/arith.json")                                       # doctest: +SKIP
            >>> detot.save("runs/arith_program", save_program=True)                 # doctest: +SKIP
            >>> again = dspy.load("runs/arith_program", allow_pickle=True)          # doctest: +SKIP
        """
        import orjson
        from dspy.utils.saving import get_dependency_versions

        from detot_agent.io.persist import atomic_write_bytes

        meta = {"dependency_versions": get_dependency_versions()}
        options = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
        if save_program:
            write_program_dir(self, path, orjson.dumps(meta, option=options))
            return
        target = json_target(path)
        atomic_write_bytes(target, orjson.dumps({**self.dump_state(), "metadata": meta}, option=options))

    def load(self, path: str | Path, **kwargs: Any) -> PersistentModule:
        """Load what `save` wrote (this release's one file, or an earlier release's file and side folder);
        validates the learned state (checksum, shapes, finiteness, encoder, the model's width) before changing
        anything. A fit folder (`detot fit`, `DETOTFit`) loads the program it shipped."""
        if Path(path).is_dir() and (Path(path) / "fit.json").is_file():
            path = Path(path) / "program.json"
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
            raise ArtefactError(f"{path}: not a loadable DETOT program ({type(exc).__name__}: {exc})") from None
        legacy = None
        if isinstance(saved, dict) and not any(_carried(v) for v in saved.values()):
            legacy = read_side(path, encoder_name=self.index.encoder_name, hidden=self._hidden())  # 0.3: a side folder
        try:
            super().load(str(path), **kwargs)
        except ArtefactError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtefactError(f"{path}: not a loadable DETOT program ({type(exc).__name__}: {exc})") from None
        if legacy is not None:
            version, embedding = legacy
            self.controller.restore(TaskState(version, embedding, self.controller.state.policy))
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PersistentModule:
        """Optimizers' copies: predictor and state copied; index, encoder, LM and engine shared."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.predictor = self.predictor.deepcopy()
        state = self.controller.state
        embedding = None if state.embedding is None else copy.deepcopy(state.embedding)
        clone._start_loop(TaskState(state.version, embedding, state.policy), self.monitor.config,
                          self.monitor.log_path, self.controller.config, self.controller.engine)
        clone._link()
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """Pickle support (`save_program=True`, `dspy.load`): the serving state, not the running loop (its
        thread, locks and evidence); the LM's engine and the encoder pickle as their settings."""
        out = {k: v for k, v in super().__getstate__().items() if k not in ("controller", "monitor", "_rollout_lock")}
        out["_loop"] = (self.controller.state, self.monitor.config, self.monitor.log_path, self.controller.config,
                        self.controller.judgements_spent)  # the loop's spent error budget travels too
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        served, monitor_config, log_path, config, *budget = state.pop("_loop")  # 0.3 pickles: no budget
        config = upgraded(config)  # 0.3 pickles: the loop's flat settings
        super().__setstate__(state)
        self._start_loop(served, monitor_config, log_path, config, training_engine(getattr(self.lm, "engine", None)))
        self.controller.judgements_spent = int(budget[0]) if budget else 0
        self._link()
