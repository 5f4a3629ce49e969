"""synth.py: stage 0, the synthetic benchmark. Writes an OV-MER benchmark and a synthetic MER-UniBench in the
official layouts that the other stages read, from one hidden generative process, so that every finding of the
papers can be tested on a CPU.

    python synth.py                                   # out/synth (where sft.py looks by default), ~1 min
    python synth.py --out DIR --seed 1 --unibench 0   # another draw, no MER-UniBench
    python synth.py --out DIR --rl_labels clean --n_test_shift 0 --unibench 0   # the first release's benchmark
    python eval.py --ckpt out/grpo --benchmark merunibench --root out/synth/unibench   # score the MER-UniBench

Every flag is also accepted with hyphens (--n-train). The same arguments write the same files, byte for byte.
An --out that already holds files is refused unless it holds an earlier benchmark and --overwrite is given; the
benchmark is written to OUT.partial and renamed when complete, so an interrupted run leaves no half benchmark.

The OV-MER benchmark (DIR/{train,rl,val,test,test_shift}.csv, reasons.csv, subtitles.csv, rl_oracle.csv,
video/, audio/, synth.json). Its generative process, which is what makes "RL beats SFT on EW-F" testable:
1. Six hidden emotion sectors: the level-1 sectors of wheel 1 of our lexicon (joyful, mad, peaceful, powerful,
   sad, scared). Each sector has a colour, a pitch, an amplitude-modulation rate and a pool of surface words
   (words of the lexicon that map to that sector in wheel 1 and to the same sectors as the sector's own name in
   every other wheel, so the EW metric of a label list equals the set-F1 of its hidden sectors).
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
   `--synonym_rate` (0.2); it leaves out each emotion of a clip at its own rate, spread evenly from 0.5x to
   1.5x `--omit_rate` (0.15), never all of them; it adds a word of a sector the clip does not carry at
   `--spurious_rate` (0.05). The annotators draw from a random stream of their own, so the clips (media,
   subtitles, consensus) are those of `--rl_labels clean`, which writes consensus labels and descriptions to
   the rl split as the first release did; rl_oracle.csv (name, openset, reason) keeps them in annotator mode.
   With `--rl_labels clean --n_test_shift 0` the files are those of the first release, byte for byte.
5. test_shift (`--n_test_shift`, 0: none, and nothing held out): three sector pairs (sorted sectors 1-2,
   3-4, 5-6) never occur together in train, rl, val or test, and each sector has a modality (video for the
   1st, 3rd and 5th, audio for the others) that never shows it alone there. A test_shift clip carries one such
   pair (and, 20% of clips, a third sector), each sector of the pair shown alone in that modality; its labels
   and subtitle cues use the last `--held_out_words` (2) words of each pool, which no other split uses; its
   misleading-subtitle rate is `--shift_misleading` (0.35, also on clips whose subtitle carries no cue) and
   its distractor rate `--shift_distractor` (0.5).
6. Reasons: a short templated description naming the cues and the emotion each suggests (a label word of
   the sector each cue evidences), e.g. "The face shows red (angry); the voice is high (scared).".

The synthetic MER-UniBench (`--unibench N` clips per set, default 120; 0: none), in DIR/unibench/ with the
folder and label-file names of the releases (data.UNIBENCH), each folder with video/, audio/ and
subtitles.csv. Its clips come from the same process as the test split (training words, the training splits'
held-out pairs and modalities avoided, base misleading and distractor rates), each from a random stream of its
own, so no clip, media file or label of it is in a training split; training never sees these labels, as in the
papers. The members:
- `ovmerdplus` (ovmerdplus-process/track2_test.csv): the test split itself, its consensus labels and its media
  (hard links, or copies where links are impossible), scored by EW-F as OV-MERD+.
- Basic emotions, scored by the HIT rate. A clip carries ONE sector (a basic-emotion set names one class per
  clip), or none: a NEUTRAL clip (no disc, no tone, a neutral subtitle; a faint distractor at the base rate),
  a small extension of the process that the OV-MER splits never use. The class is drawn uniformly among the
  set's classes that name a hidden sector, and neutral. A class word names the sector of its wheel-1 mapping
  and maps like that sector's words in every wheel where it maps (checked when writing, and tested):
  `mer2023` (mer2023-dataset-process/label-6way.npz, 'emo' as a word; the real MER2023's 6 classes neutral,
  angry, happy, sad, worried, surprise): angry -> mad, happy -> joyful, sad -> sad, worried -> scared
  (wheels 2-5: angry / anger / anger / anger, happy / joy / joy / joy, sad / sadness x3, fearful / fear x3),
  neutral -> none (skipped by the HIT rate, as officially), surprise -> no wheel-1 sector: in the class list,
  never drawn (the hidden process has no such sector). So 4 sectors and neutral, 1/5 each.
  `iemocapfour` (iemocap-dataset/label_4way.npz, 'emo' as an index into the real IEMOCAP's 4 classes happy,
  sad, neutral, anger): happy -> joyful, sad -> sad, anger -> mad (noun form, same sectors as angry),
  neutral -> none. 3 sectors and neutral, 1/4 each; no scared clip, unlike mer2023.
  Neither set has a peaceful or powerful clip (no class of the real lists names them; wheel 2 folds both
  into "happy", so a caring answer on a happy clip hits in wheel 2 only, as it would officially).
- Sentiment, scored by the weighted F1 of the binary sentiment: `cmumosi` (cmumosi-dataset/label.npz, valence
  in [-3, 3] like CMU-MOSI) and `sims` (sims-dataset/label.npz, valence in [-1, 1] like CH-SIMS), 'emo' None.
  A clip carries 1-3 sectors as in the test split, or (10%) none; its valence is scale x (positive - negative
  sectors) / sectors, by the polarity wheel 1 of our lexicon gives each sector (joyful, peaceful, powerful
  positive; mad, sad, scared negative), so it is exactly 0 for neutral clips and for clips with as many positive
  as negative sectors (about a third of the clips); the metric removes those, as the official one removes
  valence 0. The valence is written to the basic sets' 'val' too ([-1, 1]; unused by the HIT rate).
Label files hold one pickled dict `test_corpus` (name -> {'emo': ..., 'val': ...}) as the releases' do. With
the default 120 clips per set: 120 x 4 + the 200 test clips; about 80 clips per sentiment set and 96 (mer2023)
and 90 (iemocapfour) non-neutral clips per HIT set are scored.

Departures: everything here stands in for gated data (MER-Caption+, MER2025-OV, OV-MERD+ and MER-UniBench);
the real basic-emotion sets are single-label too, but their clips carry mixed, graded emotions, and real
sentiment is graded by annotators, not counted from sectors. Only 2 of the 4 basic-emotion and 2 of the 4
sentiment sets of MER-UniBench are made (enough to test the claim; each set costs evaluation time), so the
synthetic MER-UniBench mean is over 5 scores, not 9.
"""

