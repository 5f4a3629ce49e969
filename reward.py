"""reward.py: the emotion-wheel (EW) metric of OV-MER and the GRPO reward of AffectGPT-RL.

Why RL at all: the OV-MER score maps every predicted word onto five emotion wheels and compares sets of wheel
sectors. That mapping is a table lookup, not a differentiable function, so the paper optimises it with GRPO.
This file holds both sides of that bargain: the exact dataset metric (identical to the official code when it
is given the official wheel files) and the per-completion reward built from it.

The mapping, as the official code does it:

    label --forms--> synonym keys --synonyms--> wheel words --sort, first in wheel k--> sector (level 1 or 2)

`"happier"` is a form of `"happy"`, `"happy"` is a synonym key that points at wheel words, the alphabetically
first of those words that wheel k contains decides the sector. A label that is not a known form is dropped.

Two lexicons:
- `load_lexicon("builtin")`: our own lexicon, `lexicon.json` next to this file (written for this project from
  public emotion models; regular word forms are derived by the rules in `_derived_forms`).
- `load_lexicon(DIR)`: the official files (wheel1..5.xlsx, synonym.xlsx, format.csv), read with openpyxl.
  They may not be redistributed, so they never ship with the project.

Where the official code yields NaN or crashes we define the behaviour (tests/test_ew_parity.py holds it):
F = 0 when precision + recall = 0; a wheel with no usable sample is left out of the means (all wheels empty:
the scores are None, with a warning); a lone "[" parses to no labels; a ground-truth name without a prediction
is an error naming it.

The RL reward of one completion (`score_completion`), with w_* the weights:

    total = w_acc * accuracy * length_penalty + w_format * format + w_align * alignment + w_dual * dual

- accuracy: per-sample EW score = mean, over the wheels where the ground truth maps to a sector, of the
  per-sample F1 of the answer's sector set against the ground truth's. The dataset metric is instead the F of
  the dataset-mean precision and recall per wheel; that F is not a sum over samples, so it cannot be a
  per-sample reward. The per-sample F keeps both pressures the metric has (extra sectors cost precision,
  missing ones cost recall). A ground truth that maps to nothing (e.g. neutral) gives no signal: None.
- length_penalty (paper: P1, P2, P3), used only when the answer has more distinct labels n_p than the ground
  truth n_g: P1 = 1/(n_p - n_g + 1), P2 = n_g/n_p, P3 = log(n_g)/log(n_p). P3 is 0 for every n_p > 1 when
  n_g = 1, which would erase the accuracy signal of all single-label clips; we use P2 = 1/n_p there instead.
- format: 1 for exactly `<think>..</think><answer>..</answer>` (or `<answer>..</answer>` alone in no-think
  mode), both non-empty, free of tags, nothing around them but white space, else 0. Tags are exact
  (`<Answer>` or `<answer >` is no tag).
- the scored answer (`extract_answer`, for the reward and for evaluation): the first `<answer>..</answer>`
  after the LAST `</think>`; everything before it is reasoning, so an <answer> inside <think> never counts. A
  <think> that is never closed (truncated, or a trick) leaves no answer. Without think tags at all, the first
  `<answer>..</answer>` of the text. A malformed completion is still scored this way (with format 0): a
  policy that loses a tag keeps its accuracy signal, and no tag trick can earn more than an honest answer,
  because whatever the tags, ONE answer is scored, and writing that same answer in the strict format earns the
  same accuracy plus the format reward (tests/test_reward.py holds a table of such tricks).
- alignment: EW score of the emotion words spotted inside <think> against the answer labels (paper's
  alignment reward); dual: the same words against the ground truth. Words are spotted by lexicon lookup of
  single words and two-word phrases (no LLM judge; negations such as "not happy" are not understood).

Command line (prints how every label travels through the wheels, and every reward component):

    python reward.py "<think>..</think><answer>happy, tense</answer>" --gt "['worried', 'nervous']" [--lexicon DIR]
    python reward.py --file completion.txt --gt "..."       # or - (stdin), for long completions
"""

