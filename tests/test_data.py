"""data.py: readers, media decoding, prompts, batches and the tokenizer corpus."""

import av
import numpy as np
import pytest
import soundfile
import torch

import data
import model as M
import synth


@pytest.fixture(scope="module")
def tokenizer():
    return M.prepare_tokenizer(M.build_tokenizer(data.tokenizer_corpus(), vocab_size=1024))


def write_video(path, values, size=(48, 64)):
    """Grey frames whose brightness is values[i]."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=8)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "0"}
    for v in values:
        frame = av.VideoFrame.from_ndarray(np.full((*size, 3), v, np.uint8), format="rgb24")
        for p in stream.encode(frame):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
    container.close()


@pytest.mark.parametrize("total, n, want", [
    (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
    (5, 3, [0, 2, 4]),
    (3, 5, [0, 1, 2, 2, 2]),  # short clip: the last frame repeats
    (1, 3, [0, 0, 0]),
])
def test_frame_indices(total, n, want):
    assert data.frame_indices(total, n) == want


def test_load_video_samples_and_resizes(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, [20 * i for i in range(5)])
    frames = data.load_video(str(path), 3, 32)
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == torch.uint8
    assert frames.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([0, 40, 80], abs=3)
    frames = data.load_video(str(path), 8, 16)  # fewer frames than asked: the last one repeats
    assert frames.float().mean(dim=(1, 2, 3))[-4:].tolist() == pytest.approx([80] * 4, abs=3)


def test_resize_frames_centre_crops_the_longer_side():
    img = np.zeros((1, 20, 40, 3), np.uint8)
    img[:, :, 10:30] = 200  # the centre 20 columns are bright, the sides dark
    out = data.resize_frames(img, 10)
    assert out.shape == (1, 10, 10, 3)
    assert out.float().mean() > 190


def test_load_audio_mono_resampled_padded(tmp_path):
    path = tmp_path / "a.wav"
    stereo = np.stack([np.full(22050, 0.5), np.full(22050, 0.1)], axis=1)  # 0.5 s at 44.1 kHz
    soundfile.write(path, stereo, 44100)
    clips = data.load_audio(str(path), n_clips=2, clip_seconds=1.0)
    assert clips.shape == (2, 16000)
    assert torch.equal(clips[0], clips[1])  # shorter than one clip: both windows hold the padded audio
    assert clips[0, 1000:7000].mean().item() == pytest.approx(0.3, abs=0.01)  # mono = mean of channels
    assert clips[0, 8100:].abs().max().item() == 0.0  # zero padding after 0.5 s


def test_audio_windows_spread_over_the_clip(tmp_path):
    path = tmp_path / "ramp.wav"
    soundfile.write(path, np.repeat(np.arange(3) * 0.25, 16000).astype(np.float32), 16000)
    clips = data.load_audio(str(path), n_clips=3, clip_seconds=1.0)
    assert clips.mean(1).tolist() == pytest.approx([0.0, 0.25, 0.5], abs=1e-4)


def test_missing_and_corrupt_media_are_named(tmp_path):
    (tmp_path / "video").mkdir()
    (tmp_path / "audio").mkdir()
    write_video(tmp_path / "video" / "good.mp4", [100] * 4)
    soundfile.write(tmp_path / "audio" / "good.wav", np.zeros(8000), 16000)
    (tmp_path / "video" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    soundfile.write(tmp_path / "audio" / "corrupt.wav", np.zeros(8000), 16000)
    write_video(tmp_path / "video" / "nowav.mp4", [100] * 4)
    clips = [data.Clip(n, "['happy']") for n in ("good", "corrupt", "nowav")]
    args = (8, 32, 2, 1.0)
    with pytest.raises(data.DataError, match=r"clip nowav: missing .*audio/nowav.wav"):
        data.ClipDataset(str(tmp_path), clips, *args)
    ds = data.ClipDataset(str(tmp_path), clips, *args, skip_bad=True)
    assert [c.name for c in ds.clips] == ["good", "corrupt"] and list(ds.skipped) == ["nowav"]
    with pytest.raises(data.DataError, match=r"clip corrupt: .*corrupt.mp4: cannot decode video"):
        ds[1]
    encode = lambda f, a: {"video": f.float().mean((2, 3)), "audio": a.mean(-1, keepdim=True)}  # noqa: E731
    with pytest.raises(data.DataError, match="corrupt.mp4"):
        data.encode_clips(ds, encode, progress=False)
    feats = data.encode_clips(ds, encode, skip_bad=True, progress=False)
    assert list(feats) == ["good"] and set(ds.skipped) == {"nowav", "corrupt"}


def test_csv_errors_name_file_and_columns(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("name,labels\na,happy\n")
    with pytest.raises(data.DataError, match=r"train.csv: needs column 'openset'"):
        data.read_split(str(tmp_path), "train")
    bad.write_text("name,openset\na,happy,extra\n")
    with pytest.raises(data.DataError, match=r"train.csv, line 2: expected 2 fields, got 3"):
        data.read_split(str(tmp_path), "train")
    bad.write_text("name,openset\na,happy\n")
    (tmp_path / "subtitle_chieng.csv").write_text("name,chinese,english\na,你好,hello there\n")
    with pytest.raises(data.DataError, match="think mode needs a reason"):
        data.read_split(str(tmp_path), "train", need_reasons=True)
    assert data.read_split(str(tmp_path), "train")[0].subtitle == "hello there"


def test_a_lost_subtitle_file_is_refused_not_trained_around(tmp_path):
    """Labels without a subtitle file are a missing download or a typo: every stage refuses them (read_split is
    their one reader), naming what it looked for, unless told --without_subtitles; `data.py check` agrees."""
    (tmp_path / "train.csv").write_text("name,openset\na,['happy']\nb,['sad']\n")
    ov = tmp_path / "ub" / "ovmerdplus-process"  # a MER-UniBench dataset: the same rule
    ov.mkdir(parents=True)
    (ov / "track2_test.csv").write_text("name,openset\no1,['happy']\n")
    for folder, call in ((tmp_path, lambda: data.read_split(str(tmp_path), "train")),
                         (ov, lambda: data.read_unibench(str(tmp_path / "ub")))):
        with pytest.raises(data.DataError, match=rf"{folder}: no subtitle file \(looked for subtitles.csv, .*\): "
                                                 r"a missing download or a misnamed file\? .*--without_subtitles"):
            call()
    assert data.read_unibench(str(tmp_path / "ub"), subtitles=False)["ovmerdplus"][2][0].subtitle == ""
    (tmp_path / "subtitels.csv").write_text("name,english\na,hello\n")  # a typo in the name
    with pytest.raises(data.DataError, match=r"subtitels.csv has a subtitle column: rename it to subtitles.csv"):
        data.read_split(str(tmp_path), "train")
    assert [c.subtitle for c in data.read_split(str(tmp_path), "train", subtitles=False)] == ["", ""]
    problems, notes = data.check_dataset(str(tmp_path), progress=False)
    assert any("no subtitle file" in p and "subtitels.csv has a subtitle column" in p for p in problems), problems
    problems, notes = data.check_dataset(str(tmp_path), progress=False, subtitles=False)
    assert not any("no subtitle file" in p for p in problems) and any("no subtitle file" in n for n in notes)
    (tmp_path / "subtitels.csv").rename(tmp_path / "subtitles.csv")  # found: a clip it lacks is counted
    clips = data.read_split(str(tmp_path), "train")
    assert [c.subtitle for c in clips] == ["hello", ""]
    assert data.subtitle_count(clips) == "1 of 2 clips with subtitle text"


def test_use_faces_needs_the_face_folder(tmp_path):
    with pytest.raises(data.DataError, match=rf"{tmp_path}: --use_faces, but there is no openface_face/ folder"):
        data.ClipDataset(str(tmp_path), [data.Clip("a", "['happy']")], 8, 32, 2, 1.0, use_faces=True)


@pytest.mark.parametrize("raw, message", [
    # an unbalanced quote: the quote opened on line 2 closes on line 3 and swallows row b
    (b"name,openset\na,\"['happy']\nb,\"['sad']\"\n", r"bad.csv, line 2: .* runs over lines 2-3: an unbalanced quote"),
    (b"name,openset\na,\"happy\nb,sad\n", r"bad.csv, line 2: unexpected end of data .*lines 2-3"),  # never closed
    (b"name,openset\na,\"happy\nb,sad\"\n", r"bad.csv, line 2: field 'openset' holds a line break"),  # legal CSV
    (b"name,openset\n\"a\nb\",sad\n", r"bad.csv, line 2: field 'name' holds a line break"),
    (b"name,openset\na,happy\nb,caf\xe9\n", r"bad.csv, line 3: not UTF-8 text"),                   # Latin-1
    (b"\xff\xfen\x00a\x00m\x00e\x00", r"bad.csv, line 1: not UTF-8 text"),                          # UTF-16
])
def test_csv_read_strictly(tmp_path, raw, message):
    (tmp_path / "bad.csv").write_bytes(raw)
    with pytest.raises(data.DataError, match=message):
        data.read_column(str(tmp_path / "bad.csv"), "openset")


def test_free_text_may_span_lines(tmp_path):
    (tmp_path / "reasons.csv").write_text('name,reason\na,"She smiles,\nthen frowns."\nb,"Calm, ""flat"" voice."\n')
    assert data.read_column(str(tmp_path / "reasons.csv"), "reason", free_text=True) == {
        "a": "She smiles,\nthen frowns.", "b": 'Calm, "flat" voice.'}


class _Trap:
    """Unpickling this creates a file: proof that a reader unpickled something it should not have."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_npz_readers_check_the_file(tmp_path):
    import pickle
    fake = tmp_path / "labels.npz"
    fake.write_text("name,openset\na,happy\n")
    with pytest.raises(data.DataError, match=r"labels.npz: not a .npz file"):
        data.read_label_file(str(fake))
    trap = tmp_path / "unpickled"
    fake.write_bytes(pickle.dumps(_Trap(str(trap))))
    with pytest.raises(data.DataError, match=r"labels.npz: not a .npz file"):
        data.read_unibench_labels(str(fake))
    assert not trap.exists()
    fake.write_bytes(b"PK\x03\x04 a damaged zip")
    with pytest.raises(data.DataError, match=r"labels.npz: cannot read the .npz file"):
        data.read_label_file(str(fake))