import collections
import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np

import common
import data
from data import SAMPLE_RATE
from reward import load_lexicon

# ----------------------------------------------------------------------------------------------------------
# The synthetic OV-MER benchmark: sectors, cues, annotators, clips, media

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
                shifted: bool = False, chosen: list | None = None) -> dict:
    """Draw one clip's hidden sectors, its evidence per modality, labels and reason (no media yet).
    `pools` holds the words this split may use; with `shift`, a training clip avoids what it holds out and a
    test_shift clip (`shifted`) is made of it. `chosen` (sector indices) fixes the sectors: one for a
    basic-emotion clip, none for a neutral clip (no cue in any modality)."""
    sectors = list(pools)
    k = rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])
    if chosen is not None:
        chosen = list(chosen)
    elif shifted:  # a held-out pair, and now and then a third sector
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




def _write_csv(path: str, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def synthesize(out: str, n_train: int = 800, n_test: int = 200, seed: int = 0, progress: bool = True,
               n_val: int = 0, n_rl: int = 0, n_test_shift: int = 0, rl_labels: str = "annotators",
               annotators: Annotators | None = None, held_out_words: int = 2, shift_misleading: float = 0.35,
               shift_distractor: float = 0.5, n_unibench: int = 0) -> dict:
    """Write the synthetic benchmark in the official layout; returns a summary. Same arguments -> same files.
    Splits: train (noisy labels and descriptions, for SFT), rl (for GRPO: labels of simulated annotators and no
    descriptions, or with rl_labels="clean" consensus labels and descriptions), val and test (consensus), and
    test_shift (what the training splits hold out). rl, val and test_shift are written only when asked for;
    with rl annotators, rl_oracle.csv keeps the rl clips' consensus labels and descriptions. With n_unibench,
    the synthetic MER-UniBench goes to out/unibench (n_unibench clips per set, and the test split)."""
    from tqdm import tqdm
    if rl_labels not in ("annotators", "clean"):
        raise ValueError(f"rl_labels {rl_labels!r}: choose annotators or clean")
    ann = annotators or Annotators()
    lex = load_lexicon("builtin")
    full = synth_sectors(lex)
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
        _write_csv(os.path.join(out, filename), header, table)
    summary = {"seed": seed, "rl_labels": rl_labels, "sectors": full}
    if rl_labels == "annotators" and n_rl:
        summary["annotators"] = {**asdict(ann), "vocabularies": [v for v, _ in profiles],
                                 "omission_rates": [r for _, r in profiles]}
    if shift is not None:
        summary["shift"] = {**asdict(shift), "pairs": [[list(full)[a], list(full)[b]] for a, b in shift.pairs],
                            "solo": {list(full)[s]: ("video", "audio")[m] for s, m in shift.solo.items()},
                            "training_words": pools, "held_out_words": shift_pools}
    if n_unibench:
        test = [(name, labels, dict(subtitles)[name]) for name, labels in rows["test"]]
        summary["unibench"] = synthesize_unibench(out, n_unibench, seed, pools, shift, test, lex, progress)
    with open(os.path.join(out, "synth.json"), "w") as f:
        json.dump({**summary, "clips": meta}, f, indent=1)
    return {"out": out, "n_train": n_train, "n_rl": n_rl, "n_val": n_val, "n_test": n_test,
            "n_test_shift": n_test_shift, "rl_labels": rl_labels, "sectors": list(full), "n_unibench": n_unibench}


# ----------------------------------------------------------------------------------------------------------
# The synthetic MER-UniBench (folders, label files and class lists: data.UNIBENCH)

# member -> how its label file gives the class ('emo' a word, or an index into the class list) or, for a
# sentiment set, the valence scale
UNIBENCH_SETS = {"mer2023": ("hit", "word"), "iemocapfour": ("hit", "index"), "cmumosi": ("sentiment", 3.0),
                 "sims": ("sentiment", 1.0)}
NEUTRAL_RATE = 0.1  # sentiment sets: clips without any emotional evidence (valence 0)


def class_sectors(classes, pools: dict, lex) -> dict:
    """Class word -> the hidden sector it names: its wheel-1 sector, when that is one of the pools' (else None:
    neutral, surprise, disgust). Such a word must map like the sector's own words in every wheel where it maps,
    or the HIT rate would count a right answer as a miss."""
    out = {}
    for word in classes:
        mapped = lex.lookup(word)[0]
        sector = mapped[0] if mapped[0] in pools else None
        if sector is not None:
            want = lex.lookup(pools[sector][0])[0]
            wrong = [k + 1 for k, (m, w) in enumerate(zip(mapped, want)) if m is not None and m != w]
            if wrong:
                raise ValueError(f"class {word!r} names sector {sector!r} in wheel 1 but maps elsewhere in wheel "
                                 f"{wrong[0]} ({mapped[wrong[0] - 1]!r}, its words: {want[wrong[0] - 1]!r})")
        out[word] = sector
    return out


def valence(sectors, lex, scale: float) -> float:
    """scale x (positive - negative sectors) / sectors, by wheel 1's sector polarities; 0 without sectors.
    >>> valence(["joyful", "sad", "peaceful"], load_lexicon("builtin"), 3.0)
    1.0
    """
    votes = [{"positive": 1, "negative": -1}.get(lex.polarity[0].get(s), 0) for s in sectors]
    return round(scale * sum(votes) / len(votes), 4) if votes else 0.0


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: the same bytes
        shutil.copyfile(src, dst)


def synthesize_unibench(out: str, n: int, seed: int, pools: dict, shift, test: list, lex,
                        progress: bool = True) -> dict:
    """Write out/unibench: n clips for each of UNIBENCH_SETS, and the test split (name, labels, subtitle) as
    ovmerdplus. Returns what synth.json records of it (each clip's class or valence and hidden evidence)."""
    from tqdm import tqdm
    root, sectors, summary = os.path.join(out, "unibench"), list(pools), {}
    bar = tqdm(total=n * len(UNIBENCH_SETS), desc="MER-UniBench", disable=not progress, leave=False)
    for k, (member, (task, how)) in enumerate(UNIBENCH_SETS.items()):
        _, folders, label_files, classes = data.UNIBENCH[member]
        folder = os.path.join(root, folders[0])
        for sub in ("video", "audio"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        named = class_sectors(classes, pools, lex) if task == "hit" else {}
        drawn = [c for c in named if named[c] is not None or c == "neutral"]
        corpus, subtitles, meta = {}, [], {}
        for j in range(n):
            # a stream per clip, apart from the OV-MER clips' ([seed, i]) and the annotators' ([seed, i, 1])
            rng = np.random.default_rng([seed, j, 2 + k])
            name = f"{member}_{j:05d}"
            if task == "hit":  # one class; its sector, or none (neutral)
                word = drawn[int(rng.integers(len(drawn)))]
                chosen = [] if named[word] is None else [sectors.index(named[word])]
            else:  # 1-3 sectors as in the test split, or none
                word, chosen = None, ([] if rng.random() < NEUTRAL_RATE else None)
            c = _synth_clip(rng, pools, noisy=False, shift=shift, chosen=chosen)
            _render_video(os.path.join(folder, "video", f"{name}.mp4"), rng, c["video"], c["distractor"])
            _render_audio(os.path.join(folder, "audio", f"{name}.wav"), rng, c["audio"], c["distractor"])
            val = valence(c["sectors"], lex, how if task == "sentiment" else 1.0)
            emo = classes.index(word) if how == "index" else word
            corpus[name] = {"emo": emo, "val": val}
            subtitles.append((name, c["subtitle"]))
            meta[name] = {"class": word, "valence": val,
                          **{x: c[x] for x in ("sectors", "video", "audio", "text", "misleading", "distractor")}}
            bar.update(1)
        np.savez(os.path.join(folder, label_files[0]), test_corpus=np.array(corpus, dtype=object))
        _write_csv(os.path.join(folder, "subtitles.csv"), ("name", "english"), subtitles)
        summary[member] = {"folder": os.path.relpath(folder, out), "label_file": label_files[0], "task": task,
                           **({"classes": named} if task == "hit" else {"scale": how}), "clips": meta}
    bar.close()
    if test:  # OV-MERD+: the test split, its consensus labels and its very media files
        folder = os.path.join(root, data.UNIBENCH["ovmerdplus"][1][0])
        for sub, ext in (("video", "mp4"), ("audio", "wav")):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            for name, _, _ in test:
                _link_or_copy(os.path.join(out, sub, f"{name}.{ext}"), os.path.join(folder, sub, f"{name}.{ext}"))
        label_file = data.UNIBENCH["ovmerdplus"][2][0]
        _write_csv(os.path.join(folder, label_file), ("name", "openset"), [(n, lab) for n, lab, _ in test])
        _write_csv(os.path.join(folder, "subtitles.csv"), ("name", "english"), [(n, s) for n, _, s in test])
        summary["ovmerdplus"] = {"folder": os.path.relpath(folder, out), "label_file": label_file, "task": "ovmer",
                                 "clips": [n for n, _, _ in test]}
    return summary


# ----------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class Args:
    # output
    out: str = field(default="out/synth", metadata={"help": "output folder (sft.py, grpo.py and eval.py read "
                                                           "out/synth by default)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the benchmark an earlier run wrote to --out"})
    seed: int = field(default=0, metadata={"help": "seed of every draw (same seed and sizes: same files)"})
    # splits
    n_train: int = field(default=800, metadata={"help": "SFT clips (captioner-style labels and descriptions)"})
    n_rl: int = field(default=400, metadata={"help": "GRPO clips (0: no rl.csv)"})
    n_val: int = field(default=100, metadata={"help": "validation clips, consensus labels (0: no val.csv)"})
    n_test: int = field(default=200, metadata={"help": "test clips, consensus labels (also MER-UniBench's "
                                                       "ovmerdplus)"})
    n_test_shift: int = field(default=200, metadata={"help": "clips of the shifted test split (0: no "
                                                             "test_shift.csv, and nothing held out of training)"})
    unibench: int = field(default=120, metadata={"help": "clips per synthetic MER-UniBench set in OUT/unibench "
                                                         "(0: none)"})
    # rl labels
    rl_labels: str = field(default="annotators", metadata={"help": "annotators: simulated human labels, no "
                                                                   "descriptions; clean: consensus labels and "
                                                                   "descriptions (the first releases)"})
    annotators: int = field(default=Annotators.n, metadata={"help": "number of simulated annotators"})
    omit_rate: float = field(default=Annotators.omit, metadata={"help": "mean rate of a left-out emotion"})
    synonym_rate: float = field(default=Annotators.synonym, metadata={"help": "rate of a label word outside the "
                                                                             "annotator's own vocabulary"})
    spurious_rate: float = field(default=Annotators.spurious, metadata={"help": "rate of a spurious word"})
    # test_shift
    held_out_words: int = field(default=2, metadata={"help": "words per sector kept for test_shift only"})
    shift_misleading: float = field(default=0.35, metadata={"help": "misleading-subtitle rate (others: 0.15)"})
    shift_distractor: float = field(default=0.5, metadata={"help": "distractor rate (others: 0.2)"})


def check_args(args: Args):
    """Refuse bad arguments and an --out that holds other files, before any work."""
    problems = []
    problems += common.at_least(args, 0, "n_train", "n_rl", "n_val", "n_test", "n_test_shift", "unibench")
    if args.n_train + args.n_rl + args.n_val + args.n_test + args.n_test_shift == 0:
        problems.append("--n_train, --n_rl, --n_val, --n_test and --n_test_shift are all 0: no split to write")
    rates = (args.omit_rate, args.synonym_rate, args.spurious_rate, args.shift_misleading, args.shift_distractor)
    if not all(0 <= r <= 1 for r in rates):
        problems.append("rates must lie in [0, 1]")
    problems += common.at_least(args, 1, "annotators") + common.at_least(args, 0, "held_out_words")
    if args.rl_labels not in ("annotators", "clean"):
        problems.append(f"--rl_labels {args.rl_labels!r}: choose annotators or clean")
    if os.path.isdir(args.out) and os.listdir(args.out):
        if not os.path.isfile(os.path.join(args.out, "synth.json")):
            problems.append(f"--out {args.out} holds files but no synthetic benchmark (no synth.json): choose an "
                            "empty or new folder")
        elif not args.overwrite:
            problems.append(f"--out {args.out} holds a benchmark already: pass --overwrite to replace it")
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out {args.out} is a file")
    common.refuse(problems)


def main(args: Args):
    check_args(args)
    out = os.path.normpath(args.out)
    partial = out + ".partial"  # written here, renamed when complete: no half benchmark in --out
    shutil.rmtree(partial, ignore_errors=True)
    common.ensure_writable(partial)
    try:
        with common.writing(out, partial=(partial,)):  # a full disk: one message, no partial benchmark
            summary = synthesize(partial, args.n_train, args.n_test, args.seed, n_val=args.n_val, n_rl=args.n_rl,
                                 n_test_shift=args.n_test_shift, rl_labels=args.rl_labels,
                                 annotators=Annotators(args.annotators, args.omit_rate, args.synonym_rate,
                                                       args.spurious_rate),
                                 held_out_words=args.held_out_words, shift_misleading=args.shift_misleading,
                                 shift_distractor=args.shift_distractor, n_unibench=args.unibench)
            if os.path.isdir(out):  # an earlier benchmark (check_args asked for --overwrite)
                shutil.rmtree(out)
            os.replace(partial, out)
    except BaseException:  # an interrupt or any error: no half benchmark stays either
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(f"wrote {summary['n_train']} train, {summary['n_rl']} rl ({summary['rl_labels']} labels), "
          f"{summary['n_val']} val, {summary['n_test']} test and {summary['n_test_shift']} test_shift clips to "
          f"{out} (sectors: {', '.join(summary['sectors'])})")
    if args.unibench:
        print(f"and a synthetic MER-UniBench in {out}/unibench: {args.unibench} clips each of "
              f"{', '.join(UNIBENCH_SETS)}" + (", and the test split as ovmerdplus" if args.n_test else ""))


if __name__ == "__main__":
    main(common.parse_args(Args))
