"""data.py: OV-MER datasets in the official layout, prompts for every stage, and a synthetic OV-MER benchmark.

The official layout (what the released datasets unpack to), all under one folder DIR:
    DIR/{split}.csv            name, openset        labels as a list-looking string "['happy', 'excited']"
    DIR/reasons.csv            name, reason         descriptions (the <think> targets); optional
    DIR/subtitles.csv          name, english        (or name, sentence); also subtitle_chieng.csv
    DIR/video/{name}.mp4|.avi  frames, decoded with decord
    DIR/audio/{name}.wav       any rate, mono or stereo (resampled to 16 kHz mono with soxr)
    DIR/openface_face/{name}/{name}.npy or DIR/openface_face/{name}.npy   optional face crops, uint8 [T, H, W, 3]

One function, `build_prompt`, writes the prompt of every stage (SFT, GRPO, evaluation), so they cannot drift:
the placeholders <|fused|> <|audio|> <|video|> (n_tokens each), the subtitle and the question, in one user turn
of the tokenizer's chat template. Targets are `<think>{reason}</think><answer>{labels}</answer>` or
`<answer>{labels}</answer>` (no-think mode), labels joined with ", ".

The synthetic benchmark (`python data.py synth --out DIR --n-train N --n-test M --seed S`) writes the same
layout. Its generative process, which is what makes "RL beats SFT on EW-F" testable on a CPU:
1. Six hidden emotion sectors: the level-1 sectors of wheel 1 of our lexicon. Each sector has a colour, a
   pitch, an amplitude-modulation rate and a pool of surface words (words of the lexicon that map to that
   sector in wheel 1 and to the same sectors as the sector's own name in every other wheel, so the EW metric
   of a label list equals the set-F1 of its hidden sectors).
2. Each clip carries 1 (40%), 2 (40%) or 3 (20%) distinct sectors. Each sector is evidenced by a random
   non-empty subset of {video, audio, subtitle}, each modality included with probability 1/2; the subtitle
   holds at most one cue word, so a second text-only sector moves to video or audio. No modality alone
   reveals every sector of a multi-sector clip.
3. Video (64x64, 8 frames at 8 fps): a grey background with one moving disc per video sector, in the sector's
   colour. Audio (1-2 s at 16 kHz): one tone per audio sector at its pitch, amplitude-modulated at its rate,
   plus noise. Subtitle: a template sentence with a cue word of the text sector; with probability 0.15 the
   cue is MISLEADING (a word of a sector the clip does not carry) and the clip's text sector moves to video.
   Clips without a text sector get a neutral sentence. With probability 0.2 a faint distractor (a small
   dim disc, or a quiet tone) of a sector the clip does not carry is added.
4. Labels: 1-2 surface words per sector. The train split (the SFT data, like the model-led MER-Caption+)
   is annotated the way an LLM captioner annotates: it hedges, adding a word of the "scared" sector ("perhaps
   a little worried") to half the clips that do not carry it; it misses 60% of the emotions that only the
   voice carries; now and then it drops any one emotion (10%) or adds another spurious one (10%); its
   descriptions follow its labels. The val and test splits carry consensus labels (exactly the hidden
   sectors, as OV-MERD+ merges its annotators).
   The rl split (the GRPO data, like the human-checked MER2025-OV) has labels and no descriptions. Its labels
   come from simulated annotators (`--annotators`, 4), one per clip, who differ in vocabulary and in
   completeness: annotator j uses a fixed half of each sector's words, and another word of the sector at
   `--synonym-rate` (0.2); it leaves out each emotion of a clip at its own rate, spread evenly from 0.5x to
   1.5x `--omit-rate` (0.15), never all of them; it adds a word of a sector the clip does not carry at
   `--spurious-rate` (0.05). The annotators draw from a random stream of their own, so the clips (media,
   subtitles, consensus) are those of `--rl-labels clean`, which writes consensus labels and descriptions to
   the rl split as the first release did; rl_oracle.csv (name, openset, reason) keeps them in annotator mode.
   With `--rl-labels clean --n-test-shift 0` the files are those of the first release, byte for byte.
5. test_shift (`--n-test-shift`, 0: none, and nothing held out): three sector pairs (sorted sectors 1-2,
   3-4, 5-6) never occur together in train, rl, val or test, and each sector has a modality (video for the
   1st, 3rd and 5th, audio for the others) that never shows it alone there. A test_shift clip carries one such
   pair (and, 20% of clips, a third sector), each sector of the pair shown alone in that modality; its labels
   and subtitle cues use the last `--held-out-words` (2) words of each pool, which no other split uses; its
   misleading-subtitle rate is `--shift-misleading` (0.35, also on clips whose subtitle carries no cue) and
   its distractor rate `--shift-distractor` (0.5).
6. Reasons: a short templated description naming the cues and the emotion each suggests (a label word of
   the sector each cue evidences), e.g. "The face shows red (angry); the voice is high (scared).".
"""

import argparse
import collections
import contextlib
import copy
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from reward import LexiconError, load_lexicon, parse_labels

SAMPLE_RATE = 16_000
QUESTION = "Please recognize all possible emotional states of the character."
THINK_INSTRUCTION = ("First describe the emotional clues inside <think> </think>, then list the emotion labels, "
                     "separated by commas, inside <answer> </answer>.")
ANSWER_INSTRUCTION = "List the emotion labels, separated by commas, inside <answer> </answer>."


class DataError(ValueError):
    """Bad input: names the file (and clip or row) and the problem."""


def exit_on_bad_input(main, *args):
    """Run a stage's main(*args); bad input (a DataError or LexiconError: something in the files the user gave)
    ends the process with its message and exit code 1, not a traceback."""
    try:
        return main(*args)
    except (DataError, LexiconError) as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------------------------------------
# CSV readers