import argparse
import collections
import csv
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

N_WHEELS = 5
LEXICON_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lexicon.json")
POLARITIES = ("positive", "negative", "neutral")

# ----------------------------------------------------------------------------------------------------------
# Parsing label strings


_SEPARATORS = re.compile(r"[,'\"]")


def parse_labels(text) -> list:
    """Label string -> list of labels, the official rule.

    Strip ONE leading "[" and ONE trailing "]", split on , ' and ", strip and lower-case each piece, drop empty
    ones. A list (or tuple) is taken as already split. NOTE: "don't" splits at the apostrophe and "sad]." keeps
    its punctuation (and then maps to nothing): both are what the official metric does.
    """
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [s for s in (str(x).strip().lower().strip() for x in text) if s]
    text = str(text)
    if text[:1] == "[":
        text = text[1:]
    if text[-1:] == "]":  # a lone "[" is now "" and parses to [] (the official code raises IndexError here)
        text = text[:-1]
    return [piece.lower().strip() for piece in (p.strip() for p in _SEPARATORS.split(text)) if piece]


# ----------------------------------------------------------------------------------------------------------
# The lexicon: word forms -> synonym keys -> wheel words -> sectors


@dataclass
class Lexicon:
    """The three maps of the EW metric plus the five wheels.

    forms:    surface form -> synonym keys          ("happier" -> ("happy",))
    synonyms: synonym key -> wheel words            ("glad" -> ("happy", "joyful"))
    clusters: clusters[level - 1][wheel - 1] maps every word of that wheel to its level-1 sector or level-2 group
    polarity: polarity[wheel - 1] maps each level-1 sector to positive / negative / neutral (empty if unknown)
    """

    source: str
    forms: dict
    synonyms: dict
    clusters: list
    polarity: list
    wheel_words: frozenset
    _cache: dict = field(default_factory=dict, repr=False)

    def candidates(self, label: str) -> list:
        """All wheel words reachable from a label, sorted: the official order of preference."""
        words = set()
        for key in self.forms.get(label, ()):
            words.update(self.synonyms.get(key, ()))
        return sorted(words)

    def lookup(self, label: str) -> tuple:
        """label -> ((sector in wheel 1..5), (level-2 group in wheel 1..5)); None where dropped. Cached."""
        hit = self._cache.get(label)
        if hit is None:
            words = self.candidates(label)
            hit = tuple(
                tuple(next((wheel[w] for w in words if w in wheel), None) for wheel in self.clusters[level])
                for level in (0, 1))
            if len(self._cache) > 500_000:  # RL samples can invent endless garbage labels: keep memory bounded
                self._cache.clear()
            self._cache[label] = hit
        return hit

    def is_emotion(self, word: str) -> bool:
        """True when the word maps to a sector in at least one wheel."""
        return word in self.forms and any(s is not None for s in self.lookup(word)[0])


def _wheel_clusters(rows):
    """Rows (level1, level2, level3) of one wheel -> ({word: level-1 sector}, {word: level-2 group}).

    Rows apply in order, so a word listed twice keeps its LAST assignment (as the official code does).
    A level-1 word's level-2 group is the alphabetically first of its level-2 children.
    """
    level1, level2, children = {}, {}, {}
    for l1, l2, l3 in rows:
        level1[l1] = level1[l2] = level1[l3] = l1
        level2[l2] = level2[l3] = l2
        children.setdefault(l1, set()).add(l2)
    for l1, kids in children.items():
        level2[l1] = sorted(kids)[0]
    return level1, level2


def build_lexicon(source, wheel_rows, synonym_pairs, form_pairs, polarity=None) -> Lexicon:
    """Assemble a Lexicon from (wheel rows x5, (synonym, wheel word) pairs, (form, synonym key) pairs)."""
    maps = [_wheel_clusters(rows) for rows in wheel_rows]
    synonyms, forms = {}, {}
    for key, word in synonym_pairs:
        synonyms.setdefault(key, set()).add(word)
    for form, key in form_pairs:
        forms.setdefault(form, set()).add(key)
    return Lexicon(
        source=source,
        forms={f: tuple(sorted(k)) for f, k in forms.items()},
        synonyms={s: tuple(sorted(w)) for s, w in synonyms.items()},
        clusters=[[m[0] for m in maps], [m[1] for m in maps]],
        polarity=polarity or [{} for _ in range(N_WHEELS)],
        wheel_words=frozenset(w for m in maps for w in m[0]))