def test_prompt_and_masked_targets(tokenizer):
    prompt = data.build_prompt(tokenizer, "I am so happy.", think=True)
    assert prompt.count("<|fused|><|audio|><|video|>") == 1 and "I am so happy." in prompt
    assert data.build_prompt(tokenizer, "x", n_tokens=2).count("<|fused|><|fused|><|audio|><|audio|>") == 1
    clip = data.Clip("a", "['happy', 'excited']", "I am so happy.", "The voice is high.")
    ex = data.tokenize_example(tokenizer, clip, think=True, n_tokens=1)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(ex["input_ids"][n_prompt:]) == \
        "<think>The voice is high.</think><answer>happy, excited</answer><|im_end|>"
    no_think = data.tokenize_example(tokenizer, clip, think=False, n_tokens=1)
    assert tokenizer.decode([t for t in no_think["labels"] if t != -100]) == \
        "<answer>happy, excited</answer><|im_end|>"
    batch = data.collate_train([ex, no_think], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(no_think["input_ids"])
    assert (batch["labels"][1, len(no_think["input_ids"]):] == -100).all()
    prompts = data.collate_prompts(tokenizer, ["a", "a much longer subtitle here"], True, 1)
    assert prompts["attention_mask"][0, 0] == 0 and prompts["attention_mask"][:, -1].all()  # left padding
    # max_length cuts the target only; a prompt that leaves no room for a target is an error naming the clip
    cut = data.tokenize_example(tokenizer, clip, think=True, n_tokens=1, max_length=n_prompt + 3)
    assert cut["input_ids"] == ex["input_ids"][:n_prompt + 3] and cut["labels"][:n_prompt] == [-100] * n_prompt
    with pytest.raises(data.DataError, match=r"clip a: its prompt has \d+ tokens"):
        data.tokenize_example(tokenizer, clip, think=True, n_tokens=1, max_length=n_prompt)



def test_tokenizer_corpus_takes_the_datasets_text():
    """A random-init LLM's tokenizer learns the words of the data it trains on, whatever the dataset; the same
    texts and seed give the same tokenizer."""
    clips = [data.Clip(f"c{i}", "['zorbulent', 'happy']", "Quixlo is here.", "The face shows teal (zorbulent).")
             for i in range(200)]
    texts = data.clip_texts(clips[:1])
    assert texts == ["zorbulent, happy", "Quixlo is here.", "The face shows teal (zorbulent)."]
    assert data.clip_texts([data.Clip("d", "[]", " ", None)]) == []  # nothing empty
    fitted = M.build_tokenizer(data.tokenizer_corpus(data.clip_texts(clips)), 1024, seed=0)
    fixed = M.build_tokenizer(data.tokenizer_corpus(), 1024, seed=0)
    for word in ("zorbulent", "Quixlo"):
        assert len(fitted(word)["input_ids"]) == 1 < len(fixed(word)["input_ids"]), word
    assert fitted.get_vocab() == M.build_tokenizer(data.tokenizer_corpus(data.clip_texts(clips)), 1024,
                                                   seed=0).get_vocab()
    # build_model trains the tiny preset's tokenizer on the texts it is given
    model = M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu", tokenizer_texts=data.clip_texts(clips))
    assert len(model.tokenizer("zorbulent")["input_ids"]) == 1
    assert model.llm.get_input_embeddings().weight.shape[0] == len(model.tokenizer)

# ---- the feature cache (common.cached_features): keyed on everything the features depend on -------------------

@pytest.fixture(scope="module")
def tiny_model():
    return M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu").eval()


def cache_run(model, root, cache, skip_bad=False):
    """(features from the cache, the dataset after it) for the train split of root."""
    import common
    ds = data.ClipDataset(str(root), data.read_split(str(root), "train"), 8, model.image_size, 2, 1.0)
    feats = common.cached_features(model, ds, str(cache), common.Dist(), skip_bad=skip_bad, progress=False)
    return feats, ds


def direct(model, root, names):
    """Features encoded now, without any cache: the reference."""
    clips = [c for c in data.read_split(str(root), "train") if c.name in names]
    return data.encode_clips(data.ClipDataset(str(root), clips, 8, model.image_size, 2, 1.0), model.encode_media,
                             progress=False)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in ("video", "audio"))


