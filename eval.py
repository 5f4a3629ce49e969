"""eval.py: evaluate checkpoints the way the papers do, score label files, and plot training curves.

    python eval.py --ckpt out/grpo/final --data out/synth --split test --out out/eval/grpo
    python eval.py --ckpt ... --sample 5 --temperature 1 --top_p 0.9       # + the papers' sampled decoding, 5 draws
    python eval.py --ckpt ... --ablate video,audio,subtitle                  # + one run without each modality
    torchrun --standalone --nproc_per_node=2 eval.py --ckpt ...              # clips sharded over ranks
    python eval.py --ckpt ... --benchmark merunibench --root DIR --out out/eval/unibench
    python eval.py score --pred P --gt G [--lexicon builtin|DIR] [--level 1|2] [--task ovmer|hit] [--json OUT]
    python eval.py plot --run out/sft out/grpo [...] --out out/plots
    python eval.py --ckpt out/sft --split rl --sample 19 --top_p 1 --best_csv out/rft/best.csv   # best-of-N

The report folder defaults to out/eval/RUN_CHECKPOINT_SPLIT (out/eval/grpo_final_test for out/grpo), so the
evaluation of another checkpoint never overwrites it; a --out that holds another checkpoint's evaluation is
refused without --overwrite. The flags (check_args), the folder, the lexicon, the labels and the subtitle file
(`--without_subtitles` evaluates without text on purpose) are checked before the model is loaded.

Counting: every number of a report is over the same clips; clips left out (bad media with --skip_bad_clips, a
ground truth that maps to no wheel: the EW metric and the HIT rate skip it in every wheel, so leaving it out up
front changes no value) are named with their reason in summary.md and on the terminal, and metrics.json holds
n_asked, n_scored and left_out (name -> reason).

Evaluation: greedy decoding, and with `--sample N` also N sampled completions per clip at `--temperature`
(top_p 0.9 as in the released inference code; the papers' numbers come from such samples); answers parsed from
<answer> by reward.py; a report in RUN_DIR: metrics.json, summary.md and per_clip.csv (name, decoding, sample,
completion, parsed labels, ground truth, per-sample EW score, format). EW-F / precision / recall are reported
at wheel levels 1 and 2. `--ablate` adds one greedy evaluation per blanked modality (black video, silence or an
empty subtitle in place of the real one).

Best-of-N (`--best_csv PATH` with `--sample N`), the data of rejection-sampling fine-tuning (RFT): of each
clip's N samples, the one with the highest GRPO reward (accuracy + `--w_format` x format, grpo.py's defaults)
is written as a training row `name, openset, reason` (its <answer> and <think>) when it scores at least
`--min_reward` (the default 1.0 asks, at full format reward, for a per-sample F1 of at least 0.5);
`sft.py --train_csv PATH` then fine-tunes on those rows. It uses the same labels and reward calls as GRPO,
and no descriptions: the same information.

MER-UniBench (`--benchmark merunibench --root DIR`): every dataset found under DIR in its official layout
(folders and label files as released; see README) is scored: OV-MERD+ by EW-F (level 1), MER2023, MER2024,
MELD and IEMOCAP by HIT rate, CMU-MOSI, CMU-MOSEI, CH-SIMS and CH-SIMS v2 by weighted F1 and accuracy of the
binary sentiment (ground-truth valence 0 removed; a predicted neutral counts as negative, as in the official
pipeline). Missing datasets are listed; the table ends with the mean of the available primary scores.

Departures: the official pipeline turns free text into labels and sentiment with an LLM; we parse <answer>
and derive the sentiment from our lexicon: every answer label votes with the polarity of its level-1 sector
in each wheel that covers it; more positive than negative votes -> positive, more negative -> negative, a tie
(or no mapped label) -> neutral. The official script picks, per dataset, the best checkpoint on the test set;
we evaluate the checkpoint we are given.
"""

import argparse
import collections
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import common
import data
import model as model_lib
import reward
from data import UNIBENCH
from reward import ew_metric, hit_rate, load_lexicon, parse_labels

# ----------------------------------------------------------------------------------------------------------
# Scores of model outputs


