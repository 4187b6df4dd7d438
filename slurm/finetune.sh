#!/usr/bin/env bash
#SBATCH --job-name=mmm4rec-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=logs/slurm/%x-%j.out
#
# slurm/finetune.sh: fine-tune MMM4Rec on a target domain with dist/train.py
# (DeepSpeed ZeRO + torchrec) on a Slurm cluster, starting from a pre-trained
# export (PRETRAINED). slurm/transfer.sh chains it after slurm/pretrain.sh.
#
# Usage (from the repository root):
#   bash slurm/finetune.sh [SBATCH_OPTION...] [-- TRAIN_ARG...]
#       submit; creates LOG_DIR first and prints the job id
#   sbatch [SBATCH_OPTION...] slurm/finetune.sh [TRAIN_ARG...]
#       plain sbatch; the default log path logs/slurm/ must exist (mkdir -p logs/slurm)
#   bash slurm/finetune.sh --run [TRAIN_ARG...]
#       run inside an existing allocation (salloc)
#   bash slurm/finetune.sh --help
#       print this text
# TRAIN_ARGs are appended to `dist/train.py --config CONFIG --output-dir OUTPUT_DIR`,
# e.g. --set train.optimizer.lr=5e-4. sbatch options given on the command line override the
# #SBATCH defaults below (e.g. --nodes=4 --partition=gpu --time=2-00:00:00).
#
# Variables read by the job (sbatch exports your environment to it):
#   CONFIG          experiment YAML (default configs/finetune.yaml)
#   PRETRAINED      export directory of a pre-training run (OUTPUT_DIR/export of
#                   slurm/pretrain.sh: model.safetensors + config.json); passed as
#                   --set train.init_from=PRETRAINED. Checked before training starts.
#                   Unset: the config's train.init_from (or from scratch).
#   OUTPUT_DIR      where checkpoints/, export/ and metrics.json go
#                   (default runs/<job-name>-<job-id>)
#   LAUNCHER        srun (default: one Slurm task per GPU, env:// variables set
#                   from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) or torchrun
#                   (one task per node running torchrun, c10d rendezvous)
#   MMM4REC_DEVICE  gpu (default) or cpu (DS_ACCELERATOR=cpu: DeepSpeed CPU
#                   accelerator + gloo)
#   MMM4REC_OMP_THREADS
#                   OMP_NUM_THREADS of each process (default: 1 on cpu, the
#                   task's --cpus-per-task on gpu; an inherited value is replaced)
#   MMM4REC_PYTHON  Python of your environment (default: python on PATH); its
#                   directory goes first on PATH (the env's ninja, used by DeepSpeed)
#   MMM4REC_CACHE   cache shared by all jobs (default <repo>/.cache): compiled
#                   DeepSpeed ops (TORCH_EXTENSIONS_DIR=$MMM4REC_CACHE/torch_extensions
#                   unless set) and the bundled sample shards
#   RESUME          auto/1 (default: --resume, which continues from the latest
#                   checkpoint in OUTPUT_DIR, e.g. after a requeue, or starts fresh
#                   when there is none) or 0 (never)
#   EXTRA_ARGS      more dist/train.py arguments, split on whitespace
#   NPROC_PER_NODE  torchrun only: processes per node (default: tasks or GPUs per node)
#   MMM4REC_MASTER_ADDR, MMM4REC_MASTER_PORT
#                   override the rendezvous host (default: first node of the job)
#                   and port (default: 10000 + job id % 20000)
# Variables read when submitting with `bash slurm/finetune.sh` (with plain
# sbatch, use sbatch options instead):
#   NODES, TASKS_PER_NODE, CPUS_PER_TASK -> --nodes, --ntasks-per-node, --cpus-per-task
#   time, partition, account, job name, GPUs: sbatch's own variables, e.g.
#   SBATCH_TIMELIMIT, SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_JOB_NAME, SBATCH_GPUS_PER_NODE
#   LOG_DIR         job logs go to LOG_DIR/<job-name>-<job-id>.out (default logs/slurm)
# With MMM4REC_DEVICE=cpu the submission asks for --gpus-per-node=0.
# NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are yours to export; see docs/slurm.md.
set -euo pipefail

# sbatch runs a spooled copy of this file, so find the repository another way:
# MMM4REC_ROOT, this file's directory, the submit directory, or the job's script path.
mmm4rec_find_root() {
  local d cmd
  for d in "${MMM4REC_ROOT:-}" "$(dirname -- "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n "$d" && -f "$d/slurm/common.sh" ]] && { (cd -- "$d" && pwd); return 0; }
  done
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Command= is the submitted script's path, followed by its arguments.
    cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
      sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p' | head -n1 || true)
    [[ -n "$cmd" && -f "$cmd/slurm/common.sh" ]] && { (cd -- "$cmd" && pwd); return 0; }
  fi
  echo "[mmm4rec-slurm] ERROR: cannot find the mmm4rec repository; set MMM4REC_ROOT" >&2
  return 1
}
MMM4REC_ROOT=$(mmm4rec_find_root)
export MMM4REC_ROOT
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$MMM4REC_ROOT/slurm/common.sh"

mmm4rec_main finetune "$MMM4REC_ROOT/slurm/finetune.sh" "$@"
