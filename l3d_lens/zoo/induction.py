"""The embedded default model: a 2-layer attention-only transformer trained here on random
word sequences that repeat with a period varying from sequence to sequence, so that it
predicts repeats with an induction circuit (previous-token head in layer 0, induction head in
layer 1) rather than a fixed positional look-back. Small, known circuit, shipped
in TransformerLens layout and loadable as a HookedTransformer (TL 2/3) or a
TransformerBridge (TL 3/4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Int
from safetensors.torch import load_file
from torch import nn

from ..io import write_pair, write_safetensors

# shipped variants: "default" was trained with head_sparsity=0.1 (one previous-token head, one
# induction head), "redundant" without it (one previous-token head, four redundant induction heads)
VARIANTS = {"default": "induction", "redundant": "induction_redundant"}
WORDS = (
    "the a cat dog sat ran on in big small red blue tree house bird fish sun moon day night happy sad "
    "old new girl boy king queen road river stone cloud rain snow green gold fast slow up down left right "
    "apple bread milk tea book pen door wall ship star hill lake bell song car box cup hat key map"
).split()
BOS = "<bos>"
VOCAB = (BOS, *WORDS)  # 63 tokens
HALF = 12  # random words per half: sequences are [BOS, w_1..w_12, w_1..w_12]
CONFIG = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=len(VOCAB), n_ctx=2 * HALF + 1,
              act_fn="relu", normalization_type=None, attn_only=True, d_mlp=None)


def repeated_sequences(n: int, seed: int = 0, half: int = HALF) -> Int[torch.Tensor, "n seq"]:
    """[BOS, w_1..w_half, w_1..w_half] with words drawn uniformly (the second half is predictable
    only by looking back: the induction task)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, len(VOCAB), (n, half), generator=g)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), words, words], 1)


def periodic_sequences(n: int, seed: int = 0, periods: tuple[int, ...] = tuple(range(3, HALF + 1)),
                       length: int = 2 * HALF + 1) -> Int[torch.Tensor, "n seq"]:
    """[BOS, w_1..w_P, w_1..w_P, w_1..] repeated with a period P drawn per sequence: the
    training data. Mixed periods rule out a fixed-offset look-back; only an induction circuit
    (previous-token head + induction head) predicts every repeat."""
    g = torch.Generator().manual_seed(seed)
    period = torch.tensor(periods)[torch.randint(0, len(periods), (n,), generator=g)]
    words = torch.randint(1, len(VOCAB), (n, max(periods)), generator=g)
    index = torch.arange(length - 1)[None, :] % period[:, None]
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), words.gather(1, index)], 1)


def to_str_tokens(ids: torch.Tensor) -> list[str]:
    return [VOCAB[i] for i in ids.tolist()]


def to_str_words(ids: torch.Tensor) -> list[str]:
    """The tokens as a report's token views draw them: each word after a space, as a tokenizer's
    tokens carry theirs (``to_str_tokens`` gives bare words, which the views run together)."""
    return [w if w == BOS else " " + w for w in to_str_tokens(ids.reshape(-1))]


def variant_dir(variants: dict[str, str], variant: str) -> Path:
    """The asset folder of a shipped model ``variant`` (``variants``: variant -> folder under
    l3d_lens/assets); an unknown variant is an error that names the choices."""
    if variant not in variants:
        raise ValueError(f"variant={variant!r}; choose one of {sorted(variants)}")
    return Path(str(resources.files("l3d_lens") / "assets" / variants[variant]))


def _asset_dir(variant: str = "default") -> Path:
    return variant_dir(VARIANTS, variant)


def asset_dir(variant: str = "default") -> Path:
    """The installed package's folder of the shipped model ``variant`` (one of ``VARIANTS``): the
    ``path`` to give ``save`` to write over it on purpose (scripts/train_default_model.py
    --replace-shipped)."""
    return _asset_dir(variant)


def save_folder(path: Union[str, Path, None], module: str, variants: dict[str, str], variant: str) -> Path:
    """``path`` as a Path; a TypeError naming the choices when it is None: ``module``.save writes
    only where it is told to, since the shipped model's folder (``variant``'s, of ``variants``)
    is inside the installed package, which a save there would overwrite for every later load."""
    if path is None:
        shipped = variant_dir(variants, variant)
        raise TypeError(f"{module}.save needs path=, the folder to write (load it back with {module}.load(path=...)); "
                        f"to write over the shipped {variant!r} model on purpose, pass "
                        f"path={module}.asset_dir({variant!r}) ({shipped})")
    return Path(path)