def openset_report(completions: dict, gts: dict, lex, think: bool) -> dict:
    """Metrics of one draw of completions for open-set ground truths."""
    answers = {n: reward.extract_answer(completions[n]) for n in gts}
    out = {}
    for level in (1, 2):
        ew = ew_metric(answers, gts, lex, level)
        out.update({f"ew_f_l{level}": ew["fscore"], f"precision_l{level}": ew["precision"],
                    f"recall_l{level}": ew["recall"]})
    counts = [len(set(a)) for a in answers.values()]
    out.update({"format_rate": sum(reward.format_ok(completions[n], think) for n in gts) / max(1, len(gts)),
                "n_labels": sum(counts) / max(1, len(counts)),
                "n_labels_hist": dict(sorted(collections.Counter(counts).items()))})
    return out


# ----------------------------------------------------------------------------------------------------------
# `score`: metrics of two label files


def dropped_words(preds: dict, lex) -> collections.Counter:
    """Predicted words that map to no sector of any wheel, with their counts."""
    counts = collections.Counter()
    for text in preds.values():
        counts.update(w for w in parse_labels(text) if not lex.is_emotion(w))
    return counts


def score_files(pred_path, gt_path, lexicon="builtin", level=1, task="ovmer", missing_as_empty=False) -> dict:
    """Read, check and score two label files; returns a JSON-able report."""
    preds, gts = data.read_label_file(pred_path), data.read_label_file(gt_path)
    missing = [n for n in gts if n not in preds]
    if missing and not missing_as_empty:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise KeyError(f"{pred_path}: no prediction for {len(missing)} of {len(gts)} ground-truth samples "
                       f"(use --missing-as-empty to score them as empty):\n  {shown}")
    preds = {n: preds.get(n, "") for n in gts}
    lex = load_lexicon(lexicon)
    report = {"pred": pred_path, "gt": gt_path, "lexicon": lex.source, "task": task, "n_samples": len(gts),
              "missing_predictions": missing}
    if task == "hit":
        rate, per_wheel = hit_rate(preds, gts, lex, per_wheel=True)
        report.update(hit_rate=rate, per_wheel=[{"hit_rate": r, "n": n} for r, n in per_wheel])
    else:
        report.update(ew_metric(preds, gts, lex, level), level=level)
    for w in report["per_wheel"]:
        w["skipped"] = len(gts) - w["n"]
    report["dropped_words"] = dict(dropped_words(preds, lex).most_common())
    return report


def _fmt(x):
    return "  n/a " if x is None else f"{100 * x:6.2f}"


def print_report(report: dict):
    print(f"{report['task']} on {report['n_samples']} samples  (pred {report['pred']}, gt {report['gt']}, "
          f"lexicon {report['lexicon']})")
    if report["task"] == "hit":
        print(f"HIT rate: {_fmt(report['hit_rate'])}")
        print("wheel   HIT     n  skipped")
        for k, w in enumerate(report["per_wheel"], 1):
            print(f"  {k}   {_fmt(w['hit_rate'])} {w['n']:5d} {w['skipped']:8d}")
    else:
        print(f"EW-F {_fmt(report['fscore'])}   precision {_fmt(report['precision'])}   "
              f"recall {_fmt(report['recall'])}   (level {report['level']})")
        print("wheel      F   prec    rec     n  skipped")
        for k, w in enumerate(report["per_wheel"], 1):
            print(f"  {k}   {_fmt(w['fscore'])} {_fmt(w['precision'])} {_fmt(w['recall'])} {w['n']:5d} "
                  f"{w['skipped']:8d}")
    dropped = report["dropped_words"]
    top = ", ".join(f"{w} ({c})" for w, c in list(dropped.items())[:10])
    print(f"predicted words mapping to no wheel: {len(dropped)} distinct, {sum(dropped.values())} uses"
          + (f"; most frequent: {top}" if top else ""))
    if report["missing_predictions"]:
        print(f"missing predictions scored as empty: {len(report['missing_predictions'])}")