class LexiconError(ValueError):
    """A lexicon that cannot be read: names the file and the problem."""


OFFICIAL_FILES = [f"wheel{k}.xlsx" for k in range(1, N_WHEELS + 1)] + ["synonym.xlsx", "format.csv"]


def _read_official(folder) -> Lexicon:
    """The official wheel files: wheel1..5.xlsx, synonym.xlsx, format.csv."""
    try:
        import openpyxl  # only needed for the official files
    except ImportError:
        raise LexiconError("the official wheel files need openpyxl (pip install openpyxl)") from None
    missing = [name for name in OFFICIAL_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise LexiconError(f"lexicon {folder}: missing {', '.join(missing)} (the official wheel folder holds "
                           f"{', '.join(OFFICIAL_FILES)})")

    def sheet_rows(name):
        path = os.path.join(folder, name)
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
            rows = list(book.worksheets[0].iter_rows(values_only=True))
            book.close()
        except Exception as e:  # openpyxl raises zip, XML and key errors for damaged files
            raise LexiconError(f"{path}: cannot read the workbook ({type(e).__name__}: {e})") from None
        return rows[1:]  # row 0 is the header

    wheel_rows = []
    for k in range(1, N_WHEELS + 1):
        rows, last = [], [None, None, None]
        for row in sheet_rows(f"wheel{k}.xlsx"):
            # a blank cell repeats the cell above (merged-cell style); values are lower-cased and stripped
            last = [str(v).lower().strip() if v is not None else last[i] for i, v in enumerate(row[:3])]
            if len(row) < 3 or None in last:
                raise LexiconError(f"{os.path.join(folder, f'wheel{k}.xlsx')}: row {row} needs three cells "
                                   "(level 1, 2, 3), a blank one repeating the cell above")
            rows.append(tuple(last))
        wheel_rows.append(rows)

    synonym_pairs = []
    for row in sheet_rows("synonym.xlsx"):
        for run in range(0, len(row) - 1, 2):  # 8 runs of (word, synonym list)
            if row[run] is None:
                continue
            word = str(row[run]).lower().strip()
            synonym_pairs.append((word, word))
            synonym_pairs += [(s.lower().strip(), word) for s in parse_labels(str(row[run + 1] or ""))]

    path = os.path.join(folder, "format.csv")
    form_pairs = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, strict=True)
            if not {"name", "format"} <= set(reader.fieldnames or ()):
                raise LexiconError(f"{path}: needs columns 'name' and 'format'; header is {reader.fieldnames}")
            for row in reader:
                name = (row["name"] or "").lower().strip()
                form_pairs.append((name, name))
                form_pairs += [(form, name) for form in parse_labels(row["format"] or "")]
    except (csv.Error, UnicodeDecodeError) as e:
        raise LexiconError(f"{path}: cannot read it as UTF-8 CSV ({e})") from None
    return build_lexicon(os.path.abspath(folder), wheel_rows, synonym_pairs, form_pairs)


def _derived_forms(key: str) -> set:
    """Regular word forms of a synonym key (the built-in lexicon lists only irregular ones).

    Spelling variants of phrases ("light-hearted" -> "light hearted", "lighthearted"), then for one-word bases:
    adverb -ly, noun -ness, -ated -> -ation, and plural / third person -s.
    """
    bases = {key}
    if "-" in key or " " in key:
        bases |= {key.replace("-", " "), key.replace(" ", "-"), key.replace("-", "").replace(" ", "")}
    forms = set(bases)
    for b in bases:
        if " " in b:
            continue
        if b.endswith("y"):
            forms |= {b[:-1] + "ily", b[:-1] + "iness"}
        elif b.endswith("le"):
            forms |= {b[:-1] + "y", b + "ness"}
        elif b.endswith("ic"):
            forms |= {b + "ally", b + "ness"}
        else:
            forms |= {b + "ly", b + "ness"}
        if b.endswith("ated"):
            forms.add(b[:-2] + "ion")
        if b.endswith(("s", "sh", "ch", "x")):
            forms.add(b + "es")
        elif b.endswith("y") and b[-2:-1] not in "aeiou":
            forms.add(b[:-1] + "ies")
        else:
            forms.add(b + "s")
    return forms


