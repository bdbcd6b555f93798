"""Distillation losses by task. ``s`` are student outputs, ``t`` teacher targets (see `targets`).

- causal LM (``kl``): per-token KL divergence of next-token distributions at temperature ``T``,
  over the teacher's top-k tokens: ``p = softmax(t_topk / T)`` (renormalised over the k),
  ``q = log_softmax(s / T)`` gathered at those k, ``L = T^2 * mean_tokens sum_k p (log p - q)``.
  The teacher's part is stored as (k values, k indices) per token: memory ``O(k)``, not ``O(vocab)``.
- classifier (``kl``): the same over all classes.
- encoder (``cosine``): ``1 - cos(s_i, t_i)`` per token plus ``|s - t|^2 / mean(t^2)`` (the
  normalised MSE, scale-free across models).
- any model (``mse``): the normalised MSE of every float output.
- intermediate block outputs (probes): the normalised MSE of each, averaged over the probes and
  added with weight ``probe_weight`` (layer-wise distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("auto", "kl", "cosine", "mse")


def auto_loss(task: str) -> str:
    return {"causal-lm": "kl", "classifier": "kl", "image-classifier": "kl", "encoder": "cosine"}.get(task, "mse")


def targets(outputs: list[torch.Tensor], loss: str, top_k: int, task: str) -> list:
    """What is kept of the teacher's outputs: the first output reduced for ``kl`` on an LM, else as is."""
    first, rest = outputs[0].float(), [o.float() for o in outputs[1:]]
    if loss == "kl" and task == "causal-lm" and 0 < top_k < first.shape[-1]:
        values, indices = first.topk(top_k, dim=-1)
        return [(values, indices), *rest]
    return [first, *rest]


def normalised_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def kl(s: torch.Tensor, t, temperature: float) -> torch.Tensor:
    if isinstance(t, tuple):
        values, indices = t
        log_q = F.log_softmax(s.float() / temperature, dim=-1).gather(-1, indices)
        log_p = F.log_softmax(values / temperature, dim=-1)
    else:
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2


def cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = s.float()
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean() + normalised_mse(s, t)


def total(student: list[torch.Tensor], teacher: list, loss: str, temperature: float, n_outputs: int,
          probe_weight: float) -> torch.Tensor:
    """The loss of one batch: the task loss on the first output, normalised MSE on the other float
    outputs (``mse`` only), and the probes' mean normalised MSE times ``probe_weight``."""
    if loss == "kl":
        value = kl(student[0], teacher[0], temperature)
    elif loss == "cosine":
        value = cosine(student[0], teacher[0])
    else:
        floats = [(s, t) for s, t in zip(student[:n_outputs], teacher[:n_outputs]) if s.is_floating_point()]
        value = sum(normalised_mse(s, t) for s, t in floats) / max(len(floats), 1)
    probes = list(zip(student[n_outputs:], teacher[n_outputs:]))
    if probes and probe_weight > 0:
        value = value + probe_weight * sum(normalised_mse(s, t) for s, t in probes) / len(probes)
    return value
