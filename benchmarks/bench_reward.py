"""Speed of the EW metric and of the per-completion RL reward, against a straightforward baseline.

    python benchmarks/bench_reward.py [--shared ../shared] [--lexicon DIR]

Scores all nine files of ../shared/affectgpt_outputs (12,799 predictions) against themselves, levels 1 and 2,
with reward.ew_metric and with a straightforward implementation that maps every label on every use (the
official code's approach), checks both agree, and prints the times and their ratio. Then measures the RL
reward (reward.score_completion) in completions per second.
"""

import argparse
import glob
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402


def straightforward_ew_metric(preds, gts, lex, level):
    """Baseline: parse and map every label each time it is used, no caches."""
    def mapped(text):
        sets = [set() for _ in range(reward.N_WHEELS)]
        for label in reward.parse_labels(text):
            words = lex.candidates(label)
            for k in range(reward.N_WHEELS):
                wheel = lex.clusters[level - 1][k]
                first = next((w for w in words if w in wheel), None)
                if first is not None:
                    sets[k].add(wheel[first])
        return sets
    ps, rs = [[] for _ in range(reward.N_WHEELS)], [[] for _ in range(reward.N_WHEELS)]
    for name, gt in gts.items():
        for k, (g, p) in enumerate(zip(mapped(gt), mapped(preds[name]))):
            if g:
                hit = len(g & p)
                ps[k].append(hit / len(p) if p else 0.0)
                rs[k].append(hit / len(g) if p else 0.0)
    f_scores = []
    for k in range(reward.N_WHEELS):
        P, R = sum(ps[k]) / len(ps[k]), sum(rs[k]) / len(rs[k])
        f_scores.append(2 * P * R / (P + R) if P + R else 0.0)
    return sum(f_scores) / len(f_scores)


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--shared", default=os.path.join(here, "..", "shared"))
    p.add_argument("--lexicon", default=None, help="default: the official files in SHARED/emotion_wheel")
    args = p.parse_args()
    files = sorted(f for f in glob.glob(os.path.join(args.shared, "affectgpt_outputs", "*.npz"))
                   if "sentiment" not in f)
    datasets = []
    for f in files:
        with np.load(f, allow_pickle=False) as d:
            datasets.append({str(n): str(i) for n, i in zip(d["filenames"], d["fileitems"])})
    n = sum(map(len, datasets))
    lex = reward.load_lexicon(args.lexicon or os.path.join(args.shared, "emotion_wheel"))
    print(f"{len(files)} files, {n} predictions, lexicon {lex.source}")

    for data in datasets:  # the two implementations agree before anything is timed
        for level in (1, 2):
            assert math.isclose(reward.ew_metric(data, data, lex, level)["fscore"],
                                straightforward_ew_metric(data, data, lex, level), abs_tol=1e-12)

    def ours():
        lex._cache.clear()  # every timed run starts cold: the label cache is built inside it
        for data in datasets:
            for level in (1, 2):
                reward.ew_metric(data, data, lex, level)

    def baseline():
        for data in datasets:
            for level in (1, 2):
                straightforward_ew_metric(data, data, lex, level)

    t_ours, t_base = best_of(ours), best_of(baseline, repeats=1)
    print(f"dataset metric, levels 1+2, all wheels: {t_ours:.3f} s (straightforward: {t_base:.3f} s, "
          f"{t_base / t_ours:.1f}x faster)")

    labels = [text for data in datasets for text in data.values()]
    completions = [f"<think>The voice is shaky and the face tense; she seems worried.</think>"
                   f"<answer>{text.strip('[]')}</answer>" for text in labels]
    gts = labels[::-1]
    for name, kw in (("accuracy + format", {}), ("+ p3 penalty, alignment, dual",
                                                 {"penalty": "p3", "w_align": 0.2, "w_dual": 0.2})):
        t = best_of(lambda: [reward.score_completion(c, g, lex, **kw) for c, g in zip(completions, gts)])
        print(f"RL reward ({name}): {len(completions) / t:,.0f} completions/s")


if __name__ == "__main__":
    main()
