"""Circuit recovery: L3D vs activation patching vs attribution patching; writes (replaces) the
"## Circuit recovery (AUROC)" section of BENCHMARKS.md and leaves the other sections alone.

Run from the repository root (one thread; about 3 minutes on a 2-core machine):

  python benchmarks/patching.py

Models (both shipped with l3d_lens, loaded as HookedTransformer on TransformerLens 3.x and as
TransformerBridge on 4.x):

- the default "induction" model (``l3d_lens.zoo.induction``). Its circuit is identified here
  independently of the three methods: attention-pattern scores per head (previous token,
  look-back to the token after the earlier copy, BOS), the loss on repeats of other periods,
  and mean-ablation of every head. Ground truth = the heads whose mean ablation lowers the
  metric by more than 0.05 nats.
- the two-task model (``l3d_lens.zoo.two_tasks``), whose ground truth is known by
  construction (each task's heads; every other head trained silent at the answer position)
  and checked by zero-ablation.

Each method gives one score per head on 64 (clean, corrupted) pairs; AUROC = probability that
a ground-truth head scores above a non-ground-truth head (ties 1/2). Three data/L3D seeds.
L3D is read two ways: *l3d* (the subnetworks' effect through each head's output,
``l3d_lens.analysis.effects``) and *l3d_share* (their squared-norm share on the head). Two
controls use the plain per-pair gradient of the same divergence, with no decomposition:
*gradient* = E_i ||g_i restricted to the head||^2 and *gradient effect* = E_i |<g_i, W0>| over
the head's W_V and W_O slices (averaged); they separate what the decomposition adds from what
the gradient already says.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import l3d_lens  # noqa: E402
from benchmarks.common import BENCHMARKS_MD, environment, setup_threads, write_section  # noqa: E402
from l3d_lens.adapters import make_adapter  # noqa: E402
from l3d_lens.patching import NOISE_FLOOR, auroc, compare_with_patching, default_l3d_config  # noqa: E402
from l3d_lens.zoo import induction, two_tasks  # noqa: E402

SECTION = "## Circuit recovery (AUROC)"
SEEDS = (0, 1, 2)
N_PAIRS = 64
METHODS = ("patching", "attribution", "l3d", "l3d_share", "gradient", "gradient_effect")


# --- helpers ----------------------------------------------------------------------------------


def gradient_norms(model, base, source, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_i ||g_i[head, kind]||^2 over pairs, [n_layers, n_heads, 4 (W_Q, W_K, W_V, W_O)];
    E_i |mean over W_V, W_O of <g_i[head], W0[head]>|, [n_layers, n_heads]): the per-pair
    gradient of the divergence contrastive L3D decomposes (KL(source output || base output),
    summed over positions as in cfg), restricted to each head's slice of each weight."""
    adapter = make_adapter(model)
    names = [f"blocks.{layer}.attn.W_{x}" for layer in range(adapter.n_layers) for x in "QKVO"]
    with torch.no_grad():
        ref = adapter.forward(source).log_softmax(-1)
    out = torch.zeros(adapter.n_layers, adapter.n_heads, 4, dtype=torch.float64)
    eff = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
    for i in range(base.shape[0]):
        weights = {n: adapter.weight(n).detach().clone().requires_grad_(True) for n in names}
        logp = adapter.functional_forward(weights, base[i:i + 1]).log_softmax(-1)
        r = ref[i:i + 1]
        if cfg.position != "all":
            logp, r = logp[:, cfg.position], r[:, cfg.position]
        kl = (r.exp() * (r - logp)).sum()
        grads = torch.autograd.grad(kl, list(weights.values()))
        pair = torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
        for n, g in zip(names, grads):
            out[int(n.split(".")[1]), :, "QKVO".index(n[-1])] += g.double().pow(2).sum((1, 2))
            if n[-1] in "VO":
                pair[int(n.split(".")[1])] += 0.5 * (g.double() * weights[n].detach().double()).sum((1, 2))
        eff += pair.abs()
    return out / base.shape[0], eff / base.shape[0]