def read_table(path: str, required, optional=(), multiline=()) -> list:
    """Rows of a CSV as dicts with the `required` columns (and the `optional` ones that exist), each with its
    line number under "_line". `required` may hold alternatives as tuples: ("english", "sentence") means either
    column; the first found is returned under the first name.

    Read strictly: a quote that is opened and never properly closed, a wrong number of fields, text that is not
    UTF-8, or a line break inside a field of a column not in `multiline` (names and labels never span lines;
    such a field is rows merged by an unbalanced quote) is a DataError naming the file and the line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:  # e.g. no read permission
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    with f:
        reader = csv.reader(f, strict=True)
        rows, start = [], 1  # start: the line the current row begins on
        try:
            header = [h.strip() for h in next(reader, [])]
            columns = _find_columns(path, header, required, optional)
            text_columns = {columns[key] for key in map(_column_key, multiline) if key in columns}
            start = reader.line_num + 1
            for row in reader:
                first, last, start = start, reader.line_num, reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}, line {first}: expected {len(header)} fields, got {len(row)}"
                                    + _merged_hint(first, last))
                broken = [header[i] for i in columns.values()
                          if i not in text_columns and ("\n" in row[i] or "\r" in row[i])]
                if broken:
                    raise DataError(f"{path}, line {first}: field {broken[0]!r} holds a line break"
                                    + _merged_hint(first, last))
                rows.append({"_line": first, **{k: row[i] for k, i in columns.items()}})
        except csv.Error as e:
            raise DataError(f"{path}, line {start}: {e}" + _merged_hint(start, reader.line_num)) from None
        except UnicodeDecodeError:
            raise DataError(not_utf8(path)) from None
    return rows


def _column_key(want) -> str:
    return want[0] if isinstance(want, tuple) else want


def _find_columns(path: str, header: list, required, optional) -> dict:
    """Column name -> index in the header, for the required (error when absent) and optional columns."""
    columns = {}
    for want in list(required) + list(optional):
        names = want if isinstance(want, tuple) else (want,)
        found = next((n for n in names if n in header), None)
        if found is None and want in required:
            raise DataError(f"{path}: needs column {' or '.join(repr(n) for n in names)}; header is {header}")
        if found is not None:
            columns[_column_key(want)] = header.index(found)
    return columns


def _merged_hint(first: int, last: int) -> str:
    """Rows merged by an unbalanced quote span several lines: say so."""
    return f" (the row runs over lines {first}-{last}: an unbalanced quote?)" if last > first else ""


def not_utf8(path: str) -> str:
    """The message for a text file that is not UTF-8, naming its first bad line."""
    with open(path, "rb") as f:
        number = next((n for n, line in enumerate(f, 1) if not _is_utf8(line)), 1)
    return f"{path}, line {number}: not UTF-8 text (save the file as UTF-8)"


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_column(path: str, column, optional=False, free_text=False) -> dict:
    """name -> value of one column; a missing optional file -> {}. Empty and repeated names are errors; a
    free-text column (subtitles, reasons) may hold line breaks."""
    if optional and not os.path.isfile(path):
        return {}
    key = column[0] if isinstance(column, tuple) else column
    out = {}
    for row in read_table(path, ["name", column], multiline=[column] if free_text else []):
        name = row["name"].strip()
        if not name or name in out:
            raise DataError(f"{path}, line {row['_line']}: {'empty' if not name else 'duplicate'} name {name!r}")
        out[name] = row[key]
    return out


def read_label_file(path: str) -> dict:
    """name -> label string, from a `name, openset` CSV or a `filenames, fileitems` .npz (the released model
    outputs). Errors name the file and the row."""
    if not path.endswith(".npz"):
        return read_column(path, "openset")
    with open_npz(path, allow_pickle=False) as npz:
        if not {"filenames", "fileitems"} <= set(npz.files):
            raise DataError(f"{path}: needs arrays 'filenames' and 'fileitems', found {sorted(npz.files)}")
        try:
            names, items = [str(n).strip() for n in npz["filenames"]], [str(i) for i in npz["fileitems"]]
        except Exception as e:  # a damaged member, or an object array (which needs pickle)
            raise DataError(f"{path}: cannot read 'filenames' / 'fileitems' ({type(e).__name__}: {e})") from None
    if len(names) != len(items):
        raise DataError(f"{path}: {len(names)} filenames but {len(items)} fileitems")
    for k, name in enumerate(names):
        if not name or names.index(name) != k:
            raise DataError(f"{path}, item {k}: {'empty' if not name else 'duplicate'} name {name!r}")
    return dict(zip(names, items))


def open_npz(path: str, allow_pickle: bool = False):
    """np.load of a .npz archive, after checking that the file is one: np.load would otherwise try to unpickle
    any other file when allow_pickle is on, and fails with a message that does not name the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (an empty one ends in PK 5 6)
        raise DataError(f"{path}: not a .npz file (a zip archive of .npy arrays)")
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except Exception as e:  # a damaged archive
        raise DataError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None


def read_unibench_labels(path: str, classes=None) -> dict:
    """An official MER-UniBench .npz label file -> name -> (emotion word or None, valence or None).
    NOTE: these files store a pickled dict ({split}_corpus), so they are read with allow_pickle=True: only
    open label files from the official releases."""
    with open_npz(path, allow_pickle=True) as npz:
        keys = [k for k in npz.files if k.endswith("_corpus")]
        tests = [k for k in keys if "test" in k]
        key = "test_corpus" if "test_corpus" in keys else (tests[0] if len(tests) == 1 else None)
        if key is None:
            raise DataError(f"{path}: cannot tell the test corpus among {keys or npz.files}")
        try:
            corpus = npz[key].item()
        except Exception as e:
            raise DataError(f"{path}: cannot read {key!r} ({type(e).__name__}: {e})") from None
    if not isinstance(corpus, dict) or not all(isinstance(v, dict) for v in corpus.values()):
        raise DataError(f"{path}: {key!r} must be a dict of clip name -> {{'emo': ..., 'val': ...}}")
    out = {}
    for name, item in corpus.items():
        emo, val = item.get("emo"), item.get("val")
        if isinstance(emo, (int, np.integer)) and not isinstance(emo, bool):
            if classes is None or not 0 <= emo < len(classes):
                raise DataError(f"{path}: clip {name} has class index {emo} outside {classes}")
            emo = classes[emo]
        try:
            val = None if val is None else float(val)
        except (TypeError, ValueError):
            raise DataError(f"{path}: clip {name} has valence {val!r}, not a number") from None
        out[str(name)] = (None if emo is None else str(emo).lower().strip(), val)
    return out


# MER-UniBench, name: (task, folders under --root, label file, corpus classes when 'emo' is an integer index)
UNIBENCH = {
    "ovmerdplus": ("ovmer", ("ovmerdplus-process", "ovmerdplus-dataset", "ovmerdplus", "mer2025-dataset"),
                   ("track2_test.csv", "ovmerdplus.csv", "label.csv"), None),
    "mer2023": ("hit", ("mer2023-dataset-process", "mer2023-process", "mer2023"), ("label-6way.npz",),
                ("neutral", "angry", "happy", "sad", "worried", "surprise")),
    "mer2024": ("hit", ("mer2024-dataset-process", "mer2024-process", "mer2024"), ("label-6way.npz",),
                ("neutral", "angry", "happy", "sad", "worried", "surprise")),
    "meld": ("hit", ("meld-dataset", "meld-process", "meld"), ("label.npz",),
             ("anger", "joy", "sadness", "neutral", "disgust", "fear", "surprise")),
    "iemocapfour": ("hit", ("iemocap-dataset", "iemocap-process", "iemocapfour"), ("label_4way.npz", "label.npz"),
                    ("happy", "sad", "neutral", "anger")),
    "cmumosi": ("sentiment", ("cmumosi-dataset", "cmumosi-process", "cmumosi"), ("label.npz",), None),
    "cmumosei": ("sentiment", ("cmumosei-dataset", "cmumosei-process", "cmumosei"), ("label.npz",), None),
    "sims": ("sentiment", ("sims-dataset", "sims-process", "sims"), ("label.npz",), None),
    "simsv2": ("sentiment", ("simsv2-dataset", "simsv2-process", "simsv2"), ("label.npz",), None),
}


def find_unibench(root: str) -> dict:
    """dataset -> (folder, label file) for the datasets present under root."""
    found = {}
    for name, (_, folders, files, _) in UNIBENCH.items():
        for folder in folders:
            hits = [f for f in files if os.path.isfile(os.path.join(root, folder, f))]
            if hits:
                found[name] = (os.path.join(root, folder), os.path.join(root, folder, hits[0]))
                break
    return found


