"""``decompose`` (the entry point) and ``Decomposition`` (the thin stateful shell around the
learned factors: read subnetworks, compute coefficients and errors on new data, save)."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import nn

from .adapters import Adapter, make_adapter
from .checks import as_index, as_number, is_int
from .config import SEED_RANGE, L3DConfig
from .data import Data, batches, check_batch, check_data, check_dtype, check_position, first_batch
from .engine import batch_stats, check_shortcut
from .objective import sample_errors, topk_mask
from .selection import select
from .subnetworks import Factors, dense, gram, resolve_ranks
from .task import Task


def resolve_config(adapter: Adapter, cfg: L3DConfig) -> L3DConfig:
    """Fill in "auto" fields for this model and reject settings it cannot use."""
    if not isinstance(cfg, L3DConfig):
        raise TypeError(f"cfg must be an l3d_lens.L3DConfig, got {type(cfg).__name__}")
    lm = adapter.is_language_model
    sample = cfg.sample if cfg.sample != "auto" else ("token" if lm else "sequence")
    divergence = cfg.divergence if cfg.divergence != "auto" else ("kl" if lm else "mse")
    if not lm and sample == "token":
        raise ValueError("sample='token' needs a language model; for a plain module every row is a sample "
                         "(use sample='sequence' or 'auto')")
    if sample == "token" and cfg.position != -1:
        raise ValueError(f"position={cfg.position!r} applies to sample='sequence' only; with sample='token' every "
                         f"position is a sample (leave position at -1, or set sample='sequence')")
    return cfg.replace(sample=sample, divergence=divergence)


def check_untied(adapter: Adapter, names: list[str]) -> None:
    """A weight tied to another (one Parameter in two modules, or two sharing memory) cannot be
    decomposed or moved alone: both gradient engines see one of its uses, and an edit moves
    every use."""
    for name in names:
        tied = adapter.tied_paths(name)
        if len(tied) > 1:
            raise ValueError(f"{name} is tied to other weights ({', '.join(tied)}: one Parameter, or Parameters "
                             f"sharing its memory): both gradient engines see only this use of it, and an "
                             f"intervention would move every use. Untie it (give each module its own "
                             f"nn.Parameter(p.detach().clone())) or leave it out")


def build_task(model: nn.Module, cfg: L3DConfig, *, saved: bool = False) -> Task:
    """The model's adapter, the resolved config and the selected weights (``saved``: of a saved
    decomposition, whose selectors are read as the l3d_lens that saved it read them)."""
    adapter = make_adapter(model)
    cfg = resolve_config(adapter, cfg)
    selected = select(adapter, tuple(cfg.components), cfg.include_biases, saved=saved)
    resolve_ranks(selected, cfg.rank)
    check_untied(adapter, [s.name for s in selected])
    if cfg.engine == "fast":
        slow = [s.name for s in selected if not s.site.fast]
        if slow:
            raise ValueError(f"engine='fast' cannot decompose {slow}: their input/output activations are not "
                             f"exposed by this model; use engine='exact' or leave them out")
    task = Task(adapter, selected, cfg)
    if cfg.autocast is not None and adapter.model_dtype == torch.float64 and not saved:
        warnings.warn(f"autocast={cfg.autocast!r} leaves a float64 model's computation as it is (torch.autocast "
                      f"does not lower float64); the run is the same as with autocast=None", stacklevel=3)
    return task


def decompose(model: nn.Module, data: Data, cfg: L3DConfig, *, reference: Optional[Data] = None,
              progress: bool = True, checkpoint: Union[str, "os.PathLike[str]", None] = None,  # noqa: F821
              checkpoint_every: int = 0) -> "Decomposition":
    """Learn ``cfg.n_subnetworks`` low-rank subnetworks of the selected weights of ``model``
    whose few active ones reconstruct each sample's gradient of divergence from its reference.

    data: token ids [n, seq] (language model), floats [n, ...] (plain module), or a
    re-iterable of batches (trained on as they come: ``cfg.batch_size`` applies to tensor data
    only, though the saved config records it). reference: paired reference data for
    ``cfg.reference='paired'``. checkpoint: a folder for atomic checkpoints (every
    ``checkpoint_every`` steps, which needs the folder, and at each epoch end); if it holds
    one of the same run, training resumes from it, bit-identically.
    Launched with torchrun (torch.distributed initialised), each rank trains on its shard of
    every global batch. The model is left exactly as it was: same weights, same mode, no hooks.
    At the end the model's weights are fingerprinted (SHA-256; about 0.8 s for 160M parameters
    on one CPU thread), so that a save records the weights the result was computed on.
    """
    from . import distributed
    from .checkpoint import check_folder
    from .io import model_record
    from .training import train

    task, error = None, None
    try:  # under torch.distributed, a rank that fails here alone must not leave the others waiting
        check_folder(checkpoint)
        if not is_int(checkpoint_every) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0 (0: only at epoch ends), got {checkpoint_every!r}")
        if checkpoint_every and checkpoint is None:
            raise ValueError(f"checkpoint_every={checkpoint_every} saves a checkpoint every {checkpoint_every} steps "
                             f"into the checkpoint folder, but checkpoint is None; pass checkpoint=<folder> or leave "
                             f"checkpoint_every at 0")
        task = build_task(model, cfg)
        check_run(task, data, reference)
    except Exception as e:
        if not distributed.active():
            raise
        error = e
    if distributed.active():
        stop_together(task, model, cfg, error)
    factors, history = train(task, data, reference, progress, checkpoint, checkpoint_every)
    return Decomposition(task, factors, history, model_record=model_record(task))


def stop_together(task: Optional[Task], model: Any, cfg: Any, error: Optional[Exception]) -> None:
    """Under torch.distributed, after each rank ran ``decompose``'s checks (``error``: what this
    rank's raised): one collective, so that no rank trains on, or waits until the process-group
    timeout (30 minutes with gloo, then an error that names no cause) in training's first
    collective, for a rank that stopped. Configs that differ are named first (what usually makes
    one rank's checks fail); otherwise a rank that failed raises its own error and the others a
    ValueError naming each failed rank and its reason."""
    from . import distributed
    from .training import config_parts, different_runs

    device = task.adapter.device if task is not None else parameter_device(model)
    parts = config_parts(cfg.to_dict() if isinstance(cfg, L3DConfig) else None)
    differ, failed = distributed.differing_or_failed(
        parts, None if error is None else f"{type(error).__name__}: {error}", device)
    if differ:
        raise different_runs(differ) from error
    if error is not None:
        raise error
    if failed:
        raise ValueError("; ".join(f"rank {r} failed its checks before training ({why})" for r, why in failed.items())
                         + "; every rank stops")


def parameter_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (as ``Adapter.device``), the CPU for anything else."""
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def check_autograd(what: str = "L3D") -> None:
    """``what`` differentiates through the model, which torch.inference_mode() rules out: its
    tensors cannot be saved for backward, even where gradients are turned back on. No_grad and
    set_grad_enabled(False) (as TransformerLens tutorials start) are fine: training and the
    per-sample gradients turn gradients on where they need them."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} needs autograd; call it outside torch.inference_mode() (torch.no_grad() or "
                           f"torch.set_grad_enabled(False) around it are fine)")


def analysis_seed(seed: Any, default: int) -> int:
    """The seed an analysis draws its random references from: ``default`` (cfg.seed) for None,
    else an integer (Python, numpy or one-element integer tensor, never a bool) in the range a
    torch generator takes."""
    if seed is None:
        return default
    value = as_index(seed)
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer in -2**63 .. 2**64 - 1, or None for cfg.seed ({default}); "
                         f"got {seed!r}")
    return value


def check_run(task: Task, data: Data, reference: Optional[Data] = None) -> None:
    """What ``decompose`` checks before training, so that a run that cannot work stops before
    any work (``compare_with_patching`` runs it before its patching sweeps): autograd is
    available (not under torch.inference_mode()), the config's device is one this machine has,
    the data (and paired reference) fit the model, the position lies in its sequences, the
    dtypes suit the model, and the estimated peak memory fits the device."""
    check_autograd()
    if task.cfg.device is not None:
        from .io import unavailable

        problem = unavailable(torch.device(task.cfg.device))
        if problem:
            raise ValueError(f"device={task.cfg.device!r}: {problem}; use one this machine has (e.g. 'cpu'), or "
                             f"None for the model's device")
    check_data(task.adapter, data, reference, task.cfg.reference == "paired")
    if isinstance(data, torch.Tensor) and task.min_batch > task.cfg.batch_size:  # an iterable's batches are its own
        raise ValueError(f"batch_size={task.cfg.batch_size} with reference={task.cfg.reference!r} in sequence mode: "
                         f"a batch needs {task.min_batch} samples (a lone sample has no other to draw, and is its "
                         f"own mean); use batch_size >= {task.min_batch}")
    check_position(task.adapter, data, task.cfg.position)  # token mode keeps -1 (resolve_config)
    check_dtype(task.adapter, data, reference, task.cfg.autocast)
    check_memory(task, data)
    if task.cfg.engine == "fast":
        first, paired = first_batch(data)
        paired = reference[: first.shape[0]] if isinstance(reference, torch.Tensor) else paired
        rows = max(task.min_batch, 2)  # the rows check_shortcut runs, as training gets them (int64 token ids)
        check_shortcut(task, check_batch(task.adapter, first[:rows]),
                       None if paired is None else check_batch(task.adapter, paired[:rows], "reference"))


def check_memory(task: Task, data: Data) -> None:
    """Fail before training if the estimated peak memory exceeds what the device has."""
    from . import distributed, memory

    first = first_batch(data)[0]
    seq_len = first.shape[1] if task.adapter.is_language_model else 1
    batch = min(task.cfg.batch_size, first.shape[0]) if isinstance(data, torch.Tensor) else first.shape[0]
    device = task.device
    row = None if task.adapter.is_language_model else first[:1]  # a plain module's activations are measured on it
    memory.check(task, max(1, batch // distributed.world()), seq_len, device, row,
                 iterable=not isinstance(data, torch.Tensor))


def check_flag(name: str, value: object) -> None:
    """A TypeError unless ``value`` is True or False: a truthy string such as "no" is not."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


class Decomposition:
    """The result of ``decompose``: subnetworks of the selected weights and how they were found.
    ``model_record`` (``io.model_record``): the model the factors were computed on, as a save
    records it (None: the model as it is when saved)."""

    def __init__(self, task: Task, factors: Factors, history: list[dict[str, Any]], *,
                 model_record: Optional[dict[str, Any]] = None):
        self._task = task
        self._factors = factors
        self.history = history
        self._model_record = model_record

    @property
    def cfg(self) -> L3DConfig:
        return self._task.cfg

    @property
    def model(self) -> nn.Module:
        return self._task.adapter.model

    @property
    def adapter(self) -> Adapter:
        return self._task.adapter

    @property
    def weight_names(self) -> list[str]:
        return [s.name for s in self._task.selected]

    @property
    def factors(self) -> Factors:
        """The raw Tucker factors ("in|out/<weight>/core|U<m>"), read-only use."""
        return self._factors

    @property
    def n_subnetworks(self) -> int:
        return self.cfg.n_subnetworks

    def _dense(self, side: str) -> dict[str, torch.Tensor]:
        return {s.name: s.scatter(dense(self._factors, side, s), offset=1) for s in self._task.selected}

    def subnetworks(self) -> dict[str, Float[torch.Tensor, "k ..."]]:
        """V_out per weight, [n_subnetworks, *weight shape] in TransformerLens layout; each
        subnetwork has unit norm over all weights together (zero outside a head/neuron slice)."""
        return self._dense("out")

    def encoders(self) -> dict[str, Float[torch.Tensor, "k ..."]]:
        """V_in per weight, same shapes as ``subnetworks()``."""
        return self._dense("in")

    @property
    def fraction_active(self) -> Float[torch.Tensor, " k"]:
        """P_act per subnetwork over the last training epoch."""
        return (torch.tensor(self.history[-1]["p_act"], device="cpu") if self.history
                else torch.zeros(self.n_subnetworks, device="cpu"))

    def _stats(self, data: Data, reference: Optional[Data], seed: Optional[int]):
        """Per-sample gradient statistics batch by batch (``cfg.batch_size`` chunks of a tensor,
        or the batches as given), random references drawn within each batch from one generator
        seeded by ``seed`` (None: cfg.seed)."""
        task = self._task
        check_autograd()
        seed = analysis_seed(seed, self.cfg.seed)
        paired = task.cfg.reference == "paired"
        check_data(task.adapter, data, reference, paired)
        check_position(task.adapter, data, task.cfg.position)
        check_dtype(task.adapter, data, reference, task.cfg.autocast)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for x, ref in batches(task.adapter, data, reference, self.cfg.batch_size, None, task.min_batch,
                                  position=task.cfg.position):
                x = x.to(task.adapter.device)
                ref = ref.to(task.adapter.device) if ref is not None else None
                yield batch_stats(task, self._factors, x, gen, ref)

    def coefficients(self, data: Data, reference: Optional[Data] = None, *,
                     seed: Optional[int] = None) -> Float[torch.Tensor, "n_samples k"]:
        """V_in . g per sample, [n_samples, n_subnetworks] (token mode: sequence-major
        (sequence, position) samples). References are drawn from ``seed`` (an integer; default
        cfg.seed) unless paired ``reference`` data is given, which makes the result deterministic.
        Random references are drawn within each batch (the ``cfg.batch_size`` chunks of a tensor,
        or the batches as given in a list), so a sample's coefficients depend on the other
        samples passed with it."""
        return torch.cat([st.A for st in self._stats(data, reference, seed)])

    def gradient_norms(self, data: Data, reference: Optional[Data] = None, *, seed: Optional[int] = None) -> torch.Tensor:
        """||g_i||^2 per sample, as used by the loss."""
        return torch.cat([st.gsq for st in self._stats(data, reference, seed)])

    def reconstruction_error(self, data: Data, reference: Optional[Data] = None, *, seed: Optional[int] = None,
                             top_k: Optional[float] = None) -> float:
        """sum_i ||g_i - V_out c_i||^2 / sum_i ||g_i||^2 with batch top-k as in training.
        Random references (from ``seed``, default cfg.seed) and the top-k are taken within each
        batch (the ``cfg.batch_size`` chunks of a tensor, or the batches as given in a list), so
        the result depends on how the samples are batched."""
        k = self.cfg.top_k if top_k is None else as_number(top_k)
        if k is None or not 0 < k <= 1:
            raise ValueError(f"top_k must be a fraction in (0, 1] (1.0 keeps every coefficient), got {top_k!r}")
        G = gram(self._factors, self._task.selected)
        num = den = 0.0
        for st in self._stats(data, reference, seed):
            num += sample_errors(st.A, st.B, st.gsq, G, topk_mask(st.A, k)).sum().item()
            den += st.gsq.sum().item()
        if den == 0:
            raise ValueError("every per-sample gradient of these data is zero (each output equals its reference), so "
                             "there is nothing to reconstruct: the error is undefined")
        return num / den

    def attribution(self):
        """pandas DataFrame: each subnetwork's squared-norm share per head, neuron or weight
        (columns subnetwork, weight, kind, layer, head, neuron, share; sums to 1 per subnetwork)."""
        from .analysis import attribution

        return attribution(self.subnetworks(), self.adapter.sites)

    def head_attribution(self, as_tensor: bool = False):
        """Shares on attention heads: a DataFrame (subnetwork, layer, head, kind W_Q/W_K/W_V/W_O
        or bias, share), or with ``as_tensor`` a [n_subnetworks, n_layers, n_heads] tensor."""
        from .analysis import head_attribution, head_tensor

        check_flag("as_tensor", as_tensor)
        df = self.attribution()
        if as_tensor:
            return head_tensor(df, self.n_subnetworks, self.adapter.n_layers, self.adapter.n_heads)
        return head_attribution(df)

    def neuron_attribution(self):
        """Shares on MLP neurons (every decomposed weight with a neuron axis together: W_in, b_in,
        W_out, and a gated MLP's W_gate and, in the bridge, b_gate): subnetwork, layer, neuron, share."""
        from .analysis import neuron_attribution

        return neuron_attribution(self.attribution())

    def effects(self) -> dict[str, torch.Tensor]:
        """Signed effect of each subnetwork through each unit's output, e_k(u) = <v_k|u, W0|u>
        (``analysis.effects``): ``heads`` [k, n_layers, n_heads], ``mlp`` [k, n_layers],
        ``neurons`` [k, n_layers, d_mlp]; NaN where the unit's output weights are not decomposed."""
        from .analysis.effects import scaling_effects

        subs = self.subnetworks()
        a = self.adapter
        slices = {s.name: s.indices for s in self._task.selected}  # None for a whole weight
        return scaling_effects(subs, {n: a.weight(n) for n in subs}, a.sites, a.n_layers, a.n_heads, a.d_mlp,
                               slices)

    def _unit_effects(self, unit: str, data: Optional[Data], reference: Optional[Data], seed: Optional[int]):
        from .analysis.effects import weighted

        e = self.effects()[unit]
        if data is None:
            return e.abs()
        coef = self.coefficients(data, reference, seed=seed)
        return weighted(e, coef.reshape(-1, coef.shape[-1]))

    @staticmethod
    def _effect_frame(t: torch.Tensor, unit: str):
        """[k, n_layers, n_units] -> DataFrame (subnetwork, layer, <unit>, effect)."""
        import pandas as pd

        idx = torch.cartesian_prod(*(torch.arange(n) for n in t.shape))
        return pd.DataFrame({"subnetwork": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), unit: idx[:, 2].numpy(),
                             "effect": t.reshape(-1).numpy()})

    def head_effects(self, data: Optional[Data] = None, reference: Optional[Data] = None, *,
                     seed: Optional[int] = None, as_tensor: bool = False, share: bool = False):
        """What each subnetwork does through each head's output (``analysis.effects``):
        |e_k(layer, head)|, or with ``data`` mean_i |c_ik| * |e_k| on those samples; with
        ``share``, as a fraction of the subnetwork's total over heads. A DataFrame (subnetwork,
        layer, head, effect) or, with ``as_tensor``, [n_subnetworks, n_layers, n_heads]. Unlike
        ``head_attribution`` (where the norm lies) this follows the unit's output, so it is
        comparable with activation patching. A head no decomposed weight covers has effect NaN
        (not measured), and share 0.0 (so that shares sum to 1 over the heads measured)."""
        from .analysis.effects import shares

        check_flag("as_tensor", as_tensor)
        check_flag("share", share)

        t = self._unit_effects("heads", data, reference, seed)
        if share:
            t = shares(t)
        return t if as_tensor else self._effect_frame(t, "head")

    def neuron_effects(self, data: Optional[Data] = None, reference: Optional[Data] = None, *,
                       seed: Optional[int] = None):
        """What each subnetwork does through each MLP neuron's output (its W_out row): a
        DataFrame (subnetwork, layer, neuron, effect) for the neurons whose W_out row is decomposed."""
        df = self._effect_frame(self._unit_effects("neurons", data, reference, seed), "neuron")
        return df.dropna(subset=["effect"]).reset_index(drop=True)

    def impact(self, data: Data, n_references: int = 10, reference: Optional[Data] = None,
               seed: Optional[int] = None):
        """Mean |V_in . g| over ``n_references`` random references (the paper's impact):
        [n, pos, n_subnetworks] in token mode, [n, n_subnetworks] otherwise. ``seed`` (default
        cfg.seed, as for ``coefficients``) gives the first reference's draw (one reference is
        |coefficients(seed=seed)| of the same tensor) and the others' seeds
        (``analysis.impact.reference_seeds``): different seeds share no draw. References are drawn
        within each batch (the ``cfg.batch_size`` chunks of the samples; unlike ``coefficients``,
        a list of batches is joined first, as the analyses index samples), so a sample's impact
        depends on the other samples passed with it."""
        from .analysis.impact import impact

        return impact(self, data, n_references, reference, seed)

    def top_samples(self, data, subnetwork: int, k: int = 10, *, impacts=None, to_str=None, context: int = 8,
                    reference=None):
        """DataFrame of the k (sequence, position) samples where ``subnetwork`` matters most,
        with their token context (``to_str``: ids -> list of strings, e.g. model.to_str_tokens;
        ``reference``: paired data, for a contrastive decomposition)."""
        from .analysis.impact import top_samples

        return top_samples(self, data, subnetwork, k, impacts, to_str, context, reference)

    def top_logits(self, data, subnetwork: int, k: int = 10, *, to_str=None, positions=None):
        """DataFrame of the k logits most moved along ``subnetwork`` (forward-mode derivative),
        over ``positions`` (default: every position in token mode, else the decomposed one)."""
        from .analysis.impact import top_logits

        return top_logits(self, data, subnetwork, k, to_str, positions)

    def intervene(self, model: Optional[nn.Module] = None, subnetwork=0, delta=None, *, ablate: bool = False):
        """Context manager: the model's weights at W0 + sum_j delta_j v_j (delta: one number for
        all, one per subnetwork, or None for 1.0) or, with ``ablate`` (and no delta), with
        span{v_j} projected out, inside the block; restored bit-exactly on exit, even on error.

            with dec.intervene(subnetwork=3, delta=-2.0):
                logits = model(tokens)
        """
        from .interventions import check_intervention, edit_weights, weight_changes

        check_flag("ablate", ablate)
        ks, deltas = check_intervention(subnetwork, delta, ablate, self.n_subnetworks)
        adapter = self.adapter
        if model is not None and model is not self.model:
            from .adapters import make_adapter

            adapter = make_adapter(model)
            missing = [n for n in self.weight_names if n not in adapter.sites]
            if missing:
                raise ValueError(f"model has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: it is "
                                 f"not a model of the decomposition's architecture (the decomposition's weights: "
                                 f"{', '.join(self.weight_names[:4])}{' ...' if len(self.weight_names) > 4 else ''})")
            fp = adapter.fingerprint(self.weight_names)["shapes"]
            mine = self.adapter.fingerprint(self.weight_names)["shapes"]
            if fp != mine:
                raise ValueError(f"model's decomposed weights have shapes {fp}, the decomposition's are {mine}")
            check_untied(adapter, self.weight_names)
        if deltas is None:  # an ablation projects the weights as they are on entering the block
            subnetworks = self.subnetworks()
            return edit_weights(adapter, lambda: weight_changes(adapter, subnetworks, ks, None))
        return edit_weights(adapter, weight_changes(adapter, self.subnetworks(), ks, deltas))

    def intervention_curve(self, data, subnetwork: int, deltas=(-4, -2, -1, -0.5, 0.5, 1, 2, 4), *,
                           top_fraction: float = 0.1, impacts=None, reference=None):
        """DataFrame (delta, change_top, change_rest, selectivity): output change on the
        subnetwork's top-impact samples vs the rest when moving the weights along it
        (``reference``: paired data, for a contrastive decomposition's impacts). Needs at least
        2 samples; each group keeps at least one. Selectivity is inf only where the rest do not
        change and the top samples do, NaN where neither changes."""
        from .analysis.impact import intervention_curve

        return intervention_curve(self, data, subnetwork, deltas, top_fraction, impacts, reference)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:  # noqa: F821
        """Write ``path/`` with factors.safetensors and decomposition.json (no pickles); other files
        there are left alone, and a save that fails leaves an earlier one there loadable, as it was."""
        from .io import save

        save(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, *, divergence=None, check_weights: bool = True,
             device: Union[str, torch.device, None] = None) -> "Decomposition":
        """Load a saved decomposition onto ``model``; fails clearly if its weights' shapes (or,
        with check_weights, the values of the decomposed weights and of every other parameter)
        differ from those it was computed on. divergence: the custom callable it was computed with
        (only then). device: where the factors go (default: the saved config's device, or the
        model's if this machine lacks it)."""
        from .io import load

        return load(path, model, divergence=divergence, check_weights=check_weights, device=device)

    def __repr__(self) -> str:
        """One line: sizes, what a sample is, the last loss and dead count. A plain module's
        samples are the rows of its input (its config says sample='sequence', which for it only
        means not 'token'), so it shows sample=row."""
        last = self.history[-1] if self.history else {}
        sample = repr(self.cfg.sample) if self.adapter.is_language_model else "row"
        return (f"Decomposition({self.n_subnetworks} subnetworks of {len(self.weight_names)} weights, "
                f"sample={sample}, loss={last.get('loss', float('nan')):.4f}, "
                f"dead={last.get('n_dead', '?')})")
