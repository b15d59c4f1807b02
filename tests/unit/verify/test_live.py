"""verify's live phase: the query-only attacks of `--live` / `deploy.live_attacks`, their checks, the deprecated
Square flags, and several live attacks in one verify, interrupted and resumed, on the real onnxruntime linear model
(the numpy Square really runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciard_deploy.resume import StateMismatch
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.verify import VerifyState, run
from ciard_deploy.options.live import DEFAULT_LIVE, parse_live, resolve_live

pytestmark = pytest.mark.unit

#: two live attacks on 60 of the pack's 120 images, batches of 8 (about 7 batches each)
TWO = dict(live=["square50", "square80"], live_n=60, batch_size=8, seed=2)


def _measured(report) -> dict:
    """Every measured number of a report: results (without seconds and origin), metrics, parity, per-sample flags."""
    results = json.loads(json.dumps(report.results))
    for a in results["attacks"]:
        a.pop("seconds"), a.pop("origin")
    return {"results": results, "metrics": report.metrics, "parity": report.parity, "per_sample": report.per_sample}


class StopInside:
    """A progress callback standing in for Ctrl-C after the ``n``-th finished batch of live attack ``stage``."""

    def __init__(self, stage: str, n: int) -> None:
        self.stage, self.n, self.batches = stage, n, 0

    def __call__(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        if stage == self.stage and done > 0:
            self.batches += 1
            if self.batches == self.n:
                raise KeyboardInterrupt


# --------------------------------------------------------------------------- which attacks
def test_parse_live_specs():
    assert parse_live("square5000, Square100") == ["square5000", "square100"]
    assert parse_live(["square50"]) == ["square50"] and parse_live("square") == ["square5000"]  # the family default
    assert parse_live(None) == list(DEFAULT_LIVE) == ["square1000"]
    for off in ("none", "", "None", " ", "off", []):
        assert parse_live(off) == []
    with pytest.raises(UsageError, match="^--live: square50 listed twice$"):
        parse_live("square50,square50")
    with pytest.raises(UsageError, match=r"^--live: unknown attack 'sqare50'\. Did you mean"):
        parse_live("sqare50")
    with pytest.raises(UsageError, match=r"^--live: attack 'square1': queries must be >= 2, got 1$"):
        parse_live("square1")


@pytest.mark.parametrize("spec", ["pgd20", "fgsm", "aa", "apgd-ce", "mtpgd100"])
def test_a_white_box_spec_belongs_in_the_pack(spec):
    with pytest.raises(UsageError) as exc:
        parse_live(f"square100,{spec}")
    msg = str(exc.value)
    assert msg.startswith(f"--live: {spec} needs gradients, which a runtime does not give, so it cannot run live; "
                          "white-box attacks belong in the pack (ciard pack --attacks")
    assert msg.endswith("Live attacks are query-only: square<Q>") and "\n" not in msg


def test_the_deprecated_square_options():
    assert resolve_live() == (["square1000"], None)
    assert resolve_live(square_queries=300, square_n=40) == (["square300"], 40)
    assert resolve_live(square_queries=0) == ([], None)
    assert resolve_live("square50", 7) == (["square50"], 7)
    for kwargs, needle in (({"live": "square50", "square_queries": 50}, "--square-queries is the old spelling of "
                                                                          "--live: give one of them"),
                           ({"live_n": 5, "square_n": 5}, "--square-n is the old spelling of --live-n"),
                           ({"square_queries": 1}, "--square-queries must be 0 (off) or >= 2, got 1"),
                           ({"square_n": 0}, "--square-n must be >= 1, got 0"),
                           ({"live_n": -2}, "--live-n must be >= 1, got -2")):
        with pytest.raises(UsageError, match="^" + needle.replace("(", r"\(").replace(")", r"\)")):
            resolve_live(**kwargs)


# --------------------------------------------------------------------------- the CLI
def test_cli_live_flags(tmp_path, linear_onnx, pack_file, invoke, assert_one_line_error):
    base = ["verify", linear_onnx, "--pack", pack_file, "--batch-size", 8, "--seed", 2, "-q"]
    assert_one_line_error(invoke(*base, "--live", "square30,pgd20"), 2,
                          "--live: pgd20 needs gradients", "belong in the pack")
    assert_one_line_error(invoke(*base, "--live", "square30", "--square-queries", 30), 2,
                          "--square-queries is the old spelling of --live")
    assert_one_line_error(invoke(*base, "--live", "squar30"), 2, "unknown attack 'squar30'")

    # the deprecated flags and the new ones: the same verification
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    res = invoke(*base, "--square-queries", 30, "--square-n", 20, "--json", old)
    assert res.exit_code == 0, res.output
    res = invoke(*base, "--live", "square30", "--live-n", 20, "--json", new)
    assert res.exit_code == 0, res.output
    assert _measured_json(old) == _measured_json(new)
    rep = json.loads(new.read_text())
    assert rep["settings"]["live_attacks"] == ["square30"] and rep["settings"]["live_n"] == 20
    assert rep["results"]["worst_case"]["label"] == "worst(pgd10+fgsm+square30)@0.1"

    # --live none (or "") and --square-queries 0: no live attack
    for i, off in enumerate((["--live", "none"], ["--live", ""], ["--square-queries", 0])):
        out = tmp_path / f"off{i}.json"
        res = invoke(*base, *off, "--json", out)
        assert res.exit_code == 0, res.output
        rep = json.loads(out.read_text())
        assert [a["kind"] for a in rep["results"]["attacks"]] == ["transfer", "transfer"], off
        assert rep["settings"]["live_attacks"] == [] and rep["metrics"]["live_acc"] is None
        assert rep["metrics"]["square_acc"] is None and rep["per_sample"]["live_indices"] is None
        assert rep["results"]["worst_case"]["label"] == "worst(pgd10+fgsm)@0.1"


def _measured_json(path) -> tuple:
    rep = json.loads(path.read_text())
    for a in rep["results"]["attacks"]:
        a.pop("seconds"), a.pop("origin")
    return rep["results"], rep["metrics"], rep["per_sample"], rep["parity"]


# --------------------------------------------------------------------------- two live attacks in one verify
def test_two_live_attacks_in_one_verify(linear_onnx, pack_file):
    rep = run(linear_onnx, pack_file, **TWO)
    live = [a for a in rep.results["attacks"] if a["kind"] == "query"]
    assert [a["label"] for a in live] == ["square50@0.1", "square80@0.1"] and all(a["n"] == 60 for a in live)
    assert all(a["queries"] > 0 and a["settings"]["attacked"] == live[0]["settings"]["attacked"] for a in live)
    wc = rep.results["worst_case"]
    assert wc["label"] == "worst(pgd10+fgsm+square50+square80)@0.1" and wc["n"] == 60
    assert wc["tiers"]["query"] == ["square50@0.1", "square80@0.1"]

    # per sample: the worst case covers every attack on the live subset
    idx = np.asarray(rep.per_sample["live_indices"])
    bits = {k: np.array([c == "1" for c in v]) for k, v in rep.per_sample.items() if isinstance(v, str)}
    both = bits["square50@0.1"] & bits["square80@0.1"]
    assert rep.metrics["live_acc"] == pytest.approx(both.mean())
    assert rep.metrics["square_acc"] == rep.metrics["live_acc"]  # both are Squares
    everything = bits["clean"][idx] & bits["pgd10@0.1"][idx] & bits["fgsm@0.1"][idx] & both
    assert rep.metrics["worst_case_acc"] == pytest.approx(everything.mean()) == pytest.approx(wc["acc"])
    assert wc["acc"] <= min(a["robust_acc"] for a in live)

    # each live attack is seeded on its own: the same flags as when it runs alone
    alone = run(linear_onnx, pack_file, **{**TWO, "live": ["square80"]})
    assert alone.per_sample["square80@0.1"] == rep.per_sample["square80@0.1"]
    assert alone.metrics["square_acc"] == pytest.approx(bits["square80@0.1"].mean())


def test_v101_compares_the_strongest_live_attack(tmp_path, linear, linear_onnx, test_xy, h):
    """A pack whose only 'attack' is tiny noise: the strongest live attack is the one V101 names."""
    rep = run(linear_onnx, h.noise_pack(linear, *test_xy, tmp_path / "weak.npz"), live="square2,square60", live_n=40)
    (v101,) = [f for f in rep.warnings if f.code == "V101"]
    accs = rep.results["robust_acc"]
    assert accs["square60@0.1"] <= accs["square2@0.1"] and v101.check == "live_beats_transfer"
    assert v101.message.startswith(f"square60@0.1 on the runtime leaves {accs['square60@0.1']:.2%} robust")


# --------------------------------------------------------------------------- resumable, per live attack
def test_the_second_live_attack_resumes_after_an_interrupt(tmp_path, linear_onnx, pack_file):
    whole = run(linear_onnx, pack_file, **TWO)
    path = tmp_path / "v.state.json"
    with pytest.raises(KeyboardInterrupt):
        run(linear_onnx, pack_file, state_path=path, progress=StopInside("square80@0.1", 2), **TWO)
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == 2 and saved["key"]["live_n"] == 60
    first, second = saved["attacks"]
    assert first["label"] == "square50@0.1" and first["done"] == first["total"]
    assert second["label"] == "square80@0.1" and second["done"] == 2 * 8 < second["total"]

    events = []
    resumed = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **TWO)
    assert [(e.kind, e.stage, e.done) for e in events] == [("reused", "square50@0.1", first["total"]),
                                                           ("resumed", "square80@0.1", 16)]
    assert _measured(resumed) == _measured(whole)
    assert [a["origin"] for a in resumed.results["attacks"]] == ["ran", "ran", "reused", "resumed"]
    assert [a["queries"] for a in resumed.results["attacks"]] == [a["queries"] for a in whole.results["attacks"]]


def test_a_state_serves_the_live_attacks_it_shares(tmp_path, linear_onnx, pack_file):
    path = tmp_path / "v.state.json"
    run(linear_onnx, pack_file, state_path=path, **{**TWO, "live": ["square50"]})
    events = []
    both = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **TWO)
    assert [(e.kind, e.stage) for e in events] == [("reused", "square50@0.1")]  # square80 ran
    assert _measured(both) == _measured(run(linear_onnx, pack_file, **TWO))
    events.clear()
    only = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **{**TWO, "live": "square80"})
    assert [(e.kind, e.stage) for e in events] == [("reused", "square80@0.1")]
    assert only.per_sample["square80@0.1"] == both.per_sample["square80@0.1"]
    assert [a["label"] for a in json.loads(path.read_text())["attacks"]] == ["square50@0.1", "square80@0.1"]

    # a record made with other settings of the same attack, or another subset: refused, the file untouched
    d = json.loads(path.read_text())
    d["attacks"][0]["settings"]["options"]["p_init"] = 0.5
    path.write_text(json.dumps(d))
    before = path.read_bytes()
    with pytest.raises(StateMismatch, match=r"square50@0\.1 options\.p_init 0\.5 \(file\) vs 0\.8 \(now\)"):
        run(linear_onnx, pack_file, state_path=path, **TWO)
    with pytest.raises(StateMismatch, match=r"live n 60 \(file\) vs 50 \(now\)"):
        run(linear_onnx, pack_file, state_path=path, **{**TWO, "live": "square80", "live_n": 50})
    assert path.read_bytes() == before


def _as_schema_1(d: dict, square_queries: int) -> dict:
    """A schema-2 state written the way ciard-deploy wrote it before live attacks were a list."""
    key = dict(d["key"])
    live_n = key.pop("live_n")
    key.update(square_queries=square_queries, square_n=live_n if square_queries else 0, square_p_init=0.8)
    return {**d, "schema_version": 1, "key": key}


def test_a_schema_1_state_is_read_and_resumed(tmp_path, linear_onnx, pack_file):
    square = dict(live=["square30"], live_n=60, batch_size=8, seed=2)
    whole = run(linear_onnx, pack_file, **square)
    path = tmp_path / "v.state.json"
    with pytest.raises(KeyboardInterrupt):
        run(linear_onnx, pack_file, state_path=path, progress=StopInside("square30@0.1", 3), **square)
    path.write_text(json.dumps(_as_schema_1(json.loads(path.read_text()), 30)))

    state = VerifyState.load(path)
    assert state.key.live_n == 60 and state.record("square30@0.1").done == 24
    events = []
    resumed = run(linear_onnx, pack_file, state_path=path, on_state=events.append, square_queries=30, square_n=60,
                  batch_size=8, seed=2)
    assert [(e.kind, e.stage, e.done) for e in events] == [("resumed", "square30@0.1", 24)]
    assert _measured(resumed) == _measured(whole)
    assert json.loads(path.read_text())["schema_version"] == 2  # saved in the new form

    # Square off in schema 1: no records, the subset is the whole pack
    d = _as_schema_1({**json.loads(path.read_text()), "attacks": []}, 0)
    path.write_text(json.dumps(d))
    assert VerifyState.load(path).key.live_n == 120
    d["key"].pop("square_n")
    path.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="not a valid ciard verify state: key lacks square_n"):
        VerifyState.load(path)


# --------------------------------------------------------------------------- a new query-only attack
TOY_ATTACK = '''
import numpy as np

from ciard_deploy.attacks.base import QueryAttack
from ciard_deploy.attacks.budget import Budget


class RandomSign(QueryAttack):
    """Tries ``tries`` random corners of the eps-ball per image; keeps the first misclassified one."""

    def __init__(self, eps, tries=5, seed=0, batch_size=256):
        self.name, self.budget = f"rsign{tries}", Budget("Linf", float(eps), int(tries), None)
        self.seed, self.batch_size = seed, batch_size

    def options(self):
        return {"seed": self.seed}

    def run_numpy(self, predict, x, y, num_classes=None):
        rng = np.random.default_rng(self.seed)
        out, todo = x.copy(), np.ones(len(x), bool)
        for _ in range(self.budget.steps):
            trial = np.clip(x + self.budget.eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1).astype(np.float32)
            fooled = todo & (predict(trial).argmax(1) != y)
            out[fooled], todo = trial[fooled], todo & ~fooled
        return out
'''


def test_a_new_query_only_attack_needs_only_its_module_and_its_registry_entry(tmp_path, monkeypatch, linear_onnx,
                                                                               pack_file, invoke):
    from ciard_deploy.attacks.base import ATTACKS, SCORES, AttackEntry

    (tmp_path / "toy_live_attack.py").write_text(TOY_ATTACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ATTACKS._items, "rsign", AttackEntry("rsign", "rsign<K>", "toy_live_attack:RandomSign",
                                                             "tries", 5, requires=frozenset({SCORES})))
    assert parse_live("rsign3,square30") == ["rsign3", "square30"]
    path = tmp_path / "v.state.json"
    with pytest.raises(KeyboardInterrupt):
        run(linear_onnx, pack_file, state_path=path, progress=StopInside("rsign3@0.1", 2), **{**TWO, "live": "rsign3"})
    events = []
    rep = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **{**TWO, "live": "rsign3,square30"})
    assert [(e.kind, e.stage, e.done) for e in events] == [("resumed", "rsign3@0.1", 16)]
    assert rep.results["worst_case"]["label"] == "worst(pgd10+fgsm+rsign3+square30)@0.1"
    assert rep.metrics["rsign_acc"] == rep.results["robust_acc"]["rsign3@0.1"] < rep.metrics["clean_acc"]
    assert rep.metrics["square_acc"] == rep.results["robust_acc"]["square30@0.1"]
    assert _measured(rep) == _measured(run(linear_onnx, pack_file, **{**TWO, "live": "rsign3,square30"}))
    res = invoke("verify", linear_onnx, "--pack", pack_file, "--live", "rsign3", "--live-n", 20, "-q")
    assert res.exit_code == 0 and "rsign3@0.1 (query-only)" in res.stdout, res.output
