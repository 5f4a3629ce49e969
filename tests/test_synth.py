"""synth.py: the synthetic OV-MER benchmark (reproducible, its splits, annotators and test_shift) and the
command line."""

import hashlib
import json

import numpy as np
import pytest

import data
import reward
import synth


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.synthesize(str(out), n_train=30, n_test=10, seed=3, progress=False)
    return out


def test_synthetic_set_decodes_and_maps(small):
    lex = reward.load_lexicon("builtin")
    meta = json.loads((small / "synth.json").read_text())
    train, test = data.read_split(str(small), "train", need_reasons=True), data.read_split(str(small), "test")
    assert len(train) == 30 and len(test) == 10
    ds = data.ClipDataset(str(small), train + test, 8, 32, 2, 1.0)
    with_video = next(i for i, c in enumerate(ds.clips) if meta["clips"][c.name]["video"])
    item = ds[with_video]
    assert item["frames"].shape == (8, 32, 32, 3) and item["audio"].shape == (2, 16000)
    assert item["frames"].float().std() > 20  # a coloured disc on grey, not a blank frame
    for clip in test:  # clean test labels name exactly the hidden sectors (wheel 1)
        sectors = {reward.map_label(w, lex, 1) for w in reward.parse_labels(clip.labels)}
        assert sectors == set(meta["clips"][clip.name]["sectors"]), clip.name
        assert all(reward.map_label(w, lex, k) for w in reward.parse_labels(clip.labels) for k in range(1, 6))
    assert all(c.reason and c.subtitle for c in train)


