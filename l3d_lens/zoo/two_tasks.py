"""A one-layer attention-only transformer whose last token names a task, trained here so that
the two tasks run through different, known heads: a small model with a ground-truth circuit
for checking circuit-recovery methods (L3D, activation patching, attribution patching).

Sequences are ``[w_1, ..., w_8, T]``: eight random words, then a task token. At ``T`` the model
answers ``w_1`` when T = ``<first>`` and ``w_8`` when T = ``<last>``.

Ground truth by construction. Training (``train``) makes every head other than the task's
own (``TASK_HEADS``) *silent* at the answer position: the loss is the cross-entropy of the full
model plus that of the model with the other heads' outputs zeroed there, plus a penalty on
those heads' ``hook_z`` at the answer position. In a one-layer model the answer position's
logits depend on the heads only through their output at that position, so a head silenced
there carries nothing of the task; ``head_ablation`` checks it (and that each task head
matters) on the trained model. Heads (0, 0), (0, 3), (0, 5), (0, 7) serve neither task
(``UNUSED_HEADS``).

Two variants ship (``load(variant=...)``), from one training run. In ``"unpruned"`` the
unused heads keep their trained W_O: silent at the answer position, yet their W_V gets large
gradients there (dD/dW_V = sum_j attn_j x_j (x) W_O^T dD/dout), a parameter-space sensitivity
without any use for the tasks, which is what unsupervised L3D then finds (BENCHMARKS.md). In
``"default"`` they are pruned after training (W_O = 0): they write nothing anywhere. The
answers do not change (KL ~1e-5 at the answer position), but the word positions do (mean KL
about 0.8 nats): there the unused heads had fitted the unpredictable next-word target.

Shipped in TransformerLens layout (``l3d_lens/assets/two_tasks``) and loadable as a
HookedTransformer (TL 2/3) or TransformerBridge (TL 3/4), like ``zoo.induction``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import pandas as pd
import torch
from jaxtyping import Int
from safetensors.torch import load_file
from torch import nn

from .induction import (_check_probe, check_model_file, global_rngs_kept, load_tl_weights, save_folder, saved_model,
                        state_dict_tl, variant_dir, write_model)

#: shipped variants -> asset folder (see the module docstring)
VARIANTS = {"default": "two_tasks", "unpruned": "two_tasks_unpruned"}
TASKS = ("first", "last")
TASK_TOKENS = ("<first>", "<last>")
WORDS = (
    "cat dog sun moon tree bird fish king queen road river stone cloud rain snow star hill lake bell song "
    "car box cup hat key map ship door book pen"
).split()
VOCAB = (*TASK_TOKENS, *WORDS)  # 32 tokens
FIRST, LAST = 0, 1  # token ids of the task tokens
N_WORDS = 8
CONFIG = dict(n_layers=1, d_model=64, n_heads=8, d_head=8, d_vocab=len(VOCAB), n_ctx=N_WORDS + 1,
              act_fn="relu", normalization_type="LN", attn_only=True, d_mlp=None)
#: the heads each task may use (layer, head); every other head is trained silent for it
TASK_HEADS = {"first": ((0, 1), (0, 4)), "last": ((0, 2), (0, 6))}
#: the heads that serve neither task
UNUSED_HEADS = tuple((0, h) for h in range(CONFIG["n_heads"])
                     if all((0, h) not in heads for heads in TASK_HEADS.values()))
HOOK = "blocks.0.attn.hook_z"


# --- data ------------------------------------------------------------------------------------


def sequences(n: int, task: str = "mixed", seed: int = 0) -> Int[torch.Tensor, "n seq"]:
    """``[w_1..w_8, T]`` with words drawn uniformly; task "first", "last" or "mixed"
    (rows alternate first, last, first, ...)."""
    if task not in (*TASKS, "mixed"):
        raise ValueError(f"task={task!r}; choose 'first', 'last' or 'mixed'")
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(len(TASK_TOKENS), len(VOCAB), (n, N_WORDS), generator=g)
    if task == "mixed":
        t = torch.arange(n) % 2
    else:
        t = torch.full((n,), TASKS.index(task))
    return torch.cat([words, t[:, None]], 1)


def task_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0 (first) or 1 (last) per sequence, read from its last token."""
    return tokens[:, -1]


def answers(tokens: torch.Tensor) -> torch.Tensor:
    """The correct answer per sequence: w_1 for <first>, w_8 for <last>."""
    return torch.where(task_ids(tokens) == FIRST, tokens[:, 0], tokens[:, N_WORDS - 1])