def test_feature_cache_sees_regenerated_data(tiny_model, tmp_path):
    root = tmp_path / "synth"
    synth.synthesize(str(root), n_train=6, n_test=1, seed=0, progress=False)
    old, _ = cache_run(tiny_model, root, tmp_path / "cache")
    synth.synthesize(str(root), n_train=6, n_test=1, seed=1, progress=False)  # same folder, same clip names
    new, _ = cache_run(tiny_model, root, tmp_path / "cache")
    assert same(new, direct(tiny_model, root, set(new)))
    assert not same(new, old)  # the data did change: the check above is not vacuous


def test_feature_cache_sees_other_encoder_weights(tiny_model, tmp_path):
    root = tmp_path / "synth"
    synth.synthesize(str(root), n_train=4, n_test=1, seed=0, progress=False)
    model = M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu").eval()
    old, _ = cache_run(model, root, tmp_path / "cache")
    with torch.no_grad():  # the same config and names, other weights (e.g. a local encoder folder retrained)
        model.vision.vision_model.embeddings.patch_embedding.weight.mul_(1.5)
        model.audio.encoder.layers[0].attention.q_proj.weight.add_(0.1)
    new, _ = cache_run(model, root, tmp_path / "cache")
    assert same(new, direct(model, root, set(new))) and not same(new, old)


