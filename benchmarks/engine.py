"""Fast-engine benchmarks; writes (replaces) the "## Fast engine" section of BENCHMARKS.md.

Run from the repository root with the transformer-lens 3.9 interpreter (HookedTransformer):

  python benchmarks/engine.py ratio      [--batch 32] [--sample token]   # (a) time and (b) memory vs plain fwd+bwd
  python benchmarks/engine.py exact      [--batch 4]  [--sample token]   # (c) fast vs exact engine
  python benchmarks/engine.py scaling    [--factor rank] [--sample sequence]  # (d) growth of the step time
  python benchmarks/engine.py gpt2       [--batch 8]                     # GPT-2-small, all attn + MLP weights
  python benchmarks/engine.py profile    [--sample token]                # where a step's time goes
  python benchmarks/engine.py prototypes [--sample token]                # proposed optimisations, monkeypatched
  python benchmarks/engine.py micro                                      # micro-benchmarks behind single proposals
  python benchmarks/engine.py report                                     # rewrite the section from the results
  python benchmarks/engine.py all

Every suite stores its rows in benchmarks/results/engine.json (a row is replaced when it is
measured again) and rewrites the section. A row's command reproduces it. One thread always.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.common import (BENCHMARKS_MD, PAPER, ROOT, TINYSTORIES_ATTN, WHOLE_MODEL, L3DStep,  # noqa: E402
                               PlainStep, build_model, environment, interleaved, make_step, measure_memory,
                               paired_ratio, peak_rss_mib, random_tokens, reset_peak_rss, rss_mib, setup_threads,
                               write_section)

RESULTS = os.path.join(HERE, "results", "engine.json")
SECTION = "## Fast engine"
TS = "tinystories-8m"


def _load() -> dict[str, Any]:
    if os.path.exists(RESULTS):
        with open(RESULTS) as fh:
            return json.load(fh)
    return {}


def _save_rows(suite: str, rows: list[dict[str, Any]]) -> None:
    data = _load()
    table = data.setdefault(suite, {})
    for row in rows:
        table[row["key"]] = row
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(data, fh, indent=1)


def _row(key: str, command: str, **values: Any) -> dict[str, Any]:
    return {"key": key, "command": command, "env": environment(), "when": time.strftime("%Y-%m-%d %H:%M"),
            **values}


def _say(*a: Any) -> None:
    print(*a, flush=True)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _phases(step: L3DStep, tokens: torch.Tensor, n: int = 1) -> dict[str, float]:
    ph: dict[str, float] = {}
    for _ in range(n):
        step(tokens, phases=ph)
    return {k: v / n for k, v in ph.items()}


# --- (a) + (b): step vs plain forward+backward ----------------------------------------------

def suite_ratio(args) -> None:
    rows = []
    for batch in args.batch or [4, 32]:
        for sample in args.sample or ["sequence", "token"]:
            cmd = f"python benchmarks/engine.py ratio --batch {batch} --sample {sample}"
            spec = {"model": TS, "batch": batch, "seq": 16, "kind": "l3d", "cfg": {"sample": sample}}
            step, tokens, model = make_step(spec)
            plain = PlainStep(model)
            repeats = args.repeats or (3 if sample == "token" and batch >= 16 else 5)
            times, wall = interleaved({"plain": lambda: plain(tokens), "l3d": lambda: step(tokens)}, repeats=repeats)
            phases = _phases(step, tokens)
            del step, plain, model
            mem_plain = measure_memory({**spec, "kind": "plain"})
            mem_l3d = measure_memory(spec)
            row = _row(f"{batch}/{sample}", cmd, batch=batch, sample=sample, repeats=repeats,
                       plain_s=_median(times["plain"]), step_s=_median(times["l3d"]),
                       ratio=paired_ratio(times["l3d"], times["plain"]),
                       wall_ratio=paired_ratio(wall["l3d"], wall["plain"]), step_wall_s=_median(wall["l3d"]),
                       phases=phases,
                       mem_plain=mem_plain, mem_l3d=mem_l3d,
                       mem_ratio=_mem_ratio(mem_l3d, mem_plain))
            _say(f"ratio batch {batch} {sample}: plain {row['plain_s']:.3f} s, step {row['step_s']:.3f} s, "
                 f"x{row['ratio']:.2f}; memory x{row['mem_ratio']}")
            rows.append(row)
            _save_rows("ratio", [row])


def _mem_ratio(a: dict[str, Any], b: dict[str, Any]):
    if "increment_mib" in a and "increment_mib" in b:
        return a["increment_mib"] / b["increment_mib"]
    return None


# --- (c): fast vs exact engine ------------------------------------------------------------

def suite_exact(args) -> None:
    for batch in args.batch or [4, 32]:
        for sample in args.sample or ["sequence", "token"]:
            cmd = f"python benchmarks/engine.py exact --batch {batch} --sample {sample}"
            spec = {"model": TS, "batch": batch, "seq": 16, "kind": "l3d", "cfg": {"sample": sample}}
            fast, tokens, model = make_step(spec)
            exact, _, _ = make_step({**spec, "cfg": {"sample": sample, "engine": "exact"}}, model)
            plain = PlainStep(model)
            with torch.no_grad():  # same factors, same references: compare the statistics
                state = fast.gen.get_state()
                import l3d_lens.engine as engine

                a = engine.batch_stats(fast.task, fast.f, tokens, fast.gen)
                fast.gen.set_state(state)
                b = engine.batch_stats(exact.task, fast.f, tokens, fast.gen)
                fast.gen.set_state(state)
            err = max(float((x - y).norm() / y.norm()) for x, y in ((a.A, b.A), (a.B, b.B), (a.gsq, b.gsq)))
            repeats = args.repeats or 3
            times, wall = interleaved({"plain": lambda: plain(tokens), "fast": lambda: fast(tokens),
                                       "exact": lambda: exact(tokens)}, repeats=repeats)
            del fast, exact, plain, model
            mem = {k: measure_memory({**spec, "kind": "plain"} if k == "plain" else
                                     {**spec, "cfg": {"sample": sample, "engine": k}})
                   for k in ("plain", "fast", "exact")}
            row = _row(f"{batch}/{sample}", cmd, batch=batch, sample=sample, repeats=repeats, max_rel_err=err,
                       plain_s=_median(times["plain"]), fast_s=_median(times["fast"]), exact_s=_median(times["exact"]),
                       exact_over_fast=paired_ratio(times["exact"], times["fast"]),
                       exact_over_fast_wall=paired_ratio(wall["exact"], wall["fast"]),
                       fast_over_plain=paired_ratio(times["fast"], times["plain"]),
                       exact_over_plain=paired_ratio(times["exact"], times["plain"]), mem=mem)
            _say(f"exact batch {batch} {sample}: fast {row['fast_s']:.2f} s, exact {row['exact_s']:.2f} s "
                 f"(x{row['exact_over_fast']:.1f}); rel err {err:.1e}")
            _save_rows("exact", [row])


# --- (d): scaling -----------------------------------------------------------------------

SCALING = {
    # factor -> (values, how a value changes the spec)
    "n_subnetworks": ([25, 50, 100, 200], lambda s, v: s["cfg"].update(n_subnetworks=v)),
    "rank": ([5, 10, 25, 50], lambda s, v: s["cfg"].update(rank=v)),
    "weights": (["W_Q", "attn4", "attn4+mlp4", "attn*", "attn*+mlp*"],
                lambda s, v: s["cfg"].update(components=WEIGHT_SETS[v])),
    "seq": ([8, 16, 32, 64], lambda s, v: s.update(seq=v)),
    "batch": ([8, 16, 32, 64], lambda s, v: s.update(batch=v)),
}
WEIGHT_SETS = {"W_Q": ["blocks.4.attn.W_Q"], "attn4": TINYSTORIES_ATTN, "attn4+mlp4": ["blocks.4.attn", "blocks.4.mlp"],
               "attn*": ["blocks.*.attn"], "attn*+mlp*": WHOLE_MODEL}
SCALING_BASE = {"sequence": 32, "token": 8}  # base batch per sample mode
# token mode today materialises [seq, batch, seq, vocab] gradients: seq 64 x batch 8 would need ~20 GiB
TOKEN_VALUES = {"seq": [8, 16, 32], "batch": [4, 8, 16, 32]}


def suite_scaling(args) -> None:
    for sample in args.sample or ["sequence", "token"]:
        factors = args.factor or (list(SCALING) if sample == "sequence" else ["n_subnetworks", "seq", "batch"])
        for factor in factors:
            values, apply = SCALING[factor]
            values = TOKEN_VALUES.get(factor, values) if sample == "token" else values
            cmd = f"python benchmarks/engine.py scaling --factor {factor} --sample {sample}"
            specs = {}
            for v in values:
                spec = {"model": TS, "batch": SCALING_BASE[sample], "seq": 16, "kind": "l3d", "cfg": {"sample": sample}}
                apply(spec, v)
                specs[v] = spec
            # plain depends on (batch, seq) only: one plain per shape, all in this process
            model = build_model(TS)
            plain_fns, step_fns, n_weights = {}, {}, {}
            for v, spec in specs.items():
                shape = (spec["batch"], spec["seq"])
                tokens = random_tokens(*shape, model.cfg.d_vocab)
                if shape not in plain_fns:
                    p = PlainStep(model)
                    plain_fns[shape] = (lambda p=p, t=tokens: p(t))
                step, _, _ = make_step(spec, model)
                n_weights[v] = len(step.task.selected)
                step_fns[v] = (lambda s=step, t=tokens: s(t))
            fns = {f"plain {k}": fn for k, fn in plain_fns.items()}
            fns.update({f"l3d {v}": fn for v, fn in step_fns.items()})
            repeats = args.repeats or 3
            times, wall = interleaved(fns, repeats=repeats)
            rows = []
            for v, spec in specs.items():
                shape = (spec["batch"], spec["seq"])
                t, tp = times[f"l3d {v}"], times[f"plain {shape}"]
                rows.append({"value": v, "n_weights": n_weights[v], "batch": shape[0], "seq": shape[1],
                             "step_s": _median(t), "plain_s": _median(tp), "ratio": paired_ratio(t, tp),
                             "wall_ratio": paired_ratio(wall[f"l3d {v}"], wall[f"plain {shape}"])})
                _say(f"scaling {sample} {factor}={v}: {rows[-1]['step_s']:.3f} s, x{rows[-1]['ratio']:.2f} plain")
            base = {"sequence": dict(PAPER, batch=32, seq=16), "token": dict(PAPER, batch=8, seq=16)}[sample]
            _save_rows("scaling", [_row(f"{sample}/{factor}", cmd, sample=sample, factor=factor, repeats=repeats,
                                        rows=rows, base={k: base[k] for k in ("n_subnetworks", "rank", "batch", "seq")})])


# --- GPT-2 small, whole model, sequence mode ----------------------------------------------

def suite_gpt2(args) -> None:
    for batch in args.batch or [8]:
        extra = "".join(f" --{k} {v}" for k, v in (("steps", args.steps), ("rank", args.rank),
                                                       ("n-subnetworks", args.n_subnetworks)) if v)
        extra += " --bias-rank1" if args.bias_rank1 else ""
        extra += f" --patch '{args.patch}'" if args.patch else ""
        cmd = f"python benchmarks/engine.py gpt2 --batch {batch}{extra}"
        spec = {"batch": batch, "seq": 16, "steps": args.steps or 2, "rank": args.rank or 25,
                "n_subnetworks": args.n_subnetworks or 100, "bias_rank1": bool(args.bias_rank1),
                "patch": json.loads(args.patch) if args.patch else None}
        limit_gib = min(20.0, _available_gib() - 1.0)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

        def limit():
            b = int(limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

        t0 = time.time()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "gpt2-worker", json.dumps(spec)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
        events = []
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                events.append(json.loads(line))
                _say("gpt2:", line)
        err = proc.stderr.read()
        rc = proc.wait()
        row = _row(cmd.split("gpt2 ", 1)[1], cmd, batch=batch, spec=spec, address_space_limit_gib=round(limit_gib, 1), rc=rc,
                   wall_s=time.time() - t0, events=events,
                   error=None if rc == 0 else " | ".join(err.strip().splitlines()[-3:]))
        _save_rows("gpt2", [row])


def _available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


def gpt2_worker(spec: dict[str, Any]) -> None:
    setup_threads(1)

    def emit(**kv):
        print(json.dumps({"t": round(time.time() - t0, 1), "rss_mib": round(rss_mib()), "peak_mib": round(peak_rss_mib()),
                          **kv}), flush=True)

    t0 = time.time()
    model = build_model("gpt2-small")
    tokens = random_tokens(spec["batch"], spec["seq"], model.cfg.d_vocab)
    emit(event="model built", n_params=sum(p.numel() for p in model.parameters()))
    base = rss_mib()
    plain = PlainStep(model)
    plain(tokens)
    reset_peak_rss()
    ts, ws = [], []
    for _ in range(2):
        c, t = time.process_time(), time.perf_counter()
        plain(tokens)
        ts.append(time.process_time() - c)
        ws.append(time.perf_counter() - t)
    emit(event="plain", plain_s=min(ts), plain_wall_s=min(ws), plain_increment_mib=round(peak_rss_mib() - base))
    rank: Any = spec["rank"]
    if spec.get("bias_rank1"):  # a rank-R Tucker factorisation of a vector spans the same set as rank 1
        rank = {"default": rank, **{f"blocks.{i}.{w}": 1 for i in range(model.cfg.n_layers)
                                    for w in ("attn.b_O", "mlp.b_in", "mlp.b_out")}}
    cfg = dict(PAPER, components=WHOLE_MODEL, sample="sequence", rank=rank,
               n_subnetworks=spec["n_subnetworks"], batch_size=spec["batch"])
    from l3d_lens import L3DConfig

    step = L3DStep(model, L3DConfig(**cfg))
    if spec.get("patch"):
        from benchmarks.prototypes import patched

        inner = step

        def step(x, **kw):
            with patched(**spec["patch"]):
                return inner(x, **kw)

        step.task, step.f, step.n_factor_floats = inner.task, inner.f, inner.n_factor_floats
    emit(event="factors initialised", n_weights=len(step.task.selected), factor_floats=step.n_factor_floats(),
         factor_mib=round(step.n_factor_floats() * 4 / 2**20))
    for i in range(spec["steps"]):
        reset_peak_rss()
        ph: dict[str, float] = {}
        c, t = time.process_time(), time.perf_counter()
        step(tokens, phases=ph, log=lambda msg: emit(event="phase", step=i, msg=msg))
        emit(event="step", step=i, step_s=time.process_time() - c, step_wall_s=time.perf_counter() - t,
             phases=ph, step_increment_mib=round(peak_rss_mib() - base))


# --- profile ------------------------------------------------------------------------------

def suite_profile(args) -> None:
    import opt_einsum
    from torch.profiler import ProfilerActivity, profile

    import l3d_lens.engine.stats as est
    import l3d_lens.subnetworks as sn

    for sample in args.sample or ["sequence", "token"]:
        batch = (args.batch or [32])[0]
        cmd = f"python benchmarks/engine.py profile --sample {sample} --batch {batch}"
        step, tokens, model = make_step({"model": TS, "batch": batch, "seq": 16, "kind": "l3d", "cfg": {"sample": sample}})
        step(tokens)
        phases = _phases(step, tokens, 2)
        # opt_einsum: every contraction of one step, its chosen path and its forward time
        calls: list[tuple[str, tuple, float]] = []
        orig = sn.contract

        def spy(eq, *ops):
            t = time.process_time()
            r = orig(eq, *ops)
            calls.append((eq, tuple(tuple(o.shape) for o in ops), time.process_time() - t))
            return r

        sn.contract = est.contract = spy
        try:
            step(tokens)
        finally:
            sn.contract = est.contract = orig
        merged: dict[tuple, dict[str, Any]] = {}
        for eq, shapes, dt in calls:
            m = merged.setdefault((eq, shapes), {"eq": eq, "shapes": [list(s) for s in shapes], "calls": 0, "fwd_ms": 0.0})
            m["calls"] += 1
            m["fwd_ms"] += dt * 1000
        for (eq, shapes), m in merged.items():
            _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="auto")
            m["opt_cost"] = float(info.opt_cost)
            m["path"] = [c[2] for c in info.contraction_list]
            m["largest_intermediate"] = float(info.largest_intermediate)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(tokens)
        ops = []
        for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:15]:
            ops.append({"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                        "self_ms": e.self_cpu_time_total / 1000})
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        _say(f"profile {sample}: phases {phases}")
        _save_rows("profile", [_row(sample, cmd, sample=sample, batch=batch, phases=phases,
                                    contractions=sorted(merged.values(), key=lambda m: -m["fwd_ms"]),
                                    top_ops=ops, profiled_total_ms=total)])


# --- prototypes -------------------------------------------------------------------------

def suite_prototypes(args) -> None:
    from benchmarks import prototypes

    batch = (args.batch or [32])[0]
    for sample in args.sample or ["sequence", "token"]:
        cmd = f"python benchmarks/engine.py prototypes --sample {sample} --batch {batch}"
        r = prototypes.run(sample, batch, args.repeats or 3)
        spec = {"model": TS, "batch": batch, "seq": 16, "kind": "l3d", "cfg": {"sample": sample}}
        for row, (name, flags) in zip(r["rows"], prototypes.VARIANTS[sample]):
            row["mem"] = measure_memory({**spec, "patch": flags} if flags else spec)
            _say(f"prototype {sample} {name}: {row['step_s']:.3f} s x{row['vs_plain']:.2f} plain, "
                 f"x{row['vs_current']:.2f} current, mem {row['mem'].get('increment_mib')}")
        mem_plain = measure_memory({**spec, "kind": "plain"})
        _save_rows("prototypes", [_row(sample, cmd, sample=sample, batch=batch, plain_s=r["plain_s"], rows=r["rows"],
                                       mem_plain=mem_plain)])


# --- micro-benchmarks ---------------------------------------------------------------------

def suite_micro(args) -> None:
    from benchmarks import micro

    rows = micro.run(args.repeats or 3)
    _save_rows("micro", [_row("all", "python benchmarks/engine.py micro", rows=rows)])


# --- report -------------------------------------------------------------------------------

def _env_cell(env: dict[str, Any]) -> str:
    return (f"{env['machine']}; torch {env['torch']}; TL {env['transformer_lens']}; "
            f"l3d_lens {env.get('l3d_lens', '?')}")


def _mib(m: dict[str, Any], key: str = "increment_mib") -> str:
    if not m or key not in m:
        return f"n/a ({m.get('error', '?')})" if m else "n/a"
    return f"{m[key]:.0f}"


def _verdict(value, target, strict=False) -> str:
    if value is None:
        return "n/a"
    ok = value < target if strict else value <= target
    return f"{'meets' if ok else 'MISSES'} ({'<' if strict else '<='} {target:g}x)"


def report() -> str:
    data = _load()
    out = [SECTION, "",
           "Generated by `benchmarks/engine.py` (do not edit by hand; rerun a row's command to refresh it). "
           "Model: `HookedTransformer` (transformer-lens 3.9) built from `HookedTransformerConfig` with seeded random "
           "weights; TinyStories-8M shape = 8 layers, d_model 256, 16 heads x d_head 16, d_mlp 1024, vocab 50257, "
           "gelu_new, LN. L3D = the paper's setting: block-4 attention W_Q, W_K, W_V, W_O, b_O; 100 subnetworks; rank 25; "
           "top_k 0.1; KL to a random other sample; 16-token random texts. A *step* = one iteration of the loop in "
           "`l3d_lens/training.py`: `training.step` itself (batch_stats, batch top-k, gram, sample_errors, backward, Adam, "
           "normalize_, P_act bookkeeping; AuxK off as in the paper), on state initialised as `training.train` does "
           "(`benchmarks/common.py:L3DStep`); phase breakdowns use a replica of its body with a clock between phases. *Plain* = `model(tokens)`, next-token cross-entropy, backward into every "
           "parameter. Times: median seconds, one thread, both steps interleaved in one process; ratio = median of "
           "per-round ratios. Seconds are CPU seconds of the process (`time.process_time`, = the time on an idle core with one thread): the machine was shared with other jobs (load 2-4 on 2 cores), so wall time also counts waiting for a core; the wall-time ratio is given beside. Memory: peak RSS of one step (after a warm-up step) minus the RSS of the process with "
           "the model and data loaded, measured in a fresh subprocess with `MALLOC_MMAP_THRESHOLD_=65536` "
           "(see `benchmarks/common.py` docstring); memory ratio = L3D increment / plain increment.", ""]
    ratio = data.get("ratio", {})
    if ratio:
        out += ["### (a) step time and (b) peak memory vs plain forward+backward (TinyStories-8M shape)", "",
                "| batch | sample | plain s | step s | time ratio | (wall) | target | plain MiB | step MiB | memory ratio "
                "| target | step peak RSS MiB | command | threads | env |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(ratio.values(), key=lambda r: (r["sample"], r["batch"])):
            tt, mt = (2, 1.5) if r["sample"] == "sequence" else (20, 2)
            big = r["batch"] == 32
            mr = r.get("mem_ratio")
            out.append(f"| {r['batch']} | {r['sample']} | {r['plain_s']:.3f} | {r['step_s']:.3f} | {r['ratio']:.2f}x | "
                       f"{r['wall_ratio']:.2f}x | {_verdict(r['ratio'], tt) if big else '-'} | {_mib(r['mem_plain'])} | {_mib(r['mem_l3d'])} | "
                       f"{'n/a' if mr is None else f'{mr:.2f}x'} | "
                       f"{_verdict(mr, mt, strict=r['sample'] == 'token') if big else '-'} | "
                       f"{_mib(r['mem_l3d'], 'peak_mib')} | `{r['command']}` | {r['env']['threads']} | "
                       f"{_env_cell(r['env'])} |")
        out += ["", "Targets (issue 3) apply at batch 32. The paper's reference code: 227x plain at batch 32.", "",
                "Phase breakdown of the step (CPU seconds, one step after warm-up):", "",
                "| batch | sample | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
        for r in sorted(ratio.values(), key=lambda r: (r["sample"], r["batch"])):
            out.append(f"| {r['batch']} | {r['sample']} | " +
                       " | ".join(f"{r['phases'].get(p, 0):.3f}" for p in PHASES) + " |")
        out.append("")
    exact = data.get("exact", {})
    if exact:
        out += ["### (c) fast vs exact engine", "",
                "| batch | sample | plain s | fast s | exact s | exact/fast | fast/plain | exact/plain | plain MiB | "
                "fast MiB | exact MiB | max rel diff A,B,gsq | command | threads | env |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(exact.values(), key=lambda r: (r["sample"], r["batch"])):
            out.append(f"| {r['batch']} | {r['sample']} | {r['plain_s']:.3f} | {r['fast_s']:.3f} | {r['exact_s']:.3f} | "
                       f"{r['exact_over_fast']:.1f}x ({r['exact_over_fast_wall']:.1f}x wall) | {r['fast_over_plain']:.2f}x | {r['exact_over_plain']:.1f}x | "
                       f"{_mib(r['mem']['plain'])} | {_mib(r['mem']['fast'])} | {_mib(r['mem']['exact'])} | "
                       f"{r['max_rel_err']:.1e} | `{r['command']}` | {r['env']['threads']} | {_env_cell(r['env'])} |")
        out.append("")
    scaling = data.get("scaling", {})
    if scaling:
        out += ["### (d) how the step time grows (TinyStories-8M shape)", "",
                "Each group varies one factor from the base setting (sequence mode: batch 32; token mode: batch 8; "
                "16 tokens, 100 subnetworks, rank 25, block-4 attention); plain = fwd+bwd of the same batch shape, "
                "timed in the same process. Weight sets: W_Q = blocks.4.attn.W_Q; attn4 = the paper's 5 weights; "
                "attn4+mlp4 = `blocks.4.attn` + `blocks.4.mlp` (with b_Q/b_K/b_V/b_in/b_out); attn* / attn*+mlp* = "
                "the same for all 8 blocks.", "",
                "| sample | factor | value | weights | batch x seq | step s | plain s | ratio | (wall) | command | threads "
                "| env |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in sorted(scaling.values(), key=lambda g: (g["sample"], list(SCALING).index(g["factor"]))):
            for r in g["rows"]:
                out.append(f"| {g['sample']} | {g['factor']} | {r['value']} | {r['n_weights']} | {r['batch']}x{r['seq']} | "
                           f"{r['step_s']:.3f} | {r['plain_s']:.3f} | {r['ratio']:.2f}x | {r['wall_ratio']:.2f}x | "
                           f"`{g['command']}` | "
                           f"{g['env']['threads']} | {_env_cell(g['env'])} |")
        out.append("")
    gpt2 = data.get("gpt2", {})
    if gpt2:
        out += ["### GPT-2-small shape, every attention and MLP weight decomposed (sequence mode)", "",
                "12 layers, d_model 768, 12 heads x 64, d_mlp 3072, vocab 50257; components "
                "`['blocks.*.attn', 'blocks.*.mlp']` (144 weights incl. biases), 100 subnetworks, rank 25, 16 tokens. "
                "Run in a subprocess under an address-space limit so that running out of memory is an error, not "
                "the OOM killer. Memory = peak RSS minus the model-loaded RSS.", ""]
        for r in gpt2.values():
            ev = {e["event"]: e for e in r["events"] if e["event"] != "phase"}
            steps = [e for e in r["events"] if e["event"] == "step"]
            phases = [e for e in r["events"] if e["event"] == "phase"]
            out.append(f"- `{r['command']}` ({r['env']['threads']} thread, {_env_cell(r['env'])}; address-space limit "
                       f"{r['address_space_limit_gib']} GiB): exit {r['rc']}, wall {r['wall_s']:.0f} s.")
            if "plain" in ev:
                out.append(f"  - plain fwd+bwd: {ev['plain']['plain_s']:.2f} CPU s, +{ev['plain']['plain_increment_mib']} MiB.")
            if "factors initialised" in ev:
                e = ev["factors initialised"]
                out.append(f"  - {e['n_weights']} weights; factors {e['factor_floats'] / 1e6:.0f} M floats = "
                           f"{e['factor_mib']} MiB per copy (parameters, gradients, Adam m and v: 4 copies).")
            for s in steps:
                ratio_txt = f" = {s['step_s'] / ev['plain']['plain_s']:.1f}x plain" if "plain" in ev else ""
                out.append(f"  - step {s['step']}: {s['step_s']:.1f} CPU s{ratio_txt}, peak +{s['step_increment_mib']} MiB "
                           f"(peak RSS {s['peak_mib']} MiB); phases: " +
                           ", ".join(f"{k} {v:.2f} s" for k, v in s["phases"].items()))
            if r["rc"] != 0:
                last = phases[-1]["msg"] if phases else (r["events"][-1]["event"] if r["events"] else "start")
                out.append(f"  - did not finish: last completed phase: {last}; error: `{r['error']}`")
        out.append("")
    prof = data.get("profile", {})
    if prof:
        out += ["### Profile of one step (batch 32)", ""]
        for p in sorted(prof.values(), key=lambda p: p["sample"]):
            out += [f"**{p['sample']} mode** (`{p['command']}`, {p['env']['threads']} thread, {_env_cell(p['env'])}); "
                    f"phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in p["phases"].items()), "",
                    "opt_einsum contractions of one step (forward CPU ms; `path` = opt_einsum's pairwise order):", "",
                    "| equation | shapes | calls | fwd ms | opt_einsum cost | path |", "|---|---|---|---|---|---|"]
            for c in p["contractions"]:
                out.append(f"| `{c['eq']}` | {' '.join('x'.join(map(str, s)) for s in c['shapes'])} | {c['calls']} | "
                           f"{c['fwd_ms']:.1f} | {c['opt_cost']:.2g} | {'; '.join('`' + x + '`' for x in c['path'])} |")
            out += ["", "Top aten ops by self time (torch.profiler, wall clock, whole step incl. backward):", "",
                    "| op | input shapes | calls | self ms |", "|---|---|---|---|"]
            for o in p["top_ops"][:12]:
                out.append(f"| {o['op']} | `{o['shapes']}` | {o['calls']} | {o['self_ms']:.0f} |")
            out.append("")
    protos = data.get("prototypes", {})
    if protos:
        out += ["### Prototyped optimisations (monkeypatched, `benchmarks/prototypes.py`; TinyStories setting, batch 32)",
                "", "P1 cut the graph at the unembedding input in token mode; P2 unembed only the divergence's position "
                "in sequence mode; P3 Gram as D D^T from one dense V_out per weight; P4 P3 reusing the dense tensor of "
                "the A/B contraction; P5 Gram of the batch's active subnetworks only (mask first); P6 token-mode A/B "
                "through a k-major Z and a strided bmm over n. `max rel diff` = largest relative difference of A, B, "
                "gsq, the loss and its gradient w.r.t. every factor vs the current code (same factors, same references).", "",
                "| sample | variant | step s | vs plain | vs current | step MiB | memory vs plain | max rel diff | "
                "command | threads | env |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(protos.values(), key=lambda p: p["sample"]):
            for r in p["rows"]:
                mr = (r["mem"]["increment_mib"] / p["mem_plain"]["increment_mib"]
                      if "increment_mib" in r.get("mem", {}) and "increment_mib" in p["mem_plain"] else None)
                out.append(f"| {p['sample']} | {r['variant']} | {r['step_s']:.3f} | {r['vs_plain']:.2f}x | "
                           f"{r['vs_current']:.2f}x | {_mib(r.get('mem', {}))} | "
                           f"{'n/a' if mr is None else f'{mr:.2f}x'} | {r['max_rel_err']:.1e} | `{p['command']}` | "
                           f"{p['env']['threads']} | {_env_cell(p['env'])} |")
        out.append("")
    micro = data.get("micro", {}).get("all")
    if micro:
        out += ["### Micro-benchmarks behind single proposals (`benchmarks/micro.py`)", "",
                "| what | variant | CPU ms | vs current | rel diff | command | threads | env |",
                "|---|---|---|---|---|---|---|---|"]
        for r in micro["rows"]:
            out.append(f"| {r['what']} | {r['variant']} | {r['cpu_s'] * 1000:.1f} | {r['vs_current']:.2f}x | "
                       f"{r['rel_diff']:.1e} | `{micro['command']}` | {micro['env']['threads']} | "
                       f"{_env_cell(micro['env'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


PHASES = ["capture (fwd+bwd)", "finite check", "contractions (A, B, gsq)", "top-k", "gram", "loss", "loss backward",
          "adam", "normalize_", "bookkeeping"]


SUITES = {"ratio": suite_ratio, "exact": suite_exact, "scaling": suite_scaling, "gpt2": suite_gpt2,
          "profile": suite_profile, "prototypes": suite_prototypes, "micro": suite_micro}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "gpt2-worker":
        return gpt2_worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=[*SUITES, "report", "all"])
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--sample", choices=["sequence", "token"], action="append")
    ap.add_argument("--factor", choices=list(SCALING), action="append")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--n-subnetworks", type=int)
    ap.add_argument("--bias-rank1", action="store_true", help="gpt2: rank 1 for the 1-D biases b_O, b_in, b_out")
    ap.add_argument("--patch", help="gpt2: prototype flags as JSON, e.g. '{\"active\": true}'")
    args = ap.parse_args()
    threads = setup_threads(1)
    _say(f"threads: {threads}")
    for name in (SUITES if args.suite == "all" else [args.suite] if args.suite != "report" else []):
        SUITES[name](args)
    write_section(SECTION, report())
    _say(f"wrote {SECTION!r} in {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