SUBTITLE_FILES = ("subtitles.csv", "subtitle.csv", "subtitle_chieng.csv", "transcription-engchi-polish.csv",
                  "transcription_merge.csv")
SUBTITLE_COLUMNS = ("english", "sentence")


def find_subtitles(root: str) -> str | None:
    for name in SUBTITLE_FILES:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def no_subtitles_message(root: str) -> str:
    """Why a folder has no subtitle file, with a hint: a CSV of another name with a subtitle column (a typo)."""
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.lower().endswith(".csv") and name not in SUBTITLE_FILES:
            with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
                with open(os.path.join(root, name), newline="", encoding="utf-8-sig") as f:
                    header = [h.strip() for h in next(csv.reader(f), [])]
                if "name" in header and set(SUBTITLE_COLUMNS) & set(header):
                    found.append(name)
    hint = (f"; {', '.join(found)} has a subtitle column: rename it to subtitles.csv?" if found else
            ": a missing download or a misnamed file?")
    return (f"{root}: no subtitle file (looked for {', '.join(SUBTITLE_FILES)}){hint} To train or evaluate "
            f"without the text modality on purpose, pass --without_subtitles")


def read_subtitles(root: str, subtitles: bool = True) -> dict:
    """name -> subtitle text of the clips of a folder; a missing subtitle file is a DataError (a run would lose a
    modality without a word) unless subtitles=False (--without_subtitles), which reads none."""
    if not subtitles:
        return {}
    sub_file = find_subtitles(root)
    if sub_file is None:
        raise DataError(no_subtitles_message(root))
    return read_column(sub_file, SUBTITLE_COLUMNS, free_text=True)


@dataclass
class Clip:
    name: str
    labels: str          # the openset string as in the CSV
    subtitle: str = ""
    reason: str | None = None


def subtitle_count(clips) -> str:
    """'N of M clips with subtitle text', for a stage's data line: a clip that the subtitle file lacks (a note of
    `python data.py check`), or whose subtitle is empty, trains on no text."""
    return f"{sum(bool(c.subtitle.strip()) for c in clips)} of {len(clips)} clips with subtitle text"


def read_split(root: str, split: str = "train", labels_csv: str | None = None, need_reasons=False,
               subtitles: bool = True) -> list:
    """Clips of one split: DIR/{split}.csv (or an explicit labels CSV) joined with subtitles and reasons. A
    labels CSV with its own `reason` column (best-of-N completions, rl_oracle.csv) brings its reasons. The
    subtitle file must exist unless subtitles=False (read_subtitles); a clip it lacks gets an empty subtitle."""
    labels_csv = labels_csv or os.path.join(root, f"{split}.csv")
    labels = read_column(labels_csv, "openset")
    subtitles = read_subtitles(root, subtitles)
    own = labels and "reason" in read_table(labels_csv, ["name"], optional=["reason"], multiline=["reason"])[0]
    reason_file = labels_csv if own else os.path.join(root, "reasons.csv")
    reasons = read_column(reason_file, "reason", optional=True, free_text=True)
    if need_reasons:
        missing = [n for n in labels if n not in reasons]
        if missing:
            raise DataError(f"{reason_file}: think mode needs a reason for every clip; "
                            f"{len(missing)} of {len(labels)} have none (e.g. {missing[:3]}); use --no-think")
    return [Clip(n, labels[n], subtitles.get(n, ""), reasons.get(n)) for n in labels]


def read_unibench(root: str, subtitles: bool = True) -> dict:
    """dataset -> (task, folder, clips, corpus) of every MER-UniBench dataset under root (read before any work,
    so that a bad label file or a missing subtitle file stops the run before the first dataset is evaluated)."""
    sets = {}
    for name, (folder, label_file) in find_unibench(root).items():
        task, classes, corpus = UNIBENCH[name][0], UNIBENCH[name][3], None
        if task == "ovmer":
            labels = read_column(label_file, "openset")
        else:
            corpus = read_unibench_labels(label_file, classes)
            labels = {n: (e or "") for n, (e, _) in corpus.items()}
        text = read_subtitles(folder, subtitles)
        sets[name] = (task, folder, [Clip(n, labels[n], text.get(n, "")) for n in labels], corpus)
    return sets


# ----------------------------------------------------------------------------------------------------------
# Media


def frame_indices(total: int, n: int) -> list:
    """n frame indices spread uniformly over `total` frames (the centre of n equal segments); a clip with fewer
    than n frames repeats its last frame."""
    if total <= 0:
        raise ValueError("a video needs at least one frame")
    if total < n:
        return list(range(total)) + [total - 1] * (n - total)
    return [int((i + 0.5) * total / n) for i in range(n)]


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3): shorter side to `size`, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_video(path: str, n_frames: int, size: int) -> torch.Tensor:
    """n_frames uniformly sampled RGB frames, uint8 (n_frames, size, size, 3)."""
    import decord
    if not os.path.isfile(path):
        raise DataError(f"{path}: video file is missing")
    try:
        reader = decord.VideoReader(path, num_threads=1)
        frames = reader.get_batch(frame_indices(len(reader), n_frames)).asnumpy()
    except Exception as e:  # decord raises its own error types for corrupt files
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return resize_frames(frames, size)


def load_faces(path: str, n_frames: int, size: int) -> torch.Tensor:
    """Face crops saved as uint8 [T, H, W, 3] .npy, sampled and resized like video frames."""
    try:
        faces = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read face crops ({e})")
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise DataError(f"{path}: face crops must be [T, H, W, 3], got shape {faces.shape}")
    return resize_frames(faces[frame_indices(len(faces), n_frames)].astype(np.uint8), size)


def cut_clips(wave: np.ndarray, n_clips: int, clip_samples: int) -> np.ndarray:
    """(S,) -> (n_clips, clip_samples): windows whose starts are spread uniformly over the audio; a short audio
    is zero-padded at the end (every window is then the same)."""
    if len(wave) < clip_samples:
        wave = np.pad(wave, (0, clip_samples - len(wave)))
    starts = np.linspace(0, len(wave) - clip_samples, n_clips).round().astype(int)
    return np.stack([wave[s:s + clip_samples] for s in starts])


def load_audio(path: str, n_clips: int, clip_seconds: float) -> torch.Tensor:
    """Mono 16 kHz audio cut into n_clips windows of clip_seconds: float32 (n_clips, samples)."""
    import soundfile
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file is missing")
    try:
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read audio ({e})")
    if wave.shape[0] == 0:
        raise DataError(f"{path}: audio file holds no samples")
    wave = wave.mean(axis=1)  # stereo -> mono
    if rate != SAMPLE_RATE:
        import soxr
        wave = soxr.resample(wave, rate, SAMPLE_RATE).astype(np.float32)
    return torch.from_numpy(cut_clips(wave, n_clips, round(clip_seconds * SAMPLE_RATE)))


VIDEO_DIRS = ("video", "subvideo", "subvideo-tgt", "subvideo_new", "video_new")  # as the official releases name them
AUDIO_DIRS = ("audio", "subaudio")