def test_synthetic_set_is_reproducible(small, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(str(again), n_train=30, n_test=10, seed=3, progress=False)
    other = tmp_path / "other"
    synth.synthesize(str(other), n_train=30, n_test=10, seed=4, progress=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for rel in ("train.csv", "test.csv", "reasons.csv", "video/synth_00007.mp4", "audio/synth_00007.wav"):
        assert digest(small / rel) == digest(again / rel), rel
    assert digest(small / "train.csv") != digest(other / "train.csv")


# The CSVs that `synthesize` wrote before annotators and test_shift existed (commit 33a2a3a, seed 3, 30 train,
# 10 rl, 4 val, 10 test clips): rl_labels="clean" without test_shift must still write exactly these.
FIRST_RELEASE = {
    "train.csv": "516fc7c97277d649b2b328510981cba426f8675907ad396d0d4cabdca52cc54a",
    "rl.csv": "3fd8253035f693d4ef8b8424706005eb8e49e4f0b9599db6bbe28269dcffd214",
    "val.csv": "25b663257b394fc9693f9034a1fea68ae0cfa0129262dbe6e304e794aedb50ce",
    "test.csv": "3445a442584a8c885c2fcda5c54d0371f6f83191c5a87ca1bcf8f532603415bb",
    "reasons.csv": "63bdf9dbdd585bd80cb89ffcb79ace54d5c296293d87bd8e2c05859216c67c64",
    "subtitles.csv": "00239b346cfe4bdd685a4a5957537b0177d12ab2f1d5b9c940545989c4e64d46",
}


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """The same clips with clean rl labels (the first release's benchmark) and with annotators + test_shift."""
    clean, new = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("annotated")
    sizes = dict(n_train=30, n_test=10, seed=3, progress=False, n_rl=10, n_val=4)
    synth.synthesize(str(clean), rl_labels="clean", **sizes)
    synth.synthesize(str(new), n_test_shift=12, **sizes)
    return clean, new


def test_clean_rl_option_writes_the_first_release(benchmarks):
    clean, _ = benchmarks
    for name, want in FIRST_RELEASE.items():
        assert hashlib.sha256((clean / name).read_bytes()).hexdigest() == want, name
    assert not (clean / "rl_oracle.csv").exists() and not (clean / "test_shift.csv").exists()


def test_annotated_rl_split_has_no_descriptions_and_keeps_the_consensus_for_the_oracle(tmp_path):
    sizes = dict(n_train=4, n_test=2, seed=5, progress=False, n_rl=12)
    synth.synthesize(str(tmp_path / "clean"), rl_labels="clean", **sizes)
    synth.synthesize(str(tmp_path / "ann"), **sizes)
    clean_rl = data.read_split(str(tmp_path / "clean"), "rl", need_reasons=True)
    ann_rl = data.read_split(str(tmp_path / "ann"), "rl")
    oracle = data.read_split(str(tmp_path / "ann"), "rl", labels_csv=str(tmp_path / "ann" / "rl_oracle.csv"),
                             need_reasons=True)
    assert all(c.reason is None for c in ann_rl)  # no descriptions for GRPO's split
    with pytest.raises(data.DataError, match="think mode needs a reason"):
        data.read_split(str(tmp_path / "ann"), "rl", need_reasons=True)
    # the annotators get a stream of their own: same clips, and the oracle holds the clean split exactly
    assert [(c.name, c.labels, c.reason, c.subtitle) for c in oracle] == \
        [(c.name, c.labels, c.reason, c.subtitle) for c in clean_rl]
    assert [c.labels for c in ann_rl] != [c.labels for c in clean_rl]
    for rel in ("train.csv", "test.csv", "video/synth_00007.mp4", "audio/synth_00009.wav"):
        assert (tmp_path / "clean" / rel).read_bytes() == (tmp_path / "ann" / rel).read_bytes(), rel


@pytest.mark.parametrize("omit, synonym, spurious", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)])
def test_annotators_follow_their_rates(omit, synonym, spurious):
    lex = reward.load_lexicon("builtin")
    pools = synth.synth_sectors(lex)
    ann = synth.Annotators(n=3, omit=omit, synonym=synonym, spurious=spurious)
    profiles = synth.annotator_profiles(ann, pools, seed=0)
    # annotators differ in vocabulary (half of each pool) and in completeness (0.5x .. 1.5x the mean rate)
    assert profiles[0][0] != profiles[1][0] and all(len(v["sad"]) == len(pools["sad"]) // 2 for v, _ in profiles)
    assert [r for _, r in profiles] == pytest.approx([min(1, omit * k) for k in (0.5, 1.0, 1.5)])
    rng = np.random.default_rng(0)
    outside = 0
    for i in range(300):
        carried = ["joyful", "sad", "scared"][: 1 + i % 3]
        vocab, _ = profiles[i % 3]
        labels = synth.annotate(rng, pools, carried, profiles[i % 3], ann)
        sectors = {reward.map_label(w, lex, 1) for w in labels}
        if omit == 0 and spurious == 0:  # complete and faithful: exactly the carried sectors
            assert sectors == set(carried)
        if omit == 1:  # annotators at rate 1 leave out all but one emotion (never all); the one at 0.5 fewer
            assert sectors <= set(carried) and (len(sectors) == 1 if i % 3 else len(sectors) >= 1)
        if spurious == 1:  # always one emotion the clip does not carry
            assert len(sectors - set(carried)) == 1
        if synonym == 0:  # their own words only
            assert all(w in vocab[s] for w in labels for s in carried if w in pools[s])
        outside += sum(not any(w in vocab[s] for s in carried) for w in labels if sectors)
    assert (outside > 100) == (synonym == 1)


def test_test_shift_holds_out_pairs_lone_modalities_and_words(benchmarks):
    _, new = benchmarks
    meta = json.loads((new / "synth.json").read_text())
    sectors = list(meta["sectors"])
    pairs = [set(p) for p in meta["shift"]["pairs"]]
    solo = {sectors.index(s): ("video", "audio").index(m) for s, m in meta["shift"]["solo"].items()}
    held = {w for ws in meta["shift"]["held_out_words"].values() for w in ws}
    shifted = data.read_split(str(new), "test_shift")
    assert len(shifted) == 12
    for split in ("train", "rl", "val", "test"):
        for clip in data.read_split(str(new), split):
            c = meta["clips"][clip.name]
            assert not any(p <= set(c["sectors"]) for p in pairs), clip.name
            for s in (sectors.index(x) for x in c["sectors"]):  # never shown alone in its held-out modality
                shown = [s in c["video"], s in c["audio"], s in c["text"]]
                assert not (sum(shown) == 1 and shown[solo[s]]), clip.name
            assert not held & set(reward.parse_labels(clip.labels)), clip.name
            assert not any(w in clip.subtitle for w in held), clip.name
    lex = reward.load_lexicon("builtin")
    for clip in shifted:
        c = meta["clips"][clip.name]
        pair = next(p for p in pairs if p <= set(c["sectors"]))
        for s in pair:  # the pair's sectors shown alone, each in its held-out modality
            i = sectors.index(s)
            assert [i in c["video"], i in c["audio"], i in c["text"]] == [solo[i] == 0, solo[i] == 1, False]
        labels = reward.parse_labels(clip.labels)
        assert set(labels) <= held and {reward.map_label(w, lex, 1) for w in labels} == set(c["sectors"])




# ---- the command line --------------------------------------------------------------------------------------

def cli_args(out, **kw):
    sizes = dict(n_train=2, n_rl=0, n_val=0, n_test=1, n_test_shift=0)
    return synth.Args(out=str(out), **{**sizes, **kw})


def test_cli_refuses_to_replace_other_files_and_leaves_no_partial_benchmark(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    synth.main(cli_args(out))
    first = (out / "train.csv").read_bytes()
    with pytest.raises(SystemExit, match="holds a benchmark already: pass --overwrite"):
        synth.main(cli_args(out, seed=1))
    synth.main(cli_args(out, seed=1, overwrite=True))
    assert (out / "train.csv").read_bytes() != first and not (tmp_path / "bench.partial").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds files but no synthetic benchmark"):
        synth.main(cli_args(tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    def interrupted(*args, **kwargs):  # Ctrl-C halfway: the earlier benchmark stays, nothing half-written
        (tmp_path / "bench.partial" / "train.csv").write_text("name,openset\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.main(cli_args(out, seed=2, overwrite=True))
    assert not (tmp_path / "bench.partial").exists() and (out / "train.csv").read_bytes() != first
    assert (out / "synth.json").is_file()


@pytest.mark.parametrize("flags, message", [(["--n-train", "-1"], "must be >= 0"),
                                            (["--omit-rate", "2"], "rates must lie in"),
                                            (["--rl_labels", "noisy"], "--rl_labels 'noisy': choose")])
def test_cli_refuses_bad_flags(flags, message, tmp_path):
    import common
    with pytest.raises(SystemExit, match=message):
        synth.main(common.parse_args(synth.Args, ["--out", str(tmp_path / "o"), *flags]))
    assert not (tmp_path / "o").exists()
