"""The one `update` that trains a task embedding on evidence: both sides, reading one `q(x)`.

Losses, summed each step (shapes as in `task_embedding.py`):

- retrieval side (items with `positives`): InfoNCE of each helpful exemplar against the
  unhelpful ones, scores `q(x) . v / temperature`; moves `w` and `alpha`;
- soft-prompt side (items with an `example`): the NLL of the target completion given
  `[P(x); prompt]` through the frozen LM, every row with its own `P(x)`; moves `P0`, the bank
  and the gate;
- regularisation: an L2 pull of every trained tensor to its initial value (the bank's is
  zero), dropout on the soft vectors, and `balance * KL(mean gate weights || uniform)` over
  the training inputs, which keeps the mixture from collapsing onto one component.

**What the LM loss may move** (`lm_moves_retrieval`, default False; 0.3's `couple`): by default the LM loss reads `q(x)`
with its gradient stopped, so it moves the head only and the retrieval weights learn from
retrieval evidence only. Why: the LM targets were produced with demos that the *old* query
retrieved, and the discrete search passes no gradient, so an LM gradient on `w` cannot see
what it does to retrieval; it only moves every input's neighbours to suit the gate. Measured
(`evals/scripts/couple_ablation.py`, embedded SmolLM2-135M, 160 GSM8K train problems, 40 steps,
M = 4, 48 held-out problems): with `lm_moves_retrieval=True` the held-out NLL reached 1.377 against 1.388 with
the gradient stopped (from 1.497), while the LM loss alone changed the top-3 demos of 41 of the 48
held-out problems (0 of 48 when stopped). A 0.8% better fit is not worth moving retrieval for almost
every input without any retrieval evidence. `lm_moves_retrieval=True` is there to test it on other tasks.

Budget: `steps` LM steps, `retrieval_steps` in all for the cheap retrieval side, and
`max_seconds` of wall time for the whole call (checked every step). Keep the best: with
`val` items the head is early-stopped on their NLL and the best head kept; each side is
kept only if its own loss fell (retrieval: the contrastive loss on the feedback; head: the
validation NLL, or without `val` the NLL of up to 32 training items), and `version` is
bumped once if anything was kept.

Example:
    >>> import numpy as np
    >>> from detot_agent.embedding.task_embedding import TaskEmbedding
    >>> te = TaskEmbedding("t", np.eye(4, dtype=np.float32)[0], encoder_name="demo")
    >>> fb = TrainingItem(query=np.full(4, 0.5, dtype=np.float32), positives=np.eye(4, dtype=np.float32)[2:3],
    ...               negatives=np.eye(4, dtype=np.float32)[3:4])       # exemplar 2 helped, 3 did not
    >>> report = te.update([fb], retrieval_steps=20)
    >>> report.accepted, report.loss_after < report.loss_before, te.version
    (True, True, 1)
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from detot_agent.embedding.head import PromptHead
from detot_agent.embedding.update_config import TrainingItem, UpdateConfig, UpdateReport
from detot_agent.errors import ConfigError, DetotError
from detot_agent.softprompt.loss import batch_loss, encode_example, mean_nll


class Trainable(Protocol):
    """What `update` needs of a task embedding (`TaskEmbedding` is one); a protocol, so this file does not
    import `task_embedding.py`, which calls `update` from its own `update` method."""

    task: str
    dim: int
    version: int
    head: PromptHead | None

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _query(self, e: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor: ...

__all__ = ["TrainingItem", "UpdateConfig", "UpdateReport", "update"]  # the three settings/items: update_config.py


def __getattr__(name: str) -> Any:
    """0.3's `Feedback` is `TrainingItem` (a training item; `DETOT.feedback()` is the gold signal)."""
    if name == "Feedback":
        warnings.warn("detot_agent.embedding.update.Feedback is deprecated; it is TrainingItem", DeprecationWarning,
                      stacklevel=2)
        return TrainingItem
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def _rows(vectors: np.ndarray | None, dim: int, what: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(vectors if vectors is not None else np.zeros((0, dim)), dtype=np.float32))
    t = t.reshape(-1, dim)
    if not torch.isfinite(t).all():
        raise DetotError(f"feedback #{i}: {what} hold NaN or inf")
    return t


QUIET_S = 0.5  # serving first: a lull is this long without a serving request in flight (engines/serving.py)