def first_dir(root: str, names) -> str:
    """The first of `names` that exists under root (else the first name, so errors point at the usual place)."""
    return next((n for n in names if os.path.isdir(os.path.join(root, n))), names[0])


def media_paths(root: str, name: str, use_faces: bool = False, video_dir: str = "video",
                audio_dir: str = "audio") -> tuple:
    """(visual path, audio path) of a clip: face crops when asked and present, else video .mp4 / .avi."""
    visual = None
    if use_faces:
        for p in (os.path.join(root, "openface_face", name, f"{name}.npy"),
                  os.path.join(root, "openface_face", f"{name}.npy")):
            if os.path.isfile(p):
                visual = p
                break
    if visual is None:
        visual = next((p for p in (os.path.join(root, video_dir, f"{name}{ext}") for ext in (".mp4", ".avi"))
                       if os.path.isfile(p)), os.path.join(root, video_dir, f"{name}.mp4"))
    return visual, os.path.join(root, audio_dir, f"{name}.wav")


def bad_clips_message(bad: dict, n_clips: int, root: str) -> str:
    """One message listing every bad clip (name -> reason)."""
    return (f"{len(bad)} of {n_clips} clips have bad media:\n  " + "\n  ".join(bad.values())
            + f"\n(use --skip_bad_clips to leave them out; `python data.py check {root}` checks the whole folder)")


class ClipDataset(torch.utils.data.Dataset):
    """Clips with decoded media: {"name", "frames" (N, size, size, 3) uint8, "audio" (C, S) float32, "clip"}.

    Missing media files are found up front: an error naming clip and file, or with skip_bad=True the clip is
    left out and counted in `self.skipped` (name -> reason). A file that exists but cannot be decoded raises
    DataError naming it when the clip is loaded (encode_clips can skip those too).
    """

    def __init__(self, root, clips, n_frames, image_size, audio_clips, clip_seconds, use_faces=False,
                 skip_bad=False):
        self.root, self.n_frames, self.image_size = root, n_frames, image_size
        self.audio_clips, self.clip_seconds, self.use_faces = audio_clips, clip_seconds, use_faces
        self.video_dir, self.audio_dir = first_dir(root, VIDEO_DIRS), first_dir(root, AUDIO_DIRS)
        if use_faces and not os.path.isdir(os.path.join(root, "openface_face")):  # else every clip uses its video
            raise DataError(f"{root}: --use_faces, but there is no openface_face/ folder of face crops")
        self.clips, self.skipped = [], {}
        for clip in clips:
            missing = [p for p in self.paths(clip.name) if not os.path.isfile(p)]
            if missing:
                self.skipped[clip.name] = f"clip {clip.name}: missing {', '.join(missing)}"
            else:
                self.clips.append(clip)
        if self.skipped and not skip_bad:  # every bad clip at once, not one per run
            raise DataError(bad_clips_message(self.skipped, len(clips), root))

    def paths(self, name: str) -> tuple:
        return media_paths(self.root, name, self.use_faces, self.video_dir, self.audio_dir)

    def __len__(self):
        return len(self.clips)

    def subset(self, clips) -> "ClipDataset":
        """The same dataset settings over other clips (already checked)."""
        other = copy.copy(self)
        other.clips, other.skipped = list(clips), {}
        return other

    def __getitem__(self, i):
        clip = self.clips[i]
        visual, audio = self.paths(clip.name)
        try:
            frames = (load_faces if visual.endswith(".npy") else load_video)(visual, self.n_frames,
                                                                               self.image_size)
            wave = load_audio(audio, self.audio_clips, self.clip_seconds)
        except DataError as e:
            raise DataError(f"clip {clip.name}: {e}") from None
        return {"name": clip.name, "frames": frames, "audio": wave, "clip": clip}


def encode_clips(dataset: ClipDataset, encode, batch_size=16, skip_bad=False, progress=True,
                 num_workers=0, should_stop=None) -> dict:
    """Run `encode(frames, audio) -> {"video": (B, ...), "audio": (B, ...)}` over a ClipDataset once.
    Returns name -> {"video", "audio"} (CPU float32). Undecodable clips are skipped and counted in
    dataset.skipped when skip_bad; otherwise one DataError lists them all (after the first, the remaining clips
    are only decoded, to find the others). `should_stop()`, asked before each clip, raises KeyboardInterrupt when
    true (a signal handler that only sets a flag cannot be lost inside a decoder)."""
    from tqdm import tqdm
    feats, batch, bad = {}, [], {}

    def flush():
        if batch:
            out = encode(torch.stack([b["frames"] for b in batch]), torch.stack([b["audio"] for b in batch]))
            for j, b in enumerate(batch):
                feats[b["name"]] = {k: v[j].cpu() for k, v in out.items()}
            batch.clear()

    for i in tqdm(range(len(dataset)), desc="encode media", disable=not progress, leave=False):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("stopped while encoding media")
        try:
            batch.append(dataset[i])
        except DataError as e:
            (dataset.skipped if skip_bad else bad)[dataset.clips[i].name] = str(e)
        if bad:
            batch.clear()  # the run will fail: no point in encoding
        if len(batch) == batch_size:
            flush()
    if bad:
        raise DataError(bad_clips_message(bad, len(dataset), dataset.root))
    flush()
    return feats


# ----------------------------------------------------------------------------------------------------------
# `python data.py check DIR`: every problem of a dataset folder at once


def _check_names(path: str, rows: list, problems: list) -> list:
    """The names of a table's rows; empty and repeated names are problems (all of them, with their lines)."""
    names, seen = [], {}
    for row in rows:
        name = row["name"].strip()
        if not name:
            problems.append(f"{path}, line {row['_line']}: empty name")
        elif name in seen:
            problems.append(f"{path}, line {row['_line']}: name {name!r} repeats line {seen[name]}")
        else:
            seen[name] = row["_line"]
            names.append(name)
    return names