def run_methods(model, clean, corrupted, metric, truth, direction, seed) -> tuple[dict[str, float], Any]:
    cfg = default_l3d_config(model, clean.shape[0], seed=seed)
    res = compare_with_patching(model, clean, corrupted, metric, cfg=cfg, ground_truth=truth, top_k=len(truth),
                                direction=direction)
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    res.gradient_by_kind, ge = gradient_norms(model, base, source, cfg)
    g = res.gradient_by_kind.sum(-1)
    res.heads["gradient"] = [g[int(r.layer), int(r.head)].item() for r in res.heads.itertuples()]
    res.heads["gradient_effect"] = [ge[int(r.layer), int(r.head)].item() for r in res.heads.itertuples()]
    scores = dict(res.auroc)
    for m in ("gradient", "gradient_effect"):
        scores[m] = auroc(res.heads[m].values, res.heads["ground_truth"].values)
    return scores, res


def fmt_auroc(values: list[float]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def md_table(df: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the induction model ----------------------------------------------------------------------


def induction_pairs(n: int, seed: int):
    H = induction.HALF
    clean = induction.repeated_sequences(n, seed=2 * seed + 1)
    corrupted = clean.clone()
    corrupted[:, 1:H + 1] = induction.repeated_sequences(n, seed=2 * seed + 2)[:, 1:H + 1]

    def metric(logits):
        return logits[:, H:-1].log_softmax(-1).gather(-1, clean[:, H + 1:, None])[..., 0].mean()

    return clean, corrupted, metric


def identify_induction(model) -> tuple[set, pd.DataFrame, list[str]]:
    """Ground truth from attention patterns and mean-ablation (``induction.identify_circuit``),
    and the model's loss on repeats of other periods."""
    truth, table = induction.identify_circuit(model)
    notes = []
    for half in (12, 10, 8, 6):
        xs = induction.repeated_sequences(256, seed=999, half=half)
        with torch.no_grad():
            lp = model(xs)[:, :-1].log_softmax(-1).gather(-1, xs[:, 1:, None])[..., 0]
        notes.append(f"period {half}: {-lp[:, half + 1:].mean().item():.2f}")
    return truth, table, notes


UNSUP_SEEDS = (0, 1, 2)


def unsupervised_induction(model, truth) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Unsupervised L3D (token mode, random references, top-k; the demo's settings) of the
    induction model, 3 seeds: per subnetwork, how its |coefficients| split between the repeated
    and the first half, and which heads it acts through (output-effect share, analysis.effects)
    and where its norm lies (head_attribution). Returns (seed 0's table, one row per seed for
    the subnetwork most concentrated on the repeated half, text)."""
    H = induction.HALF
    data = induction.repeated_sequences(512, seed=0)
    probe = induction.repeated_sequences(64, seed=7)
    labels = [(layer, h) in truth for layer in range(2) for h in range(4)]
    first, best = None, []
    for seed in UNSUP_SEEDS:
        cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=8, rank=4, top_k=0.1,
                                 sample="token", epochs=10, batch_size=32, lr=0.01, lr_step=4, include_biases=False,
                                 seed=seed)
        dec = l3d_lens.decompose(model, data, cfg, progress=False)
        coef = dec.coefficients(probe).abs().double().reshape(64, probe.shape[1], -1)
        ratio = coef[:, H + 1:].mean((0, 1)) / coef[:, 1:H + 1].mean((0, 1)).clamp_min(1e-12)
        eff = dec.head_effects(as_tensor=True, share=True)
        norm = dec.head_attribution(as_tensor=True)
        rows = []
        for k in range(cfg.n_subnetworks):
            e, n = eff[k].flatten(), norm[k].flatten()
            top = torch.argsort(e, descending=True)[:3].tolist()
            rows.append({"subnetwork": k, "P_act": dec.fraction_active[k].item(),
                         "|c| repeated / first half": ratio[k].item(),
                         "output-effect share on circuit heads": sum(e[i].item() for i in range(8) if labels[i]),
                         "norm share on circuit heads": sum(n[i].item() for i in range(8) if labels[i]),
                         "AUROC, output effect": auroc(e.tolist(), labels),
                         "AUROC, norm share": auroc(n.tolist(), labels),
                         "top heads (effect share)": ", ".join(f"L{i // 4}H{i % 4} ({e[i]:.2f})" for i in top)})
        df = pd.DataFrame(rows)
        k = int(df["|c| repeated / first half"].idxmax())
        best.append({"seed": seed, "decomposition": f"`{dec!r}`", **df.loc[k].to_dict()})
        first = df if first is None else first
    best = pd.DataFrame(best)
    ok = ((best["|c| repeated / first half"] > 3) & (best["AUROC, output effect"] == 1)
          & (best["AUROC, norm share"] == 1)).sum()
    return first, best, (f"in {ok} of {len(best)} seeds the subnetwork most concentrated on the repeated half "
                         "(ratio > 3) ranks the circuit heads above every other head by both readouts")


# --- the two-task model -----------------------------------------------------------------------


SEPARATION_SEEDS = (0, 1, 2, 3, 4)


def token_mode_separation(model, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any], Any]:
    """Unsupervised L3D (token samples, random references, top-k) on mixed-task data."""
    x = two_tasks.sequences(512, "mixed", seed=3)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=8, rank=8, top_k=0.05, sample="token",
                             include_biases=False, epochs=8, batch_size=32, lr=0.01, lr_step=2, seed=seed)
    dec = l3d_lens.decompose(model, x, cfg, progress=False)
    xt = two_tasks.sequences(256, "mixed", seed=4)
    imp = dec.impact(xt, n_references=5)  # [n, pos, k]
    tid = two_tasks.task_ids(xt)
    share = dec.head_attribution(as_tensor=True)[:, 0]  # [k, heads]
    effect = dec.head_effects(as_tensor=True, share=True)[:, 0]  # one layer: shares over its heads
    first_heads = [h for _, h in two_tasks.TASK_HEADS["first"]]
    last_heads = [h for _, h in two_tasks.TASK_HEADS["last"]]
    rows = []
    for k in range(cfg.n_subnetworks):
        top = torch.argsort(share[k], descending=True)[:3].tolist()
        rows.append({"subnetwork": k, "P_act": dec.fraction_active[k].item(),
                     "impact at answer, first": imp[tid == 0, -1, k].mean().item(),
                     "impact at answer, last": imp[tid == 1, -1, k].mean().item(),
                     "impact at word positions": imp[:, :-1, k].mean().item(),
                     "share on first heads (1, 4)": share[k, first_heads].sum().item(),
                     "share on last heads (2, 6)": share[k, last_heads].sum().item(),
                     "effect on first heads (1, 4)": effect[k, first_heads].sum().item(),
                     "effect on last heads (2, 6)": effect[k, last_heads].sum().item(),
                     "top heads (share)": ", ".join(f"{h} ({share[k, h]:.2f})" for h in top)})
    df = pd.DataFrame(rows)
    verdict = {}
    for task, other, own, own_e in (("first", "last", "share on first heads (1, 4)", "effect on first heads (1, 4)"),
                                    ("last", "first", "share on last heads (2, 6)", "effect on last heads (2, 6)")):
        k = int(df[f"impact at answer, {task}"].idxmax())
        sel = df.loc[k, f"impact at answer, {task}"] / max(df.loc[k, f"impact at answer, {other}"], 1e-12)
        verdict[task] = {"subnetwork": k, "selectivity": sel, "own_share": df.loc[k, own],
                         "own_effect": df.loc[k, own_e]}
    return df, verdict, dec


# --- report -----------------------------------------------------------------------------------


def _summary(runs, keep, method) -> str:
    vals = [v[method] for k, v in runs.items() if keep(k)]
    return f"{min(vals):.2f}-{max(vals):.2f} ({sum(v == 1 for v in vals)} of {len(vals)} runs at 1)"


def reading(runs, keep, what: str) -> str:
    """The numbers of the table in words, for the runs ``keep`` selects."""
    return (f"Reading ({what}): AUROC ranges: patching {_summary(runs, keep, 'patching')}; attribution "
            f"{_summary(runs, keep, 'attribution')}; L3D effect {_summary(runs, keep, 'l3d')}; L3D norm share "
            f"{_summary(runs, keep, 'l3d_share')}; gradient effect control {_summary(runs, keep, 'gradient_effect')}; "
            f"gradient norm control {_summary(runs, keep, 'gradient')}. The norm readouts (share, gradient norm) "
            f"follow gradient size, which is large on weights that see large activations whether or not the "
            f"head's output matters (a silent head's W_V gets dD/dW_V = sum_j attn_j x_j (x) W_O^T dD/dout); the "
            f"effect readouts follow what the head writes.")


def separation_flags(verdict) -> dict[str, bool]:
    """Both tasks' subnetworks: impact > 5x that on the other task, > 50% of norm / of output
    effect on the task's own heads."""
    return {"by sample": all(v["selectivity"] > 5 for v in verdict.values()),
            "by norm share": all(v["own_share"] > 0.5 for v in verdict.values()),
            "by output effect": all(v["own_effect"] > 0.5 for v in verdict.values())}


def separation_seeds(model) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``token_mode_separation`` over ``SEPARATION_SEEDS``: seed 0's full table, one row per
    seed and task, and how many seeds separate the tasks each way."""
    rows, first = [], None
    counts = {"by sample": 0, "by norm share": 0, "by output effect": 0}
    for seed in SEPARATION_SEEDS:
        df, verdict, dec = token_mode_separation(model, seed)
        first = df if first is None else first
        for task, v in verdict.items():
            rows.append({"seed": seed, "dead subnetworks": int((dec.fraction_active == 0).sum()),
                         "task": f"<{task}>", "subnetwork": v["subnetwork"],
                         "impact / impact on the other task": v["selectivity"],
                         "norm share on own heads": v["own_share"], "output-effect share on own heads": v["own_effect"]})
        for k, ok in separation_flags(verdict).items():
            counts[k] += ok
    n = len(SEPARATION_SEEDS)
    text = (f"both tasks separated by sample (impact > 5x that on the other task) in {counts['by sample']} of {n} "
            f"seeds; on the task's own heads by output effect (> 50%) in {counts['by output effect']} of {n}; by "
            f"norm share (> 50%) in {counts['by norm share']} of {n}")
    return first, pd.DataFrame(rows), text


DEFAULT_ABOUT = (
    "`induction.load()`, trained with a concave penalty on each head's output norm "
    "(`induction.train(head_sparsity=0.1)`): it computes the repeat with one previous-token head and one "
    "induction head, and the other six heads write nothing, so ablating them costs nothing. Every method "
    "should find this circuit; the redundant variant below is the harder test.")
REDUNDANT_ABOUT = (
    "`induction.load(variant=\"redundant\")`, trained the same way without the head penalty (the default "
    "model of earlier versions): one previous-token head and four redundant induction heads. Mean-ablating "
    "one induction head costs little, so *noising* a single head barely moves the metric and single-head "
    "methods score low in the `noise` rows; *denoising* isolates each head's contribution.")


def subnetwork_head_table(dec, pairs) -> pd.DataFrame:
    """Per subnetwork: share of squared norm and of output effect per head, mean |coefficient|."""
    w = dec.coefficients(*pairs).abs().mean(0)
    rows = []
    for k in range(dec.n_subnetworks):
        for label, T in (("norm share", dec.head_attribution(as_tensor=True)),
                         ("output-effect share", dec.head_effects(as_tensor=True, share=True))):
            row = {"subnetwork": k, "readout": label, "mean abs coef": w[k].item()}
            for layer, h in itertools.product(range(2), range(4)):
                row[f"L{layer}H{h}"] = T[k, layer, h].item()
            rows.append(row)
    return pd.DataFrame(rows)


def induction_section(variant: str, about: str, found: dict, results: dict, runs: dict) -> list[str]:
    """The write-up of one induction model: its circuit, contrastive and unsupervised L3D."""
    truth, ident, notes = found["truth"], found["ident"], found["notes"]
    unsup_df, unsup_best, unsup_text = found["unsup"]
    res = results[(variant, "noise", 0)]
    cols = ["layer", "head", "ground_truth", "patching", "attribution", "l3d", "l3d_share", "gradient_effect",
            "gradient", "rank_patching", "rank_attribution", "rank_l3d"]
    return [
        f"### The induction model, {variant}: what its circuit is",
        "",
        about + " Circuit identified independently of the three methods on 256 fresh repeated sequences "
        "(`l3d_lens.zoo.induction.identify_circuit`): mean attention to the previous token, to position i-11 "
        "(the token after the earlier copy, for i in the second half) and to BOS, and the drop of the metric "
        "(mean log-prob of the repeated token over the second half) when the head's `hook_z` is replaced by "
        "its mean. A head is in the circuit when its pattern score (previous-token in layer 0, look-back in "
        "layer 1) is > 0.3 and its drop is >= 0.1 x the largest drop in its layer (a pattern alone also marks "
        "heads that write nothing).",
        "",
        md_table(ident, "{:.3f}"),
        "",
        f"Ground truth: {sorted(truth)}. Loss (nats) on the second half of repeats of other periods: "
        f"{'; '.join(notes)} (chance: {torch.log(torch.tensor(63.0)).item():.2f}).",
        "",
        f"Contrastive L3D (noise direction, seed 0: `{res.decomposition!r}`): each subnetwork's share of squared "
        "norm per head (Q/K/V/O together), its share of output effect per head (|e_k(head)| normalised over "
        "heads), and its mean |coefficient| on the pairs:",
        "",
        md_table(subnetwork_head_table(res.decomposition, induction_pairs(N_PAIRS, 0)[:2]), "{:.3f}"),
        "",
        "Per-head scores (noise, seed 0):",
        "",
        md_table(res.heads[cols], "{:.4g}"),
        "",
        reading(runs, lambda k: k[0] == f"induction-{variant}", f"induction model, {variant}"),
        "",
        "Unsupervised L3D (token mode, random references, k = 0.1, 8 subnetworks of rank 4 over both layers' "
        "attention, 512 sequences, 10 epochs: the demo's settings); |c| ratio on 64 fresh sequences; seed 0, "
        "every subnetwork:",
        "",
        md_table(unsup_df, "{:.3f}"),
        "",
        f"Seeds {', '.join(map(str, UNSUP_SEEDS))}, the subnetwork most concentrated on the repeated half:",
        "",
        md_table(unsup_best[["seed", "decomposition", "subnetwork", "P_act", "|c| repeated / first half",
                             "output-effect share on circuit heads", "norm share on circuit heads",
                             "AUROC, output effect", "AUROC, norm share", "top heads (effect share)"]], "{:.3f}"),
        "",
        f"Result ({variant}): {unsup_text}.",
        "",
    ]


def main(argv: "list[str] | None" = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="the file whose section is rewritten")
    args = ap.parse_args(argv)
    threads = setup_threads(1)
    env = environment()
    t0 = time.perf_counter()
    auroc_rows = []
    out = [SECTION, ""]

    # induction models: the default (one induction head) and the redundant variant (four)
    results, runs, ind = {}, {}, {}
    for variant in induction.VARIANTS:
        model = induction.load(variant=variant)
        truth, ident, notes = identify_induction(model)
        print(variant, ident.to_string(index=False), "\n", notes, "\nground truth:", sorted(truth), flush=True)
        key = f"induction-{variant}"
        for direction in ("noise", "denoise"):
            per = {m: [] for m in METHODS}
            for seed in SEEDS:
                clean, corrupted, metric = induction_pairs(N_PAIRS, seed)
                scores, res = run_methods(model, clean, corrupted, metric, truth, direction, seed)
                for m in METHODS:
                    per[m].append(scores[m])
                results[(variant, direction, seed)] = res
                runs[(key, direction, seed)] = scores
                print(key, direction, seed, scores, flush=True)
            auroc_rows.append({"model": f"induction, {variant} (2L x 4H)", "pairs": "first half replaced",
                               "direction": direction, **{m: fmt_auroc(per[m]) for m in METHODS}})
        unsup = unsupervised_induction(model, truth)
        print(unsup[0].to_string(index=False), "\n", unsup[1].to_string(index=False), "\n", unsup[2], flush=True)
        ind[variant] = {"truth": truth, "ident": ident, "notes": notes, "unsup": unsup}

    # two-task model: the default (unused heads pruned) and the unpruned variant
    two = {}
    for variant in two_tasks.VARIANTS:
        tmodel = two_tasks.load(variant=variant)
        key = f"two-task-{variant}"
        two_results = {}
        for task in two_tasks.TASKS:
            ttruth = set(two_tasks.TASK_HEADS[task])
            for direction in ("noise", "denoise"):
                per = {m: [] for m in METHODS}
                for seed in SEEDS:
                    clean, corrupted = two_tasks.contrast_pairs(N_PAIRS, task, seed=seed + 1)
                    scores, res = run_methods(tmodel, clean, corrupted,
                                              two_tasks.logit_diff_metric(clean, corrupted), ttruth, direction, seed)
                    for m in METHODS:
                        per[m].append(scores[m])
                    two_results[(task, direction, seed)] = res
                    runs[(f"{key}:{task}", direction, seed)] = scores
                    print(key, task, direction, seed, scores, flush=True)
                auroc_rows.append({"model": f"two-task, {variant} (1L x 8H)",
                                   "pairs": f"`<{task}>`: answer word replaced",
                                   "direction": direction, **{m: fmt_auroc(per[m]) for m in METHODS}})
        sep = separation_seeds(tmodel)
        print(key, sep[0].to_string(index=False), "\n", sep[1].to_string(index=False), "\n", sep[2], flush=True)
        two[variant] = {"ablation": two_tasks.head_ablation(tmodel), "results": two_results, "separation": sep}
    wall = time.perf_counter() - t0

    # --- write --------------------------------------------------------------------------------
    env_line = (f"{env['machine']}; torch {env['torch']}; transformer-lens {env['transformer_lens']} "
                f"({type(model).__name__}); Python {env['python']}")
    out += [
        f"Generated by `python benchmarks/patching.py` (do not edit by hand), {threads} thread, {env_line}; "
        f"wall {wall:.0f} s. Methods (`l3d_lens.patching.compare_with_patching`, {N_PAIRS} pairs, seeds "
        f"{', '.join(map(str, SEEDS))} for the pairs and L3D): **patching** = TransformerLens activation patching "
        "of each head's `hook_z` at all positions (`get_act_patch_attn_head_out_all_pos`), score |effect|; "
        "**attribution** = attribution patching, |sum grad x (act_other - act_base)| at the same hook (for both, "
        f"a score within {NOISE_FLOOR:g} of |metric clean - metric corrupted| counts as 0, tied: "
        "`compare_with_patching`'s `noise_floor`, so round-off never orders heads that do nothing); **l3d** = "
        "contrastive L3D (`default_l3d_config`: every attention W_Q/W_K/W_V/W_O, reference = the other input's "
        "output, KL summed over positions, top_k 1.0, 4 subnetworks, rank max(4, n_heads), ~150 Adam steps), "
        "score(head) = mean_i |sum_k c_ik e_k(head)| with e_k = <v_k, W0> over the head's W_O and W_V slices "
        "(the subnetworks' effect through the head's output, `l3d_lens.analysis.effects`); **l3d_share** = the "
        "same decomposition read by norm, sum_k mean_i |c_ik| x share_k(head); controls without decomposition, "
        "from the same per-pair gradient L3D decomposes: **gradient** = E_i ||g_i[head]||^2, **gradient_effect** "
        "= E_i |<g_i, W0>| over the head's W_V, W_O slices. `noise`: corrupted activations into the clean "
        "run, gradients at the clean run, L3D on clean inputs with corrupted references; `denoise`: the mirror. "
        "AUROC: mean (min-max) over seeds; 1 = every ground-truth head above every other head, 0.5 = chance.",
        "",
        md_table(pd.DataFrame(auroc_rows)),
        "",
    ]
    for variant, about in (("default", DEFAULT_ABOUT), ("redundant", REDUNDANT_ABOUT)):
        out += induction_section(variant, about, ind[variant], results, runs)
    out += [
        "### The two-task model: ground truth by construction",
        "",
        "`l3d_lens/zoo/two_tasks.py`, trained by `scripts/train_two_tasks.py`: one attention-only layer, 8 "
        "heads; `[w_1..w_8, T]`, answer w_1 for T = `<first>` (heads (0, 1), (0, 4)) and w_8 for T = `<last>` "
        "(heads (0, 2), (0, 6)); every other head is trained silent at the answer position. Two variants: in "
        "`default` the heads that serve neither task ((0, 0), (0, 3), (0, 5), (0, 7)) are pruned after "
        "training (W_O = 0, `two_tasks.prune_unused_heads`); in `unpruned` they keep their trained W_O, so "
        "their W_V still gets large gradients at the answer position although they write almost nothing "
        "there. Pruning leaves the answers as they were but changes the outputs at the word positions, "
        "where the unused heads had fitted the unpredictable next-word target. Zero-ablation of each head "
        "at the answer position (512 sequences per task), default variant:",
        "",
        md_table(two["default"]["ablation"], "{:.3f}"),
        "",
        "The unpruned variant's table differs by at most "
        f"{(two['default']['ablation'][['acc_drop', 'logprob_drop']] - two['unpruned']['ablation'][['acc_drop', 'logprob_drop']]).abs().max().max():.4f} "
        "in any drop.",
        "",
    ]
    for variant in two_tasks.VARIANTS:
        tres = two[variant]["results"][("first", "noise", 0)]
        out += [
            f"Per-head scores, {variant} variant, `<first>` pairs (noise, seed 0):",
            "",
            md_table(tres.heads[["layer", "head", "ground_truth", "patching", "attribution", "l3d", "l3d_share",
                                 "gradient_effect", "gradient", "rank_patching", "rank_attribution", "rank_l3d"]],
                     "{:.4g}"),
            "",
            reading(runs, lambda k, v=variant: k[0].startswith(f"two-task-{v}:"), f"two-task model, {variant}"),
            "",
        ]
    out += [
        "### Does unsupervised L3D (token mode) separate the two tasks?",
        "",
        "`L3DConfig(components='blocks.0.attn', n_subnetworks=8, rank=8, top_k=0.05, sample='token', "
        "reference='random', include_biases=False, epochs=8)` on 512 mixed sequences, L3D seeds "
        f"{', '.join(map(str, SEPARATION_SEEDS))}; impact = mean |V_in . g| over 5 random references at the "
        "answer position of 256 fresh sequences per task. For each task, the subnetwork with the largest impact "
        "on it; its share of squared norm and of output effect (|e_k(head)|, `head_effects`) on the task's own "
        "heads.",
        "",
    ]
    for variant in two_tasks.VARIANTS:
        first, per_seed, text = two[variant]["separation"]
        out += [
            f"{variant.capitalize()} variant, seed 0, every subnetwork:",
            "",
            md_table(first, "{:.3f}"),
            "",
            f"{variant.capitalize()} variant, every seed:",
            "",
            md_table(per_seed, "{:.3f}"),
            "",
            f"Result ({variant}): {text}.",
            "",
        ]
    out += [
        "Reading: in the default variant each task's subnetworks act through that task's own heads, but "
        "their *norm* lies mostly on the other task's heads. Those heads are silent at this task's answer "
        "position, yet not pruned (the other task needs them), so their W_V still gets dD/dW_V = sum_j "
        "attn_j x_j (x) W_O^T dD/dout: moving it would change the answer, and L3D, which decomposes "
        "exactly that first-order sensitivity, puts weight there. In the unpruned variant the four unused "
        "heads add the same kind of sensitivity, and much of the subnetworks' output effect then goes "
        "through those unused heads as well.",
        "",
    ]
    write_section(SECTION, "\n".join(out), args.out)
    print(f"wrote {SECTION!r} to {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
