"""Optimisers for many independent problems at once: one tensor ``z`` of shape ``(T, P)``, one row per trial.

``objective(z) -> (loss (T,), grad (T, P))`` evaluates every trial in one vectorised call. The trials
never interact: each keeps its own L-BFGS history, step size and stopping state, so trial ``i`` follows
exactly the path it would follow alone (up to floating-point rounding of the batched kernels).

:func:`batched_lbfgs` is ``torch.optim.LBFGS`` without line search (the optimiser of DLG, Zhu et al.
NeurIPS 2019, and iDLG, Zhao et al. arXiv 2001.02610: ``LBFGS(lr=1)``, defaults otherwise), run per
trial: ``steps`` calls of ``optimizer.step(closure)``, each up to ``max_iter`` L-BFGS iterations with
torch's tolerances and ``history_size``. It is flattened into "ticks": every tick evaluates the
objective once for all trials and advances each trial by one iteration. torch re-evaluates the closure
at the start of a step after an inner loop breaks early; that value is the one it already has, so a tick
reuses it (same path, fewer evaluations). A trial whose loss is below ``stop_loss`` at the start of a step
stops (the papers' "converged" break); so does a trial that torch would leave unchanged for ever
(``gtd > -tolerance_change`` or a gradient below ``tolerance_grad``). The host is synchronised only every
``sync_every`` ticks, to end the batch once every trial has stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (z (n, P), trial ids (n,)) -> loss, grad
Progress = Callable[[int, int], None]  # (ticks so far, trials still running)


@dataclass
class BatchedResult:
    z: Tensor  # (T, P) final variables
    loss: Tensor  # (T,) loss at the final z
    curve: Tensor  # (T, steps + 1): loss after k steps (held after a trial stops)
    evals: Tensor  # (T,) objective evaluations spent on each trial
    steps: Tensor  # (T,) steps (optimizer.step calls) each trial completed


_OUT = ("z", "loss", "curve", "evals", "step")


class _Trials:
    """Per-trial state with a leading trial dimension; finished trials are dropped ("compaction") so
    that the last stragglers of a batch do not pay for the whole batch."""

    def __init__(self, state: dict[str, Tensor], compact_below: float) -> None:
        self.s = state
        self.full = {k: state[k].clone() for k in _OUT}
        self.compact_below = compact_below

    def sync(self) -> bool:
        """Store finished trials, drop them if few are left running; True when all have finished."""
        done = self.s["done"]
        n_live = int((~done).sum())
        if n_live == 0 or n_live < self.compact_below * done.shape[0]:
            self._store()
            keep = (~done).nonzero().flatten()
            self.s = {k: v[keep] for k, v in self.s.items()}
        return n_live == 0

    def _store(self) -> None:
        for k in _OUT:
            self.full[k][self.s["ids"]] = self.s[k]

    def result(self, steps: int) -> BatchedResult:
        self._store()
        f = self.full
        return BatchedResult(f["z"], f["loss"], _fill_curve(f["curve"], f["loss"]), f["evals"],
                             f["step"].clamp(max=steps))


def _fill_curve(curve: Tensor, loss: Tensor) -> Tensor:
    """Hold each trial's last recorded value (and its final loss) where it stopped early."""
    idx = torch.where(curve.isnan(), 0, torch.arange(curve.shape[1], device=curve.device)).cummax(1).values
    out = curve.gather(1, idx)
    return torch.where(out.isnan(), loss[:, None], out)


