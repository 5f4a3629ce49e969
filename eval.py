"""eval.py: score OV-MER predictions the way the papers do.

    python eval.py score --pred P --gt G [--lexicon builtin|DIR] [--level 1|2] [--task ovmer|hit] [--json OUT]

P and G are CSVs with columns `name, openset` (the official format: openset is a label string such as
"['happy', 'excited']") or .npz files with arrays `filenames, fileitems`. `--task ovmer` reports the EW metric
(F-score, precision, recall, per wheel), `--task hit` the basic-emotion HIT rate (G holds one class per clip).
The table also counts the samples each wheel skipped (ground truth maps to nothing there) and the predicted
words that map to no wheel at all.
"""

import argparse
import collections
import csv
import json
import os
import sys

import numpy as np

from reward import N_WHEELS, ew_metric, hit_rate, load_lexicon, parse_labels

# ----------------------------------------------------------------------------------------------------------
# Reading label files


def read_label_file(path: str) -> dict:
    """name -> label string, from a `name, openset` CSV or a `filenames, fileitems` .npz. Errors name the file
    and the row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if not {"filenames", "fileitems"} <= set(data.files):
                raise ValueError(f"{path}: needs arrays 'filenames' and 'fileitems', found {sorted(data.files)}")
            names, items = data["filenames"], data["fileitems"]
        if len(names) != len(items):
            raise ValueError(f"{path}: {len(names)} filenames but {len(items)} fileitems")
        pairs = [(str(n), str(i), f"item {k}") for k, (n, i) in enumerate(zip(names, items))]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not {"name", "openset"} <= set(header):
                raise ValueError(f"{path}: needs columns 'name' and 'openset'; header is {header}")
            i_name, i_labels = header.index("name"), header.index("openset")
            pairs = []
            for row in reader:
                if not row:
                    continue  # blank line
                where = f"line {reader.line_num}"
                if len(row) != len(header):
                    raise ValueError(f"{path}, {where}: expected {len(header)} fields, got {len(row)}: {row}")
                pairs.append((row[i_name].strip(), row[i_labels], where))
    out = {}
    for name, labels, where in pairs:
        if not name:
            raise ValueError(f"{path}, {where}: empty name")
        if name in out:
            raise ValueError(f"{path}, {where}: duplicate name {name!r}")
        out[name] = labels
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
    preds, gts = read_label_file(pred_path), read_label_file(gt_path)
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
    try:
        report = score_files(args.pred, args.gt, args.lexicon, args.level, args.task, args.missing_as_empty)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    sys.exit("usage: python eval.py score --pred P --gt G [...]  (see python eval.py score --help)")


if __name__ == "__main__":
    main()
