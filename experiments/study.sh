#!/usr/bin/env bash
# The measurements behind the README's result tables (issue 4's "done means"), beyond the demo pipeline:
#   seeds   15-1x5: ft, MiB, RECALL (GAN and web replay) for seeds 0, 1, 2  -> mean ± std
#   10-2x5  the same methods, seed 0
#   knobs   RECALL 15-1x5 with other inpainting thresholds tau, replay ratios r and min_labelled
#   oracle  RECALL 15-1x5 with the toy generator's true masks as replay labels (label evaluation's upper bound)
# Every run resumes where it stopped (re-run the script after an interruption); step 0 is trained once per
# (base classes, seed) and shared. Needs the demo's data and pools: run `make demo` (or `dvc repro`) first.
#   bash experiments/study.sh [seeds|10-2x5|knobs|oracle|report] ...     (no argument: all of them)
# ~27 minutes on 2 CPU cores. Results: study/<run>/metrics.json, tables in reports/study/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
OUT=study
run() {  # run NAME OVERRIDES...
    local name=$1; shift
    if [ -f "$OUT/$name/metrics.json" ]; then echo "done: $name"; return; fi
    echo "run: $name ($*)"
    recall run --params params.yaml tracking.experiment=study "$@" run_dir="$OUT/$name" 2>&1 \
        | tr '\r' '\n' | grep -E '^(step [0-9]+ \(|replay:|final|recall: error)' || true
    [ -f "$OUT/$name/metrics.json" ] || { echo "run $name failed; see above" >&2; exit 1; }
}
step0() {  # step0 BASE_PROTOCOL SEED
    run "step0_${1}_s$2" protocol="$1" method=ft seed="$2" last_step=0
}
methods() {  # methods PROTOCOL STEP0_PROTOCOL SEED
    local p=$1 s0="$OUT/step0_${2}_s$3" seed=$3
    run "${p}_ft_s$seed" protocol="$p" method=ft seed="$seed" step0="$s0"
    run "${p}_mib_s$seed" protocol="$p" method=mib seed="$seed" step0="$s0"
    run "${p}_recall_gan_s$seed" protocol="$p" method=recall replay=toy_gan seed="$seed" step0="$s0"
    run "${p}_recall_web_s$seed" protocol="$p" method=recall replay=toy_web seed="$seed" step0="$s0"
}
seeds() {
    for seed in 0 1 2; do step0 15-5 "$seed"; methods 15-1x5 15-5 "$seed"; done
}
ten() {
    step0 10-10 0
    methods 10-2x5 10-10 0
    # the step-0 encoder, trained from scratch on 10 classes, is not general (ImageNet's is): let it learn
    run 10-2x5_recall_gan_unfrozen_s0 protocol=10-2x5 method=recall replay=toy_gan method.freeze_encoder=false \
        step0="$OUT/step0_10-10_s0"
}
knobs() {
    step0 15-5 0
    local s0="$OUT/step0_15-5_s0" common=(protocol=15-1x5 method=recall)
    run 15-1x5_recall_gan_tau0.5 "${common[@]}" replay=toy_gan step0="$s0" method.inpaint_threshold=0.5
    run 15-1x5_recall_gan_tau0.9 "${common[@]}" replay=toy_gan step0="$s0" method.inpaint_threshold=0.9
    run 15-1x5_recall_gan_r0.25 "${common[@]}" replay=toy_gan step0="$s0" method.replay_ratio=0.25
    run 15-1x5_recall_gan_r0.75 "${common[@]}" replay=toy_gan step0="$s0" method.replay_ratio=0.75
    run 15-1x5_recall_gan_minlab0.05 "${common[@]}" replay=toy_gan step0="$s0" method.min_labelled=0.05
    run 15-1x5_recall_web_minlab0.05 "${common[@]}" replay=toy_web step0="$s0" method.min_labelled=0.05
}
oracle() {  # label evaluation's share of the gap: the same GAN run with the generator's true masks as labels
    step0 15-5 0
    local d="$OUT/15-1x5_recall_gan_oracle" map=pools/toy_gan_mapping.json
    [ -f "$d/metrics.json" ] || python -m recall.replay.oracle pools/toy_gan "$d/steps/replay_labels" --mapping $map --write 5
    run 15-1x5_recall_gan_oracle protocol=15-1x5 method=recall replay=toy_gan step0="$OUT/step0_15-5_s0"
    mkdir -p reports/study
    python -m recall.replay.oracle pools/toy_gan "$OUT/15-1x5_recall_gan_s0/steps/replay_labels" --mapping $map \
        > reports/study/label_quality_toy_gan.json
    echo "label quality of 15-1x5_recall_gan_s0 (IoU with the true masks, share of empty labels): reports/study/label_quality_toy_gan.json"
}
report() {
    recall report $(ls -d "$OUT"/*/ | grep -v '/step0_\|_oracle/') --out reports/study > /dev/null  # oracle: not a method
    cat reports/study/summary.md
}
# web replay here renders the Flickr stand-in's photos directly (replay=toy_web, as when these tables were measured)
[ -f pools/toy_web/pool.json ] || recall pool --params params.yaml replay=toy_web 2>&1 | tail -1
for part in "${@:-10-2x5 knobs seeds oracle report}"; do
    for p in $part; do
        case $p in seeds) seeds;; 10-2x5) ten;; knobs) knobs;; oracle) oracle;; report) report;;
            *) echo "unknown part $p (seeds|10-2x5|knobs|oracle|report)" >&2; exit 2;; esac
    done
done
