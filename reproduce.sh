#!/usr/bin/env bash
# reproduce.sh: the papers' findings in miniature, on the synthetic OV-MER benchmark, on a CPU.
#
#   bash reproduce.sh             # the full run: about 17 minutes on 2 CPU cores (README, "Results")
#   bash reproduce.sh --quick     # the same steps at toy sizes, in about a minute (the smoke test runs it)
#   options: --out DIR (default out/repro), --jobs 1|2 (parallel pipelines, default 2)
#
# Steps: synthesize the benchmark; for seeds 0, 1, 2: SFT, evaluate, GRPO, evaluate, and (a control) SFT
# continued on the GRPO split, evaluate; reward variants and no-think from seed 0; modality ablation; then
# OUT/results.md (the tables) and OUT/plots/*.png. Every evaluation is on the test split, of the checkpoint
# each run ends with (never chosen by a test score). Each process uses one thread; two pipelines run at once.
set -euo pipefail
cd "$(dirname "$0")"

OUT=out/repro
JOBS=2
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    *) echo "reproduce.sh: unknown option $1 (use --quick, --out DIR, --jobs N)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

QUICK_NOTE="--quick: toy sizes (a few steps on a few clips) that test the plumbing, not the findings; its numbers
mean nothing. Run without --quick (about 15 min) for the README's results."
if [ "$QUICK" = 1 ]; then
  echo "$QUICK_NOTE"
  SYNTH="--n-train 48 --n-rl 16 --n-val 8 --n-test 16"
  SFT="--max_steps 20 --eval_every 0 --eval_samples 4 --save_every 0"
  CTRL="--max_steps 4 --eval_every 0 --eval_samples 4 --save_every 0 --batch_size 8 --micro_batch 8"
  GRPO="--max_steps 2 --clips_per_step 4 --group_size 4 --max_new_tokens 24 --eval_every 0 --eval_samples 4 --save_every 0"
  EVAL="--max_new_tokens 24"
  SAMPLES=1
else
  SYNTH=""
  SFT=""
  CTRL="--epochs 2 --warmup_steps 5 --eval_every 0"
  GRPO=""
  EVAL=""
  SAMPLES=4
fi
D=$OUT/synth
F=$OUT/features
# a second reproduction into the same OUT starts clean (the stages refuse a used --out); features are kept
if compgen -G "$OUT/sft_s*" > /dev/null || [ -d "$OUT/logs" ]; then
  echo "removing the previous reproduction in $OUT (runs, evaluations, plots, logs; the feature cache stays)"
  rm -rf "$OUT"/sft_s* "$OUT"/sftrl_s* "$OUT"/grpo_* "$OUT"/sft_nothink "$OUT/eval" "$OUT/plots" "$OUT/logs" \
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
evaluate() {  # evaluate NAME CKPT [extra eval.py flags]
  local name=$1 ckpt=$2; shift 2
  run "eval_$name" $PY eval.py --ckpt "$ckpt" --data "$D" --split test --out "$OUT/eval/$name" \
    --feature_cache "$F" $EVAL "$@"
}
seed() {  # the main comparison for one seed
  local s=$1 more=()
  [ "$s" = 0 ] && more=(--ablate video,audio,subtitle)
  run "sft_s$s" $PY sft.py --data "$D" --out "$OUT/sft_s$s" --seed "$s" --feature_cache "$F" $SFT
  evaluate "sft_s$s" "$OUT/sft_s$s" --sample $SAMPLES "${more[@]}"
  run "grpo_s$s" $PY grpo.py --init "$OUT/sft_s$s" --data "$D" --out "$OUT/grpo_s$s" --seed "$s" \
    --feature_cache "$F" $GRPO
  evaluate "grpo_s$s" "$OUT/grpo_s$s" --sample $SAMPLES "${more[@]}"
  run "sftrl_s$s" $PY sft.py --init "$OUT/sft_s$s" --data "$D" --train_split rl --lr 1e-3 \
    --out "$OUT/sftrl_s$s" --seed "$s" --feature_cache "$F" $CTRL
  evaluate "sftrl_s$s" "$OUT/sftrl_s$s"
}
variant() {  # variant NAME [grpo.py flags]: a reward variant from the seed-0 SFT policy
  local name=$1; shift
  run "grpo_$name" $PY grpo.py --init "$OUT/sft_s0" --data "$D" --out "$OUT/grpo_$name" --seed 0 \
    --feature_cache "$F" $GRPO "$@"
  evaluate "grpo_$name" "$OUT/grpo_$name"
}
nothink() {
  run sft_nothink $PY sft.py --no-think --data "$D" --out "$OUT/sft_nothink" --seed 0 --feature_cache "$F" $SFT
  evaluate sft_nothink "$OUT/sft_nothink"
  run grpo_nothink $PY grpo.py --no-think --init "$OUT/sft_nothink" --data "$D" --out "$OUT/grpo_nothink" \
    --seed 0 --feature_cache "$F" $GRPO
  evaluate grpo_nothink "$OUT/grpo_nothink"
}
lane_a() { seed 0 && variant acc_only --w_format 0 && variant acc_format_p2 --penalty p2 && nothink; }
lane_b() {
  seed 1 && seed 2
  while [ ! -f "$OUT/sft_s0/final/config.json" ]; do sleep 2; done  # the variants start from seed 0's SFT
  variant recall_format --accuracy recall && variant recall_format_p2 --accuracy recall --penalty p2
}

