#!/usr/bin/env bash
# reproduce.sh: the papers' findings in miniature, on the synthetic OV-MER benchmark, on a CPU.
#
#   bash reproduce.sh             # the full run: about 12 minutes on 2 idle CPU cores (README, "Results")
#   bash reproduce.sh --quick     # the same steps at toy sizes, in a few minutes (the smoke test runs it)
#   bash reproduce.sh --medium    # half the clips and steps (the same samples per clip): a busy machine
#   options: --out DIR (default out/repro; an earlier run there is replaced), --jobs N (steps run at once;
#            default: one per CPU core, as each process uses one thread)
#
# Steps: synthesize the benchmark (rl labels from simulated annotators, no rl descriptions, and a shifted test
# split); for seeds 0, 1, 2: SFT; SFT + GRPO; SFT + RFT (best-of-N by the GRPO reward on the same rl labels,
# as many samples per clip as GRPO draws, then SFT on the kept completions: the same information); SFT on the
# rl split's consensus labels and descriptions (an oracle: information the real data lacks); each evaluated
# on test and test_shift, greedy and sampled. Then a modality ablation of seed 0, OUT/results.md (the tables)
# and OUT/plots/*.png. Every evaluation is of the checkpoint each
# run ends with (never chosen by a test score). OUT/logs holds each step's output, and times.txt each step's
# wall, user and system seconds.
set -euo pipefail
cd "$(dirname "$0")"

OUT=out/repro
JOBS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --medium) QUICK=medium ;;
    --out) OUT=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    *) echo "reproduce.sh: unknown option $1 (use --quick, --medium, --out DIR, --jobs N)" >&2; exit 2 ;;
  esac
  shift
done
case "$JOBS" in ''|*[!0-9]*|0) echo "reproduce.sh: --jobs $JOBS: give a whole number of at least 1" >&2; exit 2 ;; esac
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

QUICK_NOTE="--quick: toy sizes (a few steps on a few clips) that test the plumbing, not the findings; its numbers
mean nothing. Run without --quick (about 12 min on 2 cores) for the README's results."
if [ "$QUICK" = 1 ]; then
  echo "$QUICK_NOTE"
  N_RL=16; G=4; B=4; STEPS=2
  SYNTH="--n-train 48 --n-rl $N_RL --n-val 8 --n-test 16 --n-test-shift 16"
  SFT="--max_steps 20 --eval_every 0 --eval_samples 4 --save_every 0"
  CTRL="--max_steps 4 --eval_every 0 --eval_samples 4 --save_every 0 --batch_size 4 --micro_batch 4"
  GRPO="--max_new_tokens 24 --eval_every 0 --eval_samples 4 --save_every 0"
  EVAL="--max_new_tokens 24"
  MIN_REWARD=-1  # a 20-step SFT policy rarely scores; the quick run only checks that every step runs
  SAMPLES=1
  SEEDS="0"
elif [ "$QUICK" = medium ]; then
  N_RL=200; G=8; B=16; STEPS=30
  SYNTH="--n-train 400 --n-rl $N_RL --n-val 50 --n-test 100 --n-test-shift 100"
  SFT=""
  CTRL="--epochs 2 --warmup_steps 5 --eval_every 0"
  GRPO="--eval_samples 50"
  EVAL=""
  MIN_REWARD=1.0
  SAMPLES=4
  SEEDS="0 1 2"
else
  N_RL=400; G=8; B=16; STEPS=60
  SYNTH="--n-rl $N_RL"
  SFT=""
  CTRL="--epochs 2 --warmup_steps 5 --eval_every 0"
  GRPO=""
  EVAL=""
  MIN_REWARD=1.0  # a well-formatted answer with per-sample F1 >= 0.5 (reward = F1 + 0.5 format)
  SAMPLES=4
  SEEDS="0 1 2"