def update(te: Trainable, feedback: Sequence[TrainingItem], *, engine: Any = None, val: Sequence[TrainingItem] = (),
           config: UpdateConfig | None = None, progress: bool = False, **overrides: Any) -> UpdateReport:
    """Train `te` in place on `feedback` (see the module docstring for the losses and rules).

    Args:
        te: the task embedding (its serving readers see the old or the new state, never a mix).
        feedback: evidence; items with `positives` train retrieval, items with `example` the head.
        engine: a torch `LocalEngine` whose model is frozen; needed when any item has an `example`.
        val: held-out items with `example`s for early stopping and judging the head.
        config: `UpdateConfig`; keyword overrides win over it.
        progress: show a progress bar.

    Raises:
        ConfigError: bad settings. DetotError: nothing to learn from, an `example` without an engine or a
            head, malformed vectors, or training that produced non-finite values.
    """
    from tqdm.auto import tqdm

    base = config.model_dump() if config else {}
    try:
        cfg = UpdateConfig(**{**base, **overrides})
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    D = te.dim
    ret: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (e, candidates (p+n, D), p)
    for i, fb in enumerate(feedback):
        if fb.positives is None or len(fb.positives) == 0:
            continue
        pos, neg = _rows(fb.positives, D, "positives", i), _rows(fb.negatives, D, "negatives", i)
        ret.append((_rows(fb.query, D, "query", i)[0], torch.cat([pos, neg]), len(pos)))
    lm_items = [fb for fb in feedback if fb.example is not None]
    val_items = [fb for fb in val if fb.example is not None]
    if not ret and not lm_items:
        raise DetotError("update needs feedback with positives (retrieval) or an example (soft prompt)")
    head0 = te.head
    if lm_items and head0 is None:
        raise DetotError(f"feedback with examples trains the soft-prompt head, and task embedding {te.task!r} has "
                         "none: call attach_head(...) first, or pass feedback without examples")
    if lm_items and engine is None:
        raise DetotError("feedback with examples trains the soft-prompt head through the LM: pass engine= "
                         "(a torch LocalEngine whose model is frozen)")
    train_ret = bool(ret) and "retrieval" not in cfg.freeze
    train_head = bool(lm_items) and head0 is not None and any(
        p not in cfg.freeze for p in ("p0", "components", "gate"))
    if not train_ret and not train_head:
        raise DetotError(f"everything this feedback could train is frozen (freeze={cfg.freeze})")

    start = time.perf_counter()
    snap = te.state_dict()
    w_init, a_init = snap["w_init"], snap["alpha_init"]
    move_query = train_ret or (train_head and cfg.lm_moves_retrieval and "retrieval" not in cfg.freeze)
    w = snap["w"].clone().requires_grad_(move_query)
    alpha = snap["alpha"].clone().requires_grad_(move_query)

    def query(e: torch.Tensor, grad: bool) -> torch.Tensor:
        q = te._query(e, w, alpha)  # (N, D)
        return q if grad else q.detach()

    # ---- the retrieval side ------------------------------------------------------------------
    def contrastive() -> torch.Tensor:
        e = torch.stack([r[0] for r in ret])  # (N, D)
        qa = query(e, True)
        total = torch.zeros(())
        for i, (_, cands, n_pos) in enumerate(ret):
            s = cands @ qa[i] / cfg.temperature  # (p+n,)
            neg = s[n_pos:]
            for j in range(n_pos):  # every positive against all negatives
                total = total + torch.logsumexp(torch.cat([s[j:j + 1], neg]), 0) - s[j]
        reg = (w - w_init).pow(2).sum() + (alpha - a_init).pow(2)
        return total / len(ret) + cfg.l2_to_init * reg

    ret_before = float(contrastive().detach()) if ret else float("nan")

    # ---- the soft-prompt side ----------------------------------------------------------------
    params: list[dict[str, Any]] = []
    if move_query:
        params.append({"params": [w, alpha], "lr": cfg.retrieval_lr})
    report = UpdateReport(accepted=False, loss_before=ret_before)
    model = dtype = None
    hp: dict[str, torch.Tensor] = {}
    train_enc: list[Any] = []
    val_enc: list[Any] = []
    if train_head:
        assert head0 is not None
        model = engine.model
        if any(p.requires_grad for p in model.parameters()):
            raise DetotError("the engine's model must be frozen (requires_grad False) before training")
        if head0.hidden_size != engine.hidden_size:
            raise DetotError(f"soft-prompt head width {head0.hidden_size} differs from the model's hidden size "
                             f"{engine.hidden_size}")
        dtype = model.get_input_embeddings().weight.dtype
        h = head0.tensors()
        empty = h["bank"].shape[0] == 0  # M = 0: P0 only
        frozen = {"p0": "p0" in cfg.freeze, "bank": "components" in cfg.freeze or empty,
                  "gate": "gate" in cfg.freeze or empty}
        hp = {n: h[n].clone().requires_grad_(not frozen[n]) for n in ("p0", "bank", "gate")}
        params.append({"params": [v for n, v in hp.items() if not frozen[n]], "lr": cfg.head_lr})
        train_enc = [encode_example(engine, fb.example, cfg.max_length) for fb in lm_items]  # type: ignore[arg-type]
        val_enc = [encode_example(engine, fb.example, cfg.max_length) for fb in val_items]  # type: ignore[arg-type]
        train_e = torch.stack([_rows(fb.query, D, "query", i)[0] for i, fb in enumerate(lm_items)])  # (N, D)
        val_e = (torch.stack([_rows(fb.query, D, "query", i)[0] for i, fb in enumerate(val_items)])
                 if val_items else train_e[:0])
        judge_enc, judge_e = (val_enc, val_e) if val_items else (train_enc[:32], train_e[:32])

    def prompts(e: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        assert head0 is not None
        return PromptHead.mix(query(e, grad and cfg.lm_moves_retrieval), hp["p0"], hp["bank"], hp["gate"], head0.tau)

    def gate_weights(e: torch.Tensor) -> torch.Tensor:
        assert head0 is not None
        return PromptHead.gate_weights(query(e, cfg.lm_moves_retrieval), hp["gate"], head0.tau)  # (N, M)

    def lm_nll(enc: list[Any], e: torch.Tensor) -> float:
        with torch.no_grad():
            P, _ = prompts(e, False)  # (N, k, H): one per example
        return mean_nll(model, P.to(dtype), enc, cfg.batch_size)

    def head_reg() -> torch.Tensor:
        reg = (hp["p0"] - h["p0_init"]).pow(2).sum(-1).mean()
        if hp["bank"].shape[0] > 0:
            reg = reg + hp["bank"].pow(2).sum(-1).mean() + (hp["gate"] - h["gate_init"]).pow(2).sum(-1).mean()
        return reg

    serving = getattr(engine, "serving_load", None) if cfg.yield_to_serving > 0 else None

    def preempting() -> contextlib.AbstractContextManager[Any]:
        """Serving first inside a step too: the model's passes pause at each layer while serving is in flight
        (`engines/serving.py`, `ServingLoad.preempting`), `yield_to_serving` seconds in all for a pass (the
        steps reset it: see below); yields what was waited (`count`, `seconds`, `budget`)."""
        if serving is None or model is None:
            return contextlib.nullcontext(SimpleNamespace(count=0, seconds=0.0, budget=None, shared=0, shared_s=0.0))
        return serving.preempting(model, cfg.yield_to_serving, budget=cfg.yield_to_serving,
                                  share=cfg.background_share)

    def paused(pauses: Any) -> None:
        report.paused_s += pauses.seconds
        report.pauses += pauses.count
        report.shared_s += pauses.shared_s
        report.shared += pauses.shared

    if train_head:
        with preempting() as pauses:
            report.lm_before = lm_nll(judge_enc, judge_e)
        paused(pauses)
    best_lm, best_head = report.lm_before, {n: v.detach().clone() for n, v in hp.items()}
    best_wa = (w.detach().clone(), alpha.detach().clone())
    opt = torch.optim.Adam(params)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    total_steps = max(cfg.steps if train_head else 0, cfg.retrieval_steps if train_ret else 0)
    lm_active, bad = train_head, 0
    order: list[int] = []
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    bar = tqdm(total=total_steps, desc=f"updating {te.task}", disable=not progress, unit="step")
    step = 0
    in_steps = contextlib.ExitStack()
    step_pauses = in_steps.enter_context(preempting())
    try:
        for step in range(1, total_steps + 1):
            uses_model = lm_active and step <= cfg.steps  # a retrieval-only step is cheap: it does not wait
            if serving is not None and uses_model:  # serving first: start the step in a lull (engines/serving.py)
                waited = serving.wait_idle(cfg.yield_to_serving, quiet=QUIET_S)
                if waited > 0:
                    report.yielded_s += waited
                    report.yields += 1
                # the step's pauses get what is left of the bound: a step waits `yield_to_serving` in all, so a
                # trainer beside serving that never lulls still advances (a bound a pause let 48 waits stack up)
                step_pauses.budget = max(0.0, cfg.yield_to_serving - waited)
                step_pauses.resumed = time.monotonic()  # waiting for the lull is not running beside serving
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                report.budget_hit, step = True, step - 1
                break
            loss = torch.zeros(())
            if train_ret and step <= cfg.retrieval_steps:
                loss = loss + contrastive()
            lm_value = None
            if lm_active and step <= cfg.steps:
                if len(order) < cfg.batch_size:
                    order += rng.sample(range(len(train_enc)), len(train_enc))
                idx = [order.pop() for _ in range(min(cfg.batch_size, len(train_enc)))]
                P, _ = prompts(train_e[idx], True)  # (B, k, H)
                P = F.dropout(P, p=cfg.dropout, training=cfg.dropout > 0)
                lm = batch_loss(model, P.to(dtype), [train_enc[i] for i in idx])
                lm_value = float(lm.detach())
                loss = loss + lm + cfg.l2_to_init * head_reg()
                if cfg.balance > 0 and hp["bank"].shape[0] > 1:
                    a = gate_weights(train_e)  # (N, M): the gate alone, no (N, k, H) prompts
                    mean = a.mean(0).clamp_min(1e-9)
                    loss = loss + cfg.balance * (mean * (mean * mean.shape[0]).log()).sum()
            if not loss.requires_grad:
                break
            opt.zero_grad()
            loss.backward()
            if model is not None and any(p.grad is not None for p in model.parameters()):
                raise DetotError("a model parameter received a gradient: the base model must stay frozen")
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], cfg.max_grad_norm)
            opt.step()
            bar.update(1)
            if lm_value is not None:
                report.train_loss.append(lm_value)
                bar.set_postfix(lm=f"{lm_value:.3f}")
                if val_items and (step % cfg.eval_every == 0 or step == cfg.steps):
                    v = lm_nll(val_enc, val_e)
                    report.val_loss.append((step, v))
                    if best_lm is None or v < best_lm:
                        best_lm, bad = v, 0
                        best_head = {n: t.detach().clone() for n, t in hp.items()}
                        best_wa = (w.detach().clone(), alpha.detach().clone())
                    else:
                        bad += 1
                        if bad >= cfg.patience:
                            report.stopped_early, lm_active = True, False
    finally:
        in_steps.close()
        paused(step_pauses)
        bar.close()
        if model is not None:
            model.train(was_training)
    report.steps = step

    # ---- keep what helped, each side on its own loss -----------------------------------------
    new_w, new_alpha = w.detach().clone(), alpha.detach().clone()
    if train_ret:
        after = float(contrastive().detach())
        report.loss_after = after
        report.retrieval_accepted = after < ret_before and bool(torch.isfinite(new_w).all())
    new_head = None
    if train_head:
        if not val_items:
            best_head = {n: t.detach().clone() for n, t in hp.items()}
            best_wa = (new_w, new_alpha)
        for n, t in best_head.items():
            hp[n].data.copy_(t)
        if move_query and not train_ret:  # coupled: the best head goes with the query it was read from
            w.data.copy_(best_wa[0])
            alpha.data.copy_(best_wa[1])
        with preempting() as pauses:
            report.lm_after = lm_nll(judge_enc, judge_e)
        paused(pauses)
        assert report.lm_before is not None
        report.head_accepted = report.lm_after < report.lm_before and all(
            bool(torch.isfinite(t).all()) for t in best_head.values())
        if report.head_accepted:
            new_head = best_head
            if move_query and not train_ret:
                new_w, new_alpha = best_wa
        if hp["bank"].shape[0] > 0:
            with torch.no_grad():
                report.gate_usage = [round(float(x), 4) for x in gate_weights(train_e).mean(0)]
    keep_query = bool(report.retrieval_accepted) or (move_query and bool(report.head_accepted) and not train_ret)
    report.accepted = keep_query or new_head is not None
    if report.accepted:
        state = te.state_dict()
        if keep_query:
            state["w"], state["alpha"] = new_w, new_alpha
        if new_head is not None:
            state["head"] = {**state["head"], **new_head}
        state["version"] = state["version"] + 1
        te.load_state_dict(state)
    report.version = te.version
    report.seconds = time.perf_counter() - start
    return report
