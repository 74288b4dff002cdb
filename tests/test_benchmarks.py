"""The benchmarks' bookkeeping: a section rewritten from saved rows (``--from-json``) states the
saved run's command, machine and time, never those of the machine that rewrites it; and the x²
give-up check's verdicts, which chose ``train.GIVE_UP``."""

from __future__ import annotations

import json

import pytest

from benchmarks.common import SAVED_KEYS, Measured, run_or_load, section_main, seeds_jobs_parser, this_machine


def test_command_writes_runs_of_consecutive_integers_as_seq():
    m = Measured(("--seeds", *map(str, range(60)), "--epochs", "300", "--toys", "tms"), "here", 1.0)
    assert m.command("toy.py") == "python benchmarks/toy.py --seeds $(seq 0 59) --epochs 300 --toys tms"
    short = Measured(("--seeds", "0", "1", "2", "7", "8", "9", "10"), "here", 1.0)
    assert short.command("toy.py") == "python benchmarks/toy.py --seeds 0 1 2 $(seq 7 10)"
    assert Measured((), "here", 1.0).command("toy.py") == "python benchmarks/toy.py"
    odd = Measured(("--3", "--4", "--5", "--6", "²", "a b"), "here", 1.0)
    assert odd.command("toy.py") == "python benchmarks/toy.py --3 --4 --5 --6 '²' 'a b'"


def test_a_saved_run_loads_with_its_own_arguments_and_machine(tmp_path):
    path = tmp_path / "run.json"
    rows, measured = run_or_load(lambda: [{"seed": 3, "x": 0.5}], None, path, ["--seeds", "3"],
                                 {"seeds": [3], "jobs": 2})
    assert measured.machine == this_machine() and measured.argv == ("--seeds", "3")
    assert measured.args == {"seeds": [3], "jobs": 2}
    assert set(json.loads(path.read_text())) == set(SAVED_KEYS)
    again, loaded = run_or_load(lambda: pytest.fail("a saved run must not be re-run"), path, None, [], {})
    assert again == rows and loaded == measured


def test_a_saved_run_without_its_machine_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"rows": [], "seconds": 1.0}))
    with pytest.raises(ValueError, match=r"lacks \['argv', 'machine', 'args'\]"):
        run_or_load(list, path, None, [], {})


def _write(tmp_path, saved):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    return path


def test_from_json_writes_the_saved_runs_command_machine_and_arguments(tmp_path):
    saved = {"rows": [{"seed": 5}], "seconds": 120.0, "argv": ["--seeds", "5", "6", "--jobs", "1"],
             "machine": "another CPU, 64 cores", "args": {"seeds": [5, 6], "threads": 1, "jobs": 1}}
    out = tmp_path / "BENCHMARKS.md"

    def section(rows, args, measured):
        return f"## T\n\n{measured.command('t.py')}; {measured.machine}; {measured.seconds / 60:.1f} min; " \
               f"seeds {args.seeds}, jobs {args.jobs}\n"

    ap = seeds_jobs_parser("doc", out)
    section_main(ap, "## T", section, lambda args: pytest.fail("must not run"),
                 ["--from-json", str(_write(tmp_path, saved)), "--out", str(out)])
    assert out.read_text() == ("# Benchmarks\n\n## T\n\npython benchmarks/t.py --seeds 5 6 --jobs 1; "
                               "another CPU, 64 cores; 2.0 min; seeds [5, 6], jobs 1\n")


def test_from_json_refuses_arguments_that_would_describe_another_run(tmp_path, capsys):
    saved = {"rows": [], "seconds": 1.0, "argv": [], "machine": "m", "args": {"seeds": [0], "threads": 1, "jobs": 2}}
    ap = seeds_jobs_parser("doc", tmp_path / "B.md")
    with pytest.raises(SystemExit):
        section_main(ap, "## T", lambda *a: "", lambda args: [],
                     ["--from-json", str(_write(tmp_path, saved)), "--seeds", "1", "--out", str(tmp_path / "B.md")])
    assert "drop ['--seeds', '1']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        section_main(seeds_jobs_parser("doc", tmp_path / "B.md"), "## T", lambda *a: "", lambda args: [],
                     ["--from-json", str(_write(tmp_path, saved)), "--json", str(tmp_path / "j.json")])
    assert "drop ['--json']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation is refused, not taken for --json or recorded as an argument
        section_main(seeds_jobs_parser("doc", tmp_path / "B.md"), "## T", lambda *a: "", lambda args: [],
                     ["--js", str(tmp_path / "j.json")])
    assert not (tmp_path / "B.md").exists() and not (tmp_path / "j.json").exists()


def _section(rows, args, measured):
    return f"## T\n\n{measured.command('t.py')}; seeds {args.seeds}; {rows}\n"