def test_skipping_bad_clips_is_decided_by_each_run(tiny_model, tmp_path):
    root = tmp_path / "synth"
    synth.synthesize(str(root), n_train=5, n_test=1, seed=0, progress=False)
    bad = data.read_split(str(root), "train")[2].name
    video = root / "video" / f"{bad}.mp4"
    good_bytes = video.read_bytes()
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    feats, ds = cache_run(tiny_model, root, tmp_path / "cache", skip_bad=True)
    assert bad not in feats and bad in ds.skipped and len(feats) == 4
    # without --skip_bad_clips the same clip fails, as it does without a cache
    with pytest.raises(data.DataError, match=f"clip {bad}: .*{bad}.mp4: cannot decode video"):
        cache_run(tiny_model, root, tmp_path / "cache")
    video.write_bytes(good_bytes)  # repaired: encoded again, by a run with or without the flag
    for skip in (True, False):
        feats, ds = cache_run(tiny_model, root, tmp_path / "cache", skip_bad=skip)
        assert bad in feats and not ds.skipped and same(feats, direct(tiny_model, root, set(feats)))


def test_two_runs_writing_the_same_cache_file_at_once(tiny_model, tmp_path, monkeypatch):
    """Two runs that share a feature cache (reproduce.sh's parallel evaluations) may both find a file missing and
    write it. With one temporary name for both, the second run's rename found the temporary gone (the first had
    renamed it) and ended with 'cannot write'; each process now writes its own temporary. The interleaving is
    made here: the other run writes and renames while this one is between its write and its rename."""
    import common
    root = tmp_path / "synth"
    synth.synthesize(str(root), n_train=3, n_test=1, seed=0, progress=False)
    real_save, other = common.save_file, []

    def save_while_another_run_writes(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        if not other:  # the other run (another pid) does all of its work now
            other.append(1)
            with monkeypatch.context() as m:
                m.setattr(common.os, "getpid", lambda: 4_000_000)
                other.append(cache_run(tiny_model, root, tmp_path / "cache")[0])

    monkeypatch.setattr(common, "save_file", save_while_another_run_writes)
    feats, _ = cache_run(tiny_model, root, tmp_path / "cache")
    assert same(feats, other[1]) and same(feats, direct(tiny_model, root, set(feats)))
    files = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(files) == 1 and files[0].startswith("features_") and files[0].endswith("_0of1.safetensors"), files


def test_a_signal_stops_feature_encoding(tiny_model, tmp_path, monkeypatch):
    """The signal handler only sets a flag (a KeyboardInterrupt raised inside a decoder's destructor is lost);
    encoding checks it between clips and exits with 128 + the signal, caching nothing."""
    import os
    import signal
    import common
    root = tmp_path / "synth"
    synth.synthesize(str(root), n_train=6, n_test=1, seed=0, progress=False)
    calls, encode = [], tiny_model.encode_media

    def encode_then_signal(frames, audio):
        calls.append(len(frames))
        if len(calls) == 1:  # Ctrl-C while the first batch is being encoded
            os.kill(os.getpid(), signal.SIGINT)
        return encode(frames, audio)

    monkeypatch.setattr(tiny_model, "encode_media", encode_then_signal)

    ds = data.ClipDataset(str(root), data.read_split(str(root), "train"), 8, tiny_model.image_size, 2, 1.0)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = common.StopFlag()
        with pytest.raises(SystemExit) as e:
            common.cached_features(tiny_model, ds, str(tmp_path / "cache"), common.Dist(), batch_size=2,
                                   progress=False, stop=stop)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert e.value.code == 128 + signal.SIGINT and calls == [2]  # stopped after the first batch of 6 clips
    assert not list((tmp_path / "cache").glob("features_*"))


def test_every_bad_clip_is_listed(tmp_path):
    (tmp_path / "video").mkdir()
    (tmp_path / "audio").mkdir()
    for name in ("good", "bad1", "bad2"):
        write_video(tmp_path / "video" / f"{name}.mp4", [100] * 4)
        soundfile.write(tmp_path / "audio" / f"{name}.wav", np.zeros(8000), 16000)
    clips = [data.Clip(n, "['happy']") for n in ("bad1", "good", "bad2")]
    args = (8, 32, 2, 1.0)
    (tmp_path / "audio" / "bad1.wav").unlink()
    (tmp_path / "video" / "bad2.mp4").unlink()
    with pytest.raises(data.DataError, match=r"^2 of 3 clips have bad media:\n  clip bad1: missing .*bad1.wav\n"
                                             r"  clip bad2: missing .*bad2.mp4\n"):
        data.ClipDataset(str(tmp_path), clips, *args)
    soundfile.write(tmp_path / "audio" / "bad1.wav", np.zeros(8000), 16000)
    write_video(tmp_path / "video" / "bad2.mp4", [100] * 4)
    for name in ("bad1", "bad2"):  # now they exist, but cannot be decoded
        (tmp_path / "video" / f"{name}.mp4").write_bytes(b"not a video")
    ds = data.ClipDataset(str(tmp_path), clips, *args)
    calls = []
    encode = lambda f, a: calls.append(len(f)) or {"video": f.float().mean((2, 3)), "audio": a}  # noqa: E731
    with pytest.raises(data.DataError, match=r"^2 of 3 clips have bad media:\n  clip bad1: .*cannot decode video"
                                             r".*\n  clip bad2: .*cannot decode video"):
        data.encode_clips(ds, encode, batch_size=1, progress=False)
    assert calls == []  # after the first bad clip nothing more is encoded: the run fails anyway


def test_check_lists_every_problem(tmp_path, capsys):
    root = tmp_path / "ds"
    synth.synthesize(str(root), n_train=4, n_test=2, seed=1, progress=False)
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(root)])
    assert e.value.code == 0 and "no problems found" in capsys.readouterr().out
    names = [f"synth_{i:05d}" for i in range(6)]
    (root / "train.csv").write_text(f"name,openset\n{names[0]},happy\n{names[0]},sad\n,sad\n{names[2]},\"[sad]\n"
                                    f"{names[3]},angry\n")   # the quote on line 5 swallows line 6
    (root / "test.csv").write_bytes(f"name,openset\n{names[4]},caf\xe9\n".encode("latin-1"))
    (root / "audio" / f"{names[0]}.wav").unlink()
    (root / "video" / f"{names[0]}.mp4").write_bytes(b"junk")
    (root / "openface_face").mkdir()
    np.save(root / "openface_face" / f"{names[0]}.npy", np.zeros((4, 8, 8), np.uint8))  # no colour axis
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(root)])
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    # both label tables are unreadable (so no clip is known and no media is checked): one problem each
    assert e.value.code == 1
    assert problems == [f"problem: {root}/test.csv, line 2: not UTF-8 text (save the file as UTF-8)",
                        f"problem: {root}/train.csv, line 5: unexpected end of data (the row runs over lines 5-6: "
                        "an unbalanced quote?)"]
    (root / "train.csv").write_text(f"name,openset\n{names[0]},happy\n{names[0]},sad\n,sad\n{names[3]},angry\n")
    (root / "test.csv").write_text(f"name,openset\n{names[4]},sad\n")
    with pytest.raises(SystemExit):
        data.main(["check", str(root)])
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: {root}/train.csv, line 3: name '{names[0]}' repeats line 2",
                        f"problem: {root}/train.csv, line 4: empty name",
                        f"problem: clip {names[0]}: {root}/video/{names[0]}.mp4: cannot decode video "
                        + problems[2].split("cannot decode video ", 1)[1],
                        f"problem: clip {names[0]}: {root}/audio/{names[0]}.wav: audio file is missing",
                        f"problem: clip {names[0]}: {root}/openface_face/{names[0]}.npy: face crops must be "
                        "[T, H, W, 3], got shape (4, 8, 8)"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    M.save_model(M.build_model(M.ModelConfig.from_preset("tiny"), device="cpu"), str(path))
    return path


