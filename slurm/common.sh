#!/usr/bin/env bash
# slurm/common.sh: the shared part of slurm/{pretrain,finetune,transfer}.sh (sourced; it
# only defines functions): what only the shell can do -- submitting, the rendezvous host
# and port, the variables a process must find before Python starts, srun/torchrun. Each
# srun task runs dist/train.py, which reads its rank from SLURM_PROCID, ... (dist/env.py:
# slurm_task_env). The repository is found at run time (MMM4REC_ROOT), Python is
# ${MMM4REC_PYTHON:-python}: nothing here hard-codes a site.

mmm4rec_log() { printf '[mmm4rec-slurm] %s\n' "$*" >&2; }
mmm4rec_die() {
  printf '[mmm4rec-slurm] ERROR: %s\n' "$*" >&2
  exit "${MMM4REC_DIE_CODE:-1}"
}

# A script's usage block: its leading comments (not the #SBATCH and shellcheck lines),
# then the #SBATCH defaults as the scheduler will read them.
mmm4rec_usage() {
  sed -n '2,/^[^#]/{/^#SBATCH/d;/^# shellcheck/d;/^[^#]/d;s/^# \{0,1\}//;p}' "$1"
  grep -q '^#SBATCH' "$1" || return 0
  printf '\n#SBATCH defaults in %s:\n' "$(basename "$1")"
  grep -E '^#SBATCH' "$1" | sed 's/^/  /'
}

# Absolute form of a local path; URLs (anything with ://) unchanged.
mmm4rec_abspath() {
  case "$1" in *://* | /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "${1#./}" ;; esac
}

# The rendezvous host: the first node of the allocation, never a silent localhost.
# MMM4REC_MASTER_ADDR overrides it (e.g. a node's InfiniBand name).
mmm4rec_head_node() {
  [[ -n "${MMM4REC_MASTER_ADDR:-}" ]] && { printf '%s\n' "$MMM4REC_MASTER_ADDR"; return 0; }
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] ||
    mmm4rec_die "SLURM_JOB_NODELIST is not set: not inside a Slurm allocation, cannot find the head node (set MMM4REC_MASTER_ADDR to force one)"
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1 || true)
  [[ -n "$head" ]] ||
    mmm4rec_die "'scontrol show hostnames \"$SLURM_JOB_NODELIST\"' gave no host name: cannot find the head node (is scontrol on PATH on the compute nodes? set MMM4REC_MASTER_ADDR to force one)"
  printf '%s\n' "$head"
}