def test_a_live_run_saves_its_arguments_as_typed_and_resolved(tmp_path):
    out, saved = tmp_path / "B.md", tmp_path / "run.json"
    section_main(seeds_jobs_parser("doc", out), "## T", _section, lambda args: [{"seeds": args.seeds}],
                 ["--seeds", "3", "4", f"--json={saved}", "--out", str(out), "--jobs", "1"])
    data = json.loads(saved.read_text())
    assert data["argv"] == ["--seeds", "3", "4", "--jobs", "1"]
    assert data["args"] == {"seeds": [3, 4], "threads": 1, "jobs": 1} and data["machine"] == this_machine()
    assert "python benchmarks/t.py --seeds 3 4 --jobs 1; seeds [3, 4]" in out.read_text()


def test_a_rewrite_spells_out_what_a_changed_default_no_longer_gives(tmp_path):
    """The run used the then default seeds 0-9; the script's default is 0-2 now: the rewritten
    command states the run's seeds, and the section gets them."""
    saved = {"rows": [1], "seconds": 60.0, "argv": [], "machine": "m",
             "args": {"seeds": list(range(10)), "threads": 1, "jobs": 2}}
    out = tmp_path / "B.md"
    ap = seeds_jobs_parser("doc", out)
    ap.set_defaults(seeds=[0, 1, 2])
    section_main(ap, "## T", _section, lambda args: pytest.fail("must not run"),
                 ["--from-json", str(_write(tmp_path, saved)), "--out", str(out)])
    assert "python benchmarks/t.py --seeds $(seq 0 9); seeds [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]; [1]" in out.read_text()
    saved["args"]["gone"] = 1
    with pytest.raises(ValueError, match="the saved run's argument 'gone' = 1 cannot be written as an option"):
        section_main(ap, "## T", _section, lambda args: [], ["--from-json", str(_write(tmp_path, saved))])


def test_give_up_section_judges_each_rule_and_keeps_held_out_seeds_apart():
    """The give-up check's verdicts on hand-made r² trajectories (80 epochs after the probe): a
    rule drops a start when its r² is below the threshold after that many epochs, a drop of a
    start that learns is wrong, and seeds from 60 on are reported as held out for both rules."""
    from types import SimpleNamespace

    from benchmarks import toy_give_up

    def row(seed, *trajectories):
        return {"toy": "square", "seed": seed, "r2": [list(t) for t in trajectories], "blocks": len(trajectories),
                "train_loss_model": None}

    never = [-0.2] * 80
    late = [-0.5] * 40 + [0.7] * 40  # below 0 for the last time after 40 epochs: a check after 40 drops it
    rows = [row(3, never, [0.9] * 80), row(37, late), row(70, [0.8] * 80), row(80, never, [0.9] * 80)]
    text = toy_give_up.section(rows, SimpleNamespace(jobs=2, threads=1), Measured((), "here", 60.0))
    assert "| 50 (`GIVE_UP`) | 0 | 2 (3/0, 80/0) | 0 | 60 |" in text
    assert "| 40 | 1 (37/0) | 2 (3/0, 80/0) | 0 | 80 |" in text
    assert "| 37/0 | -0.500 |" in text and "| **wrong give-up** | kept, learned |" in text
    assert "37/0 learns late: its worst r² is below 0 for the last time after 40 epochs" in text
    assert "- seeds 60 and up (held out for both rules) (2 seeds, 3 kept starts): 2 learned every feature" in text
    assert "never learned one: 1 (80/0)." in text
    assert "- seeds 20-59 (held out for the first rule; `GIVE_UP` (50, 0.0) was chosen on seeds 0-59) (1 seeds, 1 " \
           "kept starts): 1 learned every feature" in text


def test_overcomplete_section_counts_targets_and_compares_k10_with_its_saved_runs():
    from benchmarks import toy_overcomplete as t
    saved = t._saved_k10()

    def row(seed, k, stat, error, r2=0.87):
        return dict(seed=seed, k=k, error=error, pearson_r=stat, pearson_r_reference=0.93, r2_decoder=r2,
                    r2_model=0.88, r2_decoder_vs_model=0.98, dead_fraction=0.0)

    rows = [row(0, 10, saved[0]["value"], saved[0]["error"]), row(1, 10, saved[1]["value"], saved[1]["error"] + 1e-9)]
    rows += [row(0, 15, 0.92, 0.064), row(1, 15, 0.9199, 0.01), row(0, 20, 0.95, 0.0641), row(1, 20, 0.95, 0.02, 0.93)]
    rows += [row(2, k, 0.87, 0.03) for k in (10, 15, 20)]  # 0.06 below the reference 0.93
    text = t.summary(rows)
    assert "K = 15: statistic >= 0.92 in 1/3" in text and "(a poorer optimum) in 1/3 (seed 2)." in text
    assert "error <= 6.4% in 3/3" in text and "both in 1/3" in text
    assert "K = 20: statistic >= 0.92 in 2/3, error <= 6.4% in 2/3" in text and "r² of A >= 0.92 in 1/3" in text
    assert "the same statistic and error, bit for bit, in 1/3 seeds" in text  # seed 1's error is 1e-9 off; 2's differ
    table = t.table(rows)
    assert "| 0 | **0.9300**; 0.880 |" in table and "**0.9200** (**6.4%**); 0.870" in table
    assert "**0.9500** (6.4%); 0.870" in table  # 6.41% misses the error target: not bold


