"""The `distill` pass: train the compressed graph toward the model the pipeline started from.

The teacher is the input of the pipeline's first lossy pass (`PassContext.teacher`); the student
is the current graph lowered to a trainable `torch.fx` module (`slimc.backends.triton.lower` with
``trainable=True``). Both run on the calibration rows; the loss (`slimc.passes.distill.losses`)
compares their outputs and, where both graphs hold them, the outputs of the residual blocks.
After training the weights go back into the IR's initializers (int8 ones re-quantized onto their
own grids, LoRA merged) and `Invariants` checks that only those values changed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, Optional

import onnx_ir as ir
import torch

from slimc.errors import DataError, PassConfigError
from slimc.pipeline import Pass, PassContext, PassReport

PARAMS = ("all", "norms_biases", "lora")
DEFAULT_STEPS = 100
DEFAULT_LR = {"all": 1e-4, "norms_biases": 1e-3, "lora": 5e-4}


@dataclasses.dataclass
class Distill(Pass):
    """Knowledge distillation of the compressed graph toward the pipeline's input model.

    Options:
        steps: optimizer steps (default 100 when `minutes` is not given either).
        minutes: a wall-time budget for training instead of `steps`: the steps are planned from the
            measured time per step.
        lr: peak learning rate of AdamW (warm-up, then cosine decay to 10%); none: 1e-4 for
            `params=all`, 1e-3 for `norms_biases`, 5e-4 for `lora`.
        batch_size: calibration rows per step.
        seed: seed of the row order, augmentation and LoRA init (none: the compile seed).
        params: what trains: `all` weights, `norms_biases` (1-D parameters only), or `lora`
            (rank-`rank` adapters on every matmul weight, merged back at the end).
        rank: LoRA rank (`params=lora`).
        loss: `auto` (causal LM and classifiers: kl; encoders: cosine; other models: mse), or one
            of `kl`, `cosine`, `mse`.
        temperature: softmax temperature of the kl loss.
        top_k: kl on a causal LM: the teacher's top-k tokens per position (0: the whole vocabulary).
        blocks: match the residual blocks' outputs too (`auto`: for every loss but kl).
        cache_mb: memory for cached teacher outputs (rows beyond it are recomputed).
        threads: PyTorch threads for training (none: the compile's --threads, else PyTorch's default).
            On a machine shared with other jobs, fewer threads than cores can be several times faster.
    """

    steps: Optional[int] = None
    minutes: Optional[float] = None
    lr: Optional[float] = None
    batch_size: int = 8
    seed: Optional[int] = None
    params: Literal["all", "norms_biases", "lora"] = "all"
    rank: int = 8
    loss: Literal["auto", "kl", "cosine", "mse"] = "auto"
    temperature: float = 1.0
    top_k: int = 64
    blocks: Literal["auto", "on", "off"] = "auto"
    cache_mb: int = 1024
    threads: Optional[int] = None

    name = "distill"
    exact = False
    needs_teacher = True
    description = "train the compressed graph toward the pipeline's input model (knowledge distillation)"

    def __post_init__(self) -> None:
        super().__init__()
        if self.steps is not None and self.minutes is not None:
            raise PassConfigError("distill: give steps= or minutes=, not both (minutes= plans the steps from the "
                                  "measured time per step).")
        if self.steps is not None and self.steps < 1:
            raise PassConfigError(f"distill: steps={self.steps} must be >= 1, e.g. steps=200.")
        if self.minutes is not None and not self.minutes > 0:
            raise PassConfigError(f"distill: minutes={self.minutes} must be > 0, e.g. minutes=10.")
        if self.lr is not None and not 0 < self.lr < 1:
            raise PassConfigError(f"distill: lr={self.lr} is out of range; use a small positive number, e.g. lr=1e-4.")
        for option in ("batch_size", "rank"):
            if getattr(self, option) < 1:
                raise PassConfigError(f"distill: {option}={getattr(self, option)} must be a whole number >= 1.")
        if self.params not in PARAMS:
            raise PassConfigError(f"distill: params={self.params!r} is unknown; use all, norms_biases or lora.")
        if self.temperature <= 0:
            raise PassConfigError(f"distill: temperature={self.temperature} must be > 0 (1 is the plain softmax).")
        if self.threads is not None and self.threads < 1:
            raise PassConfigError(f"distill: threads={self.threads} must be >= 1 (none: the compile's --threads).")
        if self.top_k < 0 or self.cache_mb < 0:
            raise PassConfigError("distill: top_k and cache_mb must be >= 0.")

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        threads, before = self.threads or ctx.threads, torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return self._apply(model, ctx)
        finally:
            torch.set_num_threads(before)

    def _apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        from slimc.passes.distill import data, losses, student, train

        teacher = getattr(ctx, "teacher", None)
        if teacher is None:
            why = "no lossy pass runs before distill: the graph is the pipeline's input, so there is nothing to recover"
            return PassReport(self.name, False, "nothing to do: " + why, left_alone=[("the model", why)])
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise DataError("distill trains on calibration data and has none. Pass calibration= to slimc.compile() or "
                            "--calib on the command line (text, images or .npz; evaluation data stays separate).")
        task = ctx.loaded.task if ctx.loaded is not None else "generic"
        loss = losses.auto_loss(task) if self.loss == "auto" else self.loss
        left: list[tuple[str, str]] = []
        probes: list[str] = []
        if self.blocks == "on" or (self.blocks == "auto" and loss != "kl"):
            probes, missed = student.probes(model, teacher)
            left += missed
        with torch.no_grad():
            teacher_gm = student.lower_with(teacher, probes, trainable=False).eval()
        student_gm = student.lower_with(model, probes, trainable=True)
        used, pairs, n_outputs = _pair_outputs(student_gm, teacher_gm, loss, len(probes), left)
        seed = ctx.seed if self.seed is None else self.seed
        chosen = student.select(student_gm, model, self.params, self.rank, seed)
        left += chosen.frozen
        if not chosen.names:
            why = f"params={self.params} selects no trainable initializer in this graph"
            return PassReport(self.name, False, "nothing to do: " + why, left_alone=[*left, ("the model", why)])
        trained, masked = set(chosen.names.values()), {chosen.names[a] for a in chosen.masks}
        invariants = student.Invariants.of(model, trained, masked)
        names = sorted(set(student_gm.input_names) | set(teacher_gm.input_names))
        rows = data.Rows(ctx.calibration, ctx.loaded.inputs if ctx.loaded is not None else [], names)
        plan = train.Plan(steps=self.steps or (None if self.minutes else DEFAULT_STEPS),
                          seconds=self.minutes * 60 if self.minutes else None,
                          lr=self.lr or DEFAULT_LR[self.params], batch_size=self.batch_size, seed=seed, loss=loss,
                          temperature=self.temperature, top_k=self.top_k, probe_weight=1.0)
        run_student = _caller(student_gm, used)
        run_teacher = _caller(teacher_gm, pairs)
        loop = train.Loop(run_student, run_teacher, rows, n_outputs, chosen, plan, data.TeacherCache(self.cache_mb << 20), task)
        start = time.perf_counter()
        outcome = loop.run()
        seconds = time.perf_counter() - start
        written = student.write_back(chosen, model)
        student.unparametrize(chosen)
        invariants.check(model, trained)
        details = {
            "teacher": getattr(ctx, "teacher_label", "the pipeline's input"), "task": task, "loss": loss,
            "params": self.params, "trained_initializers": len(written),
            "trained_values": int(sum(p.numel() for p in chosen.parameters())),
            "masked_initializers": sorted(masked), "requantized_initializers": sum(
                1 for a in chosen.names if a in getattr(student_gm, "quantized", {})),
            "block_outputs_matched": probes, "calibration_rows": rows.count, "held_back_rows": rows.holdout,
            "rows_seen": outcome.steps * self.batch_size, "tokens_seen": outcome.steps * self.batch_size * rows.tokens_per_row(),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), **outcome.to_json(),
        }
        summary = (f"{outcome.steps} steps ({outcome.stopped}), held-back {loss} loss {outcome.held_before:.4g} -> "
                   f"{outcome.held_after:.4g}; {len(written)} initializers trained ({self.params})")
        return PassReport(self.name, outcome.held_after < outcome.held_before, summary, details=details, left_alone=left)


def _pair_outputs(student_gm, teacher_gm, loss: str, n_probes: int, left: list) -> tuple[list[int], list[int], int]:
    """Indices of the student outputs the loss uses and of the teacher outputs paired with them by name
    (graph outputs first, then the probes), and how many of them are graph outputs."""
    s_names, t_names = list(student_gm.output_names), list(teacher_gm.output_names)
    n_s, n_t = len(s_names) - n_probes, len(t_names) - n_probes  # the probes were lowered as the last outputs
    s_names, t_names = s_names[:n_s], t_names[:n_t]
    wanted = range(n_s) if loss == "mse" else range(1)
    used, pairs = [], []
    for i in wanted:
        if s_names[i] in t_names:
            used.append(i)
            pairs.append(t_names.index(s_names[i]))
        else:
            left.append((f"output {s_names[i]}", "the teacher has no output of that name: not in the loss"))
    if not used:
        from slimc.errors import PassFailedError

        raise PassFailedError(f"distill: the teacher has none of the outputs the {loss} loss compares "
                              f"({', '.join(s_names[i] for i in wanted)}); outputs must keep their names.")
    n_outputs = len(used)
    used += [n_s + k for k in range(n_probes)]
    pairs += [n_t + k for k in range(n_probes)]
    return used, pairs, n_outputs


def _caller(gm, picks: list[int]):
    names = list(gm.input_names)

    def run(batch):
        outputs = gm(*[batch[n] for n in names])
        return [outputs[i] for i in picks]

    return run