def _read_builtin(path=LEXICON_FILE) -> Lexicon:
    """Our lexicon: lexicon.json, five wheels of sectors -> groups -> words, synonyms, irregular forms."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if len(data["wheels"]) != N_WHEELS:
        raise ValueError(f"{path}: expected {N_WHEELS} wheels, found {len(data['wheels'])}")
    wheel_rows, polarity = [], []
    for k, wheel in enumerate(data["wheels"], 1):
        rows, pol = [], {}
        for sector, body in wheel["sectors"].items():
            if body["polarity"] not in POLARITIES:
                raise ValueError(f"{path}: wheel {k} sector {sector!r} has polarity {body['polarity']!r}")
            pol[sector] = body["polarity"]
            for group, words in body["groups"].items():
                rows += [(sector, group, w) for w in words] or [(sector, group, group)]
        wheel_rows.append(rows)
        polarity.append(pol)
    wheel_words = {w for rows in wheel_rows for row in rows for w in row}
    synonym_pairs = [(w, w) for w in wheel_words]
    for word, syns in data["synonyms"].items():
        if word not in wheel_words:
            raise ValueError(f"{path}: synonyms of {word!r}, which is in no wheel")
        synonym_pairs += [(s, word) for s in syns]
    keys = {s for s, _ in synonym_pairs}
    form_pairs = [(form, key) for key in keys for form in _derived_forms(key)]
    for key, extra in data["forms"].items():
        if key not in keys:
            raise ValueError(f"{path}: forms of {key!r}, which is no wheel word or synonym")
        form_pairs += [(form, key) for form in extra]
    return build_lexicon("builtin", wheel_rows, synonym_pairs, form_pairs, polarity)


def load_lexicon(source="builtin") -> Lexicon:
    """"builtin" (our lexicon.json) or a folder with the official files. Reads the files on every call (no cache
    keyed on a path whose files may change): load once and pass the Lexicon on."""
    if source != "builtin" and not os.path.isdir(source):
        raise LexiconError(f"lexicon: {source!r} is neither 'builtin' nor a folder of wheel files "
                           f"({', '.join(OFFICIAL_FILES)})")
    return _read_builtin() if source == "builtin" else _read_official(source)


# ----------------------------------------------------------------------------------------------------------
# The metric


def map_label(label: str, lex: Lexicon, wheel: int, level: int = 1):
    """One label -> its sector (level 1) or group (level 2) in wheel 1..5, or None when it is dropped."""
    if wheel not in range(1, N_WHEELS + 1) or level not in (1, 2):
        raise ValueError(f"wheel must be 1..{N_WHEELS} and level 1 or 2, got wheel={wheel} level={level}")
    return lex.lookup(str(label).lower().strip())[level - 1][wheel - 1]


def mapped_sets(labels, lex: Lexicon, level: int = 1) -> list:
    """Parsed labels -> 5 sets of sectors (one per wheel); labels that map to nothing are dropped."""
    sets = [set() for _ in range(N_WHEELS)]
    for label in labels:
        for s, sector in zip(sets, lex.lookup(label)[level - 1]):
            if sector is not None:
                s.add(sector)
    return sets


def _precision_recall(gt_set, pred_set):
    """(precision, recall) of one sample in one wheel; None when the ground truth is empty (skipped)."""
    if not gt_set:
        return None
    if not pred_set:
        return 0.0, 0.0
    hits = len(gt_set & pred_set)
    return hits / len(pred_set), hits / len(gt_set)


def sample_scores(pred, gt, lex: Lexicon, level: int = 1) -> list:
    """5 entries (one per wheel): (precision, recall), or None when the mapped ground truth is empty."""
    gt_sets = mapped_sets(parse_labels(gt), lex, level)
    pred_sets = mapped_sets(parse_labels(pred), lex, level)
    return [_precision_recall(g, p) for g, p in zip(gt_sets, pred_sets)]


def f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0 (the official code divides by zero there)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _check_names(preds: dict, gts: dict):
    missing = [name for name in gts if name not in preds]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise KeyError(f"{len(missing)} ground-truth sample(s) have no prediction: {shown}")


def ew_metric(preds: dict, gts: dict, lex: Lexicon, level: int = 1) -> dict:
    """The official dataset-level EW metric over the samples of `gts` (in its order).

    Per wheel: mean precision and mean recall over the samples whose mapped ground truth is non-empty, and
    F = F1 of those two means. Reported: the means of F, precision and recall over the wheels.
    """
    _check_names(preds, gts)
    sets_of = {}  # label string -> its 5 mapped sets; datasets repeat strings, so each is parsed once

    def sets(text):
        key = text if isinstance(text, str) else tuple(text)
        if key not in sets_of:
            sets_of[key] = mapped_sets(parse_labels(text), lex, level)
        return sets_of[key]

    precisions = [[] for _ in range(N_WHEELS)]
    recalls = [[] for _ in range(N_WHEELS)]
    for name, gt in gts.items():
        for k, (g, p) in enumerate(zip(sets(gt), sets(preds[name]))):
            pr = _precision_recall(g, p)
            if pr is not None:
                precisions[k].append(pr[0])
                recalls[k].append(pr[1])

    per_wheel = []
    for ps, rs in zip(precisions, recalls):
        n = len(ps)
        p = math.fsum(ps) / n if n else None
        r = math.fsum(rs) / n if n else None
        per_wheel.append({"fscore": f1(p, r) if n else None, "precision": p, "recall": r, "n": n})
    used = [w for w in per_wheel if w["n"]]
    if not used:
        warnings.warn("EW metric undefined: no sample has a ground truth that maps to any wheel "
                      "(e.g. all neutral)")
    mean = lambda key: math.fsum(w[key] for w in used) / len(used) if used else None  # noqa: E731
    return {"fscore": mean("fscore"), "precision": mean("precision"), "recall": mean("recall"),
            "per_wheel": per_wheel, "n_samples": len(gts)}


def hit_rate(preds: dict, gts: dict, lex: Lexicon, per_wheel: bool = False):
    """Official basic-emotion HIT rate: per wheel (level 1), the fraction of samples whose ground-truth class
    maps to a sector among the prediction's sectors (samples whose class maps to nothing, e.g. neutral, are
    skipped in that wheel); then the mean over the wheels that kept any sample.

    With per_wheel=True returns (rate, [(hit rate, n) per wheel]).
    """
    _check_names(preds, gts)
    hits = [[] for _ in range(N_WHEELS)]
    for name, gt in gts.items():
        gt_sets = mapped_sets(parse_labels(gt), lex, 1)
        pred_sets = mapped_sets(parse_labels(preds[name]), lex, 1)
        for k, (g, p) in enumerate(zip(gt_sets, pred_sets)):
            if g:
                hits[k].append(1.0 if g & p else 0.0)
    rates = [(math.fsum(h) / len(h) if h else None, len(h)) for h in hits]
    used = [r for r, n in rates if n]
    rate = math.fsum(used) / len(used) if used else None
    return (rate, rates) if per_wheel else rate


# ----------------------------------------------------------------------------------------------------------
# Sentiment from emotion labels (MER-UniBench's sentiment sets)


def answer_polarity(labels, lex) -> str:
    """positive / negative / neutral: each label votes with its sector's polarity in every wheel covering it."""
    votes = collections.Counter()
    for label in labels:
        for k, sector in enumerate(lex.lookup(label)[0]):
            if sector is not None:
                votes[lex.polarity[k].get(sector, "neutral")] += 1
    if votes["positive"] > votes["negative"]:
        return "positive"
    return "negative" if votes["negative"] > votes["positive"] else "neutral"