def score_main(argv):
    p = argparse.ArgumentParser(prog="eval.py score", description="Score a prediction file against labels.")
    p.add_argument("--pred", required=True, help="predictions: CSV `name, openset` or .npz `filenames, fileitems`")
    p.add_argument("--gt", required=True, help="ground truth, same formats")
    p.add_argument("--lexicon", default="builtin", help="'builtin' or a folder with the official wheel files")
    p.add_argument("--level", type=int, default=1, choices=(1, 2), help="wheel level (OV-MERD+ uses 1)")
    p.add_argument("--task", default="ovmer", choices=("ovmer", "hit"), help="EW metric or basic-emotion HIT")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--missing-as-empty", action="store_true", help="score missing predictions as empty")
    args = p.parse_args(argv)
    if args.json:
        common.ensure_writable(os.path.dirname(args.json) or ".", keep=False)  # before the work, not after
    try:
        report = score_files(args.pred, args.gt, args.lexicon, args.level, args.task, args.missing_as_empty)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
    print_report(report)
    if args.json:
        with common.writing(args.json, partial=(args.json,)):
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"report in {args.json}")


# ----------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint


@dataclass
class Args:
    ckpt: str = field(default="out/grpo", metadata={"help": "checkpoint directory or run folder"})
    data: str | None = field(default=None, metadata={"help": "OV-MER-layout folder (default: out/synth)"})
    split: str = field(default="test", metadata={"help": "labels CSV DATA/{split}.csv; several, comma-separated "
                                                     "(test,test_shift): reports in OUT/{split}/"})
    lexicon: str = field(default="builtin", metadata={"help": "'builtin' or the official wheel folder"})
    think: str = field(default="auto", metadata={"help": "auto (as the checkpoint was trained) | true | false; "
                                                          "--no-think means false"})
    sample: int = field(default=0, metadata={"help": "also draw this many sampled completions per clip "
                                                     "(0: greedy decoding only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --sample)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus cut when sampling (the papers' 0.9)"})
    max_new_tokens: int = field(default=80, metadata={"help": "completion length limit"})
    batch_size: int = field(default=64, metadata={"help": "clips per generation batch"})
    ablate: str = field(default="", metadata={"help": "also evaluate (greedy) with each of these modalities "
                                                       "blanked, one at a time: video,audio,subtitle"})
    benchmark: str = field(default="", metadata={"help": "merunibench: evaluate every dataset under --root"})
    root: str | None = field(default=None, metadata={"help": "MER-UniBench folder"})
    use_faces: bool = field(default=False, metadata={"help": "read openface_face/ crops instead of video"})
    without_subtitles: bool = field(default=False, metadata={"help": "no text modality: read no subtitle file "
                                                                     "(without it, a missing one is an error)"})
    skip_bad_clips: bool = field(default=False, metadata={"help": "leave out clips with bad media (named)"})
    feature_cache: str = field(default="out/features", metadata={"help": "folder for cached encoder features"})
    out: str | None = field(default=None, metadata={"help": "report folder (default: out/eval/RUN_CHECKPOINT_SPLIT, "
                                                          "e.g. out/eval/grpo_final_test)"})
    overwrite: bool = field(default=False, metadata={"help": "replace another checkpoint's evaluation in --out"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    # best-of-N (rejection-sampling fine-tuning): sample with --sample N on the training split, keep the best
    best_csv: str = field(default="", metadata={"help": "with --sample N: write each clip's best sampled "
                                                        "completion by the GRPO reward here (for sft.py --train_csv)"})
    min_reward: float = field(default=1.0, metadata={"help": "with --best_csv: leave out clips whose best "
                                                             "completion scores below this"})
    w_format: float = field(default=0.5, metadata={"help": "with --best_csv: format weight of the reward (as "
                                                           "grpo.py's)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})
    compile: bool | None = field(default=None, metadata={"help": "true | false: sample with the compiled static "
                                                          "KV-cache decode step (default: true with CUDA)"})


def splits_of(args: Args) -> list:
    return [x.strip() for x in args.split.split(",") if x.strip()]


def ablations_of(args: Args) -> list:
    return [x.strip() for x in args.ablate.split(",") if x.strip()]


def check_args(args: Args):
    """Refuse bad arguments before any work (before the model is loaded), with one message naming every bad
    flag."""
    problems = []
    if not set(ablations_of(args)) <= {"video", "audio", "subtitle"}:
        problems.append(f"--ablate {args.ablate!r}: choose among video, audio, subtitle")
    if not splits_of(args):
        problems.append("--split is empty")
    if args.think not in ("auto", "true", "false"):
        problems.append(f"--think {args.think!r}: choose auto, true or false")
    if args.best_csv and (args.sample < 1 or args.benchmark or len(splits_of(args)) > 1):
        problems.append("--best_csv needs --sample N (N >= 1) on one open-set split")
    if args.benchmark not in ("", "merunibench") or (args.benchmark and not args.root):
        problems.append("--benchmark takes 'merunibench' and needs --root DIR")
    problems += common.at_least(args, 1, "max_new_tokens", "batch_size")
    problems += common.at_least(args, 0, "sample")
    problems += common.positive(args, "temperature", "top_p")
    if args.top_p > 1:
        problems.append(f"--top_p {args.top_p}: must be at most 1")
    problems += common.check_device(args.device)
    common.refuse(problems)


def resolve_think(args: Args, ckpt: str) -> bool:
    if args.think in ("true", "false"):
        return args.think == "true"
    state = os.path.join(ckpt, "trainer_state.json")
    if os.path.isfile(state):
        return bool(json.load(open(state)).get("args", {}).get("think", True))
    return True


def blank_features(model) -> dict:
    """Encoder features of a black video and of silence, for the modality ablation."""
    cfg = model.cfg
    frames = torch.zeros(1, cfg.n_frames, model.image_size, model.image_size, 3, dtype=torch.uint8)
    audio = torch.zeros(1, cfg.audio_clips, round(cfg.clip_seconds * data.SAMPLE_RATE))
    with model.autocast():
        return {k: v[0].cpu() for k, v in model.encode_media(frames, audio).items()}


def generate_all(model, clips, feats, args, dist_env, think, draws: int = 0, desc: str = "generate") -> dict:
    """name -> list of completions (greedy when draws = 0, else `draws` samples), sharded over ranks and
    gathered on every rank, with a progress bar on rank 0."""
    from tqdm import tqdm
    sampling = {"greedy": True} if draws == 0 else {
        "temperature": args.temperature, "top_p": args.top_p,
        "generator": torch.Generator(dist_env.device).manual_seed(args.seed * 1009 + dist_env.rank)}
    # chunks of batch_size clips per rank: each rank generates exactly the batches of one big call, so the
    # results do not depend on the chunking
    chunk = args.batch_size * dist_env.world
    out = {}
    with tqdm(total=len(clips), desc=desc, unit="clip", disable=not dist_env.main, leave=False) as bar:
        for i in range(0, len(clips), chunk):
            out.update(common.complete_sharded(model, clips[i:i + chunk], feats, dist_env, max(1, draws), think=think,
                                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                               **sampling))
            bar.update(len(clips[i:i + chunk]))
    return out


def without(kind: str, clips, feats, blank) -> tuple:
    """The same clips with one modality replaced by a blank (black video, silence, empty subtitle)."""
    if kind == "subtitle":
        return [data.Clip(c.name, c.labels, "", c.reason) for c in clips], feats
    return clips, {n: {**f, kind: blank[kind]} for n, f in feats.items()}


def score_draws(outputs: dict, gts: dict, lex, think) -> dict:
    """Metrics averaged over the draws (with their spread when there are several)."""
    draws = [openset_report({n: outputs[n][k] for n in gts}, gts, lex, think)
             for k in range(len(next(iter(outputs.values()))))] if gts else []
    metrics = {"n_clips": len(gts), "n_draws": len(draws)}
    for key in (draws[0] if draws else {}):
        values = [m[key] for m in draws]
        if isinstance(values[0], dict):  # label-count histogram: counts over all draws
            metrics[key] = dict(sorted(sum((collections.Counter(v) for v in values), collections.Counter()).items()))
            continue
        if values[0] is None:  # no usable ground truth: the same in every draw
            metrics[key] = None
            continue
        metrics[key] = sum(values) / len(values)
        if len(values) > 1:
            metrics[key + "_std"] = float(np.std(values))
    return metrics


def best_completions(outputs: dict, clips, lex, think: bool, w_format: float, min_reward: float) -> list:
    """Best-of-N: the sampled completion of each clip with the highest GRPO reward (accuracy + w_format *
    format; ties go to the first drawn), as a training row (name, openset, reason, reward): its <answer>
    labels and <think> text. Clips whose best completion scores below min_reward are left out, as are clips
    whose labels give no reward signal (GRPO drops them too)."""
    rows = []
    for c in clips:
        if not reward.has_signal(c.labels, lex):
            continue
        scores = [reward.score_completion(t, c.labels, lex, think=think, w_format=w_format) for t in outputs[c.name]]
        k = max(range(len(scores)), key=lambda i: (scores[i]["total"], -i))
        text = outputs[c.name][k]
        if scores[k]["total"] < min_reward:
            continue
        rows.append({"name": c.name, "openset": str(reward.extract_answer(text)),
                     "reason": reward.extract_think(text).strip() if think else "",
                     "reward": round(scores[k]["total"], 6)})
    return rows


def scored_clips(clips, feats: dict, skipped: dict, why_unscored) -> tuple:
    """(the clips every number of an evaluation is computed over, name -> why each other clip is left out).
    Left out: clips with bad media (`skipped`, --skip_bad_clips), and clips for which `why_unscored(clip)`
    gives a reason (a ground truth that maps to no wheel: the EW metric and the HIT rate skip such a clip in
    every wheel anyway, so leaving it out up front changes no score and keeps one clip set for all numbers)."""
    kept, left = [], {}
    for c in clips:
        if c.name not in feats:
            reason = skipped.get(c.name, "no features")
            left[c.name] = "bad media: " + reason.removeprefix(f"clip {c.name}: ")
        elif (why := why_unscored(c)) is not None:
            left[c.name] = why
        else:
            kept.append(c)
    return kept, left


def no_wheel(lex):
    """why_unscored for the EW metric and the HIT rate: a ground truth that maps to no sector of any wheel."""
    def why(clip):
        if not reward.has_signal(clip.labels, lex):
            return f"its ground truth {clip.labels or repr('')} maps to no wheel"
        return None
    return why


def clip_counts(asked: list, left_out: dict) -> dict:
    """The counts a report states: clips asked for, scored, and each one left out with its reason."""
    return {"n_asked": len(asked), "n_scored": len(asked) - len(left_out), "left_out": left_out}


def evaluate_openset(model, root, clips, args, dist_env, think, lex, ablate) -> tuple:
    """Greedy (and, with --sample, sampled) metrics of an open-set split, plus one greedy evaluation per
    ablated modality, all over the same clips (scored_clips). Returns (metrics, per-clip rows)."""
    feats, skipped = common.clip_features(model, root, clips, dist_env, args.feature_cache, args.use_faces,
                                          args.skip_bad_clips)
    asked = clips
    clips, left_out = scored_clips(asked, feats, skipped, no_wheel(lex))
    if not clips:
        raise data.DataError(f"{root}: none of the {len(asked)} clips can be scored, e.g. "
                             + "; ".join(f"{n}: {why}" for n, why in list(left_out.items())[:3]))
    gts = {c.name: c.labels for c in clips}
    metrics = clip_counts(asked, left_out)
    rows = []
    for mode, draws in [("greedy", 0)] + ([("sampled", args.sample)] if args.sample else []):
        outputs = generate_all(model, clips, feats, args, dist_env, think, draws, desc=mode)
        metrics[mode] = score_draws(outputs, gts, lex, think)
        if mode == "sampled" and args.best_csv:
            best = best_completions(outputs, clips, lex, think, args.w_format, args.min_reward)
            metrics["best_of"] = {"n": args.sample, "kept_clips": len(best), "of_clips": len(clips),
                                  "mean_reward": sum(r["reward"] for r in best) / max(1, len(best))}
        for c in clips:
            for k, text in enumerate(outputs[c.name]):
                answer = reward.extract_answer(text)
                score = reward.ew_score(answer, parse_labels(c.labels), lex)
                rows.append({"name": c.name, "decoding": mode, "sample": k, "completion": text,
                             "labels": ", ".join(answer), "ground_truth": ", ".join(parse_labels(c.labels)),
                             "ew_score": "" if score is None else round(score, 6),
                             "format": int(reward.format_ok(text, think))})
    if args.best_csv and dist_env.main:
        with common.writing(args.best_csv, partial=(args.best_csv,)):
            write_csv(args.best_csv, best, ["name", "openset", "reason", "reward"])
    blank = blank_features(model) if ablate else None
    for kind in ablate:
        c2, f2 = without(kind, clips, feats, blank)
        outputs = generate_all(model, c2, f2, args, dist_env, think, desc=f"without {kind}")
        metrics[f"without_{kind}"] = score_draws(outputs, gts, lex, think)
    return metrics, rows


# ---- MER-UniBench -------------------------------------------------------------------------------------------

def evaluate_unibench(model, args, dist_env, think, lex, sets: dict | None = None) -> dict:
    """Score every available MER-UniBench dataset; returns the table (dataset -> metrics) and the mean."""
    builtin = load_lexicon("builtin")  # polarity of sectors for the sentiment sets
    table, sets = {}, data.read_unibench(args.root) if sets is None else sets
    for name, (task, folder, clips, corpus) in sets.items():
        feats, skipped = common.clip_features(model, folder, clips, dist_env, args.feature_cache, args.use_faces,
                                              args.skip_bad_clips)
        # sentiment is scored on clips of non-zero valence (positive vs negative), the rest on the wheels
        unscored = (lambda c: None if corpus[c.name][1] else "its valence is 0 or missing (scored: > 0 vs < 0)") \
            if task == "sentiment" else no_wheel(lex)
        asked = clips
        clips, left_out = scored_clips(asked, feats, skipped, unscored)
        outputs = generate_all(model, clips, feats, args, dist_env, think, desc=name)
        first = {c.name: outputs[c.name][0] for c in clips}
        answers = {n: reward.extract_answer(t) for n, t in first.items()}
        row = {"task": task, **clip_counts(asked, left_out)}
        if task == "ovmer":
            row["score"] = ew_metric(answers, {c.name: c.labels for c in clips}, lex)["fscore"]
        elif task == "hit":
            row["score"] = hit_rate(answers, {c.name: c.labels for c in clips}, lex)
        else:
            polarity = {n: reward.answer_polarity(a, builtin) for n, a in answers.items()}
            s = reward.sentiment_scores(polarity, {c.name: corpus[c.name][1] for c in clips})
            row.update(score=s["weighted_f1"], accuracy=s["accuracy"])
        table[name] = row
    scores = [r["score"] for r in table.values() if r["score"] is not None]
    return {"datasets": table, "missing": [n for n in UNIBENCH if n not in sets],
            "mean": sum(scores) / len(scores) if scores else None}


# ---- reports --------------------------------------------------------------------------------------------

def write_csv(path: str, rows: list, fields: list):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_reports(out: str, metrics: dict, rows: list | None):
    """metrics.json, per_clip.csv and summary.md in `out`; a failed write (a full disk) leaves none of them."""
    files = [os.path.join(out, n) for n in ("metrics.json", "per_clip.csv", "summary.md")]
    with common.writing(out, partial=files):
        os.makedirs(out, exist_ok=True)
        with open(files[0], "w") as f:
            json.dump(metrics, f, indent=1)
        if rows is not None:
            write_csv(files[1], rows, list(rows[0]) if rows else ["name"])
        with open(files[2], "w") as f:
            f.write(summary_markdown(metrics))


def left_out_lines(m: dict, where: str = "") -> list:
    """Markdown lines naming every clip left out of the scores, with the reason."""
    if not m["left_out"]:
        return []
    return ["", f"Left out of every score{where}: {len(m['left_out'])} of {m['n_asked']} clips:"] + \
        [f"- {name}: {reason}" for name, reason in m["left_out"].items()]


def scored_text(m: dict) -> str:
    """'scored 3 of 4 clips (1 left out: see below)', or 'scored 4 clips' when none was left out."""
    if not m["left_out"]:
        return f"scored {m['n_scored']} clips"
    return f"scored {m['n_scored']} of {m['n_asked']} clips ({len(m['left_out'])} left out, listed below)"


def summary_markdown(m: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    lines = [f"# Evaluation of `{m['ckpt']}`", ""]
    if "unibench" in m:
        u = m["unibench"]
        lines += ["| dataset | task | score | accuracy | scored | of |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {r['task']} | {pct(r['score'])} | {pct(r.get('accuracy'))} | {r['n_scored']} | "
                  f"{r['n_asked']} |" for k, r in u["datasets"].items()]
        lines += [f"| **mean** | | {pct(u['mean'])} | | | |", "", f"missing datasets: {', '.join(u['missing'])}"]
        for k, r in u["datasets"].items():
            lines += left_out_lines(r, f" of {k}")
        return "\n".join(lines) + "\n"
    lines += [f"split `{m['split']}` of `{m['data']}`, {scored_text(m)}, think={m['think']}", "",
              "| decoding | level | EW-F | precision | recall | format | labels |", "|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        if not isinstance(r, dict) or "n_draws" not in r:
            continue
        title = {"greedy": "greedy", "sampled": f"{r['n_draws']} samples, T={m['temperature']}, top_p={m['top_p']}"}
        for level in (1, 2):
            lines.append(f"| {title.get(name, name.replace('_', ' ') + ' (greedy)')} | {level} | "
                         f"{pct(r[f'ew_f_l{level}'])} | {pct(r[f'precision_l{level}'])} | "
                         f"{pct(r[f'recall_l{level}'])} | {pct(r['format_rate'])} | {r['n_labels']:.2f} |")
    lines += left_out_lines(m)
    return "\n".join(lines) + "\n"


def default_out(ckpt: str, args: Args) -> str:
    """out/eval/RUN_CHECKPOINT_SPLIT (e.g. out/eval/grpo_final_test): evaluating another checkpoint, or another
    split, never lands in the same folder."""
    run, name = os.path.normpath(os.path.abspath(ckpt)).split(os.sep)[-2:]
    return os.path.join("out", "eval", f"{run}_{name}_{args.benchmark or args.split}")


def check_out(out: str, ckpt: str, overwrite: bool):
    """Refuse a report folder that holds the evaluation of another checkpoint (unless --overwrite); make sure
    it can be written before the evaluation starts."""
    previous = os.path.join(out, "metrics.json")
    if os.path.isfile(previous) and not overwrite:
        try:
            with open(previous) as f:
                m = json.load(f)
            other = m.get("ckpt_path") or os.path.abspath(m["ckpt"])  # reports before ckpt_path: best guess
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            other = "an unreadable metrics.json"
        if other != os.path.abspath(ckpt):
            sys.exit(f"error: --out {out} holds the evaluation of {other}; choose another --out, or --overwrite")
    common.ensure_writable(out, keep=False)  # a run refused later leaves no empty folder


def eval_main(argv):
    # --think / --no-think as flags, as the other stages spell them
    argv = ["--think=false" if a in ("--no-think", "--no_think") else "--think=true" if a == "--think" else a
            for a in argv]
    args = common.parse_args(Args, argv)
    check_args(args)
    ablate, splits = ablations_of(args), splits_of(args)
    try:
        ckpt = common.resolve_checkpoint(args.ckpt)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    # everything a user can get wrong is checked before the model is loaded and the clips are decoded
    out = args.out or default_out(ckpt, args)
    for where in [out] if len(splits) == 1 else [os.path.join(out, s) for s in splits]:
        check_out(where, ckpt, args.overwrite)
    if args.best_csv:
        common.ensure_writable(os.path.dirname(args.best_csv) or ".", keep=False)
    lex = load_lexicon(args.lexicon)
    root = args.data or "out/synth"
    if args.benchmark and not os.path.isdir(args.root):
        raise SystemExit(f"error: --root {args.root}: no such folder")
    text = not args.without_subtitles
    labelled = data.read_unibench(args.root, subtitles=text) if args.benchmark else \
        {s: data.read_split(root, s, subtitles=text) for s in splits}
    dist_env = common.setup_dist(args.device)
    model = model_lib.load_model(ckpt, device=dist_env.device).eval().use_sampler(args.compile)
    think = resolve_think(args, ckpt)
    meta = {"ckpt": ckpt, "ckpt_path": os.path.abspath(ckpt), "think": think, "lexicon": lex.source,
            **{k: v for k, v in asdict(args).items() if k not in ("ckpt", "think", "out")}, "out": out}
    if args.benchmark:
        runs = [(out, {**meta, "unibench": evaluate_unibench(model, args, dist_env, think, lex, labelled)}, None)]
    else:  # one model, several splits: reports in OUT/{split}/
        runs = []
        for split in splits:
            result, rows = evaluate_openset(model, root, labelled[split], args, dist_env, think, lex, ablate)
            runs.append((out if len(splits) == 1 else os.path.join(out, split),
                         {**meta, "split": split, "data": root, **result}, rows))
    for where, metrics, rows in runs:
        if dist_env.main:
            write_reports(where, metrics, rows)
            print(summary_markdown(metrics), end="")
            files = ["metrics.json", "summary.md"] + (["per_clip.csv"] if rows is not None else [])
            print(f"reports in {where}/: {', '.join(files)}")
    common.cleanup_dist()


# ----------------------------------------------------------------------------------------------------------
# `plot`: training curves from metrics.jsonl

# Panels per stage. SFT and GRPO runs get separate panels (their steps are different things, and their losses
# different quantities: SFT's NLL per target token, GRPO's clipped surrogate plus KL term).
PANELS = {
    "sft": [("train/loss", "SFT loss (NLL per target token)"), ("eval/loss", "held-out NLL per target token"),
            ("eval/ew_f", "held-out EW-F (greedy)"), ("eval/format_rate", "held-out format rate"),
            ("eval/n_labels", "held-out labels per answer"), ("train/lr", "learning rate")],
    "grpo": [("reward/total", "reward (total)"), ("reward/accuracy", "reward: accuracy"),
             ("reward/format", "reward: format"), ("eval/ew_f", "held-out EW-F (greedy)"),
             ("train/kl", "KL to the reference (k3)"), ("rollout/length_mean", "completion length (tokens)"),
             ("rollout/n_labels", "labels per answer"), ("train/loss", "GRPO loss (surrogate + KL term)")],
}
STAGE_TITLES = {"sft": "SFT", "grpo": "GRPO"}


def run_stage(rows: list) -> str:
    """sft or grpo: GRPO runs log rewards and rollouts, SFT runs do not."""
    return "grpo" if any(k.startswith(("reward/", "rollout/")) for m in rows for k in m) else "sft"


def plot_runs(runs: list, plt):
    """runs: [(name, stage, metrics rows)] -> a figure with one block of panels per stage (its own x-axis:
    that stage's optimiser step) and one colour per run, the same in every panel, named in each block's legend."""
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    colour = {i: colours[i % len(colours)] for i in range(len(runs))}
    stages = [st for st in PANELS if any(r[1] == st for r in runs)]
    blocks = {st: [(k, t) for k, t in PANELS[st] if any(k in m for _, s, ms in runs if s == st for m in ms)]
              for st in stages}
    cols = 4
    heights = [max(1, math.ceil(len(blocks[st]) / cols)) for st in stages]
    fig = plt.figure(figsize=(4 * cols, 3.2 * sum(heights) + 0.6 * len(stages)), layout="constrained")
    subfigs = fig.subfigures(len(stages), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, st, rows_n in zip(subfigs, stages, heights):
        axes = list(sub.subplots(rows_n, cols, squeeze=False).flat)
        for ax, (key, title) in zip(axes, blocks[st]):
            for i, (name, stage, ms) in enumerate(runs):
                pts = [(m["step"], m[key]) for m in ms if stage == st and isinstance(m.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), color=colour[i], label=name, markersize=3,
                            marker="o" if key.startswith("eval/") else None)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(f"{STAGE_TITLES[st]} step")
            ax.grid(alpha=0.3)
        for ax in axes[len(blocks[st]):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=colour[i], label=name) for i, (name, stage, _) in enumerate(runs)
                   if stage == st]
        sub.suptitle(f"{STAGE_TITLES[st]} runs", fontweight="bold")
        sub.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def plot_main(argv):
    p = argparse.ArgumentParser(prog="eval.py plot", description="Plot training curves of sft.py/grpo.py runs.")
    p.add_argument("--run", nargs="+", required=True, help="run folders (with metrics.jsonl), overlaid")
    p.add_argument("--label", nargs="*", help="legend names, one per run (default: folder names)")
    p.add_argument("--out", default="out/plots", help="folder for curves.png")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.run):
        sys.exit(f"error: {len(args.label)} --label names for {len(args.run)} --run folders")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: eval.py plot needs matplotlib (pip install matplotlib)")
    runs = []
    for i, run in enumerate(args.run):
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            sys.exit(f"error: {path}: no such file")
        rows, bad = common.read_metrics(path)
        if bad:
            print(f"warning: {path}: left out {len(bad)} incomplete line(s): {', '.join(map(str, bad[:10]))}",
                  file=sys.stderr)
        if not rows:
            sys.exit(f"error: {path}: no complete line to plot")
        runs.append((args.label[i] if args.label else os.path.basename(os.path.normpath(run)),
                     run_stage(rows), rows))
    common.ensure_writable(args.out)
    fig = plot_runs(runs, plt)
    out = os.path.join(args.out, "curves.png")
    with common.writing(out, partial=(out,)):
        fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    return data.exit_on_bad_input(eval_main, argv)


if __name__ == "__main__":
    main()
