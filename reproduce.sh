#!/usr/bin/env bash
# reproduce.sh: every finding of the papers in miniature, on the synthetic benchmark, on a CPU.
#
#   bash reproduce.sh                       # every finding, seeds 0, 1, 2 (README, "Results")
#   bash reproduce.sh --only reasoning      # one finding and the runs it needs; several: --only reward,crosstask
#   bash reproduce.sh --quick               # every step of every finding at toy sizes, one seed: plumbing only
#   bash reproduce.sh --medium              # half the clips and steps (the same samples per clip): a busy machine
#   options: --out DIR (default out/repro; an earlier reproduction there is replaced, the feature cache kept),
#            --jobs N (steps run at once; default one per CPU core, as each process uses one thread)
#
# The findings (--only takes their names, or a, b, c, d):
#   compare    (a) the same SFT policy followed by GRPO, by RFT (best-of-N by the GRPO reward on the same rl
#                  labels, as many samples per clip as GRPO draws, then SFT on the kept completions: the same
#                  information) and by SFT on the rl clips' consensus labels and descriptions (an oracle: what the
#                  real data lacks); test and test_shift, greedy and sampled; a modality ablation of seed 0
#   reasoning  (b) think vs no-think: SFT --no-think, and GRPO --no-think from it, against their think twins; test
#   reward     (c) GRPO reward variants from the same SFT checkpoints: accuracy only, accuracy + format (the (a)
#                  run), + alignment, + the P2 length penalty, recall-weighted accuracy with and without P2; test,
#                  and the labels per answer over training
#   crosstask  (d) the synthetic MER-UniBench (basic-emotion HIT rates, sentiment, OV-MER test) of SFT, GRPO, RFT
#                  and the oracle (when (a) runs too)
# Steps shared by findings run once (the (a) SFT and GRPO runs serve (b), (c) and (d)). The SFT runs go first,
# then every branch (a run and its evaluations) in one pool of JOBS steps, the longest first. Every evaluation is
# of the checkpoint each run ends with (never chosen by a test score). OUT/results.md has one section per finding
# (paired differences per seed with mean ± sd), OUT/plots/*.png one figure per finding, OUT/logs each step's
# output and times.txt each step's wall, user and system seconds.
set -euo pipefail
cd "$(dirname "$0")"

OUT=out/repro
JOBS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
QUICK=0
ONLY=compare,reasoning,reward,crosstask
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --medium) QUICK=medium ;;
    --out) OUT=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    *) echo "reproduce.sh: unknown option $1 (use --quick, --medium, --only LIST, --out DIR, --jobs N)" >&2; exit 2 ;;
  esac
  shift
done
case "$JOBS" in ''|*[!0-9]*|0) echo "reproduce.sh: --jobs $JOBS: give a whole number of at least 1" >&2; exit 2 ;; esac
COMPARE=0 REASONING=0 REWARD=0 CROSSTASK=0
for f in $(echo "$ONLY" | tr ',' ' '); do
  case "$f" in
    a|compare) COMPARE=1 ;;
    b|reasoning) REASONING=1 ;;
    c|reward) REWARD=1 ;;
    d|crosstask) CROSSTASK=1 ;;
    *) echo "reproduce.sh: --only $f: choose among compare (a), reasoning (b), reward (c), crosstask (d)" >&2
       exit 2 ;;
  esac
done
if [ $(( COMPARE + REASONING + REWARD + CROSSTASK )) = 0 ]; then
  echo "reproduce.sh: --only names no finding" >&2; exit 2
fi
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

QUICK_NOTE="--quick: toy sizes (a few steps on a few clips) that test the plumbing, not the findings; its numbers
mean nothing. Run without --quick for the README's results."
if [ "$QUICK" = 1 ]; then
  echo "$QUICK_NOTE"
  N_RL=16; G=4; B=4; STEPS=2
  SYNTH="--n_train 48 --n_rl $N_RL --n_val 8 --n_test 16 --n_test_shift 16 --unibench 8"
  SFT="--max_steps 20 --eval_every 0 --eval_samples 4 --save_every 0"
  CTRL="--max_steps 4 --eval_every 0 --eval_samples 4 --save_every 0 --batch_size 4 --micro_batch 4"
  GRPO="--max_new_tokens 24 --eval_every 0 --eval_samples 4 --save_every 0"
  EVAL="--max_new_tokens 24"
  MIN_REWARD=-1  # a 20-step SFT policy rarely scores; the quick run only checks that every step runs
  SAMPLES=1
  SEEDS="0"