def sentiment_scores(pred_polarity: dict, valence: dict) -> dict:
    """Binary sentiment (valence > 0 vs < 0; 0 removed): weighted F1 and accuracy. A predicted neutral counts
    as negative, as (pred > 0) does in the official pipeline."""
    pairs = [(v > 0, pred_polarity[n] == "positive") for n, v in valence.items() if v != 0]
    if not pairs:
        return {"weighted_f1": None, "accuracy": None, "n": 0}
    f1s, weights = [], []
    for cls in (True, False):
        tp = sum(g == cls and p == cls for g, p in pairs)
        fp = sum(g != cls and p == cls for g, p in pairs)
        fn = sum(g == cls and p != cls for g, p in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        weights.append(sum(g == cls for g, _ in pairs))
    return {"weighted_f1": sum(f * w for f, w in zip(f1s, weights)) / len(pairs),
            "accuracy": sum(g == p for g, p in pairs) / len(pairs), "n": len(pairs)}


# ----------------------------------------------------------------------------------------------------------
# The RL reward of one completion

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_FORMAT_THINK = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)
_FORMAT_ANSWER = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.S)
_TAG = re.compile(r"</?(?:think|answer)>")
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
PENALTIES = ("none", "p1", "p2", "p3")


def extract_answer(text: str) -> list:
    """Labels of the scored answer: the first <answer>...</answer> after the last </think> (the reasoning may
    quote tags; they never count). An unclosed <think> (it opens after the last </think>) leaves no answer;
    no complete <answer> pair -> no labels."""
    opened, closed = text.rfind("<think>"), text.rfind("</think>")  # -1 when absent
    if opened > closed:
        return []
    m = _ANSWER.search(text, closed + len("</think>") if closed >= 0 else 0)
    return parse_labels(m.group(1).strip()) if m else []


