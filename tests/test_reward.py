"""Table-driven tests of parsing, mapping, the dataset metric and every reward component, on a toy lexicon
whose mappings are known by hand (so the reward logic is tested apart from the lexicon's content)."""

import math

import pytest

import reward

# Five toy wheels. Wheel 4 lists "glad" twice: the LAST row wins, so "glad" is fear there (official rule).
W1 = [("joy", "cheerful", "glad"), ("joy", "calm", "serene"), ("fear", "anxious", "worried"),
      ("fear", "scared", "terrified"), ("anger", "mad", "furious")]
W2 = [("happy", "content", "glad"), ("sad", "lonely", "isolated"), ("afraid", "anxious", "nervous")]
W4 = W1 + [("fear", "anxious", "glad")]
SYNONYMS = [("delighted", "glad"), ("uneasy", "anxious"), ("uneasy", "worried"),
            ("edgy", "mad"), ("edgy", "nervous"), ("let down", "sad")]


@pytest.fixture(scope="module")
def lex():
    wheels = [W1, W2, W1, W4, W2]
    words = {w for rows in wheels for row in rows for w in row}
    pairs = [(w, w) for w in words] + SYNONYMS
    keys = {k for k, _ in pairs}
    forms = [(k, k) for k in keys] + [("gladly", "glad"), ("anxiety", "anxious")]
    return reward.build_lexicon("toy", wheels, pairs, forms)


@pytest.mark.parametrize("text, labels", [
    ("", []),
    ("[]", []),
    ("[", []),                                    # official code: IndexError; ours: no labels
    ("]", []),
    ("happy", ["happy"]),
    ("[Happy, SAD ]", ["happy", "sad"]),
    ("['happy', 'excited']", ["happy", "excited"]),
    ('["happy", "sad"]', ["happy", "sad"]),
    ("happy,,  ,sad", ["happy", "sad"]),
    ("[[happy, sad]]", ["[happy", "sad]"]),       # only ONE bracket is stripped at each end
    ("[happy, sad].", ["happy", "sad]."]),
    ("don't care", ["don", "t care"]),            # the apostrophe is a separator
    ("happy; sad", ["happy; sad"]),
    (["Happy ", "", " sad"], ["happy", "sad"]),   # a list is taken as already split
])
def test_parse_labels(text, labels):
    assert reward.parse_labels(text) == labels


@pytest.mark.parametrize("label, wheel, level, sector", [
    ("glad", 1, 1, "joy"),
    ("glad", 1, 2, "cheerful"),
    ("joy", 1, 2, "calm"),            # a level-1 word -> alphabetically first child (calm < cheerful)
    ("glad", 2, 1, "happy"),
    ("glad", 4, 1, "fear"),           # listed twice in wheel 4: the last row wins
    ("glad", 4, 2, "anxious"),
    ("gladly", 1, 1, "joy"),          # word form -> synonym key
    ("delighted", 2, 2, "content"),   # synonym -> wheel word
    ("uneasy", 1, 1, "fear"),
    ("edgy", 1, 1, "anger"),          # candidates [mad, nervous]: mad is the first that wheel 1 has
    ("edgy", 2, 1, "afraid"),         # wheel 2 has no "mad": the next candidate, nervous, decides
    ("furious", 2, 1, None),          # not in wheel 2
    ("xyz", 1, 1, None),              # not a known form
    ("GLAD ", 1, 1, "joy"),
])
def test_map_label(lex, label, wheel, level, sector):
    assert reward.map_label(label, lex, wheel, level) == sector


def test_map_label_rejects_bad_wheel(lex):
    with pytest.raises(ValueError, match="wheel"):
        reward.map_label("glad", lex, 6)


def test_sample_scores_by_hand(lex):
    # gt {glad, anxious} vs pred {glad, furious}; wheel 4 maps glad to fear
    assert reward.sample_scores("glad, furious", "['glad', 'anxious']", lex) == [
        (0.5, 0.5), (1.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 0.5)]
    # ground truth outside wheels 2 and 5 -> skipped there; empty prediction -> 0, 0
    assert reward.sample_scores("", "furious", lex) == [(0.0, 0.0), None, (0.0, 0.0), (0.0, 0.0), None]


