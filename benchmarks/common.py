"""Shared helpers for the benchmarks: model builders, one L3D training step built from the
package's own functions, interleaved timing in one process, and peak-memory measurement in a
fresh subprocess.

Timing: every candidate of a comparison runs in the SAME process, round-robin (plain, l3d,
plain, l3d, ...), and the reported ratio is the median of the per-round ratios, so slow drift
of a shared, noisy machine hits numerator and denominator alike. Both the CPU time of the
process (``time.process_time``; with one intra-op thread this is what the step would take on
an idle core) and the wall time are recorded: the benchmark machine is shared with other jobs
(load 2-4 on 2 cores was seen), so wall time includes waiting for a core and CPU time is the
primary number.

Memory: ``tracemalloc`` does not see torch's CPU allocations, and torch has no CPU
``max_memory_allocated``. We measure the process's resident set instead, in a fresh
subprocess per measurement, with glibc's mmap threshold pinned to 64 KiB
(``MALLOC_MMAP_THRESHOLD_=65536``) so that every tensor buffer above 64 KiB is its own mmap and
goes back to the OS when freed: RSS then follows live tensor memory closely instead of
keeping freed blocks in malloc arenas. The subprocess builds the model and the data, records
``VmRSS`` (the *model-loaded baseline*), builds the step's own state (factors, Adam), runs one
warm-up step, resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), runs the
measured step and reads ``VmHWM``. Reported: absolute peak RSS, and the *increment* = peak -
model-loaded baseline, i.e. everything the step needs on top of the loaded model (plain: the
parameter gradients and the activations; L3D: factors, their gradients and Adam state,
captured activations, contraction intermediates). Ratios are of increments.
"""

from __future__ import annotations

import gc
import importlib.metadata
import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
#: where benchmarks save their runs (``--json``)
RESULTS = Path(ROOT) / "benchmarks" / "results"


def saved_run(name: str) -> dict[str, Any]:
    """What a benchmark saved with ``--json`` as ``RESULTS / name``: rows, seconds, argv, machine, args."""
    return json.loads((RESULTS / name).read_text())


def span(seeds: Iterable[int]) -> str:
    """Seeds as "a-b" when they run consecutively, else listed: "0-9", "3, 7"."""
    seeds = sorted(seeds)
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))

# --- BENCHMARKS.md ---------------------------------------------------------------------------


def write_section(heading: str, text: str, path: "str | os.PathLike[str] | None" = None) -> None:
    """Replace the section of ``path`` (BENCHMARKS.md) that starts at the line ``heading``, up to
    the next "## " heading, with ``text``, or append it; the rest of the file is kept byte for
    byte. Every benchmark script writes its own section this way."""
    path = Path(path if path is not None else BENCHMARKS_MD)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip() + "\n"
    new = pattern.sub(lambda _: body + "\n", old, count=1) if pattern.search(old) else old.rstrip() + "\n\n" + body
    path.write_text(new.rstrip() + "\n")


OUTPUT_OPTIONS = ("--out", "--json", "--from-json")


def add_output_arguments(ap, out: Path) -> None:
    """``OUTPUT_OPTIONS``: where the section goes, and saving or reusing the run's metrics."""
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--json", type=Path, default=None, help="also write every run's metrics here")
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the section from saved metrics")


def run_args(argv: list[str]) -> list[str]:
    """The arguments that shape the run: ``argv`` without ``OUTPUT_OPTIONS`` and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in OUTPUT_OPTIONS:
            skip = True
            continue
        if a.split("=")[0] in OUTPUT_OPTIONS:
            continue
        out.append(a)
    return out


#: the seeds a benchmark built on ``seeds_jobs_parser`` runs when ``--seeds`` is not given
DEFAULT_SEEDS = tuple(range(10))


def seeds_jobs_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """The command line of a benchmark that runs seeds in parallel processes: ``--seeds``
    (``DEFAULT_SEEDS``), ``--threads`` per job, ``--jobs`` and ``OUTPUT_OPTIONS``; the
    description is ``doc``'s first paragraph."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    add_output_arguments(ap, out)
    return ap