def batched_lbfgs(
    objective: Objective,
    z: Tensor,
    steps: int = 300,
    lr: float = 1.0,
    max_iter: int = 20,
    max_eval: int | None = None,
    history_size: int = 100,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    stop_loss: float = 0.0,
    sync_every: int = 20,
    compact_below: float = 0.5,
    progress: Progress | None = None,
) -> BatchedResult:
    """Per-trial ``torch.optim.LBFGS(lr, max_iter, max_eval, tolerance_grad, tolerance_change,
    history_size)`` called ``steps`` times on ``T`` independent problems (see the module docstring).

    Every ``sync_every`` ticks the host checks whether all trials stopped, and drops the finished ones
    when fewer than ``compact_below`` of the current batch still run.
    """
    T, P = z.shape
    max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
    dev, zero = z.device, z.new_zeros(T)
    i64 = torch.zeros(T, dtype=torch.long, device=dev)
    tr = _Trials(dict(
        z=z.detach().clone(), loss=zero.clone(), curve=z.new_full((T, steps + 1), float("nan")),
        ids=torch.arange(T, device=dev), done=torch.zeros(T, dtype=torch.bool, device=dev),
        at_start=torch.ones(T, dtype=torch.bool, device=dev),
        S=z.new_zeros(T, history_size, P), Y=z.new_zeros(T, history_size, P),  # L-BFGS pairs s, y
        rho=z.new_zeros(T, history_size),
        d=torch.zeros_like(z), prev_g=torch.zeros_like(z), t=zero.clone(), prev_loss=zero.clone(),
        H=z.new_ones(T), n_total=i64.clone(), n_step=i64.clone(), evals_step=i64.clone(), step=i64.clone(),
        evals=i64.clone(),
    ), compact_below)
    for tick in range(steps * (max_iter + 1) + 1):
        st = tr.s
        loss, g = (v.detach() for v in objective(st["z"], st["ids"]))
        st["loss"] = loss
        done, at_start, d, t = st["done"], st["at_start"], st["d"], st["t"]
        live = ~done
        st["evals"] = st["evals"] + live
        # an evaluation inside a step: torch's break conditions end that step
        cont = ~at_start & live
        evals_step = st["evals_step"] + cont
        opt = g.abs().amax(1) <= tolerance_grad
        small = (((d * t[:, None]).abs().amax(1) <= tolerance_change)
                 | ((loss - st["prev_loss"]).abs() < tolerance_change))
        brk = cont & ((evals_step >= max_eval) | opt | small)
        # this evaluation opens a new step: record the curve, apply the budget and the stopping rules
        start = (at_start & live) | brk
        step = st["step"] + start
        k = (step - 1).clamp(0, steps)[:, None]
        st["curve"].scatter_(1, k, torch.where(start[:, None], loss[:, None], st["curve"].gather(1, k)))
        done = done | (start & ((step > steps) | (loss < stop_loss) | opt))
        go = (start | cont) & ~done
        st["evals_step"] = torch.where(start, 1, evals_step)
        n_step = torch.where(start, 0, st["n_step"])
        # direction: torch's two-loop recursion over this trial's own history
        S, Y, rho, H = st["S"], st["Y"], st["rho"], st["H"]  # history, oldest first (empty slots are 0)
        first = st["n_total"] == 0
        y, s = g - st["prev_g"], d * t[:, None]
        ys, yy = (y * s).sum(1), (y * y).sum(1)
        push = go & ~first & (ys > 1e-10)
        # append (s, y) where accepted, dropping the oldest: a masked shift, no host sync
        S = torch.where(push[:, None, None], torch.cat([S[:, 1:], s[:, None]], 1), S)
        Y = torch.where(push[:, None, None], torch.cat([Y[:, 1:], y[:, None]], 1), Y)
        rho = torch.where(push[:, None], torch.cat([rho[:, 1:], (1.0 / ys.where(push, 1.0))[:, None]], 1), rho)
        H = torch.where(push, ys / yy.where(push, 1.0), H)
        q, al = -g, []
        m = history_size
        for j in range(min(m, tick)):  # newest to oldest; a trial has at most `tick` entries
            a = torch.einsum("tp,tp->t", S[:, m - 1 - j], q) * rho[:, m - 1 - j]
            q = torch.addcmul(q, a[:, None], Y[:, m - 1 - j], value=-1)
            al.append(a)
        r = q * H[:, None]
        for j in reversed(range(len(al))):  # oldest to newest
            b = torch.einsum("tp,tp->t", Y[:, m - 1 - j], r) * rho[:, m - 1 - j]
            r = torch.addcmul(r, (al[j] - b)[:, None], S[:, m - 1 - j])
        d_new = torch.where(first[:, None], -g, r)
        t_new = torch.where(first, (1.0 / g.abs().sum(1)).clamp(max=1.0) * lr, torch.full_like(t, lr))
        done = done | (go & ((g * d_new).sum(1) > -tolerance_change))  # torch would break here at every step
        mv = go & ~done
        st.update(
            S=S, Y=Y, rho=rho, H=H, step=step, done=done,
            d=torch.where(mv[:, None], d_new, d), t=torch.where(mv, t_new, t),
            prev_g=torch.where(mv[:, None], g, st["prev_g"]), prev_loss=torch.where(mv, loss, st["prev_loss"]),
            z=st["z"] + torch.where(mv[:, None], t_new[:, None] * d_new, 0.0),
            n_total=st["n_total"] + mv, n_step=n_step + mv,
        )
        st["at_start"] = torch.where(mv, st["n_step"] == max_iter, at_start)
        if (tick + 1) % sync_every == 0:
            if progress is not None:
                progress(tick + 1, int((~done).sum()))
            if tr.sync():
                break
    # trials still running after the last tick moved: their loss is the next evaluation's
    st = tr.s
    if st["ids"].numel() and bool((~st["done"]).any()):
        st["loss"] = objective(st["z"], st["ids"])[0].detach()
    return tr.result(steps)