def check_dataset(root: str, n_frames: int = 8, progress: bool = True, subtitles: bool = True) -> tuple:
    """Validate a dataset folder: its CSV files (strict reading, columns, names, labels), its subtitle file (a
    problem when absent, as the stages refuse to run without it, unless subtitles=False), and every clip's video
    (or face crops) and audio decoded as training decodes them. Returns (problems, notes): problems make the
    folder unusable as it is; notes are worth knowing (a clip without subtitle, a clip in two splits)."""
    from tqdm import tqdm
    problems, notes, splits, tables, n_label_files = [], [], {}, {}, 0
    if not os.path.isdir(root):
        return [f"{root}: no such folder"], notes
    sub_file = find_subtitles(root)
    for file in sorted(f for f in os.listdir(root) if f.lower().endswith(".csv")):
        path = os.path.join(root, file)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = [h.strip() for h in next(csv.reader(f), [])]
            if "openset" in header:
                kind, column, n_label_files = "labels", "openset", n_label_files + 1
            elif path == sub_file:
                kind, column = "subtitles", ("english", "sentence")
            elif "reason" in header:
                kind, column = "reasons", "reason"
            else:
                read_table(path, [])  # an unknown table: it must still be well-formed CSV
                notes.append(f"{path}: not a label, subtitle or reason table (columns {header}); only its CSV "
                             "syntax was checked")
                continue
            rows = read_table(path, ["name", column], multiline=[] if kind == "labels" else [column])
        except DataError as e:
            problems.append(str(e))
            continue
        except UnicodeDecodeError:  # in the header
            problems.append(not_utf8(path))
            continue
        names = _check_names(path, rows, problems)
        if kind != "labels":
            tables[kind] = set(names)
            continue
        splits[file] = names
        empty = [r["name"].strip() for r in rows if not parse_labels(r["openset"])]
        if empty:
            notes.append(f"{path}: {len(empty)} clips without any label (no reward signal), e.g. "
                         f"{', '.join(empty[:5])}")
    if not n_label_files:
        problems.append(f"{root}: no label table (a CSV with columns name, openset, e.g. train.csv)")
    if sub_file is None:
        if subtitles:
            problems.append(no_subtitles_message(root))
        else:
            notes.append(f"{root}: no subtitle file: the stages need --without_subtitles (no text modality)")
    clips = list(dict.fromkeys(n for names in splits.values() for n in names))  # each clip once, in order
    for kind in ("subtitles", "reasons"):
        if kind in tables:
            lacking = [n for n in clips if n not in tables[kind]]
            if lacking:
                notes.append(f"{len(lacking)} clips have no {kind[:-1]} (e.g. {', '.join(lacking[:5])})")
    seen = {}
    for file, names in splits.items():
        for n in names:
            seen.setdefault(n, []).append(file)
    shared = {n: fs for n, fs in seen.items() if len(fs) > 1}
    if shared:
        notes.append(f"{len(shared)} clips are in more than one label table (e.g. "
                     + ", ".join(f"{n} in {' and '.join(fs)}" for n, fs in list(shared.items())[:5]) + ")")
    video_dir, audio_dir = first_dir(root, VIDEO_DIRS), first_dir(root, AUDIO_DIRS)
    faces = os.path.isdir(os.path.join(root, "openface_face"))
    no_faces = []
    for name in tqdm(clips, desc="check media", disable=not progress, leave=False):
        video, audio = media_paths(root, name, False, video_dir, audio_dir)
        face = media_paths(root, name, True, video_dir, audio_dir)[0] if faces else video
        if faces and face == video:
            no_faces.append(name)
        checks = [(load_video, video, (n_frames, 32)), (load_audio, audio, (1, 1.0))]
        if face != video:
            checks.append((load_faces, face, (n_frames, 32)))
        for load, path, settings in checks:  # decoded exactly as training decodes them
            try:
                load(path, *settings)
            except DataError as e:
                problems.append(f"clip {name}: {e}")
    if no_faces:
        notes.append(f"{len(no_faces)} clips have no face crops in openface_face/ (with --use_faces they use "
                     f"their video), e.g. {', '.join(no_faces[:5])}")
    return problems, notes


# ----------------------------------------------------------------------------------------------------------
# Prompts, targets, batches


def build_prompt(tokenizer, subtitle: str, think: bool = True, n_tokens: int = 1) -> str:
    """The one prompt of every stage: media placeholders, subtitle and question in one user turn."""
    media = "<|fused|>" * n_tokens + "<|audio|>" * n_tokens + "<|video|>" * n_tokens
    text = (f"{media}\nSubtitle: {subtitle.strip() or '(none)'}\n{QUESTION} "
            f"{THINK_INSTRUCTION if think else ANSWER_INSTRUCTION}")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def format_labels(labels) -> str:
    """Label string or list -> "happy, excited"."""
    return ", ".join(parse_labels(labels))


def build_target(labels, reason: str | None = None, think: bool = True) -> str:
    answer = f"<answer>{format_labels(labels)}</answer>"
    if not think:
        return answer
    if reason is None:
        raise DataError("think mode needs a reason for every training clip")
    return f"<think>{reason.strip()}</think>{answer}"


