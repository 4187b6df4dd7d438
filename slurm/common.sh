#!/usr/bin/env bash
# slurm/common.sh: the shared part of slurm/pretrain.sh, slurm/finetune.sh and
# slurm/transfer.sh.
#
# Sourced by those scripts (it only defines functions). srun also executes it
# once per task, as `bash slurm/common.sh task-exec CMD...`, to turn the
# task's Slurm variables into the torch.distributed env:// variables
# (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
# before it execs CMD.
#
# Nothing here hard-codes a site: the repository is located at run time
# (MMM4REC_ROOT), Python is ${MMM4REC_PYTHON:-python}.

# ---------------------------------------------------------------- messages
mmm4rec_log() { printf '[mmm4rec-slurm] %s\n' "$*" >&2; }
mmm4rec_die() {
  printf '[mmm4rec-slurm] ERROR: %s\n' "$*" >&2
  exit "${MMM4REC_DIE_CODE:-1}"
}

# Print a script's usage block: its leading comment lines (after the shebang),
# without the #SBATCH and shellcheck directives.
mmm4rec_usage() {
  local file=$1 line
  while IFS= read -r line || [[ -n "$line" ]]; do
    case "$line" in
      '#!'*) continue ;;
      '#SBATCH'* | '# shellcheck'*) continue ;;
      '#') printf '\n' ;;
      '# '*) printf '%s\n' "${line#'# '}" ;;
      '#'*) printf '%s\n' "${line#'#'}" ;;
      '') continue ;;
      *) break ;;
    esac
  done <"$file"
  # The #SBATCH defaults, as the scheduler will read them.
  if grep -qE '^#SBATCH' "$file"; then
    printf '\n#SBATCH defaults in %s:\n' "$(basename "$file")"
    grep -E '^#SBATCH' "$file" | sed 's/^/  /'
  fi
  return 0
}

