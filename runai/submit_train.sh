#!/usr/bin/env bash
# Submit a prefix training run to Run:ai (CLI v2), idempotently. See docs/cluster.md, "Run:ai".
#
#   runai/submit_train.sh --run-name r42 --project team-a --image REG/prefix:TAG --pvc prefix-runs \
#       --gpus 8 --nodes 2 -- --config configs/demo.yaml trainer.max_steps=5000
#
# One node: `runai training submit`; N nodes: `runai training pytorch submit --workers N-1` (the
# master trains too). The run directory lives on the PVC, so submitting the same --run-name again
# resumes the run. Exit codes: 0 submitted (or already active), 2 a problem you can fix, other: the
# runai CLI's own failure.
set -euo pipefail

readonly RUNS_MOUNT=/home/apluser/runs  # where the PVC is mounted; PREFIX_RUNS_ROOT points here
readonly SHUTDOWN_MARGIN=15             # seconds between torchrun's SIGKILL and Kubernetes' SIGKILL
readonly MIN_GRACE=30
# Run:ai workload statuses meaning "already there, leave it alone" (compared lowercased).
readonly ACTIVE_STATES=" creating pending initializing running degraded resuming updating scheduled queued "

usage() {
    cat <<'EOF'
usage: runai/submit_train.sh --run-name NAME --project PROJECT --image IMAGE --pvc CLAIM
                             [options] [-- PREFIX_TRAIN_ARGS...]

Submit `prefix launch ... -m prefix.train --run-name NAME PREFIX_TRAIN_ARGS...` (torchrun under a
launcher that exits with the workers' code: 2 a user error, 143 stopped after the final checkpoint)
to Run:ai. The PVC CLAIM is mounted at /home/apluser/runs (PREFIX_RUNS_ROOT); submitting the same
NAME again resumes the run.

required:
  --run-name NAME       workload and run name: lowercase letters, digits, '-'; starts with a
                        letter, ends with a letter or digit; at most 63 characters
  --project PROJECT     Run:ai project
  --image IMAGE         container image holding prefix
  --pvc CLAIM           existing PersistentVolumeClaim holding the run directories

options:
  --gpus N              GPUs per node, one rank each (default 1)
  --cpu CORES           CPU cores requested per node (default: the project's)
  --memory SIZE         CPU memory requested per node, e.g. 64G (default: the project's)
  --nodes N             nodes; N > 1 submits a PyTorch workload with N-1 workers (default 1)
  --node-pool POOL      node pool to schedule on; repeat for a priority-ordered list
  --priority CLASS      Run:ai priority class (default train: preemptible)
  --grace SECONDS       termination grace period, at least 30 (default 120); torchrun kills the
                        ranks SECONDS-15 after forwarding SIGTERM, so the final checkpoint must
                        be written within that time
  --env KEY=VALUE       extra environment variable; repeatable
  --backoff-limit N     retries after a failure before the workload is Failed (default 100)
  --replace             if the workload exists and has finished (Succeeded, Failed, ...), delete
                        it and submit again; the run resumes from its directory on the PVC
  --dry-run             print the submit command and call nothing
  -h, --help            this help

environment:
  RUNAI_BIN             the runai executable (default: runai on PATH)
  RUNAI_DELETE_TIMEOUT  seconds --replace waits for a deleted workload to disappear (default 300)
EOF
}

die_usage() {  # a bad command line: one error line, then the usage
    printf 'error: %s\n' "$1" >&2
    usage >&2
    exit 2
}

die() {
    printf 'error: %s\n' "$1" >&2
    exit 2
}

quote_line() {  # print the arguments shell-quoted, as one line
    local line
    printf -v line '%q ' "$@"
    printf '%s\n' "${line% }"
}

run_name="" project="" image="" pvc="" cpu="" memory=""
gpus=1 nodes=1 priority=train grace=120 backoff_limit=100
dry_run=0 replace=0
node_pools=() envs=() train_args=()

while [[ $# -gt 0 ]]; do
    arg=$1
    shift
    if [[ $arg == --*=* ]]; then
        opt=${arg%%=*} value=${arg#*=} inline=1
    else
        opt=$arg value="" inline=0
    fi
    case $opt in
        -h | --help | --dry-run | --replace | --)
            [[ $inline == 0 ]] || die_usage "$opt takes no value"
            ;;
        --run-name | --project | --image | --pvc | --gpus | --cpu | --memory | --nodes | --node-pool | \
            --priority | --grace | --env | --backoff-limit)
            if [[ $inline == 0 ]]; then
                [[ $# -gt 0 ]] || die_usage "$opt needs a value"
                value=$1
                shift
            fi
            ;;
        *) die_usage "unknown option: $arg" ;;
    esac
    case $opt in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --replace) replace=1 ;;
        --) train_args=("$@"); break ;;
        --run-name) run_name=$value ;;
        --project) project=$value ;;
        --image) image=$value ;;
        --pvc) pvc=$value ;;
        --gpus) gpus=$value ;;
        --cpu) cpu=$value ;;
        --memory) memory=$value ;;
        --nodes) nodes=$value ;;
        --node-pool) node_pools+=("$value") ;;
        --priority) priority=$value ;;
        --grace) grace=$value ;;
        --env) envs+=("$value") ;;
        --backoff-limit) backoff_limit=$value ;;
    esac
