"""Local training and evaluation loops (pure PyTorch; no Flower import).

Data lives in device tensors and is batched by index, so the loop has no DataLoader
overhead; shuffling uses a ``torch.Generator`` seeded from (seed, round, partition), which
makes a client's round reproducible on CPU regardless of which process runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedslim.config import Augment, DevicePref, Optimizer, TrainConfig
from fedslim.errors import ConfigError
from fedslim.task.augment import augment
from fedslim.task.data import ArrayData


def select_device(pref: DevicePref) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if pref is DevicePref.CUDA and not torch.cuda.is_available():
        raise ConfigError("device='cuda' requested but torch.cuda.is_available() is False")
    if pref is DevicePref.CPU:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_generator(*seed_parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (e.g. seed, round, partition)."""
    seq = np.random.SeedSequence([int(s) for s in seed_parts])
    gen = torch.Generator()
    gen.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1)))
    return gen


def round_lr(cfg: TrainConfig, server_round: int) -> float:
    """Learning rate for a round: exponential decay across rounds."""
    return cfg.learning_rate * cfg.lr_decay ** max(0, server_round - 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class TrainStats:
    loss: float          # mean training loss over the last epoch
    num_examples: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    num_examples: int


def train_local(model: nn.Module, data: ArrayData, cfg: TrainConfig, *, server_round: int,
                seed_parts: tuple[int, ...], device: torch.device,
                proximal_mu: float = 0.0) -> TrainStats:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs on ``data``.

    ``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_start||^2`` (Li et
    al. 2020), which keeps a client's model near the global model it started from.
    """
    t0 = time.perf_counter()
    if len(data) == 0:
        return TrainStats(loss=float("nan"), num_examples=0, steps=0, seconds=0.0)
    gen = make_generator(*seed_parts, server_round)
    x_all, y_all = data.tensors(device)
    model.to(device).train()
    opt = make_optimizer(model, cfg, round_lr(cfg, server_round))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    loss_fn = nn.CrossEntropyLoss()
    n, steps = len(data), 0
    epoch_loss = torch.zeros((), device=device)
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb, yb = x_all[idx], y_all[idx]
            if cfg.augment is not Augment.NONE:
                xb = augment(xb, cfg.augment, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if anchor:
                prox = torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchor,
                                                                          strict=True)])
                (loss + 0.5 * proximal_mu * prox.sum()).backward()
            else:
                loss.backward()
            if cfg.clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            epoch_loss += loss.detach() * len(idx)
            steps += 1
    mean_loss = float(epoch_loss) / n  # one device sync per call, not per step
    return TrainStats(loss=mean_loss, num_examples=n, steps=steps,
                      seconds=time.perf_counter() - t0)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor | np.ndarray, device: torch.device,
                   batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (returned on ``device``), in eval mode."""
    model.to(device).eval()
    xt = torch.as_tensor(x).to(device)
    return torch.cat([model(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]) \
        if len(xt) else torch.empty(0, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayData, device: torch.device,
             batch_size: int = 1024) -> EvalStats:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        return EvalStats(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    x, y = data.tensors(device)
    logits = predict_logits(model, x, device, batch_size)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return EvalStats(loss=loss, accuracy=acc, num_examples=len(data))
