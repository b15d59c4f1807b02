"""`ciard verify --state/--fresh` through the CLI, on the real onnxruntime linear model (Square really runs).

Bad inputs exit 2 with one `error:` line and leave every file byte-identical; Ctrl-C after two Square
batches (raised by the progress bar, standing in for the user) exits 130 and says the same command
continues; the next call resumes (one stderr line, none with --quiet) to the same report.
"""

from __future__ import annotations

import json

import pytest

from ciard_deploy.cli.verify import StagedProgress

pytestmark = pytest.mark.unit

SQUARE = ["--square-queries", 30, "--square-n", 60, "--batch-size", 8, "--seed", 2]


@pytest.fixture
def ctrl_c_after_two_square_batches(monkeypatch):
    """The progress bar raises KeyboardInterrupt once two Square batches have finished."""
    real = StagedProgress.__call__
    seen = {"batches": 0}

    def call(self, done, total=None, stage=None):
        real(self, done, total, stage)
        if stage and stage.startswith("square") and done > 0:
            seen["batches"] += 1
            if seen["batches"] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(StagedProgress, "__call__", call)
    return seen


def _numbers(path):
    rep = json.loads(path.read_text())
    for a in rep["results"]["attacks"]:
        a.pop("seconds"), a.pop("origin")
    return rep["results"], rep["metrics"], rep["per_sample"], rep["parity"]


def test_ctrl_c_exits_130_and_the_same_command_continues(tmp_path, linear_onnx, pack_file, monkeypatch,
                                                         ctrl_c_after_two_square_batches, invoke):
    state = tmp_path / "verify.state.json"
    args = ["verify", linear_onnx, "--pack", pack_file, *SQUARE, "--state", state, "--json", tmp_path / "r.json"]
    res = invoke(*args)
    assert res.exit_code == 130, res.output
    err = res.stderr.replace("\n", " ")
    assert f"interrupted: finished work is in {state}; run the same command again to continue" in err
    assert json.loads(state.read_text())["attacks"][0]["done"] == 16 and not (tmp_path / "r.json").exists()

    monkeypatch.undo()
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("state:")]
    assert len(lines) == 1 and lines[0].startswith("state: resuming square30@0.1 at 16/"), res.stderr
    assert "(query-only, resumed)" in res.stdout
    res = invoke("verify", linear_onnx, "--pack", pack_file, *SQUARE, "--json", tmp_path / "whole.json", "-q")
    assert res.exit_code == 0, res.output
    assert _numbers(tmp_path / "r.json") == _numbers(tmp_path / "whole.json")

    res = invoke(*args, "--quiet", "--force")  # finished in the state: reused, and --quiet says nothing about it
    assert res.exit_code == 0 and "state:" not in res.stderr, res.output
    assert json.loads((tmp_path / "r.json").read_text())["results"]["attacks"][-1]["origin"] == "reused"
    assert _numbers(tmp_path / "r.json") == _numbers(tmp_path / "whole.json")


def test_ctrl_c_with_fresh_says_to_drop_it(tmp_path, linear_onnx, pack_file, ctrl_c_after_two_square_batches,
                                           invoke):
    state = tmp_path / "verify.state.json"
    res = invoke("-q", "verify", linear_onnx, "--pack", pack_file, *SQUARE, "--state", state, "--fresh")
    assert res.exit_code == 130 and "run the same command again without --fresh to continue" in \
        res.stderr.replace("\n", " "), res.output


def test_bad_state_inputs_exit_2_and_leave_files_alone(tmp_path, linear_onnx, pack_file, invoke,
                                                        assert_one_line_error):
    base = ["verify", linear_onnx, "--pack", pack_file, *SQUARE]
    assert_one_line_error(invoke(*base, "--fresh"), 2, "--fresh discards a --state file: give --state too")
    same = tmp_path / "out.json"
    assert_one_line_error(invoke(*base, "--state", same, "--json", same), 2, "--json", "same file as --state")
    assert not same.exists()
    pack_before = pack_file.read_bytes()
    assert_one_line_error(invoke(*base, "--state", pack_file), 2, "same file as --pack")
    assert_one_line_error(invoke(*base, "--state", tmp_path), 2, "is a folder")
    assert pack_file.read_bytes() == pack_before

    # a file that is no verify state (a report, given by mistake), with and without --fresh
    report = tmp_path / "report.json"
    res = invoke(*base, "--json", report, "-q")
    assert res.exit_code == 0, res.output
    before = report.read_bytes()
    for fresh in ([], ["--fresh"]):
        res = invoke(*base, "--state", report, *fresh)
        assert_one_line_error(res, 2, "is not a valid ciard verify state", "kind 'ciard.verify_report'",
                              "left as it is")
        assert report.read_bytes() == before

    # a state of another verification: refused naming what differs, untouched; --fresh starts over
    state = tmp_path / "verify.state.json"
    assert invoke(*base, "--state", state, "-q").exit_code == 0
    before = state.read_bytes()
    res = invoke("verify", linear_onnx, "--pack", pack_file, "--square-queries", 40, "--square-n", 60,
                 "--batch-size", 8, "--seed", 3, "--state", state)
    assert_one_line_error(res, 2, f"state file {state} holds a different verification", "seed 2 (file) vs 3 (now)",
                          "pass --fresh to discard it")
    assert state.read_bytes() == before
    res = invoke("verify", linear_onnx, "--pack", pack_file, "--square-queries", 40, "--square-n", 60,
                 "--batch-size", 8, "--seed", 3, "--state", state, "--fresh")
    assert res.exit_code == 0 and "state:" not in res.stderr, res.output
    assert json.loads(state.read_text())["key"]["seed"] == 3


#: After the conftest prelude (torch hidden): `ciard verify --state` stopped by Ctrl-C after two Square
#: batches, then run again; records the exit codes, attempts to import torch while importing the CLI, and
#: the torch modules loaded at the end (none may be).
RESUME_WITHOUT_TORCH = '''
    import ciard_deploy.cli
    from ciard_deploy.cli.verify import StagedProgress
    import_attempts = list(ATTEMPTS)  # attempts made while importing the CLI (none may be)

    args = json.loads(sys.argv[1])
    real, seen = StagedProgress.__call__, {"batches": 0}

    def ctrl_c(self, done, total=None, stage=None):
        real(self, done, total, stage)
        if stage and stage.startswith("square") and done > 0:
            seen["batches"] += 1
            if seen["batches"] == 2:
                raise KeyboardInterrupt

    def cli():
        sys.argv = ["ciard", *args]
        try:
            ciard_deploy.cli.main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0

    StagedProgress.__call__ = ctrl_c
    first = cli()
    StagedProgress.__call__ = real
    second = cli()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT " + json.dumps({"codes": [first, second], "import_attempts": import_attempts, "loaded": loaded}))
'''


def test_resume_needs_no_torch(tmp_path, linear_onnx, pack_file, run_torch_hidden):
    state = tmp_path / "verify.state.json"
    res, err = run_torch_hidden(RESUME_WITHOUT_TORCH, tmp_path, ["verify", linear_onnx, "--pack", pack_file, *SQUARE,
                                                                 "--state", state, "--json", tmp_path / "r.json"])
    assert res["codes"] == [130, 0], err[-2000:]
    assert res["import_attempts"] == [] and res["loaded"] == []
    assert "state: resuming square30@0.1 at 16/" in err
    assert json.loads((tmp_path / "r.json").read_text())["results"]["attacks"][-1]["origin"] == "resumed"