elif [ "$QUICK" = medium ]; then
  N_RL=200; G=8; B=16; STEPS=30
  SYNTH="--n_train 400 --n_rl $N_RL --n_val 50 --n_test 100 --n_test_shift 100 --unibench 60"
  SFT=""
  CTRL="--epochs 2 --warmup_steps 5 --eval_every 0"
  GRPO="--eval_samples 50"
  EVAL=""
  MIN_REWARD=1.0
  SAMPLES=4
  SEEDS="0 1 2"
else
  N_RL=400; G=8; B=16; STEPS=60
  SYNTH="--n_rl $N_RL --unibench 120"
  SFT=""
  CTRL="--epochs 2 --warmup_steps 5 --eval_every 0"
  GRPO=""
  EVAL=""
  MIN_REWARD=1.0  # a well-formatted answer with per-sample F1 >= 0.5 (reward = F1 + 0.5 format)
  SAMPLES=4
  SEEDS="0 1 2"
fi
GRPO="--group_size $G --clips_per_step $B --max_steps $STEPS $GRPO"
# runs no figure or table reads during training need no held-out evaluation (the policy is the same with it)
QUIET="--eval_every 0 --eval_samples 0"
# RFT draws as many samples per rl clip as GRPO does: G x (the times GRPO sees a clip), rounded
RFT_N=$(( (G * B * STEPS + N_RL / 2) / N_RL ))
W_ALIGN=0.5  # alignment weight: as the format's, half the accuracy's (the papers do not publish theirs)
# reward variants: name and grpo.py flags (accuracy + format is the (a) GRPO run itself)
VARIANTS="acc:--w_format=0 align:--w_align=$W_ALIGN p2:--penalty=p2 recall:--accuracy=recall
recall_p2:--accuracy=recall,--penalty=p2"
D=$OUT/synth
F=$OUT/features
# a second reproduction into the same OUT starts clean (the stages refuse a used --out); features are kept
if compgen -G "$OUT/sft_s*" > /dev/null || [ -d "$OUT/logs" ]; then
  echo "removing the previous reproduction in $OUT (runs, evaluations, plots, logs; the feature cache stays)"
  rm -rf "$OUT"/sft_* "$OUT"/grpo_* "$OUT"/rft_s* "$OUT"/oracle_s* "$OUT/eval" "$OUT/plots" "$OUT/logs" \
    "$OUT/results.md"
fi
mkdir -p "$OUT/logs" "$OUT/eval"
T0=$(date +%s)

# run NAME CMD...: one step, its output in OUT/logs/NAME.log; a failure stops its pipeline (and then the script)
run() {
  local name=$1; shift
  echo "[$(( $(date +%s) - T0 ))s] $name"
  local TIMEFORMAT="$name %R %U %S" ok=1  # one line per step in OUT/logs/times.txt: name, wall, user, system s
  { time "$@" > "$OUT/logs/$name.log" 2>&1 || ok=0; } 2>> "$OUT/logs/times.txt"
  if [ $ok = 0 ]; then
    echo "FAILED: $name (last lines of $OUT/logs/$name.log below)" >&2
    tail -n 30 "$OUT/logs/$name.log" >&2
    exit 1
  fi
}
# evaluate NAME SPLITS: greedy and sampled on each split (comma-separated); reports in OUT/eval/NAME/SPLIT
evaluate() {
  local where="$OUT/eval/$1"
  case "$2" in *,*) ;; *) where="$where/$2" ;; esac  # one split: eval.py writes to --out itself
  run "eval_$1" $PY eval.py --ckpt "$OUT/$1" --data "$D" --split "$2" --out "$where" --feature_cache "$F" \
    --sample $SAMPLES $EVAL
}
unibench() {  # unibench NAME: the synthetic MER-UniBench (greedy), reports in OUT/eval/unibench_NAME
  run "unibench_$1" $PY eval.py --ckpt "$OUT/$1" --benchmark merunibench --root "$D/unibench" \
    --out "$OUT/eval/unibench_$1" --feature_cache "$F" $EVAL
}
ablation() {  # ablation NAME: a checkpoint with each modality blanked (test, greedy)
  run "ablate_$1" $PY eval.py --ckpt "$OUT/$1" --data "$D" --split test --out "$OUT/eval/ablate_$1" \
    --feature_cache "$F" --ablate video,audio,subtitle $EVAL
}
# the evaluation of SFT and GRPO that (a), (b) and (c) share: (a) reads test_shift too
SPLITS=test; if [ $COMPARE = 1 ]; then SPLITS=test,test_shift; fi