def contrast_pairs(n: int, task: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, corrupted) of one task: corrupted = clean with the word the task reads (w_1 or
    w_8) replaced by a different random word, so the correct answer changes and nothing else."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; choose 'first' or 'last'")
    clean = sequences(n, task, seed)
    g = torch.Generator().manual_seed(seed + 1_000_003)
    pos = 0 if task == "first" else N_WORDS - 1
    shift = torch.randint(1, len(WORDS), (n,), generator=g)
    corrupted = clean.clone()
    corrupted[:, pos] = (clean[:, pos] - len(TASK_TOKENS) + shift) % len(WORDS) + len(TASK_TOKENS)
    return clean, corrupted


def logit_diff_metric(clean: torch.Tensor, corrupted: torch.Tensor):
    """metric(logits) = mean over pairs of logit[clean answer] - logit[corrupted answer] at the
    answer position (a scalar tensor)."""
    a, b = answers(clean), answers(corrupted)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        idx = torch.arange(last.shape[0], device=last.device)
        return (last[idx, a.to(last.device)] - last[idx, b.to(last.device)]).mean()

    return metric


def allowed_heads(tokens: torch.Tensor) -> torch.Tensor:
    """[n, n_heads] bool: which heads each sequence's task may use (layer 0)."""
    mask = torch.zeros(tokens.shape[0], CONFIG["n_heads"], dtype=torch.bool)
    for t, task in enumerate(TASKS):
        rows = task_ids(tokens) == t
        for _, h in TASK_HEADS[task]:
            mask[rows, h] = True
    return mask


# --- model ------------------------------------------------------------------------------------


def _asset_dir(variant: str = "default") -> Path:
    return variant_dir(VARIANTS, variant)


def asset_dir(variant: str = "default") -> Path:
    """The installed package's folder of the shipped model ``variant`` (one of ``VARIANTS``): the
    ``path`` to give ``save`` to write over it on purpose (scripts/train_two_tasks.py)."""
    return _asset_dir(variant)


@global_rngs_kept()
def build(kind: Optional[str] = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """An untrained model of this architecture: "hooked" (HookedTransformer) or "bridge"
    (TransformerBridge.boot_native); None picks HookedTransformer where it exists. Initialised
    from ``seed``; the global random states are left as they were (``global_rngs_kept``)."""
    if kind is None:
        try:
            from transformer_lens import HookedTransformer  # noqa: F401

            kind = "hooked"
        except ImportError:
            kind = "bridge"
    cfg = {k: v for k, v in CONFIG.items() if k != "d_mlp"}
    if kind == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**cfg, dtype=dtype, seed=seed)).eval()
    if kind == "bridge":
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        torch.manual_seed(seed)
        model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=seed), dtype=dtype)
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
        return model.eval()
    raise ValueError(f"kind={kind!r}; choose 'hooked', 'bridge' or None")


def _forward_masked(model: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor]):
    """(logits, z at the answer position [n, heads, d_head]); with ``keep`` [n, heads], the
    other heads' z at the answer position is zeroed."""
    store = {}

    def hook(z, hook):
        if "z" in store:
            return z
        store["z"] = z[:, -1]
        if keep is None:
            return z
        z = z.clone()
        z[:, -1] = z[:, -1] * keep[:, :, None].to(z.dtype)
        return z

    with model.hooks(fwd_hooks=[(HOOK, hook)]):
        out = model(x)
    out = out if isinstance(out, torch.Tensor) else out.logits
    return out, store["z"]


def prune_unused_heads(model: nn.Module) -> nn.Module:
    """Set W_O of the heads that serve neither task (``UNUSED_HEADS``) to zero, in place: they
    then write nothing at any position. Trained silent at the answer position, they change the
    answers by no more than their tiny output there."""
    weights = state_dict_tl(model)
    for layer, head in UNUSED_HEADS:
        weights[f"blocks.{layer}.attn.W_O"][head] = 0
    return load_tl_weights(model, weights)