def tokenize_example(tokenizer, clip: Clip, think: bool, n_tokens: int, max_length: int = 1024) -> dict:
    """Prompt ids + target ids + EOS, with labels = -100 on the prompt (the loss sees target tokens only)."""
    prompt = tokenizer(build_prompt(tokenizer, clip.subtitle, think, n_tokens), add_special_tokens=False)
    target = tokenizer(build_target(clip.labels, clip.reason, think), add_special_tokens=False)
    ids = prompt["input_ids"] + target["input_ids"] + [tokenizer.eos_token_id]
    labels = [-100] * len(prompt["input_ids"]) + target["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt["input_ids"]) >= max_length:  # the media placeholders live in the prompt: never cut it
        raise DataError(f"clip {clip.name}: its prompt has {len(prompt['input_ids'])} tokens, no room for a "
                        f"target within max_length {max_length} (a very long subtitle?)")
    if len(ids) > max_length:  # cut the target (and its EOS)
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_batch(seqs, value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_train(examples, pad_id: int) -> dict:
    """Right-padded training batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": pad_batch(ids, pad_id, left=False),
            "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, left=False),
            "labels": pad_batch([e["labels"] for e in examples], -100, left=False)}


def collate_prompts(tokenizer, subtitles, think: bool, n_tokens: int) -> dict:
    """Left-padded prompts for generation: input_ids, attention_mask."""
    ids = [tokenizer(build_prompt(tokenizer, s, think, n_tokens), add_special_tokens=False)["input_ids"]
           for s in subtitles]
    return {"input_ids": pad_batch(ids, tokenizer.pad_token_id, left=True),
            "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, left=True)}


def stack_media(feats: dict, names) -> dict:
    """Cached features of several clips -> {"video": (B, N, Dv), "audio": (B, C, Da)}."""
    return {k: torch.stack([feats[n][k] for n in names]) for k in ("video", "audio")}


# ----------------------------------------------------------------------------------------------------------
# The synthetic OV-MER benchmark

COLOURS = [(230, 40, 40), (40, 90, 230), (150, 60, 200), (250, 210, 30), (240, 120, 20), (40, 190, 90),
           (200, 200, 200), (20, 200, 220)]
COLOUR_NAMES = ["red", "blue", "purple", "yellow", "orange", "green", "white", "cyan"]
PITCHES = [180.0, 260.0, 340.0, 450.0, 600.0, 800.0, 1000.0, 1250.0]
PITCH_NAMES = ["very low", "low", "lowish", "middle", "high", "very high", "shrill", "piercing"]
AM_RATES = [2.0, 3.0, 5.0, 7.0, 9.0, 11.0, 4.0, 6.0]
HEDGE_SECTOR = "scared"  # the sector a hedging annotator adds (wheel-1 sector of "worried" in our lexicon)
CUE_TEMPLATES = ["I feel so {w} about all of this.", "Honestly, this makes me {w}.", "You know, I am really {w}.",
                 "Right now I am just {w}.", "It all leaves me {w}, to be honest."]
NEUTRAL_SUBTITLES = ["We will meet at the station at noon.", "The report is on the table.",
                     "Please pass me the salt.", "The bus leaves in ten minutes.", "I bought some bread today."]


_NOUN_ENDINGS = ("ness", "ion", "ity", "ment", "ance", "ence", "ism", "ship", "dom", "ure")


def synth_sectors(lex=None, pool_size: int = 8) -> dict:
    """sector -> pool of surface words (adjectives) for the synthetic benchmark.

    The sectors are the level-1 sectors of wheel 1 of our lexicon. A sector's words are its wheel-1 words and
    their synonyms that share one mapping in all five wheels (the most common complete one), so a label list
    scores exactly like its set of hidden sectors. Wheel words come first, then shorter words.
    """
    lex = lex or load_lexicon("builtin")
    wheel1 = lex.clusters[0][0]
    sectors = sorted(set(wheel1.values()))
    if len(sectors) > len(COLOURS):
        raise ValueError(f"the synthetic benchmark supports at most {len(COLOURS)} sectors, got {len(sectors)}")
    pools = {}
    for sector in sectors:
        own = {w for w, s in wheel1.items() if s == sector}
        words = own | {key for key, ws in lex.synonyms.items() if own.intersection(ws)}
        words = [w for w in words if w.isascii() and w.isalpha() and len(w) <= 12 and not w.endswith(_NOUN_ENDINGS)]
        signatures = collections.Counter(lex.lookup(w)[0] for w in words if None not in lex.lookup(w)[0])
        if not signatures:
            raise ValueError(f"lexicon: no word of sector {sector!r} maps to a sector in every wheel")
        signature = signatures.most_common(1)[0][0]
        pool = sorted((w for w in words if lex.lookup(w)[0] == signature), key=lambda w: (w not in own, len(w), w))
        if len(pool) < 2:
            raise ValueError(f"lexicon: sector {sector!r} has fewer than 2 consistent words for the benchmark")
        pools[sector] = pool[:pool_size]
    return pools


@dataclass
class Shift:
    """What the synthetic benchmark holds out of its training splits for the test_shift split."""
    pairs: list          # sector-index pairs never carried together in training; a test_shift clip carries one
    solo: dict           # sector index -> the modality (0 video, 1 audio) that shows it alone in test_shift
                         # and never alone in training
    misleading: float    # misleading-subtitle rate of test_shift
    distractor: float    # distractor rate of test_shift


@dataclass
class Annotators:
    """Simulated human annotators of the rl split: they differ in vocabulary and in completeness."""
    n: int = 4               # annotators; each rl clip is labelled by one of them
    omit: float = 0.15       # mean rate at which an annotator leaves out one of a clip's emotions
    synonym: float = 0.2     # rate at which a label word comes from outside the annotator's own vocabulary
    spurious: float = 0.05   # rate of one spurious word (an emotion the clip does not carry)


def annotator_profiles(ann: Annotators, pools: dict, seed: int) -> list:
    """One (vocabulary, omission rate) per annotator: a vocabulary is half of each sector's words, and the
    omission rates spread evenly from 0.5x to 1.5x the mean rate (a careful and a hasty annotator)."""
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for j in range(ann.n):
        vocab = {s: sorted(rng.choice(ws, size=max(1, len(ws) // 2), replace=False).tolist())
                 for s, ws in pools.items()}
        scale = 0.5 + j / (ann.n - 1) if ann.n > 1 else 1.0
        profiles.append((vocab, min(1.0, ann.omit * scale)))
    return profiles


def annotate(rng: np.random.Generator, pools: dict, carried: list, profile: tuple, ann: Annotators) -> list:
    """One annotator's labels of a clip carrying the sectors `carried`: 1-2 words per emotion it notices."""
    vocab, omit = profile
    sectors = list(pools)
    noticed = [s for s in carried if rng.random() >= omit]  # an emotion now and then left out ...
    if not noticed:  # ... but never all of them
        noticed = [carried[int(rng.integers(len(carried)))]]
    labels = []
    for s in noticed:
        for _ in range(int(rng.choice([1, 2]))):
            own = rng.random() >= ann.synonym  # mostly its own words, now and then another synonym
            word = str(rng.choice(vocab[s] if own else pools[s]))
            if word not in labels:
                labels.append(word)
    others = [s for s in sectors if s not in carried]
    if others and rng.random() < ann.spurious:
        labels.append(str(rng.choice(pools[others[int(rng.integers(len(others)))]])))
    return labels


def _draw_evidence(rng, chosen: list, shift: Shift | None, shifted: bool) -> tuple:
    """Which modalities show each chosen sector: video, audio, text lists of sector indices."""
    video, audio, text = [], [], []
    for s in chosen:
        if shifted and s in shift.solo:  # test_shift: the sector shows in its held-out modality alone
            mods = np.zeros(3, dtype=bool)
            mods[shift.solo[s]] = True
        else:
            while True:
                mods = rng.random(3) < 0.5
                held = shift is not None and s in shift.solo and mods.sum() == 1 and mods[shift.solo[s]]
                if mods.any() and not held:
                    break
        if mods[2] and text:  # one cue word per subtitle: the extra text sector moves to the video
            mods[2], mods[0] = False, True
        for on, lst in zip(mods, (video, audio, text)):
            if on:
                lst.append(s)
    return video, audio, text


def _keep_out(shift: Shift, video: list, audio: list, text: list):
    """A training clip never shows a sector in its held-out modality alone (a subtitle moved to the video can
    make it so): such a sector is shown by the other of video and audio too."""
    for s, m in shift.solo.items():
        shown = [s in video, s in audio, s in text]
        if sum(shown) == 1 and shown[m]:
            (audio if m == 0 else video).append(s)


def _synth_clip(rng: np.random.Generator, pools: dict, noisy: bool, shift: Shift | None = None,
                shifted: bool = False) -> dict:
    """Draw one clip's hidden sectors, its evidence per modality, labels and reason (no media yet).
    `pools` holds the words this split may use; with `shift`, a training clip avoids what it holds out and a
    test_shift clip (`shifted`) is made of it."""
    sectors = list(pools)
    k = rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])
    if shifted:  # a held-out pair, and now and then a third sector
        pair = list(shift.pairs[int(rng.integers(len(shift.pairs)))])
        rest = [i for i in range(len(sectors)) if i not in pair]
        chosen = pair + ([int(rng.choice(rest))] if k == 3 else [])
    else:
        while True:
            chosen = [int(i) for i in rng.choice(len(sectors), size=k, replace=False)]
            if shift is None or not any(a in chosen and b in chosen for a, b in shift.pairs):
                break
    others = [i for i in range(len(sectors)) if i not in chosen]
    video, audio, text = _draw_evidence(rng, chosen, shift, shifted)
    p_misleading, p_distractor = (shift.misleading, shift.distractor) if shifted else (0.15, 0.2)
    misleading = None
    # the subtitle names a sector the clip does not carry (test_shift: also where no sector speaks through it)
    if (text or shifted) and rng.random() < p_misleading:
        if text and text[0] not in video:
            video.append(text[0])
        misleading, text = int(rng.choice(others)) if others else None, []
    if shift is not None and not shifted:
        _keep_out(shift, video, audio, text)
    distractor = None
    if others and rng.random() < p_distractor:
        distractor = (int(rng.choice(others)), "video" if rng.random() < 0.5 else "audio")
    words = {s: list(rng.choice(pools[sectors[s]], size=rng.choice([1, 2]), replace=False)) for s in chosen}
    annotated = list(chosen)  # what the annotator noticed
    if noisy:
        for s in chosen:  # voice-only emotions are often missed (as by a captioner that reads faces and words)
            if s in audio and s not in video and s not in text and len(annotated) > 1 and rng.random() < 0.6:
                annotated.remove(s)
        if len(annotated) > 1 and rng.random() < 0.1:  # ... and now and then any one emotion
            annotated.remove(annotated[int(rng.integers(len(annotated)))])
    labels = [w for s in annotated for w in words[s]]
    hedge = None
    if noisy and others:
        if HEDGE_SECTOR in pools and sectors.index(HEDGE_SECTOR) in others and rng.random() < 0.5:
            # a hedging annotator: "maybe a little worried" although nothing shows it
            hedge = str(rng.choice(pools[HEDGE_SECTOR]))
            labels.append(hedge)
        elif rng.random() < 0.1:  # ... or any spurious emotion
            labels.append(str(rng.choice(pools[sectors[int(rng.choice(others))]])))
    cue_sector = text[0] if text else misleading
    cue = str(rng.choice(pools[sectors[cue_sector]])) if cue_sector is not None else None
    subtitle = (str(rng.choice(CUE_TEMPLATES)).format(w=cue) if cue is not None
                else str(rng.choice(NEUTRAL_SUBTITLES)))
    parts = []  # the description names the cues the annotator noticed
    seen_video, seen_audio = [s for s in video if s in annotated], [s for s in audio if s in annotated]
    if seen_video:
        parts.append("the face shows " + " and ".join(f"{COLOUR_NAMES[s]} ({words[s][0]})" for s in seen_video))
    if seen_audio:
        parts.append("the voice is " + " and ".join(f"{PITCH_NAMES[s]} ({words[s][0]})" for s in seen_audio))
    if text and text[0] in annotated:
        parts.append(f"the words say {cue}")
    if hedge:
        parts.append(f"perhaps a little {hedge}")
    reason = ("; ".join(parts) or "no clear emotional cue").capitalize() + "."
    return {"sectors": [sectors[s] for s in chosen], "video": video, "audio": audio, "text": text,
            "misleading": misleading, "distractor": distractor, "labels": labels, "subtitle": subtitle,
            "reason": reason}