done

# ---- validation: everything is checked before anything is called ----
[[ -n $run_name ]] || die_usage "--run-name is required"
[[ ${#run_name} -le 63 ]] ||
    die_usage "--run-name: '$run_name' is ${#run_name} characters; at most 63"
[[ $run_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die_usage "--run-name: '$run_name' is not a Kubernetes workload name; use lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
[[ -n $project ]] || die_usage "--project is required"
[[ $project =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die_usage "--project: '$project' is not a valid project name"
[[ -n $image ]] || die_usage "--image is required"
[[ $image =~ ^[^[:space:]]+$ ]] || die_usage "--image: '$image' contains whitespace"
[[ -n $pvc ]] || die_usage "--pvc is required"
[[ ${#pvc} -le 253 && $pvc =~ ^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$ ]] ||
    die_usage "--pvc: '$pvc' is not a PersistentVolumeClaim name"
[[ $gpus =~ ^[1-9][0-9]{0,3}$ ]] || die_usage "--gpus: '$gpus' is not a positive integer"
[[ $nodes =~ ^[1-9][0-9]{0,3}$ ]] || die_usage "--nodes: '$nodes' is not a positive integer"
[[ $grace =~ ^[0-9]{1,6}$ ]] || die_usage "--grace: '$grace' is not a number of seconds"
((10#$grace >= MIN_GRACE)) ||
    die_usage "--grace: $grace seconds is too short; at least $MIN_GRACE (torchrun gets grace - $SHUTDOWN_MARGIN s to let the final checkpoint finish)"
grace=$((10#$grace))
[[ $backoff_limit =~ ^[0-9]{1,6}$ ]] || die_usage "--backoff-limit: '$backoff_limit' is not a non-negative integer"
[[ -z $cpu || $cpu =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--cpu: '$cpu' is not a number of cores"
[[ -z $memory || $memory =~ ^[0-9]+(\.[0-9]+)?([kKMGTPE]i?)?$ ]] ||
    die_usage "--memory: '$memory' is not a size such as 64G"
[[ $priority =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die_usage "--priority: '$priority' is not a priority class name"
for pool in "${node_pools[@]}"; do
    [[ $pool =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die_usage "--node-pool: '$pool' is not a node pool name"
done
for kv in "${envs[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env: '$kv' is not KEY=VALUE"
    [[ ${kv%%=*} != PREFIX_RUNS_ROOT ]] || die_usage "--env: PREFIX_RUNS_ROOT is set by this script (the PVC mount $RUNS_MOUNT)"
done
for a in "${train_args[@]}"; do
    case $a in
        --run-name | --run-name=*) die_usage "give the run name with --run-name before '--', not to prefix.train" ;;
        --runs-root | --runs-root=*) die_usage "the runs root is the PVC mount ($RUNS_MOUNT); do not pass --runs-root" ;;
    esac
done

# ---- the container command: `prefix launch` as PID 1 (bash execs it), so it receives SIGTERM and passes
# it to torchrun at once; it exits with the workers' code, not torchrun's 1 (docs/cluster.md) ----
shutdown_timeout=$((grace - SHUTDOWN_MARGIN))
launch="exec prefix launch --nnodes=$nodes --nproc-per-node=$gpus"
if ((nodes > 1)); then
    # MASTER_ADDR/MASTER_PORT are set by the PyTorchJob operator in every pod; expanded in the pod.
    # shellcheck disable=SC2016
    launch+=' --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}"'
    launch+=" --rdzv-id=$run_name"
else
    launch+=" --standalone"
fi
launch+=" --shutdown-timeout=$shutdown_timeout -m prefix.train --run-name $run_name"
for a in "${train_args[@]}"; do
    launch+=" $(printf '%q' "$a")"
done

runai=${RUNAI_BIN:-runai}
if ((nodes > 1)); then
    kind=(training pytorch)
    submit=("$runai" "${kind[@]}" submit "$run_name" --workers "$((nodes - 1))")
else
    kind=(training)
    submit=("$runai" "${kind[@]}" submit "$run_name")
fi
submit+=(-p "$project" -i "$image" -g "$gpus")
[[ -z $cpu ]] || submit+=(--cpu-core-request "$cpu")
[[ -z $memory ]] || submit+=(--cpu-memory-request "$memory")
submit+=(--existing-pvc "claimname=$pvc,path=$RUNS_MOUNT" -e "PREFIX_RUNS_ROOT=$RUNS_MOUNT")
for kv in "${envs[@]}"; do
    submit+=(-e "$kv")
done
submit+=(--large-shm --termination-grace-period "${grace}s" --backoff-limit "$((10#$backoff_limit))")
for pool in "${node_pools[@]}"; do
    submit+=(--node-pools "$pool")
done
submit+=(--priority "$priority" --command -- bash -c "$launch")

if ((dry_run)); then
    quote_line "${submit[@]}"
    exit 0
fi

# ---- the runai executable ----
if [[ -n ${RUNAI_BIN:-} ]]; then
    [[ -x $RUNAI_BIN && ! -d $RUNAI_BIN ]] || command -v "$RUNAI_BIN" >/dev/null 2>&1 ||
        die "RUNAI_BIN=$RUNAI_BIN is not an executable"
else
    command -v runai >/dev/null 2>&1 ||
        die "the runai CLI is not on PATH; install it (Run:ai CLI v2) or set RUNAI_BIN"
fi

describe() {  # prints the workload's description; non-zero when it does not exist
    "$runai" "${kind[@]}" describe "$run_name" -p "$project" 2>&1
}

status_of() {  # the workload status from describe's output, lowercased; empty if none is found
    local line word
    while IFS= read -r line; do
        if [[ ${line,,} =~ (^|[^a-z])status([^a-z]|$) ]]; then
            for word in ${line//[^A-Za-z]/ }; do
                word=${word,,}
                [[ $word == status ]] && continue
                printf '%s\n' "$word"
                return
            done
        fi
    done <<<"$1"
    # Fall back to an answer that is nothing but the status (one word).
    if [[ $1 =~ ^[[:space:]]*([A-Za-z]+)[[:space:]]*$ ]]; then
        printf '%s\n' "${BASH_REMATCH[1],,}"
    fi
}

# ---- idempotent resubmission ----
workload="${kind[*]} workload '$run_name' in project '$project'"
if description=$(describe); then
    status=$(status_of "$description")
    [[ -n $status ]] || die "$workload exists but its status could not be read from 'runai ${kind[*]} describe'; check it and delete it yourself if it should be resubmitted"
    if [[ $ACTIVE_STATES == *" $status "* ]]; then
        echo "$workload is already active (status ${status^}); not submitting"
        exit 0
    fi
    ((replace)) || die "$workload already exists with status ${status^}; pass --replace to delete it and submit again (the run resumes from its directory on the PVC)"
    echo "$workload has status ${status^}; deleting it (--replace)"
    "$runai" "${kind[@]}" delete "$run_name" -p "$project"
    deadline=$((SECONDS + ${RUNAI_DELETE_TIMEOUT:-300}))
    while describe >/dev/null; do
        ((SECONDS < deadline)) || die "$workload still exists ${RUNAI_DELETE_TIMEOUT:-300} s after deleting it; try again later"
        sleep 5
    done
fi

echo "submitting $workload"
exec "${submit[@]}"