@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_stage_scripts_print_data_errors_as_one_message(tmp_path, script, tiny_ckpt):
    import subprocess
    import sys
    from conftest import ROOT
    (tmp_path / "d").mkdir()
    for split in ("train", "rl"):
        (tmp_path / "d" / f"{split}.csv").write_text("name,openset\na,\"[happy]\nb,[sad]\n")
    more = ["--init", str(tiny_ckpt)] if script == "grpo.py" else []
    r = subprocess.run([sys.executable, str(ROOT / script), "--data", str(tmp_path / "d"), "--out",
                        str(tmp_path / "out"), *more], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and ".csv, line 2: " in r.stderr


def test_labels_csv_with_its_own_reasons(tmp_path):
    (tmp_path / "train.csv").write_text("name,openset\na,['sad']\n")
    (tmp_path / "reasons.csv").write_text("name,reason\na,from reasons.csv\n")
    (tmp_path / "best.csv").write_text("name,openset,reason,reward\na,\"['happy']\",from best.csv,1.5\n")
    (tmp_path / "subtitles.csv").write_text("name,english\na,hello\n")
    assert data.read_split(str(tmp_path), "train")[0].reason == "from reasons.csv"
    clip = data.read_split(str(tmp_path), "train", labels_csv=str(tmp_path / "best.csv"), need_reasons=True)[0]
    assert (clip.labels, clip.reason) == ("['happy']", "from best.csv")