def extract_think(text: str) -> str:
    """Text inside the first <think>...</think> ("" when absent)."""
    m = _THINK.search(text)
    return m.group(1) if m else ""


def spot_emotions(text: str, lex: Lexicon) -> list:
    """Emotion words named in free text, in order of first appearance: two-word phrases first, then words."""
    words = _WORD.findall(text.lower())
    found, i = [], 0
    while i < len(words):
        pair = words[i] + " " + words[i + 1] if i + 1 < len(words) else None
        if pair and lex.is_emotion(pair):
            hit, i = pair, i + 2
        else:
            hit, i = (words[i] if lex.is_emotion(words[i]) else None), i + 1
        if hit and hit not in found:
            found.append(hit)
    return found


def format_ok(text: str, think: bool = True) -> bool:
    """Strict format: <think>X</think><answer>Y</answer> (or <answer>Y</answer> alone when think=False), X and
    Y non-empty and free of tags, nothing else but white space around."""
    m = (_FORMAT_THINK if think else _FORMAT_ANSWER).fullmatch(text)
    return m is not None and all(part.strip() and not _TAG.search(part) for part in m.groups())


def length_penalty(n_pred: int, n_gt: int, kind: str = "none") -> float:
    """Factor on the accuracy reward when the answer lists more distinct labels than the ground truth."""
    if kind not in PENALTIES:
        raise ValueError(f"length penalty must be one of {PENALTIES}, got {kind!r}")
    if kind == "none" or n_pred <= n_gt or n_gt == 0:
        return 1.0
    if kind == "p1":
        return 1.0 / (n_pred - n_gt + 1)
    if kind == "p2" or n_gt == 1:  # P3 with n_g = 1 is log(1) = 0 for every n_p: fall back to P2 = 1/n_p
        return n_gt / n_pred
    return math.log(n_gt) / math.log(n_pred)


ACCURACY = {"f1": lambda p, r: f1(p, r), "recall": lambda p, r: r}