@dataclasses.dataclass(frozen=True)
class Measured:
    """How and where a benchmark's rows were measured, saved with them (``--json``): a section
    rewritten from saved rows (``--from-json``) states the run's own arguments, machine and
    time, not those of the machine that rewrites it."""

    #: the run's arguments as typed, without ``OUTPUT_OPTIONS``
    argv: tuple[str, ...]
    #: the machine line: CPU and cores, CPU capability, Python and torch (``this_machine``; runs
    #: saved before it had the capability lack it)
    machine: str
    seconds: float
    #: every argument of the run with its value, defaults included (``vars(args)`` without
    #: ``OUTPUT_OPTIONS``): a rewrite describes the run with these, whatever the defaults now are
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def command(self, script: str) -> str:
        """The command that ran ``benchmarks/<script>``: a run of four or more consecutive
        integers is written ``$(seq a b)``."""
        words, i = [], 0
        while i < len(self.argv):
            j = i
            while j + 1 < len(self.argv) and _is_int(self.argv[j]) and _is_int(self.argv[j + 1]) \
                    and int(self.argv[j + 1]) == int(self.argv[j]) + 1:
                j += 1
            words.append(f"$(seq {self.argv[i]} {self.argv[j]})" if j - i >= 3 else shlex.quote(self.argv[i]))
            i = j + 1 if j - i >= 3 else i + 1
        return " ".join([f"python benchmarks/{script}", *words])


def _is_int(word: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", word) is not None


def this_machine() -> str:
    """The machine line of a section measured here: CPU and cores, CPU capability, versions."""
    return (f"{machine()} ({platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def jobs_header(script: str, args, measured: Measured) -> str:
    """The first sentence of such a benchmark's section: the command as run, jobs and threads,
    the machine and versions, and the total time, all of the run (``measured``)."""
    return (f"Command: `{measured.command(script)}` ({args.jobs} jobs, `torch.set_num_threads({args.threads})` each); "
            f"machine: {measured.machine}; total {measured.seconds / 60:.1f} min.")


def jobs_section(heading: str, script: str, args, measured: Measured, intro: str, *blocks: str) -> str:
    """Such a benchmark's section: ``heading``, ``jobs_header`` followed by ``intro``, then each of
    ``blocks`` (a table, summary lines), separated by blank lines."""
    parts = [heading, "", jobs_header(script, args, measured) + " " + intro]
    for block in blocks:
        parts += ["", block]
    return "\n".join(parts + [""])


def pool_map(fn: Callable[..., Any], tasks: Iterable[tuple], jobs: int) -> list[Any]:
    """``fn(*task)`` for every task in ``jobs`` spawned processes; results in task order."""
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *task) for task in tasks]
        return [f.result() for f in futures]


Section = Callable[[list[dict[str, Any]], Any, Measured], str]


