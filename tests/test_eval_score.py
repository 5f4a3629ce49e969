"""`python eval.py score` on good and malformed files (in this process; one test runs it as users do)."""

import contextlib
import csv
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest

import eval as ev
from conftest import ROOT


def write_csv(path, rows, header=("name", "openset")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def score(*args):
    """What `python eval.py score ARGS` returns (exit code, stdout, stderr), run in this process: a subprocess
    would spend seconds importing torch. As at the command line, sys.exit's message goes to stderr with code 1."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ev.main(["score", *map(str, args)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
    return types.SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())


GT = [("a", "['happy', 'sad']"), ("b", "['angry']"), ("c", "['neutral']")]
PRED = [("a", "[happy, sad, xyzzy]"), ("b", ""), ("c", "[calm]")]


def test_csv_and_npz_give_the_same_report(tmp_path):
    gt = write_csv(tmp_path / "gt.csv", GT)
    pred = write_csv(tmp_path / "pred.csv", PRED)
    np.savez(tmp_path / "pred.npz", filenames=np.array([n for n, _ in PRED]),
             fileitems=np.array([t for _, t in PRED]))
    reports = []
    for p in (pred, tmp_path / "pred.npz"):
        out = tmp_path / "report.json"
        r = score("--pred", p, "--gt", gt, "--json", out)
        assert r.returncode == 0, r.stderr
        assert "EW-F" in r.stdout and "xyzzy (1)" in r.stdout
        reports.append(json.loads(out.read_text()))
    for rep in reports:
        # a is perfect, b predicts nothing, c (neutral) is skipped: P = R = F = 0.5 in every wheel
        assert rep["fscore"] == pytest.approx(0.5) and rep["precision"] == pytest.approx(0.5)
        assert [w["n"] for w in rep["per_wheel"]] == [2] * 5
        assert [w["skipped"] for w in rep["per_wheel"]] == [1] * 5
        assert rep["dropped_words"] == {"xyzzy": 1}
    assert reports[0]["fscore"] == reports[1]["fscore"]


def test_hit_task(tmp_path):
    gt = write_csv(tmp_path / "gt.csv", [("a", "happy"), ("b", "sad"), ("c", "neutral")])
    pred = write_csv(tmp_path / "pred.csv", [("a", "[joyful, tense]"), ("b", "[angry]"), ("c", "[sad]")])
    out = tmp_path / "hit.json"
    r = score("--pred", pred, "--gt", gt, "--task", "hit", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["hit_rate"] == pytest.approx(0.5)  # a hits, b misses, c is skipped
    assert [w["n"] for w in rep["per_wheel"]] == [2] * 5


@pytest.mark.parametrize("rows, header, message", [
    ([("a", "happy")], ("name", "labels"), "needs column 'openset'"),
    ([("a", "happy"), ("b", "sad", "extra")], ("name", "openset"), "line 3: expected 2 fields, got 3"),
    ([("a", "happy"), ("a", "sad")], ("name", "openset"), "line 3: duplicate name 'a'"),
    ([("", "happy")], ("name", "openset"), "line 2: empty name ''"),
])
def test_malformed_csv_names_file_and_row(tmp_path, rows, header, message):
    bad = write_csv(tmp_path / "bad.csv", rows, header)
    good = write_csv(tmp_path / "good.csv", [("a", "happy")])
    r = score("--pred", bad, "--gt", good)
    assert r.returncode != 0
    assert "bad.csv" in r.stderr and message in r.stderr


def test_unbalanced_quote_is_an_error(tmp_path):
    gt = write_csv(tmp_path / "gt.csv", [("a", "['happy']"), ("b", "['sad']")])
    pred = tmp_path / "pred.csv"
    pred.write_text("name,openset\na,\"['happy']\nb,\"['sad']\"\n")  # the quote on line 2 swallows row b
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "score", "--pred", str(pred), "--gt", gt],
                       capture_output=True, text=True, cwd=ROOT)  # as users run it: one message, no traceback
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "pred.csv, line 2:" in r.stderr and "unbalanced quote" in r.stderr


def test_json_report_folder(tmp_path, capsys):
    gt = write_csv(tmp_path / "gt.csv", [("a", "['happy']")])
    out = tmp_path / "new" / "folder" / "r.json"  # a missing folder is made
    ev.main(["score", "--pred", gt, "--gt", gt, "--json", str(out)])
    assert json.loads(out.read_text())["fscore"] == 1.0 and f"report in {out}" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"error: cannot write .*/file: "):  # checked before scoring
        ev.main(["score", "--pred", str(tmp_path / "nope.csv"), "--gt", gt, "--json",
                 str(tmp_path / "file" / "r.json")])


def test_missing_file_and_bad_npz(tmp_path):
    good = write_csv(tmp_path / "good.csv", [("a", "happy")])
    r = score("--pred", tmp_path / "nope.csv", "--gt", good)
    assert r.returncode != 0 and "nope.csv: no such file" in r.stderr
    np.savez(tmp_path / "bad.npz", names=np.array(["a"]))
    r = score("--pred", tmp_path / "bad.npz", "--gt", good)
    assert r.returncode != 0 and "bad.npz: needs arrays 'filenames' and 'fileitems'" in r.stderr


def test_missing_predictions_are_listed(tmp_path):
    gt = write_csv(tmp_path / "gt.csv", [("a", "happy"), ("b", "sad"), ("c", "angry")])
    pred = write_csv(tmp_path / "pred.csv", [("a", "happy")])
    r = score("--pred", pred, "--gt", gt)
    assert r.returncode != 0
    assert "no prediction for 2 of 3" in r.stderr and "\n  b\n  c" in r.stderr
    out = tmp_path / "r.json"
    r = score("--pred", pred, "--gt", gt, "--missing-as-empty", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["missing_predictions"] == ["b", "c"] and rep["precision"] == pytest.approx(1 / 3)


def test_official_lexicon_end_to_end(tmp_path, parity_cases):
    case = next(c for c in parity_cases["datasets"] if c["id"] == "pub_small_A")
    gt = write_csv(tmp_path / "gt.csv", [(n, case["gt"][n]) for n in case["names"]])
    pred = write_csv(tmp_path / "pred.csv", [(n, case["pred"][n]) for n in case["names"]])
    out = tmp_path / "r.json"
    r = score("--pred", pred, "--gt", gt, "--lexicon", ROOT.parent / "shared" / "emotion_wheel", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["fscore"] == pytest.approx(case["expected"]["fscore"], abs=1e-12)
    assert [w["n"] for w in rep["per_wheel"]] == case["expected"]["per_wheel_sample_count"]