def test_evaluate_time_section_reads_the_median_round_and_flags_a_changed_result():
    from benchmarks import toy_evaluate_time as t
    rows = [{"seed": 1, "cpu": {"full": [18.0, 16.0], "early": [6.0, 8.0]}, "same": True, "max_abs_delta": 0.12},
            {"seed": 0, "cpu": {"full": [10.0, 12.0], "early": [2.0, 2.0]}, "same": False, "max_abs_delta": 0.2}]
    table = t.table(rows)
    assert table.index("| 0 |") < table.index("| 1 |")
    assert "| 0 | 11.0 | 2.0 | 5.50 | **no** |" in table and "| 1 | 17.0 | 7.0 | 2.43 | yes |" in table
    text = t.summary(rows)
    assert "full / early: 2.43-5.50" in text and "in 1/2 seeds" in text and "reached its half change: 0.2 " in text


def test_overcomplete_per_sample_block_compares_r2_gaps_with_the_batch_runs_of_the_same_seeds(monkeypatch):
    from benchmarks import toy_overcomplete as t

    def row(seed, k, r2, model=0.9, norm="batch"):
        return dict(seed=seed, k=k, loss_norm=norm, error=0.02, pearson_r=0.92, pearson_r_reference=0.93,
                    r2_decoder=r2, r2_model=model, r2_decoder_vs_model=0.99, dead_fraction=0.0)

    batch = [row(0, 15, 0.88), row(1, 15, 0.80), row(0, 10, 0.5)]
    held = {"rows": [row(2, 15, 0.89)]}
    sample = [row(0, 15, 0.899, norm="sample"), row(1, 15, 0.70, norm="sample"), row(2, 15, 0.895, norm="sample"),
              row(3, 15, 0.9, norm="sample")]  # seed 3 has no batch run: not compared
    run = {"rows": sample, "argv": ["--seeds", "0", "1", "2", "3"], "machine": "m", "seconds": 60.0,
           "args": {"seeds": [0, 1, 2, 3], "ks": [15], "loss_norm": "sample", "jobs": 2, "threads": 1}}
    monkeypatch.setattr(t, "_per_sample_run", lambda: run)
    monkeypatch.setattr(t, "_held_out_run", lambda: held)
    text = t.per_sample(batch)
    assert "seeds 0-3" in text and "1.0 min" in text
    assert "per-sample median -0.0050 (-0.2000 to -0.0010)" in text
    assert "batch median -0.0200 (-0.1000 to -0.0100) on the same seeds" in text
    assert "closer to the model's own with the per-sample loss in 2/3." in text
    monkeypatch.setattr(t, "_per_sample_run", lambda: None)
    assert "No per-sample run saved" in t.per_sample(batch)


def test_the_gpu_toy_check_runs_its_path_on_the_cpu_and_refuses_a_missing_device(capsys, monkeypatch):
    """``benchmarks/gpu_toy.py`` (run on a lent GPU) on the CPU: both columns agree exactly and it
    passes; without CUDA it exits 2 before any work; a device run that raises fails it."""
    from benchmarks import gpu_toy

    assert gpu_toy.main(["--device", "cpu", "--toys", "tmcs", "--epochs", "2", "--train-epochs", "1"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("tmcs") and " cpu " in ln]
    shown = [ln for ln in lines if ln[1] != "decompose"]
    assert len(shown) == 4 and all(ln[-3] == ln[-1] for ln in shown)
    monkeypatch.setattr(gpu_toy.torch.cuda, "is_available", lambda: False)
    assert gpu_toy.main(["--toys", "tmcs"]) == 2
    def lost(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(gpu_toy, "run", lost)
    assert gpu_toy.main(["--device", "cpu", "--toys", "tms"]) == 1
    assert "tms: FAILED: RuntimeError: device lost" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["memory_estimate", "patching"])
def test_help_and_out_are_read_before_any_run(name, tmp_path, monkeypatch, capsys):
    """``--help`` ran the whole benchmark (10 minutes) and rewrote the repository's BENCHMARKS.md;
    an unknown flag is refused before any run, and ``--out`` names the file to rewrite."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(module, "setup_threads", lambda *a: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        module.main(["--bogus"])
    assert e.value.code == 2
