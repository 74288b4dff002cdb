"""Prototypes of proposed fast-engine optimisations, monkeypatched over l3d_lens (which this
file does not edit), each checked against the unpatched result and timed in one process.

  python benchmarks/prototypes.py [--batch 32] [--repeats 3] [--write]

P1 ``capture_split``: cut the autograd graph at the unembedding's input. The unembedding (and
   log-softmax, KL) is position-wise, so dD[n, t]/dh[n, t] for every target t comes from ONE
   ordinary backward; only the blocks below it need the target-batched backward
   (is_grads_batched). Today the batched backward runs through the vocab-sized logits once
   per target position (16 x [32, 16, 50257] tensors; log_softmax_backward has no batching
   rule and falls back to a loop + cat).
P2 ``last_only`` (sequence mode, int position): unembed only the position the divergence
   reads, instead of every position.
P3 ``gram_dense``: Gram of V_out from one dense V_out per weight, G = D D^T, instead of the
   8-operand einsum that builds the dense tensor twice (once per side) and back-propagates
   through both builds.
P4 ``reuse``: P3, with the dense V_out taken from the stacked [V_in; V_out] dense tensor the
   sequence-mode contraction builds anyway (opt_einsum's path for A, B materialises it).
P5 ``active``: the loss needs sum_i c_i^T G c_i = sum_kl G_kl (C^T C)_kl with C the top-k-masked
   coefficients, so only Gram entries between subnetworks active somewhere in the batch
   matter (the others are multiplied by zero, in the loss and in its gradient). Compute the
   mask first, then the Gram of the active set S only (|S|^2 instead of K^2 entries), with the
   unchanged ``_inner`` on index-selected factors.
P6 ``zbmm`` (token mode): contract each weight's input side with the factors to
   Z[k, n, s, out] (k-major, what opt_einsum's bmm over k produces anyway), then finish with one
   bmm over n on a strided view of Z, giving [n, k, u]. Today the single einsum asks for
   ``n u k`` output, and torch.einsum makes Z contiguous with k innermost first: a
   cache-hostile transposing copy of the largest intermediate (26 M floats per weight here),
   in the forward and again in the backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (PlainStep, environment, interleaved, make_step, paired_ratio,  # noqa: E402
                               setup_threads)

import l3d_lens.engine as engine  # noqa: E402
import l3d_lens.objective as objective  # noqa: E402
import l3d_lens.training as training  # noqa: E402
import l3d_lens.engine.stats as stats_mod  # noqa: E402
import l3d_lens.subnetworks as sn  # noqa: E402
from l3d_lens.adapters import POSITIONS, TOKENS  # noqa: E402
from l3d_lens.engine.fast import Captured  # noqa: E402

ORIGINAL = {"capture": engine.capture, "gram": sn.gram, "from_captured": stats_mod.from_captured,
            "sample_errors": objective.sample_errors}


# --- P1 / P2: capture with the graph cut at the unembedding -------------------------------

def capture_split(task, inputs, generator, paired=None, last_only=False):
    """engine.fast.capture with the graph cut at the unembedding input (see module doc)."""
    adapter = task.adapter
    sites = [s.site for s in task.selected]
    in_keys = {s.input for s in sites if s.input not in (None, TOKENS, POSITIONS)}
    out_keys = {s.output for s in sites}
    store_in, store_out, by_module, modules = {}, {}, {}, {}
    for k in in_keys | out_keys:
        module, role = adapter.capture_point(k)
        by_module.setdefault(id(module), []).append((k, role))
        modules[id(module)] = module

    def make_hook(entries):
        def hook(module, args, output):
            for k, role in entries:
                if role == "in" and k not in store_in:
                    store_in[k] = args[0].detach()
            if any(role == "out" and k in out_keys for k, role in entries) and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            for k, role in entries:
                if role == "out":
                    if k in in_keys and k not in store_in:
                        store_in[k] = output.detach()
                    if k in out_keys:
                        store_out.setdefault(k, []).append(output)
            return output
        return hook

    hooks = {modules[mid]: make_hook(entries) for mid, entries in by_module.items()}
    token = task.token_mode
    if last_only:
        assert not token and task.cfg.position == -1, "prototype: last_only only for sequence mode, position=-1"
    cut = {}

    def pre(module, args):
        h = args[0]
        leaf = h.detach().requires_grad_(True)
        cut["h"], cut["leaf"] = h, leaf
        return (leaf[:, -1:] if last_only else leaf,) + tuple(args[1:])

    unembed = adapter.model.unembed
    with adapter.session(), torch.enable_grad():
        paired_outputs = None
        if paired is not None:
            with torch.no_grad():
                paired_outputs = adapter.forward(paired)
        handle = unembed.register_forward_pre_hook(pre)
        try:
            with adapter.forward_hooks(hooks):
                outputs = adapter.forward(inputs)
        finally:
            handle.remove()
        refs = task.references(outputs, generator, paired_outputs)
        d = task.divergence(task.view(outputs), refs)
        (gh,) = torch.autograd.grad(d.sum(), cut["leaf"])  # [n, t, d_model], position-wise
        keys = sorted(out_keys)
        tensors = [t for k in keys for t in store_out[k]]
        if token:
            n, t = d.shape
            cot = gh.new_zeros((t, n, t, gh.shape[-1]))
            idx = torch.arange(t)
            cot[idx, :, idx] = gh.transpose(0, 1)  # cot[u, n, u] = dD[n, u]/dh[n, u]
            grads = torch.autograd.grad(cut["h"], tensors, grad_outputs=cot, is_grads_batched=True, allow_unused=True)
            grads = [torch.zeros((t, *x.shape), dtype=x.dtype) if g is None else g for g, x in zip(grads, tensors)]
            grads = [g.movedim(0, 1) for g in grads]
        else:
            grads = torch.autograd.grad(cut["h"], tensors, grad_outputs=gh, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, tensors)]
    douts, i = {}, 0
    for k in keys:
        parts = grads[i: i + len(store_out[k])]
        i += len(parts)
        douts[k] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    return Captured(store_in, douts, inputs if adapter.is_language_model else None, d.detach())


# --- P3 / P4: Gram from one dense V_out ---------------------------------------------------

_dense_cache: dict[int, dict[str, torch.Tensor]] = {}


def gram_dense(f, selected, side_a="out", side_b="out"):
    assert side_a == side_b == "out"
    cached = _dense_cache.pop(id(f), {})
    G = 0.0
    for s in selected:
        D = cached.get(s.name)
        if D is None:
            D = sn.dense(f, "out", s)
        D = D.reshape(D.shape[0], -1)
        G = G + D @ D.T
    return G


def from_captured_reuse(task, f, cap):
    """from_captured, but for a weight whose A/B contraction is cheapest through the dense
    stacked [V_in; V_out] (sequence mode), build that dense tensor explicitly and keep its
    V_out half for gram_dense."""
    if task.token_mode:
        return ORIGINAL["from_captured"](task, f, cap)
    K = next(iter(f.values())).shape[0]
    dtype = next(iter(f.values())).dtype
    coef, gsq = 0.0, 0.0
    keep = {}
    for s in task.selected:
        x, y, x_lab, y_lab, u = stats_mod.site_terms(task, s, cap, dtype)
        core, us = stats_mod._stacked(f, s)
        big, small = sn.mode_letters(len(us))
        # dense [2K, *shape] in the weight's mode order, once
        D = sn.contract("k" + small + "," + ",".join(f"k{b}{r}" for b, r in zip(big, small)) + "->k" + big, core, *us)
        keep[s.name] = D[K:]
        if x is None:
            g = y.sum(1)  # bias: [n, *out]
            g_lab = y_lab
        else:
            g = sn.contract(f"ns{x_lab},ns{y_lab}->n{x_lab}{y_lab}", x, y)
            g_lab = x_lab + y_lab
        label = dict(zip(s.site.modes, big))
        order = "".join(label[m] for m in s.site.modes)
        coef = coef + sn.contract(f"n{g_lab},k{order}->nk", g, D)
        sq = [y, y] + ([x, x] if x is not None else [])
        terms = [f"ns{y_lab}", f"nS{y_lab}"] + ([f"ns{x_lab}", f"nS{x_lab}"] if x is not None else [])
        gsq = gsq + sn.contract(",".join(terms) + "->n", *sq)
    _dense_cache[id(f)] = keep
    coef = coef.reshape(-1, 2 * K)
    return stats_mod.Stats(coef[:, :K], coef[:, K:], gsq.reshape(-1))


# --- P6: token-mode contraction through a k-major Z and a strided bmm over n -------------

def from_captured_zbmm(task, f, cap):
    if not task.token_mode:
        return ORIGINAL["from_captured"](task, f, cap)
    K = next(iter(f.values())).shape[0]
    dtype = next(iter(f.values())).dtype
    coef, gsq = 0.0, 0.0
    for s in task.selected:
        site = s.site
        x, y, x_lab, y_lab, u = stats_mod.site_terms(task, s, cap, dtype)
        if site.input in (TOKENS, POSITIONS):
            raise NotImplementedError("prototype: embeddings")
        core, us = stats_mod._stacked(f, s)
        big, small = sn.mode_letters(len(us))
        n, t, pos = y.shape[:3]
        yf = y.reshape(n, t, -1)  # [n, u, s*out]
        if x is None:  # bias: Z[k, out] is the dense bias, the same at every position
            Z = sn.contract("k" + small + "," + ",".join(f"k{b}{r}" for b, r in zip(big, small)) + "->k" + big,
                            core, *us)
            c = torch.einsum("nuY,kY->nku", y.sum(2).reshape(n, t, -1), Z.reshape(Z.shape[0], -1))
        else:
            terms = [f"ns{x_lab}", "k" + small] + [f"k{b}{r}" for b, r in zip(big, small)]
            Z = sn.contract(",".join(terms) + f"->kns{y_lab}", x, core, *us)  # [2K, n, s, *out]
            c = torch.bmm(Z.reshape(Z.shape[0], n, -1).transpose(0, 1), yf.transpose(1, 2))  # [n, 2K, u]
        coef = coef + c.transpose(1, 2)
        sq = [y, y] + ([x, x] if x is not None else [])
        sq_terms = [f"nus{y_lab}", f"nuS{y_lab}"] + ([f"ns{x_lab}", f"nS{x_lab}"] if x is not None else [])
        gsq = gsq + sn.contract(",".join(sq_terms) + "->nu", *sq)
    coef = coef.reshape(-1, 2 * K)
    return stats_mod.Stats(coef[:, :K], coef[:, K:], gsq.reshape(-1))


# --- P5: Gram of the active subnetworks only ----------------------------------------------

class LazyGram:
    """Stands for gram(f, selected) until the loss knows which subnetworks are active."""

    def __init__(self, f, selected, dense):
        self.f, self.selected, self.dense = f, selected, dense

    def of(self, idx):
        sub = {k: (v.index_select(0, idx) if k.startswith("out/") else v) for k, v in self.f.items()}
        return (gram_dense if self.dense else ORIGINAL["gram"])(sub, self.selected)


def sample_errors_active(A, B, gsq, G, mask):
    """objective.sample_errors with the Gram of the active subnetworks only."""
    if not isinstance(G, LazyGram):
        return ORIGINAL["sample_errors"](A, B, gsq, G, mask)
    c = A * mask
    idx = mask.any(0).nonzero().squeeze(1)
    cs = c.index_select(1, idx)
    return gsq - 2 * (c * B).sum(-1) + ((cs @ G.of(idx)) * cs).sum(-1)


@contextlib.contextmanager
def patched(split=False, last_only=False, gram=False, reuse=False, active=False, zbmm=False):
    """Apply prototypes by replacing functions where training.step and batch_stats look them up."""
    saved = [(engine, "capture", engine.capture), (engine, "from_captured", engine.from_captured),
             (training, "gram", training.gram), (sn, "gram", sn.gram),
             (training, "sample_errors", training.sample_errors)]

    def put(name, fn, *modules):
        for m in modules:
            setattr(m, name, fn)

    try:
        if split or last_only:
            put("capture", lambda task, x, g, p=None: capture_split(task, x, g, p, last_only=last_only), engine)
        if gram or reuse:
            put("gram", gram_dense, training, sn)
        if active:
            put("gram", lambda f, selected, *sides, dense=gram: LazyGram(f, selected, dense), training)
            put("sample_errors", sample_errors_active, training)
        if reuse:
            put("from_captured", from_captured_reuse, engine)
        if zbmm:
            put("from_captured", from_captured_zbmm, engine)
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
        _dense_cache.clear()


# --- checks and timings -------------------------------------------------------------------

def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_and_grads(step, tokens):
    """The loss of training.step (aux off) and its gradient w.r.t. every factor, through the
    functions as training.step looks them up."""
    task, f = step.task, step.f
    st = training.batch_stats(task, f, tokens, step.gen)
    mask = training.topk_mask(st.A.detach(), step.cfg.top_k)
    G = training.gram(f, task.selected)
    loss = training.sample_errors(st.A, st.B, st.gsq, G, mask).sum() / st.gsq.detach().sum()
    grads = torch.autograd.grad(loss, list(f.values()), allow_unused=True)
    flat = torch.cat([(torch.zeros_like(v) if g is None else g).flatten() for g, v in zip(grads, f.values())])
    return st, loss.detach(), flat


def check(step, tokens, **flags):
    """Relative differences of A, B, gsq, the loss and its gradient against the unpatched code
    (same factors, same generator state)."""
    state = step.gen.get_state()
    st0, l0, g0 = _loss_and_grads(step, tokens)
    step.gen.set_state(state)
    with patched(**flags):
        st1, l1, g1 = _loss_and_grads(step, tokens)
    step.gen.set_state(state)
    return {"A": rel(st1.A, st0.A), "B": rel(st1.B, st0.B), "gsq": rel(st1.gsq, st0.gsq), "loss": rel(l1, l0),
            "grad": rel(g1, g0)}


VARIANTS = {
    "token": [("current", {}), ("P1 split", {"split": True}), ("P3 gram", {"gram": True}),
              ("P5 active", {"active": True}), ("P6 zbmm", {"zbmm": True}),
              ("P1+P3+P6", {"split": True, "gram": True, "zbmm": True})],
    "sequence": [("current", {}), ("P2 last-only", {"last_only": True}), ("P3 gram", {"gram": True}),
                 ("P4 reuse", {"reuse": True}), ("P5 active", {"active": True}),
                 ("P3+P5", {"gram": True, "active": True}),
                 ("P2+P3+P5", {"last_only": True, "gram": True, "active": True})],
}


def run(sample, batch, repeats):
    spec = {"model": "tinystories-8m", "batch": batch, "seq": 16, "kind": "l3d", "cfg": {"sample": sample}}
    step, tokens, model = make_step(spec)
    plain = PlainStep(model)
    rows = []
    fns = {"plain": lambda: plain(tokens)}
    for name, flags in VARIANTS[sample]:
        def fn(flags=flags):
            with patched(**flags):
                step(tokens)
        fns[name] = fn
    times, wall = interleaved(fns, repeats=repeats, warmup=1)
    for name, flags in VARIANTS[sample]:
        err = check(step, tokens, **flags) if flags else {}
        rows.append({"variant": name, "step_s": statistics.median(times[name]),
                     "vs_plain": paired_ratio(times[name], times["plain"]),
                     "vs_current": paired_ratio(times[name], times["current"]),
                     "vs_current_wall": paired_ratio(wall[name], wall["current"]), "max_rel_err": max(err.values(), default=0.0),
                     "rel_err": err})
    return {"sample": sample, "batch": batch, "plain_s": statistics.median(times["plain"]), "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", default="sequence,token")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    threads = setup_threads(1)
    result = {"env": environment(), "threads": threads,
              "command": "python benchmarks/prototypes.py " + " ".join(sys.argv[1:]), "runs": []}
    for sample in args.samples.split(","):
        r = run(sample, args.batch, args.repeats)
        result["runs"].append(r)
        print(f"{sample} batch {args.batch}: plain {r['plain_s']:.3f} s")
        for row in r["rows"]:
            print(f"  {row['variant']:14s} {row['step_s']:7.3f} s  x{row['vs_plain']:.2f} plain  "
                  f"x{row['vs_current']:.2f} current  max rel err {row['max_rel_err']:.1e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
