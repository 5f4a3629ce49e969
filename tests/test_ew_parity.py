"""Exact parity with the official OV-MER metric, on the cases its own code produced (../shared/ew_parity)."""

import math
import warnings

import pytest

import reward

TOL = 1e-12


def test_official_maps_have_the_official_sizes(official_lexicon):
    assert len(official_lexicon.wheel_words) == 253
    assert len(official_lexicon.synonyms) == 1255
    assert len(official_lexicon.forms) == 7386


def test_known_odd_mappings_of_the_official_code(official_lexicon):
    lex = official_lexicon
    # fear reaches "fearless" first in wheels 2-5 (ovmer.md section 4)
    assert [reward.map_label("fear", lex, k) for k in (2, 3, 4, 5)] == ["happy", "joyful", "genius", "joyful"]
    assert reward.map_label("surprise", lex, 5) is None
    assert all(reward.map_label("neutral", lex, k, level) is None for k in range(1, 6) for level in (1, 2))


def test_parsing_matches_the_official_lists(parity_cases):
    for case in parity_cases["samples"]:
        assert reward.parse_labels(case["gt"]) == case["gt_list"], case["id"]
        assert reward.parse_labels(case["pred"]) == case["pred_list"], case["id"]


@pytest.mark.parametrize("level", [1, 2])
def test_per_sample_sets_and_scores(parity_cases, official_lexicon, level):
    checked = 0
    for case in parity_cases["samples"]:
        gt_sets = reward.mapped_sets(reward.parse_labels(case["gt"]), official_lexicon, level)
        pred_sets = reward.mapped_sets(reward.parse_labels(case["pred"]), official_lexicon, level)
        scores = reward.sample_scores(case["pred"], case["gt"], official_lexicon, level)
        for k in range(5):
            want = case["results"][f"level{level}"][f"wheel{k + 1}"]
            where = f"{case['id']} level {level} wheel {k + 1}"
            assert sorted(gt_sets[k]) == want["gt_set"], where
            assert sorted(pred_sets[k]) == want["pred_set"], where
            if want["skipped"]:
                assert scores[k] is None, where
            else:
                assert scores[k] == pytest.approx((want["precision"], want["recall"]), abs=TOL), where
            checked += 1
    assert checked == 5 * len(parity_cases["samples"]) == 750


def _expected(value):
    return None if value == "NaN" else value


def test_dataset_level_results(parity_cases, official_lexicon):
    for case in parity_cases["datasets"]:
        gts = {name: case["gt"][name] for name in case["names"]}
        level = int(case["level"][-1])
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = reward.ew_metric(case["pred"], gts, official_lexicon, level)
        want = case["expected"]
        assert [w["n"] for w in got["per_wheel"]] == want["per_wheel_sample_count"], case["id"]
        for k, (f, p, r) in enumerate(want["per_wheel"]):
            w = got["per_wheel"][k]
            if w["n"] == 0:  # our definition: an empty wheel has no scores (official: NaN)
                assert (w["fscore"], w["precision"], w["recall"]) == (None, None, None)
                continue
            assert w["precision"] == pytest.approx(p, abs=TOL) and w["recall"] == pytest.approx(r, abs=TOL)
            # our definition: F = 0 when P + R = 0 (official: NaN)
            assert w["fscore"] == pytest.approx(0.0 if f == "NaN" else f, abs=TOL), case["id"]
        if not case.get("degenerate"):
            for key in ("fscore", "precision", "recall"):
                assert got[key] == pytest.approx(want[key], abs=TOL), (case["id"], key)


def test_degenerate_definitions(parity_cases, official_lexicon):
    cases = {c["id"]: c for c in parity_cases["datasets"]}
    pr0 = cases["pub_degenerate_PR0"]
    got = reward.ew_metric(pr0["pred"], pr0["gt"], official_lexicon)
    # wheel 1 scores 1, wheels 2-5 have P = R = 0 -> F = 0 each, so the mean F is 1/5 instead of NaN
    assert got["fscore"] == pytest.approx(0.2, abs=TOL)
    assert got["precision"] == pytest.approx(pr0["expected"]["precision"], abs=TOL)
    empty = cases["pub_degenerate_all_skipped"]
    with pytest.warns(UserWarning, match="undefined"):
        got = reward.ew_metric(empty["pred"], empty["gt"], official_lexicon)
    assert (got["fscore"], got["precision"], got["recall"]) == (None, None, None)
    assert [w["n"] for w in got["per_wheel"]] == [0] * 5


def test_error_cases_follow_our_definitions(parity_cases, official_lexicon):
    assert reward.parse_labels("[") == []  # a lone "[" parses to no labels instead of IndexError
    for case in parity_cases["error_samples"]:
        scores = reward.sample_scores(case["pred"], case["gt"], official_lexicon)
        if case["gt"] == "[":
            assert scores == [None] * 5
        else:  # a real ground truth against an empty prediction: P = R = 0 in every wheel it maps to
            assert any(s is not None for s in scores) and all(s == (0.0, 0.0) for s in scores if s is not None)
    errors = {c["id"]: c for c in parity_cases["error_datasets"]}
    missing = errors["pub_err_missing_pred"]
    with pytest.raises(KeyError, match="'b'"):
        reward.ew_metric(missing["pred"], missing["gt"], official_lexicon)
    bracket = errors["pub_err_bracket_pred"]
    got = reward.ew_metric(bracket["pred"], bracket["gt"], official_lexicon)
    assert got["fscore"] == pytest.approx(1.0) and [w["n"] for w in got["per_wheel"]] == [1] * 5


def test_hit_rate(parity_cases, official_lexicon):
    case = parity_cases["hitrate"][0]
    gts = {name: case["gt"][name] for name in case["names"]}
    rate, per_wheel = reward.hit_rate(case["pred"], gts, official_lexicon, per_wheel=True)
    assert rate == pytest.approx(case["expected"]["hitrate"], abs=TOL)
    assert [n for _, n in per_wheel] == case["expected"]["per_wheel_sample_count"]
    for (got, _), want in zip(per_wheel, case["expected"]["per_wheel"]):
        assert got == pytest.approx(want[0], abs=TOL)
    assert not math.isnan(rate)
