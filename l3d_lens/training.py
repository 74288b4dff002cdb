"""The training loop: Adam on the Tucker factors of V_in and V_out (the model never
changes), step decay of the learning rate per epoch, V_out renormalised after every step,
P_act and dead counts per epoch. Everything random comes from one generator seeded by
``cfg.seed``, so the same seed and data give a bit-identical result on CPU.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .data import Data, batches
from .engine import NonFiniteGradient, batch_stats
from .objective import l3d_loss
from .subnetworks import Factors, gram, init_factors, normalize_, resolve_ranks
from .task import Task


def train(task: Task, data: Data, reference: Optional[Data], progress: bool = True) -> tuple[Factors, list[dict[str, Any]]]:
    cfg = task.cfg
    device = torch.device(cfg.device) if cfg.device else task.adapter.device
    gen = torch.Generator().manual_seed(cfg.seed)
    ranks = resolve_ranks(task.selected, cfg.rank)
    f = init_factors(task.selected, ranks, cfg.n_subnetworks, gen, cfg.torch_dtype, device)
    for t in f.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(f.values()), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_decay)
    history: list[dict[str, Any]] = []
    min_batch = 1 if task.token_mode or cfg.reference != "random" else 2
    step = 0
    bar = tqdm(range(cfg.epochs), desc="L3D", disable=not progress, unit="epoch")
    for epoch in bar:
        active = torch.zeros(cfg.n_subnetworks, dtype=torch.float64)
        n_seen = 0
        loss_num = loss_den = 0.0
        lr = opt.param_groups[0]["lr"]
        for x, paired in batches(task.adapter, data, reference, cfg.batch_size, gen, min_batch):
            x = x.to(task.adapter.device)
            paired = paired.to(task.adapter.device) if paired is not None else None
            try:
                stats = batch_stats(task, f, x, gen, paired)
            except NonFiniteGradient as e:
                raise FloatingPointError(
                    f"non-finite (NaN/inf) per-sample gradient for weight {e.name} at step {step} (epoch {epoch}); "
                    f"check the model's outputs and the data of this batch") from None
            loss, mask = l3d_loss(stats.A, stats.B, stats.gsq, gram(f, task.selected), cfg.top_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            normalize_(f, task.selected, "out")
            step += 1
            active += mask.sum(0).double().cpu()
            n_seen += mask.shape[0]
            den = stats.gsq.detach().sum().item()
            loss_num += loss.item() * den
            loss_den += den
        sched.step()
        p_act = active / max(n_seen, 1)
        record = {"epoch": epoch, "loss": loss_num / max(loss_den, 1e-300), "lr": lr, "steps": step,
                  "p_act": p_act.tolist(), "n_dead": int((p_act == 0).sum())}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", dead=record["n_dead"])
    for t in f.values():
        t.requires_grad_(False)
    return f, history