def test_ew_metric_by_hand(lex):
    gts = {"s1": "glad, anxious", "s2": "furious"}
    preds = {"s2": "", "s1": "[glad, furious]"}
    got = reward.ew_metric(preds, gts, lex)
    assert [w["n"] for w in got["per_wheel"]] == [2, 1, 2, 2, 1]
    # F of the means: wheel 1 P = R = 0.25; wheel 2 P = 1, R = .5; wheel 4 P = .25, R = .5 -> F = 1/3
    assert [w["fscore"] for w in got["per_wheel"]] == pytest.approx([0.25, 2 / 3, 0.25, 1 / 3, 2 / 3])
    assert got["fscore"] == pytest.approx(13 / 30)
    assert got["precision"] == pytest.approx(0.55)
    assert got["recall"] == pytest.approx(0.4)
    with pytest.raises(KeyError, match="s3"):
        reward.ew_metric(preds, {**gts, "s3": "glad"}, lex)


def test_hit_rate_by_hand(lex):
    gts = {"a": "glad", "b": "sad"}
    preds = {"a": "cheerful, furious", "b": "[lonely]"}
    rate, per_wheel = reward.hit_rate(preds, gts, lex, per_wheel=True)
    assert per_wheel == [(1.0, 1), (0.5, 2), (1.0, 1), (0.0, 1), (0.5, 2)]
    assert rate == pytest.approx(0.6)


@pytest.mark.parametrize("n_pred, n_gt, kind, factor", [
    (3, 2, "none", 1.0),
    (3, 2, "p1", 1 / 2),
    (5, 2, "p1", 1 / 4),
    (3, 2, "p2", 2 / 3),
    (3, 2, "p3", math.log(2) / math.log(3)),
    (9, 3, "p3", 0.5),
    (2, 1, "p3", 1 / 2),   # n_g = 1: P3 falls back to P2 = 1/n_p
    (4, 1, "p3", 1 / 4),
    (2, 2, "p1", 1.0),     # only when the answer has MORE labels
    (1, 3, "p2", 1.0),
])
def test_length_penalty(n_pred, n_gt, kind, factor):
    assert reward.length_penalty(n_pred, n_gt, kind) == pytest.approx(factor)


def test_length_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="p4"):
        reward.length_penalty(3, 1, "p4")


@pytest.mark.parametrize("text, think, ok", [
    ("<think>a</think><answer>b</answer>", True, True),
    ("  <think>a\nb</think>\n<answer>b, c</answer>\n", True, True),
    ("<think></think><answer>b</answer>", True, False),          # empty reasoning
    ("<think>a</think><answer> </answer>", True, False),         # empty answer
    ("<answer>b</answer>", True, False),
    ("<answer>b</answer>", False, True),
    ("<think>a</think><answer>b</answer>", False, False),        # no-think mode wants the answer alone
    ("<think>a</think><answer>b</answer> and more", True, False),
    ("<think>a</think> so <answer>b</answer>", True, False),
    ("<think>a<think>b</think><answer>c</answer>", True, False),  # nested tag
    ("<think>a</think><answer>b</answer><answer>c</answer>", True, False),
    ("<think>a</think><answer>b", True, False),                  # truncated
])
def test_format(text, think, ok):
    assert reward.format_ok(text, think) is ok


@pytest.mark.parametrize("text, labels", [
    ("<think>x</think><answer>[glad, Anxious]</answer>", ["glad", "anxious"]),
    ("<answer> glad </answer>", ["glad"]),
    ("glad, anxious", []),                          # no tag -> no labels
    ("<answer>glad, anxious", []),                  # unclosed
    ("<answer>glad</answer><answer>sad</answer>", ["glad"]),  # the first answer counts
    ("<think><answer>glad</answer></think><answer>sad</answer>", ["sad"]),  # the one after </think>
    ("<think>x <answer>glad</answer>", []),         # the reasoning never ends: no answer
])
def test_extract_answer(text, labels):
    assert reward.extract_answer(text) == labels