sft() { run "sft_s$1" $PY sft.py --data "$D" --out "$OUT/sft_s$1" --seed "$1" --feature_cache "$F" $SFT; }
sft_nothink() {
  run "sft_nothink_s$1" $PY sft.py --data "$D" --out "$OUT/sft_nothink_s$1" --seed "$1" --feature_cache "$F" \
    --no-think $SFT --eval_every 0
}
sft_branch() {
  if [ $COMPARE = 1 ] || [ $REASONING = 1 ]; then evaluate "sft_s$1" $SPLITS; fi
  if [ $CROSSTASK = 1 ]; then unibench "sft_s$1"; fi
  if [ $COMPARE = 1 ] && [ "$1" = 0 ]; then ablation sft_s0; fi
}
grpo_branch() {
  run "grpo_s$1" $PY grpo.py --init "$OUT/sft_s$1" --data "$D" --out "$OUT/grpo_s$1" --seed "$1" \
    --feature_cache "$F" $GRPO
  if [ $COMPARE = 1 ] || [ $REASONING = 1 ] || [ $REWARD = 1 ]; then evaluate "grpo_s$1" $SPLITS; fi
  if [ $CROSSTASK = 1 ]; then unibench "grpo_s$1"; fi
  if [ $COMPARE = 1 ] && [ "$1" = 0 ]; then ablation grpo_s0; fi
}
variant_branch() {  # variant_branch NAME:FLAGS SEED: a GRPO reward variant from the same SFT checkpoint, on test
  local name=${1%%:*} flags=${1#*:}
  run "grpo_${name}_s$2" $PY grpo.py --init "$OUT/sft_s$2" --data "$D" --out "$OUT/grpo_${name}_s$2" \
    --seed "$2" --feature_cache "$F" $GRPO $QUIET $(echo "$flags" | tr ',' ' ')
  evaluate "grpo_${name}_s$2" test
}
nothink_branch() {
  run "grpo_nothink_s$1" $PY grpo.py --init "$OUT/sft_nothink_s$1" --data "$D" --out "$OUT/grpo_nothink_s$1" \
    --seed "$1" --feature_cache "$F" --no-think $GRPO $QUIET
  evaluate "grpo_nothink_s$1" test
  evaluate "sft_nothink_s$1" test
}
rft_branch() {  # RFT: best of RFT_N samples per rl clip (sampled as GRPO samples: T = 1, no top-p), then SFT
  run "rft_sample_s$1" $PY eval.py --ckpt "$OUT/sft_s$1" --data "$D" --split rl --sample $RFT_N --top_p 1 \
    --seed "$1" --best_csv "$OUT/rft_s$1.csv" --min_reward $MIN_REWARD --out "$OUT/eval/rl_sft_s$1" \
    --feature_cache "$F" $EVAL
  run "rft_s$1" $PY sft.py --init "$OUT/sft_s$1" --data "$D" --train_csv "$OUT/rft_s$1.csv" --lr 1e-3 \
    --out "$OUT/rft_s$1" --seed "$1" --feature_cache "$F" $CTRL
  if [ $COMPARE = 1 ]; then evaluate "rft_s$1" test,test_shift; fi
  if [ $CROSSTASK = 1 ]; then unibench "rft_s$1"; fi
}
oracle_branch() {  # the oracle: the same fine-tuning on the rl clips' consensus labels and descriptions
  run "oracle_s$1" $PY sft.py --init "$OUT/sft_s$1" --data "$D" --train_csv "$D/rl_oracle.csv" --lr 1e-3 \
    --out "$OUT/oracle_s$1" --seed "$1" --feature_cache "$F" $CTRL
  evaluate "oracle_s$1" test,test_shift
  if [ $CROSSTASK = 1 ]; then unibench "oracle_s$1"; fi
}
runs() { for s in $SEEDS; do echo "$OUT/$1_s$s"; done; }
curves() {  # the training curves of (a) in one figure: SFT and GRPO over seeds, RFT and the oracle of seed 0
  run plots_curves $PY eval.py plot --run $(runs sft) $(runs grpo) "$OUT/rft_s0" "$OUT/oracle_s0" \
    --out "$OUT/plots/curves"
}
# pool TASK...: run the tasks (a function and its arguments, e.g. "grpo_branch 1") JOBS at a time, in the order
# given; the first failure stops the others (each task's running step, then the task) and the script.
# (Polling rather than `wait -n`, which macOS's bash 3.2 lacks.)
PIDS=()
pool() {
  local task
  for task in "$@"; do
    reap "$JOBS"
    $task & PIDS+=($!)
  done
  reap 1
}
reap() {  # reap N: collect finished tasks until fewer than N run
  local p live
  while :; do
    live=()
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
      if kill -0 "$p" 2>/dev/null; then live+=("$p"); else wait "$p" || stop_all; fi
    done
    PIDS=(${live[@]+"${live[@]}"})
    if [ ${#PIDS[@]} -lt "$1" ]; then return; fi
    sleep 0.5
  done
}
stop_all() {
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill_tree "$p"; done
  exit 1
}
kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill "$1" 2>/dev/null || true; }

run synth $PY synth.py --out "$D" --overwrite --seed 0 $SYNTH
tasks=()  # every finding starts from the SFT runs
for s in $SEEDS; do tasks+=("sft $s"); done
if [ $REASONING = 1 ]; then for s in $SEEDS; do tasks+=("sft_nothink $s"); done; fi
pool "${tasks[@]}"
tasks=()  # then the branches, the longest first, so that no core idles at the end
for s in $SEEDS; do tasks+=("grpo_branch $s"); done
if [ $REWARD = 1 ]; then
  for v in $VARIANTS; do for s in $SEEDS; do tasks+=("variant_branch $v $s"); done; done
fi
if [ $REASONING = 1 ]; then for s in $SEEDS; do tasks+=("nothink_branch $s"); done; fi
if [ $COMPARE = 1 ] || [ $CROSSTASK = 1 ]; then for s in $SEEDS; do tasks+=("rft_branch $s"); done; fi
if [ $COMPARE = 1 ]; then for s in $SEEDS; do tasks+=("oracle_branch $s"); done; fi
for s in $SEEDS; do tasks+=("sft_branch $s"); done
pool "${tasks[@]}"
if [ $COMPARE = 1 ]; then curves; fi

WALL=$(( $(date +%s) - T0 ))
$PY - "$OUT" "$WALL" "$QUICK" "$RFT_N" "$COMPARE$REASONING$REWARD$CROSSTASK" "$W_ALIGN" $SEEDS <<'EOF'
"""Gather OUT/eval/**/metrics.json and the runs' metrics.jsonl into OUT/results.md and OUT/plots/*.png."""
import importlib.metadata, json, os, platform, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, wall, quick, rft_n, chosen, w_align = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    sys.argv[5], sys.argv[6]
SEEDS = [int(s) for s in sys.argv[7:]]
COMPARE, REASONING, REWARD, CROSSTASK = (c == "1" for c in chosen)
ev = lambda name, split="test": json.load(open(os.path.join(out, "eval", name, split, "metrics.json")))  # noqa: E731
one = lambda name: json.load(open(os.path.join(out, "eval", name, "metrics.json")))  # noqa: E731
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
MODES = (("test", "greedy"), ("test", "sampled"), ("test_shift", "greedy"), ("test_shift", "sampled"))
os.makedirs(os.path.join(out, "plots"), exist_ok=True)


def spread(values, signed=False):  # "mean ± standard deviation" in %, "mean ± -" for one seed
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = pct(statistics.stdev(values)) if len(values) > 1 else "-"
    return f"{100 * statistics.mean(values):{'+' if signed else ''}.1f} ± {sd}"


def paired(a, b):  # per-seed differences a - b in points, then mean ± sd (a seed without both: left out)
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return "n/a"
    return " / ".join(f"{100 * x:+.1f}" for x in d) + f" ({spread(d, signed=True)})"


def ewf(name, split="test", mode="greedy"):
    return [ev(f"{name}_s{s}", split)[mode]["ew_f_l1"] for s in SEEDS]


def bars(ax, groups, series, values, ylabel):
    """Grouped bars: one group per entry of `groups`, one bar per series (mean over seeds, error bar = sd),
    every seed as a dot. values[series][group] = list over seeds (fractions, drawn in %)."""
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        for i, group in enumerate(groups):
            v = [100 * x for x in values[name][group] if x is not None]
            if not v:
                continue
            x = i + (j - (len(series) - 1) / 2) * width
            ax.bar(x, statistics.mean(v), width * 0.9, color=f"C{j}", label=name if i == 0 else None,
                   yerr=statistics.stdev(v) if len(v) > 1 else None, capsize=3, alpha=0.75)
            ax.scatter([x] * len(v), v, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plots", name), dpi=110)
    plt.close(fig)


seeds_note = ("seeds " if len(SEEDS) > 1 else "seed ") + ", ".join(map(str, SEEDS))
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
steps = [line.split() for line in open(os.path.join(out, "logs", "times.txt")) if line.strip()]
cpu_s = sum(float(user) + float(system) for _, _, user, system in steps)  # the steps' user and system seconds


def finding_of(step):  # the finding a step is counted under: the first selected finding that needs it
    if step.startswith("unibench_"):
        return "crosstask"
    if "nothink" in step:
        return "reasoning"
    if step.startswith(("grpo_", "eval_grpo_")) and step.split("_s")[0].split("grpo_")[-1] in (
            "acc", "align", "p2", "recall", "recall_p2"):
        return "reward"
    if step in ("synth",) or step.startswith("sft_s"):
        return "shared"
    if step.startswith(("grpo_s", "eval_grpo_s")):
        return "compare" if COMPARE else "reasoning" if REASONING else "reward" if REWARD else "crosstask"
    if step.startswith(("eval_sft_s",)):
        return "compare" if COMPARE else "reasoning"
    return "compare" if COMPARE else "crosstask"  # RFT, oracle, ablations, plots


by_finding = {}
for name, _, user, system in steps:
    key = finding_of(name)
    by_finding[key] = by_finding.get(key, 0.0) + float(user) + float(system)
mmss = lambda s: f"{int(s) // 60} min {int(s) % 60} s"  # noqa: E731
lines = ["# Results of `bash reproduce.sh" + {"1": " --quick", "medium": " --medium"}.get(quick, "") + "`", ""]
if quick == "1":
    lines += ["**Toy sizes: these numbers test the plumbing, not the findings; they mean nothing.** Run "
              "`bash reproduce.sh` without `--quick` for the results.", ""]
lines += [
    f"Machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch "
    f"{importlib.metadata.version('torch')}. Wall time: {mmss(wall)}; CPU time (user + system, all processes): "
    f"{mmss(cpu_s)} (" + ", ".join(f"{k} {mmss(v)}" for k, v in by_finding.items())
    + "; a step shared by findings counts under the first that needs it, the SFT runs and the benchmark under "
    "shared). Level-1 EW metric in %, mean ± standard deviation over " + seeds_note + "; greedy decoding, and "
    "sampled (T = 1, top_p 0.9, " + f"{ev('grpo_s0')['sampled']['n_draws'] if COMPARE or REWARD or REASONING else '-'}"
    " draws per clip). A paired difference lists each seed's, then their mean ± sd; a mean within about one sd of "
    "0 is a tie.", ""]

# ---- (a) ------------------------------------------------------------------------------------------------------
if COMPARE:
    MODELS = (("SFT", "sft"), ("SFT + GRPO", "grpo"), ("SFT + RFT (same information)", "rft"),
              ("SFT + oracle (consensus labels and descriptions)", "oracle"))
    lines += ["## (a) GRPO against SFT, same-information RFT and an oracle", ""]
    for split in ("test", "test_shift"):
        lines += [f"### `{split}`", "",
                  "| model | EW-F (greedy) | precision | recall | labels | EW-F (sampled) |",
                  "|---|---|---|---|---|---|"]
        for title, name in MODELS:
            ms = [ev(f"{name}_s{s}", split) for s in SEEDS]
            g = [m["greedy"] for m in ms]
            lines.append(f"| {title} | {spread([x['ew_f_l1'] for x in g])} | {spread([x['precision_l1'] for x in g])}"
                         f" | {spread([x['recall_l1'] for x in g])} | {statistics.mean(x['n_labels'] for x in g):.2f}"
                         f" | {spread([m['sampled']['ew_f_l1'] for m in ms])} |")
        lines.append("")
    lines += [f"### Paired differences (EW-F points, per seed {' / '.join(map(str, SEEDS))}, then mean ± sd)", "",
              "| difference | " + " | ".join(f"{split}, {mode}" for split, mode in MODES) + " |",
              "|---|---|---|---|---|"]
    for title, a, b in (("GRPO - SFT", "grpo", "sft"), ("RFT - SFT", "rft", "sft"), ("GRPO - RFT", "grpo", "rft"),
                        ("GRPO - oracle", "grpo", "oracle"), ("oracle - SFT", "oracle", "sft")):
        lines.append(f"| {title} | " + " | ".join(paired(ewf(a, *m), ewf(b, *m)) for m in MODES) + " |")
    bests = [one(f"rl_sft_s{s}")["best_of"] for s in SEEDS]
    grpo_args = json.load(open(os.path.join(out, "grpo_s0", "args.json")))
    per_clip = grpo_args["group_size"] * grpo_args["max_steps"] * grpo_args["clips_per_step"] / bests[0]["of_clips"]
    lines += ["", f"Samples per rl clip: GRPO draws {grpo_args['group_size']} x {grpo_args['max_steps']} steps x "
              f"{grpo_args['clips_per_step']} clips / {bests[0]['of_clips']} clips = {per_clip:.1f}; RFT draws "
              f"{rft_n} once. RFT kept " + ", ".join(f"{b['kept_clips']}" for b in bests)
              + f" of {bests[0]['of_clips']} clips ({seeds_note}), mean best reward "
              + ", ".join(f"{b['mean_reward']:.2f}" for b in bests) + ". SFT's greedy EW-F on the rl labels: "
              + ", ".join(pct(one(f"rl_sft_s{s}")["greedy"]["ew_f_l1"]) for s in SEEDS) + "."]
    lines += ["", "### Modality ablation at evaluation (seed 0, test, greedy EW-F)", "",
              "| model | all | without video | without audio | without subtitle |", "|---|---|---|---|---|"]
    for title, name in (("SFT", "sft_s0"), ("SFT + GRPO", "grpo_s0")):
        m = one(f"ablate_{name}")
        lines.append(f"| {title} | {pct(m['greedy']['ew_f_l1'])} | " + " | ".join(
            pct(m[f"without_{k}"]["ew_f_l1"]) for k in ("video", "audio", "subtitle")) + " |")
    lines += ["", "Figure: `plots/compare.png`; training curves (SFT runs and GRPO runs in panels of their own): "
              "`plots/curves/curves.png`.", ""]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    groups = [f"{split}\n{mode}" for split, mode in MODES]
    bars(ax, groups, [t.split(" (")[0] for t, _ in MODELS],
         {t.split(" (")[0]: {g: ewf(n, *m) for g, m in zip(groups, MODES)} for t, n in MODELS}, "EW-F (%)")
    ax.set_title(f"(a) GRPO vs SFT, same-information RFT and an oracle ({seeds_note}; bars: mean ± sd, dots: seeds)")
    save(fig, "compare.png")

# ---- (b) ------------------------------------------------------------------------------------------------------
if REASONING:
    lines += ["## (b) Reasoning: think vs no-think (`test`)", "",
              "| model | EW-F (greedy) | EW-F (sampled) | precision | recall | labels |", "|---|---|---|---|---|---|"]
    ROWS = (("SFT, think", "sft"), ("SFT, no think", "sft_nothink"), ("SFT + GRPO, think", "grpo"),
            ("SFT + GRPO, no think", "grpo_nothink"))
    for title, name in ROWS:
        g = [ev(f"{name}_s{s}")["greedy"] for s in SEEDS]
        lines.append(f"| {title} | {spread(ewf(name))} | {spread(ewf(name, mode='sampled'))} | "
                     f"{spread([x['precision_l1'] for x in g])} | {spread([x['recall_l1'] for x in g])} | "
                     f"{statistics.mean(x['n_labels'] for x in g):.2f} |")
    lines += ["", "| difference (EW-F points) | greedy | sampled |", "|---|---|---|"]
    for title, a, b in (("SFT: think - no think", "sft", "sft_nothink"),
                        ("GRPO: think - no think", "grpo", "grpo_nothink"),
                        ("think: GRPO - SFT", "grpo", "sft"), ("no think: GRPO - SFT", "grpo_nothink", "sft_nothink")):
        lines.append(f"| {title} | {paired(ewf(a), ewf(b))} | "
                     f"{paired(ewf(a, mode='sampled'), ewf(b, mode='sampled'))} |")
    lines += ["", "Figure: `plots/reasoning.png`.", ""]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars(ax, ["SFT", "SFT + GRPO"], ["think, greedy", "no think, greedy", "think, sampled", "no think, sampled"],
         {f"{mode}, {d}": {m: ewf(("sft" if m == "SFT" else "grpo") + ("" if mode == "think" else "_nothink"),
                                  mode=d) for m in ("SFT", "SFT + GRPO")}
          for d in ("greedy", "sampled") for mode in ("think", "no think")}, "EW-F on test (%)")
    ax.set_title(f"(b) think vs no-think ({seeds_note})")
    save(fig, "reasoning.png")

# ---- (c) ------------------------------------------------------------------------------------------------------
if REWARD:
    VARIANTS = (("accuracy only", "grpo_acc"), ("accuracy + format", "grpo"),
                (f"accuracy + format + {w_align} alignment", "grpo_align"), ("accuracy + format, P2", "grpo_p2"),
                ("recall + format", "grpo_recall"), ("recall + format, P2", "grpo_recall_p2"))

    def n_labels_curve(run):  # rollout/n_labels per GRPO step (the mean distinct labels of the sampled answers)
        rows = [json.loads(line) for line in open(os.path.join(out, run, "metrics.jsonl")) if line.strip()]
        return [(r["step"], r["rollout/n_labels"]) for r in rows if "rollout/n_labels" in r]

    lines += ["## (c) Reward design (GRPO from the same SFT checkpoints; `test`)", "",
              "| reward | EW-F (greedy) | EW-F (sampled) | precision | recall | labels (test, greedy) | "
              "labels in training, first -> last step |", "|---|---|---|---|---|---|---|"]
    curves = {}
    for title, name in VARIANTS:
        g = [ev(f"{name}_s{s}")["greedy"] for s in SEEDS]
        curves[title] = [n_labels_curve(f"{name}_s{s}") for s in SEEDS]
        first, last = [c[0][1] for c in curves[title]], [c[-1][1] for c in curves[title]]
        lines.append(f"| {title} | {spread(ewf(name))} | {spread(ewf(name, mode='sampled'))} | "
                     f"{spread([x['precision_l1'] for x in g])} | {spread([x['recall_l1'] for x in g])} | "
                     f"{statistics.mean(x['n_labels'] for x in g):.2f} ± "
                     f"{statistics.stdev(x['n_labels'] for x in g) if len(g) > 1 else 0:.2f} | "
                     f"{statistics.mean(first):.2f} -> {statistics.mean(last):.2f} ± "
                     f"{statistics.stdev(last) if len(last) > 1 else 0:.2f} |")
    lines += ["", "| difference (EW-F points) | greedy | sampled |", "|---|---|---|"]
    for title, a, b in (("accuracy + format - accuracy only", "grpo", "grpo_acc"),
                        ("+ alignment - accuracy + format", "grpo_align", "grpo"),
                        ("P2 - accuracy + format", "grpo_p2", "grpo"),
                        ("recall + format - accuracy + format", "grpo_recall", "grpo"),
                        ("recall + format, P2 - recall + format", "grpo_recall_p2", "grpo_recall")):
        lines.append(f"| {title} | {paired(ewf(a), ewf(b))} | "
                     f"{paired(ewf(a, mode='sampled'), ewf(b, mode='sampled'))} |")
    lines += ["", "Labels: distinct labels per answer; in training, the mean over a step's sampled completions "
              "(`rollout/n_labels`, seeds averaged, ± sd of the last step). Figure: `plots/reward.png`.", ""]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    short = {t: t.replace("accuracy", "acc").replace(" + format", "+fmt").replace(f" + {w_align} alignment",
                                                                                    "+align") for t, _ in VARIANTS}
    bars(ax, [short[t] for t, _ in VARIANTS], ["greedy", "sampled"],
         {d: {short[t]: ewf(n, mode=d) for t, n in VARIANTS} for d in ("greedy", "sampled")}, "EW-F on test (%)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"(c) reward variants ({seeds_note})")
    for j, (title, _) in enumerate(VARIANTS):
        for k, c in enumerate(curves[title]):
            ax2.plot([x for x, _ in c], [y for _, y in c], color=f"C{j}", alpha=0.8 if k == 0 else 0.35,
                     label=short[title] if k == 0 else None)
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("labels per sampled answer")
    ax2.set_title("label count over training (a line per seed)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    save(fig, "reward.png")

# ---- (d) ------------------------------------------------------------------------------------------------------
if CROSSTASK:
    MODELS = [("SFT", "sft"), ("SFT + GRPO", "grpo"), ("SFT + RFT", "rft")] + ([("SFT + oracle", "oracle")]
                                                                            if COMPARE else [])
    ub = {name: [one(f"unibench_{name}_s{s}")["unibench"] for s in SEEDS] for _, name in MODELS}
    sets = list(ub["sft"][0]["datasets"])
    metric = {"ovmer": "EW-F", "hit": "HIT", "sentiment": "weighted F1"}
    score = lambda name, ds: [u["mean"] if ds == "mean" else u["datasets"][ds]["score"] for u in ub[name]]  # noqa
    lines += ["## (d) Cross-task: the synthetic MER-UniBench (greedy)", "",
              "| model | " + " | ".join(f"{ds} ({metric[ub['sft'][0]['datasets'][ds]['task']]})" for ds in sets)
              + " | **mean** |", "|---|" + "---|" * (len(sets) + 1)]
    for title, name in MODELS:
        lines.append(f"| {title} | " + " | ".join(spread(score(name, ds)) for ds in sets + ["mean"]) + " |")
    lines += ["", "| difference (points) | " + " | ".join(sets) + " | **mean** |", "|---|" + "---|" * (len(sets) + 1)]
    for title, a, b in (("GRPO - SFT", "grpo", "sft"), ("GRPO - RFT", "grpo", "rft"), ("RFT - SFT", "rft", "sft")):
        lines.append(f"| {title} | " + " | ".join(paired(score(a, ds), score(b, ds)) for ds in sets + ["mean"]) + " |")
    scored = {ds: ub["sft"][0]["datasets"][ds]["n_scored"] for ds in sets}
    lines += ["", "Clips scored per set (sentiment: valence 0 removed; HIT: neutral clips, which map to no wheel, "
              "left out): "
              + ", ".join(f"{ds} {n}" for ds, n in scored.items()) + ". The mean is over these "
              f"{len(sets)} scores (the papers' MER-UniBench: 9). Figure: `plots/crosstask.png`.", ""]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    bars(ax, sets + ["mean"], [t for t, _ in MODELS], {t: {ds: score(n, ds) for ds in sets + ["mean"]}
                                                       for t, n in MODELS}, "score (%)")
    ax.set_title(f"(d) synthetic MER-UniBench ({seeds_note}; bars: mean ± sd, dots: seeds)")
    save(fig, "crosstask.png")

open(os.path.join(out, "results.md"), "w").write("\n".join(lines))
print("\n".join(lines))
EOF
echo "done in $WALL s: $OUT/results.md"
if [ "$QUICK" = 1 ]; then echo "$QUICK_NOTE"; fi