def seeds_jobs_main(doc: str, heading: str, section: Section, run: Callable[[Any], list[dict[str, Any]]],
                    argv: Optional[list[str]] = None,
                    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> None:
    """The main of a benchmark built on ``seeds_jobs_parser`` (plus ``add_arguments``): see
    ``section_main``."""
    ap = seeds_jobs_parser(doc, Path(BENCHMARKS_MD))
    if add_arguments is not None:
        add_arguments(ap)
    section_main(ap, heading, section, run, argv)


def section_main(ap: argparse.ArgumentParser, heading: str, section: Section,
                 run: Callable[[Any], list[dict[str, Any]]], argv: Optional[list[str]] = None) -> None:
    """Parse ``argv`` with ``ap`` (which has ``OUTPUT_OPTIONS``; abbreviations are refused),
    set the thread count, run ``run(args)`` (or, with ``--from-json``, load what a run saved)
    and write ``section(rows, args, measured)`` as ``heading``'s section of ``--out``. ``args``
    are the run's own: with ``--from-json``, the saved run's, and where a default has changed
    since, ``measured``'s command spells the run's value out."""
    ap.allow_abbrev = False
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    given = run_args(argv)
    if args.from_json and (given or args.json):
        ap.error("--from-json rewrites the section of the saved run, with that run's own arguments; drop "
                 f"{given + (['--json'] if args.json else [])}")
    torch.set_num_threads(getattr(args, "threads", 1))
    rows, measured = run_or_load(lambda: run(args), args.from_json, args.json, given, _run_vars(args))
    now = _run_vars(ap.parse_args(list(measured.argv)))  # what the typed arguments give with today's defaults
    stale = {k: v for k, v in measured.args.items() if now.get(k) != v}
    if stale:
        measured = dataclasses.replace(measured, argv=measured.argv + _spelled_out(ap, stale))
    write_section(heading, section(rows, argparse.Namespace(**measured.args), measured), args.out)
    print(f"wrote {heading!r} to {args.out}")


def _run_vars(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if f"--{k.replace('_', '-')}" not in OUTPUT_OPTIONS}


def _spelled_out(ap: argparse.ArgumentParser, values: dict[str, Any]) -> tuple[str, ...]:
    """Options that set each of ``values`` (argument name -> value) explicitly."""
    actions = {a.dest: a for a in ap._actions if a.option_strings}
    out: list[str] = []
    for dest, value in values.items():
        if dest not in actions or not isinstance(actions[dest], argparse._StoreAction):
            raise ValueError(f"the saved run's argument {dest!r} = {value!r} cannot be written as an option of "
                             f"this script (options: {sorted(actions)})")
        out += [max(actions[dest].option_strings, key=len),
                *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return tuple(out)


SAVED_KEYS = ("rows", "seconds", "argv", "machine", "args")


def measured_of(saved: dict[str, Any]) -> Measured:
    """How a run saved with ``--json`` (``saved_run``) was measured."""
    return Measured(tuple(saved["argv"]), saved["machine"], saved["seconds"], saved["args"])


def run_or_load(run: Callable[[], list[dict[str, Any]]], from_json: Optional[Path], to_json: Optional[Path],
                argv: list[str], args: dict[str, Any]) -> tuple[list[dict[str, Any]], Measured]:
    """(rows, how they were measured): ``run()`` timed here with arguments ``argv`` as typed and
    ``args`` resolved and, with ``to_json``, saved there; or, with ``from_json``, what an earlier
    run saved, so a section can be rewritten without re-running it."""
    if from_json:
        saved = json.loads(Path(from_json).read_text())
        missing = [k for k in SAVED_KEYS if k not in saved]
        if missing:
            raise ValueError(f"{from_json} lacks {missing} (a saved run holds {list(SAVED_KEYS)}); without them the "
                             "section cannot say how and where the rows were measured")
        return saved["rows"], measured_of(saved)
    start = time.perf_counter()
    rows = run()
    measured = Measured(tuple(argv), this_machine(), time.perf_counter() - start, args)
    if to_json:
        Path(to_json).write_text(json.dumps({"rows": rows, "seconds": measured.seconds, "argv": list(measured.argv),
                                             "machine": measured.machine, "args": measured.args}, default=str))
    return rows, measured


# --- environment -------------------------------------------------------------------------


def setup_threads(n: int = 1) -> int:
    """Set torch's intra-op thread count explicitly (2 threads is pathologically slow on the
    2-core benchmark machine) and return it."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch.get_num_threads()


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"unknown CPU, {os.cpu_count()} cores"


def code_version() -> str:
    """git commit of the checkout, '+dirty' when l3d_lens/ has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "l3d_lens"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) / 2**20
    return {"machine": f"{machine()}, {mem:.0f} GiB", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformer_lens": _version("transformer-lens"),
            "opt_einsum": _version("opt_einsum"), "python": sys.version.split()[0], "l3d_lens": code_version()}


# --- models and data ---------------------------------------------------------------------

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # TinyStories-8M (GPT-Neo-like); LN unfolded because the weights are random
    "tinystories-8m": dict(n_layers=8, d_model=256, n_heads=16, d_head=16, d_mlp=1024, d_vocab=50257,
                           n_ctx=2048, act_fn="gelu_new", normalization_type="LN"),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                       n_ctx=1024, act_fn="gelu_new", normalization_type="LN"),
}

TINYSTORIES_ATTN = ["blocks.4.attn.W_Q", "blocks.4.attn.W_K", "blocks.4.attn.W_V", "blocks.4.attn.W_O",
                    "blocks.4.attn.b_O"]
