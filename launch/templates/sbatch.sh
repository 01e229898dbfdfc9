#!/bin/bash
# {{HEADER}}
#SBATCH --job-name={{JOB_NAME}}
#SBATCH --nodes={{NODES}}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={{CPUS_PER_TASK}}
{{RESOURCE_LINES}}#SBATCH --output={{SLURM_LOG}}
#SBATCH --open-mode=append
#SBATCH --chdir={{WORKDIR}}
#SBATCH --requeue
# SIGUSR1 reaches this script (B:) {{SIGNAL_SECONDS}} s before the time limit; the trap below passes it to
# the training step, whose workers save a checkpoint and stop; then the job requeues itself.
#SBATCH --signal=B:USR1@{{SIGNAL_SECONDS}}

set -uo pipefail
PYTHON={{PYTHON}}
PREEMPTED_EXIT_CODE={{PREEMPTED_EXIT_CODE}}
MAX_REQUEUES={{MAX_REQUEUES}}
log() { echo "pkm-launch: $(date '+%F %T') $*"; }

# The c10d store lives on the first node of the allocation, where this script runs, at the address
# SLURM reaches that node at. If that is loopback (a hosts-file alias of the node's own name) while
# other nodes are elsewhere, use this host's outward address; loopback is kept only when every node
# is on this machine (a test cluster). PKM_RDZV_ADDR, when set at submission, wins.
node_addr() {
  local a r
  a=$(scontrol show node "$1" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  a=${a:-$1}
  r=$(getent ahostsv4 "$a" 2>/dev/null | awk 'NR == 1 { print $1 }')
  echo "${r:-$a}"
}
mapfile -t job_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${job_nodes[0]}
rdzv_addr=${PKM_RDZV_ADDR:-$(node_addr "$head_node")}
case $rdzv_addr in
  127.*)
    for n in "${job_nodes[@]:1}"; do
      case $(node_addr "$n") in
        127.*) ;;
        *) outward=$(hostname -I 2>/dev/null | awk '{ print $1 }')
           if [ -z "$outward" ]; then
             log "error: $head_node is at $rdzv_addr (loopback) and this host has no outward address; set PKM_RDZV_ADDR"
             exit 1
           fi
           rdzv_addr=$outward
           break ;;
      esac
    done ;;
esac
rdzv_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
log "job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} times) on $SLURM_JOB_NODELIST; rendezvous at $rdzv_addr:$rdzv_port on $head_node"

preempted=0
on_signal() {
  preempted=1
  log "got SIG$1: asking the training step to save a checkpoint and stop"
  [ -n "${step_pid:-}" ] && kill -s "$1" "$step_pid" 2>/dev/null  # srun passes it to every task
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# One torchrun per node; the agent on node 0 hosts the rendezvous store.
{{TORCHRUN_ENV}}
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  log() { echo "pkm-launch: $(date "+%F %T") $*"; }
  is_host=0; [ "$SLURM_NODEID" = 0 ] && is_host=1
  log "node $SLURMD_NODENAME is node rank $SLURM_NODEID of $SLURM_JOB_NUM_NODES: starting torchrun"
  python=$1; shift
  exec "$python" -m torch.distributed.run --rdzv-conf=is_host=$is_host "$@"' pkm-node \
  "$PYTHON" {{TORCHRUN_ARGS}} &
step_pid=$!
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"; rc=$?

if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ] || { [ "$preempted" = 1 ] && [ "$rc" -ne 0 ]; }; then
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    log "stopped (exit $rc) after $MAX_REQUEUES requeues: not requeueing again"
    exit "$rc"
  fi
  log "training stopped to be resumed (exit $rc): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  log "error: scontrol requeue $SLURM_JOB_ID failed"
fi
log "training step finished with exit code $rc"
exit "$rc"