def write_model(path: Path, weights: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``path/`` (model.safetensors, meta.json) so that a failed save leaves an earlier one
    there loadable (``io.write_pair``). The JSON records the weights file's sha256
    (``check_model_file``), so a kill between the two replaces loads as an error, never as a mix."""
    path.mkdir(parents=True, exist_ok=True)

    def meta_text(tmp: Path) -> str:
        return json.dumps({**meta, "model_sha256": hashlib.sha256(tmp.read_bytes()).hexdigest()}, indent=1)

    write_pair(path, "model.safetensors", lambda tmp: write_safetensors(weights, tmp), "meta.json", meta_text)


def saved_model(path: Union[str, Path, None], variant: Optional[str], asset_dir: Callable[[str], Path],
                module: str, noun: str) -> tuple[Path, str, dict]:
    """The folder, "saved" or "shipped", and meta.json of the ``noun`` model ``module``.load
    reads: the folder ``path`` (one ``save`` wrote) or the shipped ``variant``'s (``asset_dir``),
    not both."""
    if path is not None and variant is not None:
        raise ValueError(f"load takes either variant= (a shipped model) or path= (a saved one), got variant={variant!r} "
                         f"and path={str(path)!r}")
    what = "saved" if path is not None else "shipped"
    path = Path(path) if path is not None else asset_dir(variant or "default")
    if not (path / "meta.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no saved {noun} model (meta.json and model.safetensors, as "
                                f"{module}.save writes them)")
    return path, what, json.loads((path / "meta.json").read_text())


def check_model_file(path: Path, meta: dict) -> None:
    """RuntimeError unless ``path``/model.safetensors is the file ``meta`` was saved with (its
    ``model_sha256``, where it has one: a save cut off between its two replaces)."""
    saved = meta.get("model_sha256")
    if saved is not None and hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() != saved:
        raise RuntimeError(f"{path}: model.safetensors is not the file meta.json was saved with (its sha256 differs); "
                           f"a save into this folder was cut off, so save the model again")


#: the seed CUDA's generators start from when nothing was queued for them (c10's default_rng_seed_val)
CUDA_DEFAULT_SEED = 67280421310721


@contextlib.contextmanager
def global_rngs_kept():
    """Restore torch's (CPU, and CUDA where initialised), numpy's and Python's global random
    states on exit (also a decorator). TransformerLens reseeds them all while it builds a model
    (``HookedTransformerConfig(seed=...)``, ``init_weights``), so without this every load would
    reset a user's seeded stream to the same draws. Before CUDA starts, torch queues its seed
    for it: the queue is kept too, and where CUDA starts inside (a model built on the GPU runs
    TransformerLens's queued seed), the user's queued seeds are run again, or CUDA's default seed
    set, so CUDA draws as it would have from the user's seed."""
    cpu, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    lazy = getattr(torch.cuda, "_lazy_seed_tracker", None)
    queued = dict(vars(lazy)) if lazy is not None and cuda is None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif queued is not None and not torch.cuda.is_initialized():
            vars(lazy).update(queued)
        elif queued is not None:  # CUDA started inside, seeded from TransformerLens's queue
            calls = [call for call in queued.get("call_order", []) if call]
            if not calls:
                torch.cuda.manual_seed_all(CUDA_DEFAULT_SEED)
            for callback, _ in calls:
                callback()
        np.random.set_state(np_state)
        random.setstate(py_state)


def _hooked_cfg(dtype: torch.dtype):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**{k: v for k, v in CONFIG.items() if k != "d_mlp"}, dtype=dtype, seed=0)


@global_rngs_kept()
def build(kind: Optional[str] = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An untrained model of the default architecture: "hooked" (HookedTransformer) or
    "bridge" (TransformerBridge.boot_native); None picks HookedTransformer where it exists.
    The global random states are left as they were (``global_rngs_kept``)."""
    if kind is None:
        try:
            from transformer_lens import HookedTransformer  # noqa: F401

            kind = "hooked"
        except ImportError:
            kind = "bridge"
    if kind == "hooked":
        from transformer_lens import HookedTransformer

        return HookedTransformer(_hooked_cfg(dtype)).eval()
    if kind == "bridge":
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        cfg = TransformerBridgeConfig(**{k: v for k, v in CONFIG.items() if k != "d_mlp"}, seed=0)
        model = TransformerBridge.boot_native(cfg, dtype=dtype)
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
        return model.eval()
    raise ValueError(f"kind={kind!r}; choose 'hooked', 'bridge' or None")


def _check_all_sites(adapter, model: nn.Module, what: str) -> None:
    """ValueError naming the model's parameters that no TL-layout weight reads or writes (a
    grouped-query model's K and V): ``what`` would leave them out, silently."""
    covered = {id(adapter.native_parameter(name)) for name in adapter.sites}
    left = [name for name, p in model.named_parameters() if id(p) not in covered]
    if left:
        raise ValueError(f"{what} cannot carry this model's parameters {left}: they have no TransformerLens-layout "
                         f"weight here (grouped-query K and V have none), so they would be left out")


def state_dict_tl(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight in TransformerLens layout, keyed by TL name (every parameter of the model
    must be one of them)."""
    from ..adapters import make_adapter

    adapter = make_adapter(model)
    _check_all_sites(adapter, model, "state_dict_tl")
    return {name: adapter.weight(name).detach().clone().contiguous() for name in adapter.sites}


def load_tl_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Write TL-layout weights into any supported model (in place). Every weight of the model
    must be given, in its TL shape exactly (a broadcastable one would load repeated rows), and
    every key must name one of them; the one exception is an all-zero bias the model lacks
    (TL 4's native model has no unembedding bias; the shipped models keep theirs at zero)."""
    from ..adapters import make_adapter

    adapter = make_adapter(model)
    _check_all_sites(adapter, model, "load_tl_weights")
    missing = sorted(set(adapter.sites) - set(weights))
    if missing:
        raise ValueError(f"weights missing for {missing}")
    extra = sorted(k for k in set(weights) - set(adapter.sites)
                   if not (k.rpartition(".")[2].startswith("b_") and not weights[k].any()))
    if extra:
        raise ValueError(f"weights given for {extra}, which this model does not have (its weights: "
                         f"{sorted(adapter.sites)})")
    wrong = [f"{name} has shape {tuple(weights[name].shape)}, the model's is {tuple(adapter.weight(name).shape)}"
             for name in adapter.sites if weights[name].shape != adapter.weight(name).shape]
    if wrong:
        raise ValueError(f"weights of the wrong shape: {'; '.join(wrong)}")
    with torch.no_grad():
        for name in adapter.sites:
            param = adapter.native_parameter(name)
            param.copy_(adapter.to_native(name, weights[name].to(param.dtype)))
    return model


@global_rngs_kept()
def train(steps: int = 8000, batch: int = 64, lr: float = 1e-3, seed: int = 0, kind: Optional[str] = None,
          head_sparsity: float = 0.1, log_every: int = 1000) -> nn.Module:
    """Train the default model on periodic sequences (about 4 minutes on one CPU thread).

    No LayerNorm: with it, this small model learned diffuse, period-specific attention.
    ``head_sparsity`` adds head_sparsity * sum over heads of sqrt(mean ||z_h W_O[h]||) (ramped in
    over the first fifth of training): a concave penalty on each head's output norm, so the model
    computes with as few heads as it can. With 0.1 the circuit is one previous-token head (L0H2)
    and one induction head (L1H0) and the other six heads write nothing; with 0 the model spreads
    the induction step over four redundant layer-1 heads (see BENCHMARKS.md). Needs
    ``kind="hooked"`` (a HookedTransformer) when the penalty is on. Seeds torch from ``seed``
    inside, and leaves the global random states as they were (``global_rngs_kept``)."""
    if head_sparsity < 0:
        raise ValueError(f"head_sparsity must be >= 0 (0 turns the penalty off), got {head_sparsity!r}")
    torch.manual_seed(seed)
    model = build(kind)
    if head_sparsity and not hasattr(model, "blocks"):
        raise ValueError("head_sparsity > 0 needs kind='hooked' (a HookedTransformer); use head_sparsity=0 "
                         "to train a TransformerBridge")
    model.train()
    # the unembedding bias stays zero: TransformerLens 4's native model has none
    params = [p for n, p in model.named_parameters() if not n.endswith("b_U") and not n.endswith("unembed.bias")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    z: dict[int, torch.Tensor] = {}
    hooks = [(f"blocks.{layer}.attn.hook_z", lambda act, hook: z.__setitem__(hook.layer(), act))
             for layer in range(CONFIG["n_layers"])] if head_sparsity else []
    for step in range(steps):
        x = periodic_sequences(batch, seed=seed * 1_000_003 + step)
        with model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
            logits = model(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if head_sparsity:
            penalty = sum((torch.einsum("bphd,hdm->bphm", z[layer], model.blocks[layer].attn.W_O)
                           .norm(dim=-1).mean((0, 1)) + 1e-4).sqrt().sum() for layer in z)
            loss = loss + head_sparsity * min(1.0, step / (0.2 * steps)) * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    return model.eval()


def induction_loss(model: nn.Module, n: int = 64, seed: int = 12345) -> tuple[float, float]:
    """(mean loss on the first half, on the repeated second half) of fresh sequences."""
    x = repeated_sequences(n, seed)
    with torch.no_grad():
        logits = model(x)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        lp = logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
    return -lp[:, :HALF].mean().item(), -lp[:, HALF + 1:].mean().item()


def identify_circuit(model: nn.Module, n: int = 256, seed: int = 12345, pattern: float = 0.3,
                     ablation: float = 0.1) -> tuple[set[tuple[int, int]], "pd.DataFrame"]:  # noqa: F821
    """The induction circuit found without L3D or patching: per head, its mean attention to the
    previous token, to the token after the earlier copy (look-back, i - HALF + 1 in the repeated
    half) and to BOS, and the drop of the mean log-prob of the repeated tokens when its ``hook_z``
    is replaced by its mean over the batch. A head is in the circuit when its pattern score
    (previous-token in layer 0, look-back in layer 1) exceeds ``pattern`` and its drop is at least
    ``ablation`` times the largest drop in its layer: an attention pattern alone also marks
    silent heads. Returns ({(layer, head)}, DataFrame of the scores)."""
    import pandas as pd

    x = repeated_sequences(n, seed=seed)
    T, H = x.shape[1], HALF
    acts: dict[str, torch.Tensor] = {}
    names = [f"blocks.{layer}.attn.hook_{k}" for layer in range(CONFIG["n_layers"]) for k in ("pattern", "z")]

    def keep(name):
        def hook(act, hook):
            acts[name] = act.detach().clone()
        return hook

    def repeat_logprob(logits) -> float:
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        return logits[:, H:-1].log_softmax(-1).gather(-1, x[:, H + 1:, None])[..., 0].mean().item()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
        base = repeat_logprob(model(x))
    rows = []
    for layer in range(CONFIG["n_layers"]):
        z = acts[f"blocks.{layer}.attn.hook_z"]
        for h in range(CONFIG["n_heads"]):
            pat = acts[f"blocks.{layer}.attn.hook_pattern"][:, h]

            def mean_ablate(act, hook, h=h, z=z):
                act = act.clone()
                act[:, :, h] = z[:, :, h].mean(0)
                return act

            with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", mean_ablate)]):
                drop = base - repeat_logprob(model(x))
            rows.append({"layer": layer, "head": h,
                         "prev-token attn": torch.stack([pat[:, i, i - 1] for i in range(1, T)]).mean().item(),
                         "look-back attn": torch.stack([pat[:, i, i - H + 1] for i in range(H + 1, T)]).mean().item(),
                         "BOS attn": pat[:, 1:, 0].mean().item(), "mean-ablation drop (nats)": drop})
    table = pd.DataFrame(rows)
    score = table["prev-token attn"].where(table.layer == 0, table["look-back attn"])
    drop = table["mean-ablation drop (nats)"]
    table["in circuit"] = (score > pattern) & (drop >= ablation * drop.groupby(table.layer).transform("max"))
    return {(int(r.layer), int(r.head)) for r in table[table["in circuit"]].itertuples()}, table


def save(model: nn.Module, path: Union[str, Path, None] = None, variant: str = "default") -> Path:
    """Write the model and a probe of its logits (checked on load) to the folder ``path`` and
    return it (``write_model``: a failed save leaves an earlier one loadable). ``path`` is
    required: the shipped ``variant``'s folder, ``asset_dir(variant)``, is written over only
    when given as ``path``; without one the TypeError names it."""
    path = save_folder(path, "induction", VARIANTS, variant)
    probe = repeated_sequences(4, seed=7)
    with torch.no_grad():
        logits = model(probe)
    first, second = induction_loss(model)
    meta = {"config": CONFIG, "vocab": list(VOCAB), "half": HALF, "format_version": 1,
            "probe_tokens": probe.tolist(), "probe_logits_sum": float(logits.double().sum()),
            "probe_logits_first": logits[0, -1].tolist(), "loss_first_half": first, "loss_second_half": second}
    write_model(path, state_dict_tl(model), meta)
    return path


def load(kind: Optional[str] = None, dtype: torch.dtype = torch.float32, variant: Optional[str] = None,
         path: Union[str, Path, None] = None) -> nn.Module:
    """A shipped trained model as a HookedTransformer (TL 2/3) or TransformerBridge: the default
    one (one previous-token head L0H2, one induction head L1H0, six silent heads) or, with
    ``variant="redundant"``, the one trained without the head penalty (four induction heads);
    ``path``: a folder ``save`` wrote instead (a retrained model; not with ``variant``).

    Checked on load: the weights' names and shapes (``load_tl_weights``, ValueError), the stored
    config and vocabulary, the weights file's sha256 where stored (``check_model_file``), and the
    stored probe logits (one forward of the 4 stored probe
    sequences; the last position of the first, and the sum of all, must match within a tolerance
    scaled to ``dtype``); a mismatch of these raises RuntimeError."""
    path, what, meta = saved_model(path, variant, _asset_dir, "induction", "induction")
    if meta["config"] != CONFIG or meta["vocab"] != list(VOCAB):
        raise RuntimeError(f"{path}: {what} model does not match this l3d_lens version's default architecture")
    check_model_file(path, meta)
    model = load_tl_weights(build(kind, dtype), load_file(str(path / "model.safetensors")))
    _check_probe(model, meta, path, dtype)
    return model


def _check_probe(model: nn.Module, meta: dict, path: Path, dtype: torch.dtype) -> None:
    """The model's logits on the stored probe tokens match those stored when it was saved: the
    last position of the first sequence (``probe_logits_first``) and the sum of all of them
    (``probe_logits_sum``), each where the metadata has it."""
    if "probe_tokens" not in meta or not {"probe_logits_first", "probe_logits_sum"} & set(meta):
        return
    with torch.no_grad():
        out = model(torch.tensor(meta["probe_tokens"], dtype=torch.long))
    logits = (out if isinstance(out, torch.Tensor) else out.logits).double().cpu()
    # float32/float64: 1e-3 (the shipped models match to ~1e-5); half precisions: their rounding
    tol = max(1e-3, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    if "probe_logits_first" in meta:
        expected = torch.tensor(meta["probe_logits_first"], dtype=torch.float64)
        first = logits[0, -1]
        err = (first - expected).abs().max().item() if first.shape == expected.shape else float("inf")
        if not err <= tol * (1 + expected.abs().max().item()):
            raise RuntimeError(f"{path}: the loaded model's probe logits differ from those stored with it (max "
                               f"|diff| {err:.3g}); the weights or this TransformerLens version compute something else")
    if "probe_logits_sum" in meta:
        # rounding errors of the summands partly cancel: allow tol x sqrt(count) x the largest logit
        err = abs(logits.sum().item() - meta["probe_logits_sum"])
        if not err <= tol * (1 + logits.numel() ** 0.5 * logits.abs().max().item()):
            raise RuntimeError(f"{path}: the sum of the loaded model's probe logits differs from the one stored with "
                               f"it by {err:.3g}; the weights or this TransformerLens version compute something else")


def metadata(variant: str = "default") -> dict:
    return json.loads((_asset_dir(variant) / "meta.json").read_text())