def _render_video(path: str, rng: np.random.Generator, video: list, distractor, size=64, n_frames=8):
    import av
    bg = rng.integers(90, 140)
    discs = [(s, 1.0, 11) for s in video]
    if distractor and distractor[1] == "video":
        discs.append((distractor[0], 0.35, 6))
    starts = rng.uniform(12, size - 12, size=(len(discs), 2))
    speeds = rng.uniform(-2.5, 2.5, size=(len(discs), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    container = av.open(path, "w")
    # NOTE: MPEG-4 part 2, not H.264: libx264 output varies from run to run on noisy frames here, and the
    # benchmark promises byte-identical files for a seed
    stream = container.add_stream("mpeg4", rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"qscale": "2"}
    for t in range(n_frames):
        frame = np.full((size, size, 3), bg, dtype=np.float32)
        frame += rng.normal(0, 6, size=frame.shape)
        for (s, alpha, radius), p0, v in zip(discs, starts, speeds):
            cy, cx = np.clip(p0 + t * v, radius, size - radius)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
            frame[inside] = (1 - alpha) * frame[inside] + alpha * np.array(COLOURS[s], dtype=np.float32)
        img = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(img):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _render_audio(path: str, rng: np.random.Generator, audio: list, distractor):
    import soundfile
    seconds = rng.uniform(1.0, 2.0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tones = [(s, 1.0) for s in audio]
    if distractor and distractor[1] == "audio":
        tones.append((distractor[0], 0.25))
    wave = rng.normal(0, 0.02, size=t.shape)
    for s, amp in tones:
        am = 0.6 + 0.4 * np.sin(2 * math.pi * AM_RATES[s] * t + rng.uniform(0, 2 * math.pi))
        wave += 0.25 * amp * am * np.sin(2 * math.pi * PITCHES[s] * t + rng.uniform(0, 2 * math.pi))
    soundfile.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")


def _labels_string(labels) -> str:
    return "[" + ", ".join(f"'{w}'" for w in labels) + "]"


def synthesize(out: str, n_train: int = 800, n_test: int = 200, seed: int = 0, progress: bool = True,
               n_val: int = 0, n_rl: int = 0, n_test_shift: int = 0, rl_labels: str = "annotators",
               annotators: Annotators | None = None, held_out_words: int = 2, shift_misleading: float = 0.35,
               shift_distractor: float = 0.5) -> dict:
    """Write the synthetic benchmark in the official layout; returns a summary. Same arguments -> same files.
    Splits: train (noisy labels and descriptions, for SFT), rl (for GRPO: labels of simulated annotators and no
    descriptions, or with rl_labels="clean" consensus labels and descriptions), val and test (consensus), and
    test_shift (what the training splits hold out). rl, val and test_shift are written only when asked for;
    with rl annotators, rl_oracle.csv keeps the rl clips' consensus labels and descriptions."""
    from tqdm import tqdm
    if rl_labels not in ("annotators", "clean"):
        raise ValueError(f"rl_labels {rl_labels!r}: choose annotators or clean")
    ann = annotators or Annotators()
    full = synth_sectors()
    shift = None
    if n_test_shift:  # hold out surface words, sector pairs and lone-modality sectors for test_shift
        cut = {s: max(2, len(ws) - held_out_words) for s, ws in full.items()}
        pools = {s: ws[:cut[s]] for s, ws in full.items()}
        shift_pools = {s: ws[cut[s]:] or ws for s, ws in full.items()}
        n = len(full)
        shift = Shift(pairs=[(i, i + 1) for i in range(0, n - 1, 2)], solo={i: i % 2 for i in range(n)},
                      misleading=shift_misleading, distractor=shift_distractor)
    else:
        pools = shift_pools = full
    profiles = annotator_profiles(ann, pools, seed)
    os.makedirs(os.path.join(out, "video"), exist_ok=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    names = ("train", "rl", "val", "test", "test_shift")
    rows = {split: [] for split in names}
    reasons, subtitles, oracle, meta = [], [], [], {}
    splits = (["train"] * n_train + ["rl"] * n_rl + ["val"] * n_val + ["test"] * n_test
              + ["test_shift"] * n_test_shift)
    for i, split in enumerate(tqdm(splits, desc="synthesize", disable=not progress, leave=False)):
        rng = np.random.default_rng([seed, i])  # one stream per clip: order-independent and reproducible
        name = f"synth_{i:05d}"
        shifted = split == "test_shift"
        c = _synth_clip(rng, shift_pools if shifted else pools, noisy=(split == "train"), shift=shift,
                        shifted=shifted)
        _render_video(os.path.join(out, "video", f"{name}.mp4"), rng, c["video"], c["distractor"])
        _render_audio(os.path.join(out, "audio", f"{name}.wav"), rng, c["audio"], c["distractor"])
        meta[name] = {k: c[k] for k in ("sectors", "video", "audio", "text", "misleading", "distractor")}
        meta[name]["split"] = split
        subtitles.append((name, c["subtitle"]))
        if split == "rl" and rl_labels == "annotators":
            # a stream of its own, so the clip (media, subtitle, consensus) is the same as with clean labels
            arng = np.random.default_rng([seed, i, 1])
            j = int(arng.integers(ann.n))
            rows[split].append((name, _labels_string(annotate(arng, pools, c["sectors"], profiles[j], ann))))
            oracle.append((name, _labels_string(c["labels"]), c["reason"]))
            meta[name]["annotator"] = j
            continue  # no description: the real GRPO data (MER2025-OV) has none
        rows[split].append((name, _labels_string(c["labels"])))
        reasons.append((name, c["reason"]))
    tables = [(f"{split}.csv", ("name", "openset"), rows[split]) for split in names
              if rows[split] or split in ("train", "test")]
    tables += [("reasons.csv", ("name", "reason"), reasons), ("subtitles.csv", ("name", "english"), subtitles)]
    if oracle:
        tables.append(("rl_oracle.csv", ("name", "openset", "reason"), oracle))
    for filename, header, table in tables:
        with open(os.path.join(out, filename), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(table)
    summary = {"seed": seed, "rl_labels": rl_labels, "sectors": full}
    if rl_labels == "annotators" and n_rl:
        summary["annotators"] = {**asdict(ann), "vocabularies": [v for v, _ in profiles],
                                 "omission_rates": [r for _, r in profiles]}
    if shift is not None:
        summary["shift"] = {**asdict(shift), "pairs": [[list(full)[a], list(full)[b]] for a, b in shift.pairs],
                            "solo": {list(full)[s]: ("video", "audio")[m] for s, m in shift.solo.items()},
                            "training_words": pools, "held_out_words": shift_pools}
    with open(os.path.join(out, "synth.json"), "w") as f:
        json.dump({**summary, "clips": meta}, f, indent=1)
    return {"out": out, "n_train": n_train, "n_rl": n_rl, "n_val": n_val, "n_test": n_test,
            "n_test_shift": n_test_shift, "rl_labels": rl_labels, "sectors": list(full)}


def tokenizer_corpus() -> list:
    """Texts the on-the-fly tokenizer of the tiny preset is trained on: prompts, templates, lexicon words."""
    lex = load_lexicon("builtin")
    pools = synth_sectors(lex)
    words = sorted(lex.synonyms)
    # the fixed parts of every prompt and target are repeated so that they become a few tokens each
    texts = 50 * [QUESTION, THINK_INSTRUCTION, ANSWER_INSTRUCTION, "Subtitle: (none)", "user", "assistant"]
    texts += 10 * (CUE_TEMPLATES + NEUTRAL_SUBTITLES + COLOUR_NAMES + PITCH_NAMES)
    texts += 50 * ["The face shows", "the voice is", "the words say", "No clear emotional cue", "perhaps a little"]
    texts += [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    pool_words = sorted({w for ws in pools.values() for w in ws})
    texts += [f"{w}, {v}" for w in pool_words for v in pool_words]  # label words become single tokens
    texts += [f"{t.format(w=w)}" for t in CUE_TEMPLATES for w in pool_words]
    return texts


def main(argv=None):
    p = argparse.ArgumentParser(description="OV-MER data tools.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write the synthetic OV-MER benchmark in the official layout")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-train", type=int, default=800)
    s.add_argument("--n-rl", type=int, default=400, help="clips for GRPO (0: no rl.csv)")
    s.add_argument("--n-val", type=int, default=100, help="validation clips, consensus labels (0: no val.csv)")
    s.add_argument("--n-test", type=int, default=200)
    s.add_argument("--n-test-shift", type=int, default=200,
                   help="clips of the shifted test split (0: no test_shift.csv, and nothing held out of training)")
    s.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("rl labels")
    g.add_argument("--rl-labels", default="annotators", choices=("annotators", "clean"),
                   help="annotators: simulated human labels, no descriptions (default); clean: consensus labels "
                        "and descriptions (with --n-test-shift 0, the benchmark of the first releases)")
    g.add_argument("--annotators", type=int, default=Annotators.n, help="number of annotators")
    g.add_argument("--omit-rate", type=float, default=Annotators.omit, help="mean rate of a left-out emotion")
    g.add_argument("--synonym-rate", type=float, default=Annotators.synonym,
                   help="rate of a label word outside the annotator's own vocabulary")
    g.add_argument("--spurious-rate", type=float, default=Annotators.spurious, help="rate of a spurious word")
    g = s.add_argument_group("test_shift")
    g.add_argument("--held-out-words", type=int, default=2, help="words per sector kept for test_shift only")
    g.add_argument("--shift-misleading", type=float, default=0.35, help="misleading-subtitle rate (others: 0.15)")
    g.add_argument("--shift-distractor", type=float, default=0.5, help="distractor rate (others: 0.2)")
    c = sub.add_parser("check", help="validate a dataset folder and list every problem (exit 1 when any)")
    c.add_argument("dir", help="dataset folder in the official layout")
    c.add_argument("--without_subtitles", action="store_true",
                   help="the folder has no subtitle file on purpose (the stages' --without_subtitles)")
    args = p.parse_args(argv)
    if args.command == "check":
        problems, notes = check_dataset(args.dir, subtitles=not args.without_subtitles)
        for line in notes:
            print(f"note: {line}")
        for line in problems:
            print(f"problem: {line}")
        print(f"{args.dir}: {len(problems)} problem(s)" if problems else f"{args.dir}: no problems found")
        sys.exit(1 if problems else 0)
    sizes = (args.n_train, args.n_rl, args.n_val, args.n_test, args.n_test_shift)
    if min(sizes) < 0 or sum(sizes) == 0:
        sys.exit("error: --n-train, --n-rl, --n-val, --n-test and --n-test-shift must be >= 0 and not all 0")
    rates = (args.omit_rate, args.synonym_rate, args.spurious_rate, args.shift_misleading, args.shift_distractor)
    if not all(0 <= r <= 1 for r in rates) or args.annotators < 1 or args.held_out_words < 0:
        sys.exit("error: rates must lie in [0, 1], --annotators must be >= 1 and --held-out-words >= 0")
    ann = Annotators(args.annotators, args.omit_rate, args.synonym_rate, args.spurious_rate)
    summary = synthesize(args.out, args.n_train, args.n_test, args.seed, n_val=args.n_val, n_rl=args.n_rl,
                         n_test_shift=args.n_test_shift, rl_labels=args.rl_labels, annotators=ann,
                         held_out_words=args.held_out_words, shift_misleading=args.shift_misleading,
                         shift_distractor=args.shift_distractor)
    print(f"wrote {summary['n_train']} train, {summary['n_rl']} rl ({summary['rl_labels']} labels), "
          f"{summary['n_val']} val, {summary['n_test']} test and {summary['n_test_shift']} test_shift clips to "
          f"{summary['out']} (sectors: {', '.join(summary['sectors'])})")


if __name__ == "__main__":
    main()
