"""The benchmarks' bookkeeping: a section rewritten from saved rows (``--from-json``) states the
saved run's command, machine and time, never those of the machine that rewrites it."""

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


def test_a_saved_run_loads_with_its_own_arguments_and_machine(tmp_path):
    path = tmp_path / "run.json"
    rows, measured = run_or_load(lambda: [{"seed": 3, "x": 0.5}], None, path, ["--seeds", "3"])
    assert measured.machine == this_machine() and measured.argv == ("--seeds", "3")
    assert set(json.loads(path.read_text())) == set(SAVED_KEYS)
    again, loaded = run_or_load(lambda: pytest.fail("a saved run must not be re-run"), path, None, [])
    assert again == rows and loaded == measured


def test_a_saved_run_without_its_machine_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"rows": [], "seconds": 1.0}))
    with pytest.raises(ValueError, match=r"lacks \['argv', 'machine'\]"):
        run_or_load(list, path, None, [])


def _write(tmp_path, saved):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    return path


def test_from_json_writes_the_saved_runs_command_machine_and_arguments(tmp_path):
    saved = {"rows": [{"seed": 5}], "seconds": 120.0, "argv": ["--seeds", "5", "6", "--jobs", "1"],
             "machine": "another CPU, 64 cores"}
    out = tmp_path / "BENCHMARKS.md"

    def section(rows, args, measured):
        return f"## T\n\n{measured.command('t.py')}; {measured.machine}; {measured.seconds / 60:.1f} min; " \
               f"seeds {args.seeds}, jobs {args.jobs}\n"

    ap = seeds_jobs_parser("doc", out)
    section_main(ap, "## T", section, lambda args: pytest.fail("must not run"),
                 ["--from-json", str(_write(tmp_path, saved)), "--out", str(out)])
    assert out.read_text() == ("# Benchmarks\n\n## T\n\npython benchmarks/t.py --seeds 5 6 --jobs 1; another CPU, 64 cores; 2.0 min; "
                               "seeds [5, 6], jobs 1\n")


def test_from_json_refuses_arguments_that_would_describe_another_run(tmp_path, capsys):
    saved = {"rows": [], "seconds": 1.0, "argv": [], "machine": "m"}
    ap = seeds_jobs_parser("doc", tmp_path / "B.md")
    with pytest.raises(SystemExit):
        section_main(ap, "## T", lambda *a: "", lambda args: [],
                     ["--from-json", str(_write(tmp_path, saved)), "--seeds", "1", "--out", str(tmp_path / "B.md")])
    assert "drop ['--seeds', '1']" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()
