"""The training loop of `distill`: AdamW, warm-up then cosine decay, budgeted, early-stopped.

Learning rate at step ``i`` of ``n``: ``lr * (i + 1) / w`` for ``i < w = max(1, n / 20)``, then
``lr * (0.1 + 0.9 * (1 + cos(pi * (i - w) / (n - w))) / 2)``. With ``minutes=`` the plan ``n`` is
re-made from the measured time per step (after 3, 10 and 30 steps, then at every held-back
measurement from the rate since the previous plan: cached teacher outputs make later steps
faster), so the schedule ends when the time does; the loop also stops at the deadline. Every
``n / 10`` steps (at least 10) the loss on the held-back rows is measured; the best trainable state
is kept and restored at the end, and training stops after `PATIENCE` measurements without
improvement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from slimc import progress
from slimc.passes.distill import losses
from slimc.passes.distill.data import Rows, Sampler, TeacherCache, augment

PATIENCE = 3
REPLAN_AT = (3, 10, 30)


@dataclasses.dataclass
class Plan:
    steps: int | None
    seconds: float | None
    lr: float
    batch_size: int
    seed: int
    loss: str
    temperature: float
    top_k: int
    probe_weight: float


@dataclasses.dataclass
class Outcome:
    steps: int = 0
    planned: int = 0
    held_before: float = math.nan
    held_after: float = math.nan
    best_step: int = 0
    stopped: str = "steps done"
    seconds_per_step: float = 0.0
    teacher_seconds: float = 0.0
    cached_rows: int = 0
    epochs: float = 0.0
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


class Loop:
    """One distillation run of ``student`` toward ``teacher``: callables from a batch (input name ->
    tensor) to the paired outputs, the graph outputs the loss uses first (``n_outputs``), then the probes."""

    def __init__(self, student: Callable, teacher: Callable, rows: Rows, n_outputs: int,
                 trainable, plan: Plan, cache: TeacherCache, task: str):
        self.student, self.teacher, self.rows = student, teacher, rows
        self.n_outputs, self.train, self.plan, self.cache, self.task = n_outputs, trainable, plan, cache, task
        self.gen = torch.Generator().manual_seed(plan.seed)

    def _targets(self, index: np.ndarray, batch: dict[str, torch.Tensor], augmented: bool) -> list:
        if not augmented and (hit := self.cache.get(index)) is not None:
            return hit
        start = time.perf_counter()
        with torch.no_grad():
            picked = self.teacher(batch)
            targets = losses.targets(picked[:1], self.plan.loss, self.plan.top_k, self.task) if self.plan.loss == "kl" else [
                picked[0].float()]
            targets += [o.float() if o.is_floating_point() else o for o in picked[1:]]
        self.teacher_time += time.perf_counter() - start
        if not augmented and all(_lead(t) == len(index) for t in targets):
            self.cache.put(index, targets)
        return targets

    def _loss(self, index: np.ndarray, augmented: bool) -> torch.Tensor:
        batch = self.rows.take(index)
        if augmented:
            batch = augment(batch, self.rows.images, self.gen)
        targets = self._targets(index, batch, augmented)
        outputs = self.student(batch)
        return losses.total(list(outputs), targets, self.plan.loss, self.plan.temperature, self.n_outputs,
                            self.plan.probe_weight)

    def held_loss(self) -> float:
        with torch.no_grad():
            values = [(float(self._loss(ix, False)), len(ix)) for ix in self.rows.held(self.plan.batch_size)]
        return sum(v * n for v, n in values) / sum(n for _, n in values)

    def _lr(self, step: int, total: int) -> float:
        warm = max(1, total // 20)
        if step < warm:
            return self.plan.lr * (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return self.plan.lr * (0.1 + 0.9 * (1 + math.cos(math.pi * frac)) / 2)

    @staticmethod
    def _replan(step: int, now: float, rate: float, deadline: float, bar) -> tuple[int, int]:
        """Steps that fit before ``deadline`` at ``rate`` steps/s (the schedule stretches or shrinks)."""
        total = max(step + 1, int(step + (deadline - now) * rate * 0.97))
        if bar is not None:
            bar.total = total
        return total, max(10, total // 10)

    def run(self) -> Outcome:
        torch.manual_seed(self.plan.seed)
        out, self.teacher_time = Outcome(), 0.0
        params = self.train.parameters()
        opt = torch.optim.AdamW(params, lr=self.plan.lr, weight_decay=0.0)
        sampler = Sampler(self.rows.train, self.plan.seed)
        augmented = bool(self.rows.images)
        start = time.perf_counter()
        deadline = start + self.plan.seconds if self.plan.seconds else None
        total = self.plan.steps or 10**6
        if deadline is not None and self.plan.steps is None:
            total = 50  # replanned from measured step times
        out.held_before = best = self.held_loss()
        best_state, since_best, eval_every = _snapshot(params), 0, max(10, total // 10)
        out.history.append((0, best))
        bar = progress.tqdm_bar(total, "distill")
        running, step, train_start = None, 0, time.perf_counter()
        mark = (0, train_start)
        while step < total:
            index = sampler.next(self.plan.batch_size)
            for group in opt.param_groups:
                group["lr"] = self._lr(step, total)
            loss = self._loss(index, augmented)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.train.apply_masks()
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4g}")
            now = time.perf_counter()
            timed = deadline is not None and self.plan.steps is None
            if timed and step in REPLAN_AT:
                total, eval_every = self._replan(step, now, step / (now - train_start), deadline, bar)
                mark = (step, now)
            last = step >= total or (deadline is not None and now >= deadline)
            if step % eval_every == 0 or last:
                held = self.held_loss()
                now = time.perf_counter()
                if timed and not last and step > mark[0]:  # the rate since the last plan, evaluations included
                    total, eval_every = self._replan(step, now, (step - mark[0]) / (now - mark[1]), deadline, bar)
                    mark = (step, now)
                out.history.append((step, held))
                if held < best:
                    best, best_state, since_best, out.best_step = held, _snapshot(params), 0, step
                else:
                    since_best += 1
                if since_best >= PATIENCE:
                    out.stopped = f"early stop: no better held-back loss in {PATIENCE} measurements"
                    break
            if deadline is not None and now >= deadline:
                out.stopped = "time budget spent"
                break
        if bar is not None:
            bar.close()
        _restore(params, best_state)
        self.train.apply_masks()
        elapsed = time.perf_counter() - train_start
        out.steps, out.planned, out.held_after = step, total, best
        out.seconds_per_step = elapsed / max(step, 1)
        out.teacher_seconds = self.teacher_time
        out.cached_rows = len(self.cache.rows)
        out.epochs = step * self.plan.batch_size / self.rows.train
        return out


def _lead(t) -> int:
    return int(t[0].shape[0]) if isinstance(t, tuple) else (int(t.shape[0]) if t.dim() else -1)


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)