@global_rngs_kept()
def train(steps: int = 2500, batch: int = 128, lr: float = 3e-3, seed: int = 0, kind: Optional[str] = None,
          silence: float = 10.0, log_every: int = 250, prune: bool = True) -> nn.Module:
    """Train on mixed tasks (about a minute on one CPU thread). Loss: cross-entropy of the
    answer for the full model and for the model with the other task's heads (and the unused
    heads) zeroed at the answer position, ``silence`` x their squared hook_z there, and
    next-word cross-entropy at the word positions (unpredictable: keeps those outputs flat).
    ``prune``: then ``prune_unused_heads`` (the default variant; False gives "unpruned").
    Seeds torch from ``seed`` inside, and leaves the global random states as they were."""
    torch.manual_seed(seed)
    model = build(kind, seed=seed)
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("b_U") and not n.endswith("unembed.bias")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    ce = nn.functional.cross_entropy
    for step in range(steps):
        x = sequences(batch, "mixed", seed=seed * 1_000_003 + step + 1)
        keep = allowed_heads(x)
        y = answers(x)
        full, z = _forward_masked(model, x, None)
        masked, _ = _forward_masked(model, x, keep)
        quiet = (z.pow(2).sum(-1) * (~keep).to(z.dtype)).sum(-1).mean()
        words = ce(full[:, :-1].reshape(-1, full.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce(full[:, -1], y) + ce(masked[:, -1], y) + silence * quiet + words
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f} (silence {quiet.item():.4f}, words {words.item():.3f})")
    model.eval()
    return prune_unused_heads(model) if prune else model


# --- checks -------------------------------------------------------------------------------------


def evaluate(model: nn.Module, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Accuracy and mean log-prob of the answer per task, on fresh sequences."""
    out = {}
    for task in TASKS:
        x = sequences(n, task, seed)
        with torch.no_grad():
            logits, _ = _forward_masked(model, x, None)
        lp = logits[:, -1].log_softmax(-1)
        y = answers(x)
        out[f"acc_{task}"] = (lp.argmax(-1) == y).float().mean().item()
        out[f"logprob_{task}"] = lp.gather(-1, y[:, None]).mean().item()
    return out


def head_ablation(model: nn.Module, n: int = 512, seed: int = 12345) -> pd.DataFrame:
    """Zero-ablate each head's output at the answer position, one at a time: per head and task,
    the drop in accuracy and in mean answer log-prob, and the head's RMS hook_z there (a
    silent head has ~0). The ground truth is the heads that matter for each task."""
    rows = []
    base = evaluate(model, n, seed)
    for task in TASKS:
        x = sequences(n, task, seed)
        y = answers(x)
        with torch.no_grad():
            _, z = _forward_masked(model, x, None)
        for h in range(CONFIG["n_heads"]):
            keep = torch.ones(n, CONFIG["n_heads"], dtype=torch.bool)
            keep[:, h] = False
            with torch.no_grad():
                logits, _ = _forward_masked(model, x, keep)
            lp = logits[:, -1].log_softmax(-1)
            rows.append({"task": task, "layer": 0, "head": h, "in_task_heads": (0, h) in TASK_HEADS[task],
                         "z_rms": z[:, h].pow(2).mean().sqrt().item(),
                         "acc_drop": base[f"acc_{task}"] - (lp.argmax(-1) == y).float().mean().item(),
                         "logprob_drop": base[f"logprob_{task}"] - lp.gather(-1, y[:, None]).mean().item()})
    return pd.DataFrame(rows)


# --- save / load ---------------------------------------------------------------------------------


def save(model: nn.Module, path: Union[str, Path, None] = None, variant: str = "default") -> Path:
    """Write the model, a probe of its logits and its checks to the folder ``path`` and return it
    (``induction.write_model``: a failed save leaves an earlier one loadable). ``path`` is
    required: the shipped ``variant``'s folder, ``asset_dir(variant)``, is written over only
    when given as ``path``; without one the TypeError names it."""
    path = save_folder(path, "two_tasks", VARIANTS, variant)
    probe = sequences(4, "mixed", seed=7)
    with torch.no_grad():
        logits, _ = _forward_masked(model, probe, None)
    ablation = head_ablation(model)
    meta = {"config": CONFIG, "vocab": list(VOCAB),
            "task_heads": {k: [list(h) for h in v] for k, v in TASK_HEADS.items()},
            "format_version": 1, "probe_tokens": probe.tolist(), "probe_logits_sum": float(logits.double().sum()),
            "evaluation": evaluate(model),
            "ablation": ablation.round(5).to_dict(orient="records")}
    write_model(path, state_dict_tl(model), meta)
    return path


def load(kind: Optional[str] = None, dtype: torch.dtype = torch.float32, variant: Optional[str] = None,
         path: Union[str, Path, None] = None) -> nn.Module:
    """The shipped trained model as a HookedTransformer (TL 2/3) or TransformerBridge;
    ``variant="unpruned"``: with the unused heads' W_O as trained (see the module docstring);
    ``path``: a folder ``save`` wrote instead (a retrained model; not with ``variant``).

    Checked on load: the stored config, vocabulary and task heads, the weights file's sha256
    where stored, and the sum of the stored probe's logits (as in ``induction.load``). A
    mismatch raises RuntimeError."""
    path, what, meta = saved_model(path, variant, _asset_dir, "two_tasks", "two-task")
    task_heads = {k: tuple(tuple(h) for h in v) for k, v in meta["task_heads"].items()}
    if meta["config"] != CONFIG or meta["vocab"] != list(VOCAB) or task_heads != TASK_HEADS:
        raise RuntimeError(f"{path}: {what} model does not match this l3d_lens version's two-task architecture")
    check_model_file(path, meta)
    model = load_tl_weights(build(kind, dtype), load_file(str(path / "model.safetensors")))
    _check_probe(model, meta, path, dtype)
    return model


def metadata(variant: str = "default") -> dict:
    return json.loads((_asset_dir(variant) / "meta.json").read_text())