def ew_score(pred_labels, gt_labels, lex: Lexicon, level: int = 1, kind: str = "f1"):
    """Per-sample EW score: mean over the wheels where the ground truth maps to a sector of the per-sample F1
    (kind="f1"), or of the recall alone (kind="recall", no precision pressure: the reward-hacking setting).
    None when the ground truth maps to nothing in every wheel."""
    score = ACCURACY[kind]
    gt_sets = mapped_sets(gt_labels, lex, level)
    pred_sets = mapped_sets(pred_labels, lex, level)
    scores = [score(*pr) for pr in map(_precision_recall, gt_sets, pred_sets) if pr is not None]
    return math.fsum(scores) / len(scores) if scores else None


def has_signal(gt, lex: Lexicon, level: int = 1) -> bool:
    """Whether a ground truth (label string or list) can reward anything: some label maps to a sector of some
    wheel. One that maps to nothing (e.g. neutral) scores every answer None, so RL leaves its clip out."""
    return any(mapped_sets(parse_labels(gt), lex, level))


def score_completion(text: str, gt, lex: Lexicon, think: bool = True, penalty: str = "none",
                     w_acc: float = 1.0, w_format: float = 0.5, w_align: float = 0.0, w_dual: float = 0.0,
                     level: int = 1, accuracy: str = "f1"):
    """Reward of one completion against a ground-truth label string (or list): a readable dict, or None when
    the ground truth gives no reward signal (maps to nothing in every wheel: drop the clip).

    Defaults: accuracy weight 1 and format weight 0.5 (the paper's R = R_acc + w * R_format with w
    unpublished; 0.5 keeps a right answer worth more than a right format), no length penalty and no
    auxiliary rewards (the paper's best recipe was accuracy + format). accuracy="recall" drops the
    precision pressure (to show the reward hacking that the length penalties stop).
    """
    gt_labels = parse_labels(gt)
    answer = extract_answer(text)
    acc = ew_score(answer, gt_labels, lex, level, accuracy)
    if acc is None:
        return None
    n_pred, n_gt = len(set(answer)), len(set(gt_labels))
    penalty_factor = length_penalty(n_pred, n_gt, penalty)
    fmt = 1.0 if format_ok(text, think) else 0.0
    out = {"total": 0.0, "accuracy": acc, "length_penalty": penalty_factor, "format": fmt,
           "answer": answer, "n_pred": n_pred, "n_gt": n_gt}
    if think and (w_align or w_dual):  # word spotting is the costly part: only when it counts
        named = spot_emotions(extract_think(text), lex)
        out["think_emotions"] = named
        out["alignment"] = ew_score(named, answer, lex, level) or 0.0
        out["dual"] = ew_score(named, gt_labels, lex, level) or 0.0
    else:
        out["alignment"] = out["dual"] = 0.0
    out["total"] = (w_acc * acc * penalty_factor + w_format * fmt
                    + w_align * out["alignment"] + w_dual * out["dual"])
    return out


def summarize_completions(completions: dict, gts: dict, lex: Lexicon, think: bool = True, level: int = 1) -> dict:
    """Dataset view of model outputs: EW metric of the <answer> labels (missing answer tag -> no labels), the
    fraction in the strict format, and the mean number of distinct answer labels. Keys are namespaced eval/."""
    answers = {name: extract_answer(completions[name]) for name in gts}
    ew = ew_metric(answers, gts, lex, level)
    n = max(1, len(gts))
    return {"eval/ew_f": ew["fscore"], "eval/ew_precision": ew["precision"], "eval/ew_recall": ew["recall"],
            "eval/format_rate": sum(format_ok(completions[k], think) for k in gts) / n,
            "eval/n_labels": sum(len(set(a)) for a in answers.values()) / n}


# ----------------------------------------------------------------------------------------------------------
# Transparency: explain a label or a completion