WHOLE_MODEL = ["blocks.*.attn", "blocks.*.mlp"]
# the paper's tiny-stories setting: 100 subnetworks, rank 25, k = 0.1, random reference, KL
PAPER = dict(components=TINYSTORIES_ATTN, n_subnetworks=100, rank=25, top_k=0.1, divergence="kl",
             reference="random", lr=0.005)


def build_model(name: str, seed: int = 0, **overrides: Any):
    """A HookedTransformer (transformer-lens 3.x) with seeded random weights."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = {**MODEL_SHAPES[name], **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**shape, seed=seed))
    model.eval()
    return model


def random_tokens(n: int, seq: int, d_vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, d_vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# --- the steps being compared ------------------------------------------------------------


class PlainStep:
    """Plain training forward+backward of the same model and batch: logits, next-token
    cross-entropy, backward into every parameter; gradients freed at the end (so that they
    count inside the step's memory)."""

    def __init__(self, model):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)

    def __call__(self, tokens: torch.Tensor) -> float:
        logits = self.model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        value = loss.item()
        self.model.zero_grad(set_to_none=True)
        return value


class L3DStep:
    """One iteration of the training loop: ``l3d_lens.training.step`` itself (batch_stats,
    batch top-k, gram, sample_errors, optional AuxK, backward, Adam, normalize_, P_act
    bookkeeping), on state initialised as ``training.train`` does (``init_factors`` from a
    generator seeded by cfg.seed, Adam at cfg.lr).

    With ``phases`` (a dict to which per-phase CPU seconds are added) or ``log``, the step runs
    a replica of ``training.step``'s body (single process, AuxK off) with a clock between the
    phases, and the fast engine's ``batch_stats`` split into its parts (capture, finiteness
    check, from_captured). Every function is looked up on its module at call time, so the
    prototypes in ``benchmarks/prototypes.py`` can patch them."""

    def __init__(self, model, cfg):
        import dataclasses

        from l3d_lens import distributed, training
        from l3d_lens.decomposition import build_task
        from l3d_lens.subnetworks import init_factors, resolve_ranks

        task = build_task(model, cfg)
        self.task = dataclasses.replace(task, sharded=distributed.active())
        self.cfg = self.task.cfg
        device = torch.device(self.cfg.device) if self.cfg.device else self.task.adapter.device
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        ranks = resolve_ranks(self.task.selected, self.cfg.rank)
        self.f = init_factors(self.task.selected, ranks, self.cfg.n_subnetworks, self.gen, self.cfg.torch_dtype,
                              device)
        for t in self.f.values():
            t.requires_grad_(True)
        self.opt = torch.optim.Adam(list(self.f.values()), lr=self.cfg.lr)
        K = self.cfg.n_subnetworks
        self.sums = training.EpochSums(torch.zeros(K, dtype=torch.float64), torch.zeros(K))
        self.n_steps = 0

    def n_factor_floats(self) -> int:
        return sum(t.numel() for t in self.f.values())

    def __call__(self, x: torch.Tensor, phases: Optional[dict[str, float]] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        from l3d_lens import training

        if phases is None and log is None:
            training.step(self.task, self.f, self.opt, x, None, self.gen, self.sums, self.n_steps, 0)
        else:
            self._phased(x, _Clock(phases, log))
        self.n_steps += 1

    def _phased(self, x: torch.Tensor, clock: "_Clock") -> None:
        import l3d_lens.engine as engine
        from l3d_lens import training

        task, f, cfg = self.task, self.f, self.cfg
        assert cfg.aux_coef == 0, "the phased replica of training.step covers aux_coef=0 only"
        if cfg.engine != "fast":
            stats = engine.batch_stats(task, f, x, self.gen, None)
            clock("batch_stats")
        else:
            cap = engine.capture(task, x, self.gen, None)
            clock("capture (fwd+bwd)")
            for s in task.selected:
                site = s.site
                tensors = [cap.douts[site.output]] + ([cap.inputs[site.input]] if site.input in cap.inputs else [])
                if not all(torch.isfinite(t).all() for t in tensors):
                    raise engine.NonFiniteGradient(s.name)
            clock("finite check")
            stats = engine.from_captured(task, f, cap)
            del cap
            clock("contractions (A, B, gsq)")
        mask = training.topk_mask(stats.A.detach(), cfg.top_k)
        den = stats.gsq.detach().sum().item()
        clock("top-k")
        G = training.gram(f, task.selected)
        clock("gram")
        errors = training.sample_errors(stats.A, stats.B, stats.gsq, G, mask)
        num = errors.sum()
        loss = num / den
        clock("loss")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clock("loss backward")
        self.opt.step()
        clock("adam")
        training.normalize_(f, task.selected, "out")
        clock("normalize_")
        counts = mask.sum(0).double().cpu()
        self.sums.last_active[counts > 0] = self.n_steps + 1
        self.sums.active += counts
        self.sums.n_seen += mask.shape[0]
        self.sums.loss_num += num.item()
        self.sums.loss_den += den
        clock("bookkeeping")


class _Clock:
    def __init__(self, phases, log):
        self.phases, self.log = phases, log
        self.c, self.t = time.process_time(), time.perf_counter()

    def __call__(self, name: str) -> None:
        c, t = time.process_time(), time.perf_counter()
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0.0) + c - self.c
        if self.log is not None:
            self.log(f"{name}: cpu {c - self.c:.2f} s, wall {t - self.t:.2f} s, rss {rss_mib():.0f} MiB, "
                     f"peak {peak_rss_mib():.0f} MiB")
        self.c, self.t = c, t