# Tag tricks against the ground truth "glad" (toy lexicon): "glad" scores accuracy 1 and "furious" 0 (furious
# maps to anger in wheels 1, 3, 4 where glad is joy/joy/fear, and to nothing in wheels 2, 5). Scored answer:
# the first <answer> pair after the last </think>; an unclosed <think> leaves none. Format: the strict one.
HONEST = "<think>t</think><answer>glad</answer>"
TRICKS = [  # (completion, think mode, accuracy, format), derived by hand from the rules above
    (HONEST, True, 1.0, 1.0),
    ("\n<think>t</think>\n<answer> glad </answer>\n", True, 1.0, 1.0),            # white space around is fine
    ("<think>t</think><answer>furious</answer>", True, 0.0, 1.0),                  # honest and wrong
    ("<think><answer>glad</answer></think><answer>furious</answer>", True, 0.0, 0.0),  # answer inside think
    ("<think>t</think><answer>furious</answer><answer>glad</answer>", True, 0.0, 0.0),  # repeated: the first
    ("<think>t</think><answer>glad</answer><answer>furious</answer>", True, 1.0, 0.0),
    ("<think>t<think>u</think>v</think><answer>glad</answer>", True, 1.0, 0.0),     # nested think
    ("<think>t</think><answer>glad</answer> or furious", True, 1.0, 0.0),          # text after </answer>
    ("<think>t</think><answer>furious</answer> glad", True, 0.0, 0.0),
    ("<think>t <answer>glad</answer>", True, 0.0, 0.0),                            # missing </think>
    ("<think>t</think><answer>glad</answer><think>u", True, 0.0, 0.0),             # a think left open after
    ("<answer>glad</answer>", True, 1.0, 0.0),                                     # no reasoning at all
    ("</think><answer>glad</answer>", True, 1.0, 0.0),                             # a close without an open
    ("<THINK>t</THINK><ANSWER>glad</ANSWER>", True, 0.0, 0.0),                     # other case: no tags
    ("<think>t</think><Answer>glad</Answer>", True, 0.0, 0.0),
    ("<think>t</think><answer >glad</answer >", True, 0.0, 0.0),                   # spaces inside tags
    ("< think>t</think><answer>glad</answer>", True, 1.0, 0.0),                    # "< think>" is text
    ("<think>t</think><answer>furious</answer><think>u</think><answer>glad</answer>", True, 1.0, 0.0),
    ("<think>t</think><answer>glad</answer><think>u</think>", True, 0.0, 0.0),     # second think after
    ("<think>t</think><answer></answer>", True, 0.0, 0.0),                         # empty answer
    ("<think></think><answer>glad</answer>", True, 1.0, 0.0),                      # empty reasoning
    ("<think>t</think><answer>glad</think>furious</answer>", True, 0.0, 0.0),      # tag inside the answer
    ("<think>t</think><answer><answer>glad</answer></answer>", True, 0.0, 0.0),    # "<answer>glad" maps to nothing
    ("<think>t</think><answer>glad", True, 0.0, 0.0),                              # unclosed answer
    ("glad", True, 0.0, 0.0),                                                      # no tags at all
    ("<answer>glad</answer>", False, 1.0, 1.0),                                    # no-think mode
    ("<think><answer>glad</answer></think><answer>furious</answer>", False, 0.0, 0.0),
    ("<answer>furious</answer><answer>glad</answer>", False, 0.0, 0.0),
    ("<think>t</think><answer>glad</answer>", False, 1.0, 0.0),                    # think where none is asked
]


@pytest.mark.parametrize("text, think, accuracy, fmt", TRICKS)
def test_tag_tricks(lex, text, think, accuracy, fmt):
    r = reward.score_completion(text, "glad", lex, think=think)
    assert (r["accuracy"], r["format"]) == (accuracy, fmt)
    # whatever the weights, no trick beats the honest completion that names the right answer
    honest = HONEST if think else "<answer>glad</answer>"
    for w_format in (0.0, 0.5):
        trick = reward.score_completion(text, "glad", lex, think=think, w_format=w_format)["total"]
        assert trick <= reward.score_completion(honest, "glad", lex, think=think, w_format=w_format)["total"]


def test_spot_emotions(lex):
    text = "She looks GLAD, then uneasy; anxiety rises. She felt let down, glad again, tables."
    assert reward.spot_emotions(text, lex) == ["glad", "uneasy", "anxiety", "let down"]
    assert reward.spot_emotions("", lex) == []


