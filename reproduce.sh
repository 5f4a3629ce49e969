#!/usr/bin/env bash
# reproduce.sh: the papers' findings in miniature, on the synthetic OV-MER benchmark, on a CPU.
#
#   bash reproduce.sh             # the full run: about 15-20 minutes on 2 CPU cores (README, "Results")
#   bash reproduce.sh --quick     # the same steps at toy sizes, in a few minutes (the smoke test runs it)
#   bash reproduce.sh --medium    # half the clips and steps (the same samples per clip): a busy machine
#   options: --out DIR (default out/repro; an earlier run there is replaced), --jobs 1|2|3 (parallel pipelines;
#            3: one per seed and, after SFT, one per branch: for a machine shared with other work)
#
# Steps: synthesize the benchmark (rl labels from simulated annotators, no rl descriptions, and a shifted test
# split); for seeds 0, 1, 2: SFT; SFT + GRPO; SFT + RFT (best-of-N by the GRPO reward on the same rl labels,
# as many samples per clip as GRPO draws, then SFT on the kept completions: the same information); SFT on the
# rl split's consensus labels and descriptions (an oracle: information the real data lacks); each evaluated
# on test and test_shift, greedy and sampled. Then a modality ablation of seed 0, OUT/results.md (the tables)
# and OUT/plots/*.png. Every evaluation is of the checkpoint each
# run ends with (never chosen by a test score). Each process uses one thread; two pipelines run at once.
set -euo pipefail
cd "$(dirname "$0")"

OUT=out/repro
JOBS=2
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
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

QUICK_NOTE="--quick: toy sizes (a few steps on a few clips) that test the plumbing, not the findings; its numbers
mean nothing. Run without --quick (about 15 min) for the README's results."
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
  SEEDS="0 1"
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
  if ! "$@" > "$OUT/logs/$name.log" 2>&1; then
    echo "FAILED: $name (last lines of $OUT/logs/$name.log below)" >&2
    tail -n 30 "$OUT/logs/$name.log" >&2
    exit 1
  fi
}
evaluate() {  # evaluate NAME CKPT: greedy and sampled, on test and test_shift (reports in OUT/eval/NAME/SPLIT)
  run "eval_$1" $PY eval.py --ckpt "$2" --data "$D" --split test,test_shift --out "$OUT/eval/$1" \
    --feature_cache "$F" --sample $SAMPLES $EVAL
}
# after SFT, four independent branches per seed (in parallel with --jobs 3)
grpo_branch() {
  run "grpo_s$s" $PY grpo.py --init "$OUT/sft_s$s" --data "$D" --out "$OUT/grpo_s$s" --seed "$s" \
    --feature_cache "$F" $GRPO
  evaluate "grpo_s$s" "$OUT/grpo_s$s"
}
rft_branch() {  # RFT: best of RFT_N samples per rl clip (sampled as GRPO samples: T = 1, no top-p), then SFT
  run "rft_sample_s$s" $PY eval.py --ckpt "$OUT/sft_s$s" --data "$D" --split rl --sample $RFT_N --top_p 1 \
    --seed "$s" --best_csv "$OUT/rft_s$s.csv" --min_reward $MIN_REWARD --out "$OUT/eval/rl_sft_s$s" \
    --feature_cache "$F" $EVAL
  run "rft_s$s" $PY sft.py --init "$OUT/sft_s$s" --data "$D" --train_csv "$OUT/rft_s$s.csv" --lr 1e-3 \
    --out "$OUT/rft_s$s" --seed "$s" --feature_cache "$F" $CTRL
  evaluate "rft_s$s" "$OUT/rft_s$s"
}
oracle_branch() {  # the oracle: the same fine-tuning on the rl clips' consensus labels and descriptions
  run "oracle_s$s" $PY sft.py --init "$OUT/sft_s$s" --data "$D" --train_csv "$D/rl_oracle.csv" --lr 1e-3 \
    --out "$OUT/oracle_s$s" --seed "$s" --feature_cache "$F" $CTRL
  evaluate "oracle_s$s" "$OUT/oracle_s$s"
}
sft_branch() { evaluate "sft_s$s" "$OUT/sft_s$s"; }
seed() {  # the main comparison for one seed
  local s=$1 pids=() rc=0 branch
  run "sft_s$s" $PY sft.py --data "$D" --out "$OUT/sft_s$s" --seed "$s" --feature_cache "$F" $SFT
  for branch in sft_branch grpo_branch rft_branch oracle_branch; do
    if [ "$JOBS" -ge 3 ]; then $branch & pids+=($!); else $branch || return 1; fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}
