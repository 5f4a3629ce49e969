"""data.py: OV-MER datasets in the official layout, read into tensors and prompts for every stage.

The official layout (what the released datasets unpack to), all under one folder DIR:
    DIR/{split}.csv            name, openset        labels as a list-looking string "['happy', 'excited']"
    DIR/reasons.csv            name, reason         descriptions (the <think> targets); optional
    DIR/subtitles.csv          name, english        (or name, sentence); also subtitle_chieng.csv
    DIR/video/{name}.mp4|.avi  frames, decoded with decord
    DIR/audio/{name}.wav       any rate, mono or stereo (resampled to 16 kHz mono with soxr)
    DIR/openface_face/{name}/{name}.npy or DIR/openface_face/{name}.npy   optional face crops, uint8 [T, H, W, 3]
MER-UniBench's test sets (`find_unibench`, `read_unibench`) keep their releases' folders and .npz label files.
`python synth.py` writes a synthetic benchmark in these layouts; `python data.py check DIR` validates a folder.

One function, `build_prompt`, writes the prompt of every stage (SFT, GRPO, evaluation), so they cannot drift:
the placeholders <|fused|> <|audio|> <|video|> (n_tokens each), the subtitle and the question, in one user turn
of the tokenizer's chat template. Targets are `<think>{reason}</think><answer>{labels}</answer>` or
`<answer>{labels}</answer>` (no-think mode), labels joined with ", ". `tokenizer_corpus` gives the texts a
random-init LLM's tokenizer is trained on: the fixed prompt texts, the lexicon's words and the dataset's text.
"""

import argparse
import contextlib
import copy
import csv
import os
import sys
from dataclasses import dataclass

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
# The text an on-the-fly tokenizer is trained on


def clip_texts(clips) -> list:
    """The text of a dataset's clips as a model reads and writes it: each clip's labels (as in its targets),
    subtitle and reason, where it has them."""
    texts = []
    for c in clips:
        texts += [t for t in (format_labels(c.labels), c.subtitle.strip(), (c.reason or "").strip()) if t]
    return texts


def tokenizer_corpus(texts=()) -> list:
    """Texts the on-the-fly tokenizer of a random-init LLM is trained on: the fixed parts of every prompt and
    target (repeated, so that each becomes a few tokens), every word of the lexicon, and `texts`, the text of the
    dataset the model will train on (`clip_texts`): whatever the dataset, its words become few tokens. The same
    texts and seed give the same tokenizer."""
    words = sorted(load_lexicon("builtin").synonyms)
    corpus = 50 * [QUESTION, THINK_INSTRUCTION, ANSWER_INSTRUCTION, "Subtitle: (none)", "user", "assistant"]
    corpus += [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    return corpus + list(texts)


def main(argv=None):
    p = argparse.ArgumentParser(description="OV-MER data tools.")
    sub = p.add_subparsers(dest="command", required=True)
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


if __name__ == "__main__":
    main()