def test_score_completion_components(lex):
    gt = "['glad', 'anxious']"
    r = reward.score_completion("<think>She looks glad.</think><answer>glad, furious</answer>", gt, lex)
    assert r["accuracy"] == pytest.approx(0.6)   # mean of per-wheel F: (.5 + 2/3 + .5 + 2/3 + 2/3) / 5
    assert (r["format"], r["length_penalty"], r["n_pred"], r["n_gt"]) == (1.0, 1.0, 2, 2)
    assert r["total"] == pytest.approx(0.6 + 0.5)
    # three labels against two: P2 = 2/3 multiplies accuracy, format still counts in full
    r = reward.score_completion("<think>t</think><answer>glad, furious, anxious</answer>", gt, lex, penalty="p2")
    assert r["length_penalty"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(64 / 75)  # per-wheel F (4/5, 1, 4/5, 2/3, 1): the penalty is not in it
    assert r["total"] == pytest.approx(64 / 75 * 2 / 3 + 0.5)
    # bad format, no answer tag: nothing
    r = reward.score_completion("glad, anxious", gt, lex)
    assert (r["accuracy"], r["format"], r["total"]) == (0.0, 0.0, 0.0)
    # a ground truth that maps to nothing gives no signal
    assert reward.score_completion("<think>t</think><answer>glad</answer>", "neutral", lex) is None


def test_alignment_and_dual(lex):
    text = "<think>She looks glad.</think><answer>glad, furious</answer>"
    r = reward.score_completion(text, "glad, anxious", lex, w_align=1.0, w_dual=1.0, w_format=0.0)
    assert r["think_emotions"] == ["glad"]
    # alignment: [glad] vs answer {glad, furious}: F = 2/3 in wheels 1, 3, 4 and 1 in wheels 2, 5
    assert r["alignment"] == pytest.approx(0.8)
    # dual: [glad] vs gt {glad, anxious}: wheels 1, 3: 2/3; 2, 5: 2/3; wheel 4 (both fear): 1
    assert r["dual"] == pytest.approx((4 * 2 / 3 + 1) / 5)
    assert r["total"] == pytest.approx(r["accuracy"] + r["alignment"] + r["dual"])
    no_think = reward.score_completion("<answer>glad</answer>", "glad", lex, think=False, w_align=1.0)
    assert no_think["alignment"] == 0.0 and no_think["format"] == 1.0


def test_cli_explains_every_step(capsys, lex, monkeypatch):
    monkeypatch.setattr(reward, "load_lexicon", lambda source: lex)
    reward.main(["<think>She seems uneasy.</think><answer>glad, xyz</answer>", "--gt", "['glad', 'anxious']",
                 "--penalty", "p1"])
    out = capsys.readouterr().out
    assert "'xyz': not a known word form -> dropped" in out
    assert "'glad': form of ['glad'] -> wheel words ['glad']" in out
    assert "wheel 4: 'glad' -> 'fear'" in out
    assert "emotions named in <think>: ['uneasy']" in out
    want = reward.score_completion("<think>She seems uneasy.</think><answer>glad, xyz</answer>",
                                   "['glad', 'anxious']", lex, penalty="p1")
    assert f"= {want['total']:.4f}" in out


def test_cli_reads_the_completion_from_a_file_or_stdin(capsys, lex, monkeypatch, tmp_path):
    import io
    monkeypatch.setattr(reward, "load_lexicon", lambda source: lex)
    text = "<think>She seems uneasy.\n" + "And more. " * 500 + "</think><answer>glad, xyz</answer>"
    reward.main([text, "--gt", "glad, anxious"])
    want = capsys.readouterr().out
    assert "answer: ['glad', 'xyz']" in want and "emotions named in <think>: ['uneasy']" in want
    (tmp_path / "c.txt").write_text(text)
    reward.main(["--file", str(tmp_path / "c.txt"), "--gt", "glad, anxious"])
    assert capsys.readouterr().out == want
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    reward.main(["-", "--gt", "glad, anxious"])
    assert capsys.readouterr().out == want
    # bytes that are not UTF-8: refused from stdin as from a file, whatever the locale decodes stdin with
    (tmp_path / "latin1.txt").write_bytes("<answer>gl\xe4d</answer>".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"--file .*latin1.txt: cannot read it as UTF-8"):
        reward.main(["--file", str(tmp_path / "latin1.txt"), "--gt", "glad"])
    for argv in (["-"], ["--file", "-"]):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("<answer>gl\xe4d</answer>".encode("latin-1")),
                                                          encoding="latin-1"))
        with pytest.raises(SystemExit, match=r"\(stdin\): not UTF-8 text"):
            reward.main(argv + ["--gt", "glad"])
    with pytest.raises(SystemExit, match="give the completion as an argument, or --file"):
        reward.main(["x", "--file", str(tmp_path / "c.txt"), "--gt", "glad"])
    with pytest.raises(SystemExit, match=r"--file .*nope.txt: cannot read it"):
        reward.main(["--file", str(tmp_path / "nope.txt"), "--gt", "glad"])


def test_bad_lexicon_is_one_message(tmp_path):
    pytest.importorskip("openpyxl")
    with pytest.raises(SystemExit, match=r"lexicon .*: missing wheel1.xlsx, .*format.csv"):
        reward.main(["<answer>glad</answer>", "--gt", "glad", "--lexicon", str(tmp_path)])
    for name in reward.OFFICIAL_FILES:
        (tmp_path / name).write_text("not a workbook")
    with pytest.raises(SystemExit, match=r"wheel1.xlsx: cannot read the workbook"):
        reward.main(["<answer>glad</answer>", "--gt", "glad", "--lexicon", str(tmp_path)])