ablation() {  # ablation NAME: seed 0's checkpoint with each modality blanked (test, greedy)
  run "ablate_$1" $PY eval.py --ckpt "$OUT/$1" --data "$D" --split test --out "$OUT/eval/ablate_$1" \
    --feature_cache "$F" --ablate video,audio,subtitle $EVAL
}
lane_a() { seed 0 && ablation sft_s0 && ablation grpo_s0; }
lane_b() { for s in $SEEDS; do [ "$s" = 0 ] || seed "$s" || return 1; done; }

run synth $PY data.py synth --out "$D" --seed 0 $SYNTH
if [ "$JOBS" -ge 3 ]; then  # one pipeline per seed
  pids=()
  for s in $SEEDS; do
    if [ "$s" = 0 ]; then lane_a & else seed "$s" & fi
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { kill "${pids[@]}" 2>/dev/null; exit 1; }; done
elif [ "$JOBS" = 2 ]; then
  lane_a & a=$!
  lane_b & b=$!
  wait $a || { kill $b 2>/dev/null; exit 1; }
  wait $b || exit 1
else
  lane_a
  lane_b
fi

runs() { for s in $SEEDS; do echo "$OUT/$1_s$s"; done; }
run plots_grpo $PY eval.py plot --run $(runs grpo) --out "$OUT/plots/grpo_seeds"
run plots_rft $PY eval.py plot --run "$OUT/rft_s0" "$OUT/oracle_s0" --label "RFT (seed 0)" "oracle (seed 0)" \
  --out "$OUT/plots/rft_oracle"
run plots_sft $PY eval.py plot --run $(runs sft) --out "$OUT/plots/sft"
WALL=$(( $(date +%s) - T0 ))
CPU=$(times | tail -n 1)  # user and system time of every finished child process
$PY - "$OUT" "$WALL" "$QUICK" "$RFT_N" "$CPU" $SEEDS <<'EOF'
"""Gather OUT/eval/*/*/metrics.json into OUT/results.md."""
import json, os, platform, re, statistics, sys
import torch
out, wall, quick, rft_n, cpu_times = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
SEEDS = [int(s) for s in sys.argv[6:]]
ev = lambda split, name: json.load(open(os.path.join(out, "eval", name, split, "metrics.json")))  # noqa: E731
one = lambda name: json.load(open(os.path.join(out, "eval", name, "metrics.json")))  # noqa: E731
pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
MODELS = (("SFT", "sft"), ("SFT + GRPO", "grpo"), ("SFT + RFT (same information)", "rft"),
          ("SFT + oracle (consensus labels and descriptions)", "oracle"))
MODES = (("test", "greedy"), ("test", "sampled"), ("test_shift", "greedy"), ("test_shift", "sampled"))


def spread(values):
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values) if len(values) > 1 else 0.0)}"


def seconds(text):  # "1m2.5s" -> 62.5
    m = re.fullmatch(r"(\d+)m([\d.]+)s", text)
    return 60 * int(m.group(1)) + float(m.group(2)) if m else 0.0


cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
cpu_s = sum(seconds(t) for t in cpu_times.split())
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
        cells.append(" / ".join(f"{100 * x:+.1f}" for x in d) + f" ({100 * statistics.mean(d):+.1f} ± "
                     f"{pct(statistics.stdev(d))})")
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