# A rendezvous port derived from the job id (jobs sharing a node do not collide), in
# 10000-29999: below Linux's ephemeral range (32768+). MMM4REC_MASTER_PORT overrides it.
mmm4rec_master_port() {
  [[ -n "${MMM4REC_MASTER_PORT:-}" ]] && { printf '%s\n' "$MMM4REC_MASTER_PORT"; return 0; }
  [[ "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]] ||
    mmm4rec_die "SLURM_JOB_ID is not set (or not a number): cannot derive MASTER_PORT (set MMM4REC_MASTER_PORT)"
  printf '%s\n' "$((10000 + SLURM_JOB_ID % 20000))"
}

# mmm4rec_submit KIND SCRIPT [SBATCH_OPTION...] [-- TRAIN_ARG...]: sbatch SCRIPT and print
# the job id. NODES, TASKS_PER_NODE and CPUS_PER_TASK become sbatch options (sbatch has no
# variables for them; time, partition, account, job name, GPUs: its own SBATCH_* variables);
# options given here come last and win.
mmm4rec_submit() {
  local kind=$1 script=$2
  shift 2
  local -a opts=() train_args=()
  while [[ $# -gt 0 ]]; do
    [[ "$1" == "--" ]] && { shift; train_args=("$@"); break; }
    opts+=("$1")
    shift
  done
  command -v sbatch >/dev/null 2>&1 || mmm4rec_die "sbatch not found on PATH: run this on a Slurm login node"
  local log_dir=${LOG_DIR:-logs/slurm}
  mkdir -p "$log_dir" || mmm4rec_die "cannot create LOG_DIR '$log_dir'"
  local -a args=(--parsable --output="$log_dir/%x-%j.out")
  [[ -n "${NODES:-}" ]] && args+=(--nodes="$NODES")
  [[ -n "${TASKS_PER_NODE:-}" ]] && args+=(--ntasks-per-node="$TASKS_PER_NODE")
  [[ -n "${CPUS_PER_TASK:-}" ]] && args+=(--cpus-per-task="$CPUS_PER_TASK")
  [[ "${MMM4REC_DEVICE:-gpu}" == cpu ]] && args+=(--gpus-per-node=0)
  # The job runs a spooled copy of the script: tell it where the repository is.
  export MMM4REC_ROOT=${MMM4REC_ROOT:?MMM4REC_ROOT must be set before mmm4rec_submit}
  local out id
  out=$(sbatch "${args[@]}" "${opts[@]}" "$script" "${train_args[@]}") || mmm4rec_die "sbatch failed for $kind ($script)"
  id=${out%%;*}
  [[ "$id" =~ ^[0-9]+(_[0-9]+)?$ ]] || mmm4rec_die "sbatch printed '$out', not a job id"
  printf '%s\n' "$id"
}

# mmm4rec_run KIND [TRAIN_ARG...] (KIND: pretrain | finetune): the body of the batch job:
# check the variables, set the launch environment, run dist/train.py on every task, pass
# its exit status on.
mmm4rec_run() {
  local kind=$1
  shift
  [[ -n "${SLURM_JOB_ID:-}" ]] ||
    mmm4rec_die "not inside a Slurm job (SLURM_JOB_ID unset). Submit with 'sbatch slurm/$kind.sh' or 'bash slurm/$kind.sh' (see --help)"
  local device=${MMM4REC_DEVICE:-gpu} launcher=${LAUNCHER:-srun}
  case "$device" in gpu | cpu) ;; *) mmm4rec_die "MMM4REC_DEVICE must be gpu or cpu, got '$device'" ;; esac
  case "$launcher" in srun | torchrun) ;; *) mmm4rec_die "LAUNCHER must be srun or torchrun, got '$launcher'" ;; esac
  local root=${MMM4REC_ROOT:?} train_py="${MMM4REC_ROOT:?}/dist/train.py"
  [[ -f "$train_py" ]] || mmm4rec_die "training entry point not found: $train_py (MMM4REC_ROOT=$root)"
  local py=${MMM4REC_PYTHON:-python}
  if [[ "$py" == */* ]]; then
    # An environment that is not activated: its bin/ first on PATH, so that its tools are
    # used (ninja for DeepSpeed's JIT-built ops, among others).
    py=$(mmm4rec_abspath "$py")
    PATH="$(dirname -- "$py"):$PATH"
    export PATH
  fi
  command -v "$py" >/dev/null 2>&1 || mmm4rec_die "Python interpreter '$py' not found (set MMM4REC_PYTHON to your environment's python)"
  local config output_dir
  config=$(mmm4rec_abspath "${CONFIG:-configs/$kind.yaml}")
  [[ "$config" == *://* || -f "$config" ]] || mmm4rec_die "CONFIG not found: $config"
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
  [[ -n "${EXTRA_ARGS:-}" ]] && read -ra extra <<<"$EXTRA_ARGS"
  cmd+=("${extra[@]}" "$@")
  # --resume continues from the latest checkpoint, or starts fresh when there is none (dist/train.py)
  case "${RESUME:-auto}" in
    auto | 1 | yes | true) cmd+=(--resume) ;;
    0 | no | false) ;;
    *) mmm4rec_die "RESUME must be auto, 1 or 0, got '${RESUME}'" ;;
  esac

  # --- what every process must find before Python starts (the rest: dist/env.py)
  MASTER_ADDR=$(mmm4rec_head_node)
  MASTER_PORT=$(mmm4rec_master_port)
  export MASTER_ADDR MASTER_PORT MMM4REC_DEVICE=$device PYTHONUNBUFFERED=1
  # Threads per process: an OMP_NUM_THREADS inherited from the submitting shell is replaced.
  if [[ "$device" == cpu ]]; then
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${MMM4REC_OMP_THREADS:-1}
  else
    export OMP_NUM_THREADS=${MMM4REC_OMP_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  fi
  # srun does not inherit --cpus-per-task from sbatch in every Slurm version.
  local -a srun_opts=(--kill-on-bad-exit=1) launch
  if [[ "$launcher" == srun ]]; then
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    export MMM4REC_SLURM_TASK=1   # dist/train.py reads its rank from SLURM_PROCID, ...
    launch=(srun "${srun_opts[@]}" "$py" "${cmd[@]}")
  else
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local nproc=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
    [[ -n "$nproc" ]] || nproc=$((${SLURM_NTASKS:-1} / nnodes))
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || mmm4rec_die "cannot tell how many processes to start per node (got '$nproc'); set NPROC_PER_NODE"
    srun_opts+=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
    [[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
    launch=(srun "${srun_opts[@]}" "$py" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc"
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="mmm4rec-$SLURM_JOB_ID"
      --max-restarts=0 "${cmd[@]}")
  fi
  mmm4rec_log "job $SLURM_JOB_ID ($kind) on ${SLURM_JOB_NUM_NODES:-1} node(s): ${SLURM_JOB_NODELIST:-?}"
  mmm4rec_log "device=$device launcher=$launcher tasks=${SLURM_NTASKS:-?} master=$MASTER_ADDR:$MASTER_PORT"
  mmm4rec_log "config=$config output_dir=$output_dir; command: ${launch[*]}"

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

# mmm4rec_main KIND SCRIPT_FILE [ARG...]: the entry point of pretrain.sh and finetune.sh:
# --help; inside a batch job (or --run in an allocation): run the job, ARGs to dist/train.py;
# otherwise submit SCRIPT_FILE, ARGs being sbatch options [-- dist/train.py arguments].
mmm4rec_main() {
  local kind=$1 file=$2
  shift 2
  case "${1:-}" in
    -h | --help) mmm4rec_usage "$file"; return 0 ;;
    --run) shift; mmm4rec_run "$kind" "$@"; return ;;
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