run synth $PY data.py synth --out "$D" --seed 0 $SYNTH
if [ "$JOBS" -ge 2 ]; then
  lane_a & a=$!
  lane_b & b=$!
  wait $a || { kill $b 2>/dev/null; exit 1; }
  wait $b || exit 1
else
  lane_a
  lane_b
fi

run plots_grpo $PY eval.py plot --run "$OUT/grpo_s0" "$OUT/grpo_s1" "$OUT/grpo_s2" --out "$OUT/plots/grpo_seeds"
run plots_rewards $PY eval.py plot --run "$OUT/grpo_s0" "$OUT/grpo_acc_only" "$OUT/grpo_acc_format_p2" \
  "$OUT/grpo_recall_format" "$OUT/grpo_recall_format_p2" \
  --label "acc+format" "acc only" "acc+format+P2" "recall+format" "recall+format+P2" --out "$OUT/plots/rewards"
run plots_sft $PY eval.py plot --run "$OUT/sft_s0" "$OUT/sft_s1" "$OUT/sft_s2" "$OUT/sft_nothink" --out "$OUT/plots/sft"
WALL=$(( $(date +%s) - T0 ))
$PY - "$OUT" "$WALL" "$QUICK" <<'EOF'
"""Gather OUT/eval/*/metrics.json into OUT/results.md."""
import json, os, platform, statistics, sys
import torch
out, wall, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ev = lambda name: json.load(open(os.path.join(out, "eval", name, "metrics.json")))  # noqa: E731
pct = lambda x: f"{100 * x:.1f}"  # noqa: E731


def spread(values):
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values) if len(values) > 1 else 0.0)}"


cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
lines = ["# Results of `bash reproduce.sh" + (" --quick" if quick else "") + "`", ""]
if quick:
    lines += ["**Toy sizes: these numbers test the plumbing, not the findings; they mean nothing.** Run "
              "`bash reproduce.sh` without `--quick` for the results.", ""]
lines += [
          f"Machine: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}."
          f" Wall time: {wall // 60} min {wall % 60} s. Test split of the synthetic benchmark, level-1 EW metric,"
          " mean ± standard deviation over seeds 0, 1, 2.", "",
          "## 1. SFT vs SFT + GRPO", "",
          "| model | EW-F (greedy) | precision | recall | labels | EW-F (sampled, T=1, top_p 0.9) |",
          "|---|---|---|---|---|---|"]
