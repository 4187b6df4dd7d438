#!/usr/bin/env bash
# slurm/transfer.sh: the transfer experiment as two chained Slurm jobs:
# pre-training (slurm/pretrain.sh), then fine-tuning (slurm/finetune.sh) from
# the pre-training export, submitted with --dependency=afterok:<pretrain id> so
# that fine-tuning starts only if pre-training succeeded (and is cancelled
# otherwise: --kill-on-invalid-dep=yes).
#
# Usage (on a login node, from the repository root):
#   bash slurm/transfer.sh [SBATCH_OPTION...]
#       SBATCH_OPTIONs (e.g. --partition=gpu --account=abc) go to both jobs
#   bash slurm/transfer.sh --help
#
# Prints, on stdout, shell-readable lines (progress goes to stderr):
#   PRETRAIN_JOB_ID=<id>
#   FINETUNE_JOB_ID=<id>
#   RUN_DIR=<absolute path>
# so `eval "$(bash slurm/transfer.sh)"` sets them in your shell.
#
# Variables:
#   RUN_DIR             parent of both output dirs (default runs/transfer-<date>-<time>)
#   PRETRAIN_CONFIG     default configs/pretrain.yaml
#   FINETUNE_CONFIG     default configs/finetune.yaml
#   PRETRAIN_OUTPUT_DIR default RUN_DIR/pretrain
#   FINETUNE_OUTPUT_DIR default RUN_DIR/finetune
#                       fine-tuning gets PRETRAINED=PRETRAIN_OUTPUT_DIR/export
#   PRETRAIN_EXTRA_ARGS, FINETUNE_EXTRA_ARGS
#                       dist/train.py arguments for one job (whitespace-split)
#   PRETRAIN_SBATCH_ARGS, FINETUNE_SBATCH_ARGS
#                       sbatch options for one job (whitespace-split),
#                       e.g. FINETUNE_SBATCH_ARGS="--time=02:00:00"
#   NODES, TASKS_PER_NODE, CPUS_PER_TASK, SBATCH_TIMELIMIT, SBATCH_PARTITION,
#   SBATCH_ACCOUNT, SBATCH_GPUS_PER_NODE (sbatch's own variables)
#                       resources of both jobs (default: the #SBATCH lines of
#                       pretrain.sh / finetune.sh)
#   LOG_DIR             job logs: LOG_DIR/<job-name>-<job-id>.out (default
#                       logs/slurm; created here)
#   LAUNCHER, MMM4REC_DEVICE, MMM4REC_PYTHON, MMM4REC_CACHE, RESUME, ...
#                       as in slurm/pretrain.sh --help
set -euo pipefail

mmm4rec_find_root() {
  local d
  for d in "${MMM4REC_ROOT:-}" "$(dirname -- "${BASH_SOURCE[0]}")/.."; do
    [[ -n "$d" && -f "$d/slurm/common.sh" ]] && { (cd -- "$d" && pwd); return 0; }
  done
  echo "[mmm4rec-slurm] ERROR: cannot find the mmm4rec repository; set MMM4REC_ROOT" >&2
  return 1
}
MMM4REC_ROOT=$(mmm4rec_find_root)
export MMM4REC_ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$MMM4REC_ROOT/slurm/common.sh"

case "${1:-}" in
  -h | --help)
    mmm4rec_usage "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

run_dir=$(mmm4rec_abspath "${RUN_DIR:-runs/transfer-$(date +%Y%m%d-%H%M%S)}")
pretrain_out=$(mmm4rec_abspath "${PRETRAIN_OUTPUT_DIR:-$run_dir/pretrain}")
finetune_out=$(mmm4rec_abspath "${FINETUNE_OUTPUT_DIR:-$run_dir/finetune}")
pretrain_cfg=$(mmm4rec_abspath "${PRETRAIN_CONFIG:-configs/pretrain.yaml}")
finetune_cfg=$(mmm4rec_abspath "${FINETUNE_CONFIG:-configs/finetune.yaml}")
for cfg in "$pretrain_cfg" "$finetune_cfg"; do
  [[ "$cfg" == *://* || -f "$cfg" ]] || mmm4rec_die "config not found: $cfg"
done
mkdir -p "$run_dir"

read -ra pretrain_sbatch <<<"${PRETRAIN_SBATCH_ARGS:-}"
read -ra finetune_sbatch <<<"${FINETUNE_SBATCH_ARGS:-}"

pretrain_id=$(
  unset PRETRAINED SBATCH_JOB_NAME
  CONFIG=$pretrain_cfg OUTPUT_DIR=$pretrain_out EXTRA_ARGS=${PRETRAIN_EXTRA_ARGS:-} \
    mmm4rec_submit pretrain "$MMM4REC_ROOT/slurm/pretrain.sh" "$@" "${pretrain_sbatch[@]}"
)
mmm4rec_log "submitted pre-training job $pretrain_id -> $pretrain_out"

if ! finetune_id=$(
  unset SBATCH_JOB_NAME
  CONFIG=$finetune_cfg OUTPUT_DIR=$finetune_out PRETRAINED=$pretrain_out/export \
    EXTRA_ARGS=${FINETUNE_EXTRA_ARGS:-} \
    mmm4rec_submit finetune "$MMM4REC_ROOT/slurm/finetune.sh" \
    --dependency="afterok:$pretrain_id" --kill-on-invalid-dep=yes "$@" "${finetune_sbatch[@]}"
); then
  mmm4rec_log "fine-tuning submission failed: cancelling pre-training job $pretrain_id"
  scancel "$pretrain_id" || true
  exit 1
fi
mmm4rec_log "submitted fine-tuning job $finetune_id (after $pretrain_id succeeds) -> $finetune_out"
mmm4rec_log "logs: ${LOG_DIR:-logs/slurm}/mmm4rec-pretrain-$pretrain_id.out, ${LOG_DIR:-logs/slurm}/mmm4rec-finetune-$finetune_id.out"

printf 'PRETRAIN_JOB_ID=%s\nFINETUNE_JOB_ID=%s\nRUN_DIR=%s\n' "$pretrain_id" "$finetune_id" "$run_dir"