# -------------------------------------------------------------- paths
# Absolute form of a local path (relative to the current directory); URLs
# (anything with ://) are returned unchanged.
mmm4rec_abspath() {
  local p=$1
  case "$p" in
    *://*) printf '%s\n' "$p" ;;
    /*) printf '%s\n' "$p" ;;
    *) printf '%s/%s\n' "$PWD" "${p#./}" ;;
  esac
}

# ------------------------------------------------------- distributed setup
# Expand Slurm's compressed per-node task counts ("2(x3),1") and print the
# count for node index $2.
mmm4rec_tasks_on_node() {
  local spec=$1 idx=$2 part count reps
  local -a parts
  IFS=, read -ra parts <<<"$spec"
  for part in "${parts[@]}"; do
    if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      count=${BASH_REMATCH[1]}
      reps=${BASH_REMATCH[2]}
    elif [[ "$part" =~ ^[0-9]+$ ]]; then
      count=$part
      reps=1
    else
      return 1
    fi
    if ((idx < reps)); then
      printf '%s\n' "$count"
      return 0
    fi
    idx=$((idx - reps))
  done
  return 1
}

# The rendezvous host: the first node of the allocation, never a silent
# localhost. MMM4REC_MASTER_ADDR overrides it (e.g. a node's InfiniBand name).
mmm4rec_head_node() {
  if [[ -n "${MMM4REC_MASTER_ADDR:-}" ]]; then
    printf '%s\n' "$MMM4REC_MASTER_ADDR"
    return 0
  fi
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] ||
    mmm4rec_die "SLURM_JOB_NODELIST is not set: not inside a Slurm allocation, cannot find the head node (set MMM4REC_MASTER_ADDR to force one)"
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1 || true)
  [[ -n "$head" ]] ||
    mmm4rec_die "'scontrol show hostnames \"$SLURM_JOB_NODELIST\"' gave no host name: cannot find the head node (is scontrol on PATH on the compute nodes? set MMM4REC_MASTER_ADDR to force one)"
  printf '%s\n' "$head"
}

# A rendezvous port derived from the job id (so that jobs sharing a node do
# not collide), in 10000-29999: below Linux's ephemeral range (32768+).
# MMM4REC_MASTER_PORT overrides it.
mmm4rec_master_port() {
  if [[ -n "${MMM4REC_MASTER_PORT:-}" ]]; then
    printf '%s\n' "$MMM4REC_MASTER_PORT"
    return 0
  fi
  [[ "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]] ||
    mmm4rec_die "SLURM_JOB_ID is not set (or not a number): cannot derive MASTER_PORT (set MMM4REC_MASTER_PORT)"
  printf '%s\n' "$((10000 + SLURM_JOB_ID % 20000))"
}

# Executed per task by srun: export the env:// variables from this task's
# SLURM_* variables, then exec the command.
mmm4rec_task_exec() {
  local v
  for v in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID MASTER_ADDR MASTER_PORT; do
    [[ -n "${!v:-}" ]] || mmm4rec_die "task-exec: $v is not set (run this under srun inside the batch script)"
  done
  [[ $# -gt 0 ]] || mmm4rec_die "task-exec: no command given"
  export RANK=$SLURM_PROCID
  export WORLD_SIZE=$SLURM_NTASKS
  export LOCAL_RANK=$SLURM_LOCALID
  local local_size
  local_size=$(mmm4rec_tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}" "$SLURM_NODEID") ||
    mmm4rec_die "task-exec: cannot read this node's task count from SLURM_STEP_TASKS_PER_NODE='${SLURM_STEP_TASKS_PER_NODE:-}'"
  export LOCAL_WORLD_SIZE=$local_size
  export LOCAL_SIZE=$local_size # DeepSpeed's CPU accelerator counts devices from it
  export GROUP_RANK=$SLURM_NODEID
  # Where each rank runs (the multi-node tests read it from the job log).
  mmm4rec_log "task rank $RANK/$WORLD_SIZE on host $(uname -n) (node index $SLURM_NODEID, local rank $LOCAL_RANK/$local_size)"
  exec "$@"
}

# ------------------------------------------------------------- submission
# mmm4rec_submit KIND SCRIPT [SBATCH_OPTION...] [-- TRAIN_ARG...]
# Submit SCRIPT with sbatch, turning the resource variables (NODES,
# TASKS_PER_NODE, GPUS_PER_NODE, CPUS_PER_TASK, TIME, PARTITION, ACCOUNT,
# JOB_NAME, LOG_DIR) into sbatch options; options given here come last and win.
# Prints the job id.
mmm4rec_submit() {
  local kind=$1 script=$2
  shift 2
  local -a opts=() train_args=()
  while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--" ]]; then
      shift
      train_args=("$@")
      break
    fi
    opts+=("$1")
    shift
  done
  command -v sbatch >/dev/null 2>&1 || mmm4rec_die "sbatch not found on PATH: run this on a Slurm login node"

  local log_dir=${LOG_DIR:-logs/slurm}
  mkdir -p "$log_dir" || mmm4rec_die "cannot create LOG_DIR '$log_dir'"
  local -a args=(--parsable --output="$log_dir/%x-%j.out")
  [[ -n "${JOB_NAME:-}" ]] && args+=(--job-name="$JOB_NAME")
  [[ -n "${NODES:-}" ]] && args+=(--nodes="$NODES")
  [[ -n "${TASKS_PER_NODE:-}" ]] && args+=(--ntasks-per-node="$TASKS_PER_NODE")
  [[ -n "${CPUS_PER_TASK:-}" ]] && args+=(--cpus-per-task="$CPUS_PER_TASK")
  if [[ "${MMM4REC_DEVICE:-gpu}" == cpu ]]; then
    args+=(--gpus-per-node=0)
  elif [[ -n "${GPUS_PER_NODE:-}" ]]; then
    args+=(--gpus-per-node="$GPUS_PER_NODE")
  fi
  [[ -n "${TIME:-}" ]] && args+=(--time="$TIME")
  [[ -n "${PARTITION:-}" ]] && args+=(--partition="$PARTITION")
  [[ -n "${ACCOUNT:-}" ]] && args+=(--account="$ACCOUNT")

  # The job runs a spooled copy of the script: tell it where the repository is.
  MMM4REC_ROOT=${MMM4REC_ROOT:?MMM4REC_ROOT must be set before mmm4rec_submit}
  export MMM4REC_ROOT
  local out id
  out=$(sbatch "${args[@]}" "${opts[@]}" "$script" "${train_args[@]}") ||
    mmm4rec_die "sbatch failed for $kind ($script)"
  id=${out%%;*}
  [[ "$id" =~ ^[0-9]+(_[0-9]+)?$ ]] || mmm4rec_die "sbatch printed '$out', not a job id"
  printf '%s\n' "$id"
}

# ---------------------------------------------------------------- the job
# mmm4rec_run KIND [TRAIN_ARG...]   (KIND: pretrain | finetune)
# The body of the batch job: validate the variables, set up the environment,
# launch dist/train.py on every task, propagate its exit status.
mmm4rec_run() {
  local kind=$1
  shift
  [[ -n "${SLURM_JOB_ID:-}" ]] ||
    mmm4rec_die "not inside a Slurm job (SLURM_JOB_ID unset). Submit with 'sbatch slurm/$kind.sh' or 'bash slurm/$kind.sh' (see --help)"

  local device=${MMM4REC_DEVICE:-gpu} launcher=${LAUNCHER:-srun}
  case "$device" in gpu | cpu) ;; *) mmm4rec_die "MMM4REC_DEVICE must be gpu or cpu, got '$device'" ;; esac
  case "$launcher" in srun | torchrun) ;; *) mmm4rec_die "LAUNCHER must be srun or torchrun, got '$launcher'" ;; esac

  local root=${MMM4REC_ROOT:?}
  local train_py="$root/dist/train.py"
  [[ -f "$train_py" ]] || mmm4rec_die "training entry point not found: $train_py (MMM4REC_ROOT=$root)"

  local py=${MMM4REC_PYTHON:-python}
  if [[ "$py" == */* ]]; then
    # An environment that is not activated: put its bin/ first on PATH, so that
    # its tools are used (ninja for DeepSpeed's JIT-built ops, among others).
    py=$(mmm4rec_abspath "$py")
    PATH="$(dirname -- "$py"):$PATH"
    export PATH
  fi
  command -v "$py" >/dev/null 2>&1 || mmm4rec_die "Python interpreter '$py' not found (set MMM4REC_PYTHON to your environment's python)"

  local config
  config=$(mmm4rec_abspath "${CONFIG:-configs/$kind.yaml}")
  [[ "$config" == *://* || -f "$config" ]] || mmm4rec_die "CONFIG not found: $config"

  local output_dir
  output_dir=$(mmm4rec_abspath "${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-mmm4rec-$kind}-$SLURM_JOB_ID}")
  mkdir -p "$output_dir" || mmm4rec_die "cannot create OUTPUT_DIR $output_dir"

  local -a cmd=("$train_py" --config "$config" --output-dir "$output_dir")

  if [[ "$kind" == finetune ]]; then
    if [[ -n "${PRETRAINED:-}" ]]; then
      local pretrained
      pretrained=$(mmm4rec_abspath "$PRETRAINED")
      if [[ "$pretrained" != *://* ]]; then
        local why   # the export format's own check (mmm4rec/export_format.py)
        why=$(PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -m mmm4rec.export_format detect "$pretrained" 2>&1 >/dev/null) ||
          mmm4rec_die "PRETRAINED=${why:-$pretrained is not an export}; did the pretraining job finish?"
      fi
      cmd+=(--set "train.init_from=$pretrained")
    else
      mmm4rec_log "PRETRAINED is not set: fine-tuning starts from the config's train.init_from (or from scratch)"
    fi
  fi

  local -a extra=()
  if [[ -n "${EXTRA_ARGS:-}" ]]; then
    read -ra extra <<<"$EXTRA_ARGS"
    cmd+=("${extra[@]}")
  fi
  cmd+=("$@")

  case "${RESUME:-auto}" in
    1 | yes | true) cmd+=(--resume) ;;
    0 | no | false) ;;
    auto)
      if [[ -d "$output_dir/checkpoints" ]] && [[ -n "$(ls -A "$output_dir/checkpoints" 2>/dev/null)" ]]; then
        mmm4rec_log "found checkpoints in $output_dir/checkpoints: resuming (RESUME=0 to start over)"
        cmd+=(--resume)
      fi
      ;;
    *) mmm4rec_die "RESUME must be auto, 1 or 0, got '${RESUME}'" ;;
  esac

  # --- environment shared by every task
  MASTER_ADDR=$(mmm4rec_head_node)
  MASTER_PORT=$(mmm4rec_master_port)
  export MASTER_ADDR MASTER_PORT
  export MMM4REC_DEVICE=$device
  # One cache for all jobs (as dist/train.py's default): compiled DeepSpeed ops,
  # bundled sample shards.
  export MMM4REC_CACHE=${MMM4REC_CACHE:-$root/.cache}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$MMM4REC_CACHE/torch_extensions}
  mkdir -p "$TORCH_EXTENSIONS_DIR"
  # Threads per process: an OMP_NUM_THREADS inherited from the submitting shell
  # is replaced (it was set for another machine); MMM4REC_OMP_THREADS sets it.
  if [[ "$device" == cpu ]]; then
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS=${MMM4REC_OMP_THREADS:-1}
    export CUDA_VISIBLE_DEVICES=""
  else
    export OMP_NUM_THREADS=${MMM4REC_OMP_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  fi
  export PYTHONUNBUFFERED=1

  # srun does not inherit --cpus-per-task from sbatch in every Slurm version.
  local -a srun_opts=(--kill-on-bad-exit=1)
  local -a launch
  if [[ "$launcher" == srun ]]; then
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    launch=(srun "${srun_opts[@]}" bash "$root/slurm/common.sh" task-exec "$py" "${cmd[@]}")
  else
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local nproc=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
    if [[ -z "$nproc" ]]; then
      nproc=$((${SLURM_NTASKS:-1} / nnodes))
    fi
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || mmm4rec_die "cannot tell how many processes to start per node (got '$nproc'); set NPROC_PER_NODE"
    srun_opts+=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
    [[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
    launch=(srun "${srun_opts[@]}" "$py" -m torch.distributed.run
      --nnodes="$nnodes" --nproc-per-node="$nproc"
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="mmm4rec-$SLURM_JOB_ID"
      --max-restarts=0 "${cmd[@]}")
  fi

  mmm4rec_log "job $SLURM_JOB_ID ($kind) on ${SLURM_JOB_NUM_NODES:-1} node(s): ${SLURM_JOB_NODELIST:-?}"
  mmm4rec_log "device=$device launcher=$launcher tasks=${SLURM_NTASKS:-?} master=$MASTER_ADDR:$MASTER_PORT"
  mmm4rec_log "config=$config"
  mmm4rec_log "output_dir=$output_dir"
  mmm4rec_log "command: ${launch[*]}"

  local start=$SECONDS rc=0
  "${launch[@]}" || rc=$?
  local took=$((SECONDS - start))
  if ((rc != 0)); then
    mmm4rec_log "training FAILED with exit code $rc after ${took}s (job $SLURM_JOB_ID)"
    exit "$rc"
  fi
  if [[ -f "$output_dir/export/model.safetensors" ]]; then
    mmm4rec_log "training finished in ${took}s; export: $output_dir/export"
  elif [[ "$kind" == pretrain ]]; then
    MMM4REC_DIE_CODE=3 mmm4rec_die "training exited 0 after ${took}s but left no export in $output_dir/export: nothing to transfer"
  else
    mmm4rec_log "training finished in ${took}s, but left no export in $output_dir/export"
  fi
}

# mmm4rec_main KIND SCRIPT_FILE [ARG...]: the entry point of pretrain.sh and
# finetune.sh.
#   --help | -h            print the usage block
#   inside a batch job     run the job (ARGs go to dist/train.py)
#   --run [ARG...]         run the job inside the current allocation (salloc)
#   otherwise              submit SCRIPT_FILE: ARGs are sbatch options,
#                          then optionally -- and dist/train.py arguments
mmm4rec_main() {
  local kind=$1 file=$2
  shift 2
  case "${1:-}" in
    -h | --help)
      mmm4rec_usage "$file"
      return 0
      ;;
    --run)
      shift
      mmm4rec_run "$kind" "$@"
      return
      ;;
  esac
  if [[ -n "${SLURM_JOB_ID:-}" && "${ENVIRONMENT:-}" == BATCH ]]; then
    mmm4rec_run "$kind" "$@"
  else
    local id
    id=$(mmm4rec_submit "$kind" "$file" "$@")
    mmm4rec_log "submitted $kind job $id; log: ${LOG_DIR:-logs/slurm}/<job-name>-$id.out"
    printf '%s\n' "$id"
  fi
}

# Executed (not sourced): per-task entry point used by srun.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  case "${1:-}" in
    task-exec)
      shift
      mmm4rec_task_exec "$@"
      ;;
    *)
      mmm4rec_die "usage: bash slurm/common.sh task-exec CMD... (srun runs this per task; see slurm/README.md)"
      ;;
  esac
fi