# --- specs: one description builds the same step for timing and for memory -----------------


def l3d_cfg(spec: dict[str, Any]):
    from l3d_lens import L3DConfig

    cfg = {**PAPER, **spec.get("cfg", {})}
    cfg.setdefault("batch_size", spec["batch"])
    return L3DConfig(**cfg)


def make_step(spec: dict[str, Any], model=None):
    """spec = {"model": name, "batch": n, "seq": t, "kind": "plain" | "l3d", "cfg": {...L3DConfig overrides},
    "model_overrides": {...}, "patch": {...prototype flags}} -> (step callable, tokens, model)."""
    model = model if model is not None else build_model(spec["model"], **spec.get("model_overrides", {}))
    tokens = random_tokens(spec["batch"], spec["seq"], model.cfg.d_vocab)
    step = PlainStep(model) if spec["kind"] == "plain" else L3DStep(model, l3d_cfg(spec))
    if spec.get("patch"):  # a prototype from benchmarks/prototypes.py, applied around every call
        from benchmarks.prototypes import patched

        inner = step

        def step(x, *args, **kwargs):
            with patched(**spec["patch"]):
                return inner(x, *args, **kwargs)

        step.inner = inner
    return step, tokens, model


# --- timing -----------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(CPU seconds, wall seconds) per call of each function, measured round-robin in this process."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            c, t = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - t)
    return cpu, wall


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios (robust to drift between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


# --- memory -----------------------------------------------------------------------------


def _status(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_mib() -> float:
    return _status("VmRSS")


def peak_rss_mib() -> float:
    return _status("VmHWM")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _memory_main(spec: dict[str, Any]) -> dict[str, Any]:
    setup_threads(spec.get("threads", 1))
    model = build_model(spec["model"], **spec.get("model_overrides", {}))
    tokens = random_tokens(spec["batch"], spec["seq"], model.cfg.d_vocab)
    gc.collect()
    base = rss_mib()
    step, _, _ = make_step(spec, model)
    for _ in range(spec.get("warmup", 1)):
        step(tokens)
    gc.collect()
    before = rss_mib()
    reset_peak_rss()
    c = time.process_time()
    step(tokens)
    seconds = time.process_time() - c
    peak = peak_rss_mib()
    return {"model_loaded_mib": base, "before_step_mib": before, "peak_mib": peak,
            "increment_mib": peak - base, "step_cpu_s": seconds}


def measure_memory(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Peak RSS of one step, in a fresh subprocess (see the module docstring)."""
    return measure_in_subprocess(["-m", "benchmarks.common", json.dumps(spec)], spec, timeout)


def measure_in_subprocess(args: list[str], spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """The JSON a fresh ``python <args>`` prints last, run with the allocator and thread settings
    memory is measured under (``spec["threads"]``); {"error": ...} if it fails or times out."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec.get("threads", 1)),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_memory_main(json.loads(sys.argv[1]))))