def batched_adam(
    objective: Objective,
    z: Tensor,
    steps: int = 300,
    lr: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    stop_loss: float = 0.0,
    sync_every: int = 20,
    compact_below: float = 0.5,
    progress: Progress | None = None,
) -> BatchedResult:
    """``steps`` Adam updates per trial (one evaluation each); a trial stops once its loss < ``stop_loss``."""
    T, _ = z.shape
    i64 = torch.zeros(T, dtype=torch.long, device=z.device)
    tr = _Trials(dict(
        z=z.detach().clone(), loss=z.new_zeros(T), curve=z.new_full((T, steps + 1), float("nan")),
        ids=torch.arange(T, device=z.device), done=torch.zeros(T, dtype=torch.bool, device=z.device),
        m=torch.zeros_like(z), v=torch.zeros_like(z), step=i64.clone(), evals=i64.clone(),
    ), compact_below)
    for k in range(steps + 1):
        st = tr.s
        loss, g = (v.detach() for v in objective(st["z"], st["ids"]))
        live = ~st["done"]
        st["evals"] = st["evals"] + live
        st["curve"][:, k] = torch.where(live, loss, st["curve"][:, k])
        st["loss"] = torch.where(live, loss, st["loss"])
        done = st["done"] | (loss < stop_loss) | (k == steps)
        mv = (~done)[:, None]
        n = st["step"] + ~done
        m = torch.where(mv, betas[0] * st["m"] + (1 - betas[0]) * g, st["m"])
        v = torch.where(mv, betas[1] * st["v"] + (1 - betas[1]) * g * g, st["v"])
        bc1 = 1 - betas[0] ** n.clamp(min=1).to(z.dtype)
        bc2 = 1 - betas[1] ** n.clamp(min=1).to(z.dtype)
        upd = lr * (m / bc1[:, None]) / ((v / bc2[:, None]).sqrt() + eps)
        st.update(done=done, step=n, m=m, v=v, z=torch.where(mv, st["z"] - upd, st["z"]))
        if (k + 1) % sync_every == 0 or k == steps:
            if progress is not None:
                progress(k + 1, int((~done).sum()))
            if tr.sync():
                break
    return tr.result(steps)