for title, name in (("SFT", "sft"), ("SFT + GRPO (accuracy + format)", "grpo"),
                    ("control: SFT, then SFT on the GRPO split", "sftrl")):
    ms = [ev(f"{name}_s{s}") for s in range(3)]
    g = [m["greedy"] for m in ms]
    sampled = spread([m["sampled"]["ew_f_l1"] for m in ms]) if "sampled" in ms[0] else "-"
    lines.append(f"| {title} | {spread([x['ew_f_l1'] for x in g])} | {spread([x['precision_l1'] for x in g])} | "
                 f"{spread([x['recall_l1'] for x in g])} | {statistics.mean(x['n_labels'] for x in g):.2f} | {sampled} |")
gain = lambda a, b, mode: [ev(f"{a}_s{s}")[mode]["ew_f_l1"] - ev(f"{b}_s{s}")[mode]["ew_f_l1"]  # noqa: E731
                            for s in range(3)]
for mode in ("greedy", "sampled") if "sampled" in ev("sft_s0") else ("greedy",):
    g = gain("grpo", "sft", mode)
    lines.append(f"\nGRPO minus SFT, paired by seed ({mode}): " + ", ".join(f"{100 * x:+.1f}" for x in g)
                 + f" (mean {100 * statistics.mean(g):+.1f} ± {pct(statistics.stdev(g))})")
c = gain("grpo", "sftrl", "greedy")
lines.append("\nGRPO minus the control, paired by seed (greedy): " + ", ".join(f"{100 * x:+.1f}" for x in c)
             + f" (mean {100 * statistics.mean(c):+.1f} ± {pct(statistics.stdev(c))})")
lines += ["", "## 2. Reward variants (seed 0)", "",
          "| reward | EW-F | precision | recall | labels (test, greedy) | labels (training samples, first -> last step) |",
          "|---|---|---|---|---|---|"]
for title, name in (("accuracy only", "grpo_acc_only"), ("accuracy + format", "grpo_s0"),
                    ("accuracy + format + P2", "grpo_acc_format_p2"), ("recall + format", "grpo_recall_format"),
                    ("recall + format + P2", "grpo_recall_format_p2")):
    g = ev(name)["greedy"]
    rows = [json.loads(line) for line in open(os.path.join(out, name, "metrics.jsonl")) if "rollout/n_labels" in line]
    lines.append(f"| {title} | {pct(g['ew_f_l1'])} | {pct(g['precision_l1'])} | {pct(g['recall_l1'])} | "
                 f"{g['n_labels']:.2f} | {rows[0]['rollout/n_labels']:.2f} -> {rows[-1]['rollout/n_labels']:.2f} |")
lines += ["", "## 3. Think vs no-think (seed 0)", "", "| mode | SFT EW-F | SFT + GRPO EW-F |", "|---|---|---|",
          f"| think | {pct(ev('sft_s0')['greedy']['ew_f_l1'])} | {pct(ev('grpo_s0')['greedy']['ew_f_l1'])} |",
          f"| no think | {pct(ev('sft_nothink')['greedy']['ew_f_l1'])} | {pct(ev('grpo_nothink')['greedy']['ew_f_l1'])} |",
          "", "## 4. Modality ablation at evaluation (seed 0, greedy EW-F)", "",
          "| model | all | without video | without audio | without subtitle |", "|---|---|---|---|---|"]
for title, name in (("SFT", "sft_s0"), ("SFT + GRPO", "grpo_s0")):
    m = ev(name)
    lines.append(f"| {title} | {pct(m['greedy']['ew_f_l1'])} | " + " | ".join(
        pct(m[f"without_{k}"]["ew_f_l1"]) for k in ("video", "audio", "subtitle")) + " |")
lines += ["", "Plots: `plots/grpo_seeds/curves.png`, `plots/rewards/curves.png`, `plots/sft/curves.png`.", ""]
open(os.path.join(out, "results.md"), "w").write("\n".join(lines))
print("\n".join(lines))
EOF
echo "done in $WALL s: $OUT/results.md"
if [ "$QUICK" = 1 ]; then echo "$QUICK_NOTE"; fi