def explain_label(label: str, lex: Lexicon, level: int = 1) -> list:
    """Human-readable lines: how one label travels form -> synonym -> wheel word -> sector in each wheel."""
    keys = lex.forms.get(label)
    if not keys:
        return [f"  {label!r}: not a known word form -> dropped in every wheel"]
    words = lex.candidates(label)
    lines = [f"  {label!r}: form of {list(keys)} -> wheel words {words}"]
    for k in range(1, N_WHEELS + 1):
        wheel = lex.clusters[level - 1][k - 1]
        first = next((w for w in words if w in wheel), None)
        lines.append(f"      wheel {k}: " + (f"{first!r} -> {wheel[first]!r}" if first
                                             else "no candidate is in this wheel -> dropped"))
    return lines


def read_completion(completion: str | None, path: str | None) -> str:
    """The completion text: given on the command line, read from a file, or from stdin when it is "-"."""
    if (completion is None) == (path is None):
        raise SystemExit("error: give the completion as an argument, or --file PATH (- for stdin)")
    if completion is not None and completion != "-":
        return completion
    if completion == "-" or path == "-":  # bytes, decoded here: as strict as a file, whatever the locale
        try:
            return sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {'--file -' if path else '-'} (stdin): not UTF-8 text ({e})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --file {path}: cannot read it as UTF-8 text ({e})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description="Explain the EW reward of one completion.")
    p.add_argument("completion", nargs="?",
                   help="model output, e.g. '<think>..</think><answer>happy, tense</answer>'; - reads stdin")
    p.add_argument("--file", help="read the completion from this file instead (- for stdin)")
    p.add_argument("--gt", required=True, help="ground-truth labels, e.g. \"['worried', 'nervous']\"")
    p.add_argument("--lexicon", default="builtin", help="'builtin' or a folder with the official wheel files")
    p.add_argument("--level", type=int, default=1, choices=(1, 2))
    p.add_argument("--no-think", action="store_true", help="expect <answer> alone")
    p.add_argument("--penalty", default="none", choices=PENALTIES)
    p.add_argument("--w-format", type=float, default=0.5)
    p.add_argument("--w-align", type=float, default=0.0)
    p.add_argument("--w-dual", type=float, default=0.0)
    args = p.parse_args(argv)
    completion = read_completion(args.completion, args.file)
    try:
        lex = load_lexicon(args.lexicon)
    except LexiconError as e:
        raise SystemExit(f"error: {e}") from None
    think = not args.no_think
    answer, gt = extract_answer(completion), parse_labels(args.gt)
    print(f"lexicon: {lex.source}, level {args.level}")
    for title, labels in (("ground truth", gt), ("answer", answer)):
        print(f"{title}: {labels}")
        for label in labels:
            print("\n".join(explain_label(label, lex, args.level)))
    if think:
        print(f"emotions named in <think>: {spot_emotions(extract_think(completion), lex)}")
    print("per wheel (precision, recall):")
    for k, pr in enumerate(sample_scores(answer, gt, lex, args.level), 1):
        print(f"  wheel {k}: " + ("skipped (ground truth maps to nothing)" if pr is None
                                  else f"P={pr[0]:.3f} R={pr[1]:.3f} F={f1(*pr):.3f}"))
    r = score_completion(completion, gt, lex, think=think, penalty=args.penalty, w_format=args.w_format,
                         w_align=args.w_align, w_dual=args.w_dual, level=args.level)
    if r is None:
        print("reward: None (the ground truth maps to no wheel: such clips are dropped from RL)")
        return
    print(f"reward components: accuracy={r['accuracy']:.4f} x length_penalty[{args.penalty}]="
          f"{r['length_penalty']:.4f} (n_pred={r['n_pred']}, n_gt={r['n_gt']}), format={r['format']:.0f}, "
          f"alignment={r['alignment']:.4f}, dual={r['dual']:.4f}")
    print(f"total = 1*{r['accuracy']:.4f}*{r['length_penalty']:.4f} + {args.w_format}*{r['format']:.0f} + "
          f"{args.w_align}*{r['alignment']:.4f} + {args.w_dual}*{r['dual']:.4f} = {r['total']:.4f}")


if __name__ == "__main__":
    main()