fi
GRPO="--group_size $G --clips_per_step $B --max_steps $STEPS $GRPO"
# RFT draws as many samples per rl clip as GRPO does: G x (the times GRPO sees a clip), rounded
RFT_N=$(( (G * B * STEPS + N_RL / 2) / N_RL ))
D=$OUT/synth
F=$OUT/features
# a second reproduction into the same OUT starts clean (the stages refuse a used --out); features are kept
if compgen -G "$OUT/sft_s*" > /dev/null || [ -d "$OUT/logs" ]; then
  echo "removing the previous reproduction in $OUT (runs, evaluations, plots, logs; the feature cache stays)"
  rm -rf "$OUT"/sft_s* "$OUT"/grpo_* "$OUT"/rft_s* "$OUT"/oracle_s* "$OUT/eval" "$OUT/plots" "$OUT/logs" \
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
evaluate() {  # evaluate NAME CKPT: greedy and sampled, on test and test_shift (reports in OUT/eval/NAME/SPLIT)
  run "eval_$1" $PY eval.py --ckpt "$2" --data "$D" --split test,test_shift --out "$OUT/eval/$1" \
    --feature_cache "$F" --sample $SAMPLES $EVAL
}
# after SFT, four independent branches per seed; seed 0's SFT and GRPO branches also run the modality ablation
ablation() {  # ablation NAME: a checkpoint with each modality blanked (test, greedy)
  run "ablate_$1" $PY eval.py --ckpt "$OUT/$1" --data "$D" --split test --out "$OUT/eval/ablate_$1" \
    --feature_cache "$F" --ablate video,audio,subtitle $EVAL
}
sft() { run "sft_s$1" $PY sft.py --data "$D" --out "$OUT/sft_s$1" --seed "$1" --feature_cache "$F" $SFT; }
sft_branch() {
  evaluate "sft_s$1" "$OUT/sft_s$1"
  if [ "$1" = 0 ]; then ablation sft_s0; fi
}
grpo_branch() {
  run "grpo_s$1" $PY grpo.py --init "$OUT/sft_s$1" --data "$D" --out "$OUT/grpo_s$1" --seed "$1" \
    --feature_cache "$F" $GRPO
  evaluate "grpo_s$1" "$OUT/grpo_s$1"
  if [ "$1" = 0 ]; then ablation grpo_s0; fi
}
rft_branch() {  # RFT: best of RFT_N samples per rl clip (sampled as GRPO samples: T = 1, no top-p), then SFT
  run "rft_sample_s$1" $PY eval.py --ckpt "$OUT/sft_s$1" --data "$D" --split rl --sample $RFT_N --top_p 1 \
    --seed "$1" --best_csv "$OUT/rft_s$1.csv" --min_reward $MIN_REWARD --out "$OUT/eval/rl_sft_s$1" \
    --feature_cache "$F" $EVAL
  run "rft_s$1" $PY sft.py --init "$OUT/sft_s$1" --data "$D" --train_csv "$OUT/rft_s$1.csv" --lr 1e-3 \
    --out "$OUT/rft_s$1" --seed "$1" --feature_cache "$F" $CTRL
  evaluate "rft_s$1" "$OUT/rft_s$1"
}
oracle_branch() {  # the oracle: the same fine-tuning on the rl clips' consensus labels and descriptions
  run "oracle_s$1" $PY sft.py --init "$OUT/sft_s$1" --data "$D" --train_csv "$D/rl_oracle.csv" --lr 1e-3 \
    --out "$OUT/oracle_s$1" --seed "$1" --feature_cache "$F" $CTRL
  evaluate "oracle_s$1" "$OUT/oracle_s$1"
}
# pool TASK...: run the tasks (a function and its seed, e.g. "grpo_branch 1") JOBS at a time, in the order
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
tasks=(); for s in $SEEDS; do tasks+=("sft $s"); done
pool "${tasks[@]}"
tasks=()  # the longest branches first, so that no core idles at the end
for branch in grpo_branch rft_branch oracle_branch sft_branch; do
  for s in $SEEDS; do tasks+=("$branch $s"); done
done
pool "${tasks[@]}"

runs() { for s in $SEEDS; do echo "$OUT/$1_s$s"; done; }
run plots_grpo $PY eval.py plot --run $(runs grpo) --out "$OUT/plots/grpo_seeds"
run plots_rft $PY eval.py plot --run "$OUT/rft_s0" "$OUT/oracle_s0" --label "RFT (seed 0)" "oracle (seed 0)" \
  --out "$OUT/plots/rft_oracle"
run plots_sft $PY eval.py plot --run $(runs sft) --out "$OUT/plots/sft"
WALL=$(( $(date +%s) - T0 ))
$PY - "$OUT" "$WALL" "$QUICK" "$RFT_N" $SEEDS <<'EOF'
"""Gather OUT/eval/*/*/metrics.json into OUT/results.md."""
import json, os, platform, statistics, sys
import torch
out, wall, quick, rft_n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
SEEDS = [int(s) for s in sys.argv[5:]]
ev = lambda split, name: json.load(open(os.path.join(out, "eval", name, split, "metrics.json")))  # noqa: E731
one = lambda name: json.load(open(os.path.join(out, "eval", name, "metrics.json")))  # noqa: E731
pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
MODELS = (("SFT", "sft"), ("SFT + GRPO", "grpo"), ("SFT + RFT (same information)", "rft"),
          ("SFT + oracle (consensus labels and descriptions)", "oracle"))
MODES = (("test", "greedy"), ("test", "sampled"), ("test_shift", "greedy"), ("test_shift", "sampled"))


def spread(values, signed=False):  # "mean ± standard deviation" in %, "mean ± -" for one seed
    sd = pct(statistics.stdev(values)) if len(values) > 1 else "-"
    return f"{100 * statistics.mean(values):{'+' if signed else ''}.1f} ± {sd}"


cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
cpu_s = sum(float(user) + float(system) for _, _, user, system in  # the steps' user and system seconds
            (line.split() for line in open(os.path.join(out, "logs", "times.txt"))))
lines = ["# Results of `bash reproduce.sh" + {"1": " --quick", "medium": " --medium"}.get(quick, "") + "`", ""]
if quick == "1":
    lines += ["**Toy sizes: these numbers test the plumbing, not the findings; they mean nothing.** Run "
              "`bash reproduce.sh` without `--quick` for the results.", ""]
lines += [
         f"Machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}."
         f" Wall time: {wall // 60} min {wall % 60} s; CPU time (user + system, all processes): "
         f"{int(cpu_s) // 60} min {int(cpu_s) % 60} s. Level-1 EW metric in %, mean ± standard deviation over"
         f" seeds {', '.join(map(str, SEEDS))}; greedy decoding, and sampled (T = 1, top_p 0.9, "
         f"{ev('test', 'sft_s0')['sampled']['n_draws']} draws per clip).", ""]
for split in ("test", "test_shift"):
    lines += [f"## 1{'a' if split == 'test' else 'b'}. `{split}`", "",
              "| model | EW-F (greedy) | precision | recall | labels | EW-F (sampled) |", "|---|---|---|---|---|---|"]
    for title, name in MODELS:
        ms = [ev(split, f"{name}_s{s}") for s in SEEDS]
        g = [m["greedy"] for m in ms]
        lines.append(f"| {title} | {spread([x['ew_f_l1'] for x in g])} | {spread([x['precision_l1'] for x in g])} | "
                     f"{spread([x['recall_l1'] for x in g])} | {statistics.mean(x['n_labels'] for x in g):.2f} | "
                     f"{spread([m['sampled']['ew_f_l1'] for m in ms])} |")
    lines.append("")
lines += [f"## 2. Paired differences (EW-F points, per seed {' / '.join(map(str, SEEDS))}, then mean ± standard "
          "deviation)", "",
          "| difference | " + " | ".join(f"{split}, {mode}" for split, mode in MODES) + " |", "|---|---|---|---|---|"]
for title, a, b in (("GRPO - SFT", "grpo", "sft"), ("RFT - SFT", "rft", "sft"), ("GRPO - RFT", "grpo", "rft"),
                    ("GRPO - oracle", "grpo", "oracle"), ("oracle - SFT", "oracle", "sft")):
    cells = []
    for split, mode in MODES:
        d = [ev(split, f"{a}_s{s}")[mode]["ew_f_l1"] - ev(split, f"{b}_s{s}")[mode]["ew_f_l1"] for s in SEEDS]
        cells.append(" / ".join(f"{100 * x:+.1f}" for x in d) + f" ({spread(d, signed=True)})")
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
bests = [one(f"rl_sft_s{s}")["best_of"] for s in SEEDS]
grpo_args = json.load(open(os.path.join(out, "grpo_s0", "args.json")))
lines += ["", f"Samples per rl clip: GRPO draws {grpo_args['group_size']} x {grpo_args['max_steps']} steps x "
          f"{grpo_args['clips_per_step']} clips / {bests[0]['of_clips']} clips = "
          f"{grpo_args['group_size'] * grpo_args['max_steps'] * grpo_args['clips_per_step'] / bests[0]['of_clips']:.1f}"
          f"; RFT draws {rft_n} once. RFT kept " + ", ".join(f"{b['kept_clips']}" for b in bests)
          + f" of {bests[0]['of_clips']} clips (seeds {', '.join(map(str, SEEDS))}), mean best reward "
          + ", ".join(f"{b['mean_reward']:.2f}" for b in bests) + ". SFT's greedy EW-F on the rl labels: "
          + ", ".join(pct(one(f"rl_sft_s{s}")["greedy"]["ew_f_l1"]) for s in SEEDS) + "."]
lines += ["", "## 3. Modality ablation at evaluation (seed 0, test, greedy EW-F)", "",
          "| model | all | without video | without audio | without subtitle |", "|---|---|---|---|---|"]
for title, name in (("SFT", "sft_s0"), ("SFT + GRPO", "grpo_s0")):
    m = one(f"ablate_{name}")
    lines.append(f"| {title} | {pct(m['greedy']['ew_f_l1'])} | " + " | ".join(
        pct(m[f"without_{k}"]["ew_f_l1"]) for k in ("video", "audio", "subtitle")) + " |")
lines += ["", "Plots: `plots/grpo_seeds/curves.png`, `plots/sft/curves.png`, `plots/rft_oracle/curves.png`.", ""]
open(os.path.join(out, "results.md"), "w").write("\n".join(lines))
print("\n".join(lines))
EOF
echo "done in $WALL s: $OUT/results.md"
if [ "$QUICK" = 1 ]; then echo "$QUICK_NOTE"; fi
