#!/usr/bin/env bash
# hpcserve worker job: join the Ray head, host Serve engine replicas, and leave
# cleanly before the scheduler kills the allocation.
#
# Usable unchanged as a SLURM batch script (sbatch --signal=B:USR1@WARN ...) and
# as a HEAppE command template (parameters as KEY=VALUE arguments).  Configured
# through the environment, or KEY=VALUE arguments which are exported first:
#   HPCSERVE_HEAD_ADDRESS    host:port of the head's Ray GCS            (required)
#   HPCSERVE_ALLOCATION_ID   id the pool gave this allocation           (required)
#   HPCSERVE_POOL            pool name                                  (default: default)
#   HPCSERVE_WALLTIME_END    epoch seconds; default SLURM_JOB_END_TIME,
#                            else now + HPCSERVE_WALLTIME_S
#   HPCSERVE_RESOURCES       JSON Ray resources of the node             (default {"hpc_slot": 1})
#   HPCSERVE_NUM_CPUS / HPCSERVE_NUM_GPUS                               (default 1 / 0)
#   HPCSERVE_NODE_IP         address this node advertises               (default: first of hostname -I;
#                            auto-loopback: a 127.x address of its own, for jobs sharing one machine)
#   HPCSERVE_PYTHON          python of the hpcserve install             (default: python3)
#   HPCSERVE_WARNING_S       drain this long before the end even if no signal comes
#                            (HEAppE templates cannot ask for --signal)  (default 0: off)
#   HPCSERVE_START_ATTEMPTS  tries of `ray start` that fail while joining          (default 2)
#   HPCSERVE_ENV_FILE        KEY=VALUE file (0600) sourced first: RAY_AUTH_TOKEN and the
#                            cluster's Ray settings travel there, never on a command line
#
# Signals: USR1 (the scheduler's early warning) or TERM sent to this shell drain
# the node: `ray start --block` is sent TERM alone, which makes Ray drain the node
# (Serve moves replicas away) before the raylet exits.  A TERM to the whole process
# group would kill the raylet at once -- hence the early warning.
set -u
for arg in "$@"; do
  case "$arg" in *=*) export "${arg?}" ;; esac
done
if [ -n "${HPCSERVE_ENV_FILE:-}" ]; then
  set -a; . "$HPCSERVE_ENV_FILE"; set +a
fi
: "${HPCSERVE_HEAD_ADDRESS:?HPCSERVE_HEAD_ADDRESS is required}"
: "${HPCSERVE_ALLOCATION_ID:?HPCSERVE_ALLOCATION_ID is required}"
PY=${HPCSERVE_PYTHON:-python3}
RAY=$(dirname "$PY")/ray
[ -x "$RAY" ] || RAY=ray
POOL=${HPCSERVE_POOL:-default}
if [ -z "${HPCSERVE_WALLTIME_END:-}" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  # SLURM 22.05 exports no end time; ask the scheduler (epoch seconds).
  HPCSERVE_WALLTIME_END=$(SLURM_TIME_FORMAT=%s squeue --noheader --jobs="$SLURM_JOB_ID" --format=%e 2>/dev/null)
  case "$HPCSERVE_WALLTIME_END" in ''|*[!0-9]*) HPCSERVE_WALLTIME_END="" ;; esac
fi
END=${HPCSERVE_WALLTIME_END:-$(( $(date +%s) + ${HPCSERVE_WALLTIME_S:-3600} ))}
IP=${HPCSERVE_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
if [ "$IP" = auto-loopback ]; then
  n=$(( ${SLURM_JOB_ID:-$$} ))
  IP="127.1.$(( n / 250 % 250 )).$(( n % 250 + 2 ))"
fi
IP=${IP:-127.0.0.1}
DEFAULT_RESOURCES='{"hpc_slot": 1}'
RESOURCES=${HPCSERVE_RESOURCES:-$DEFAULT_RESOURCES}

ray_pid=""
drained=0
drain() {
  drained=1
  echo "hpcserve[$HPCSERVE_ALLOCATION_ID]: $1 received at $(date +%s): draining" >&2
  trap '' USR1 TERM
  [ -n "$ray_pid" ] && kill -TERM "$ray_pid" 2>/dev/null
}
trap 'drain USR1' USR1
trap 'drain TERM' TERM

if [ "${HPCSERVE_WARNING_S:-0}" -gt 0 ]; then
  # Our own early warning, for schedulers that send none: USR1 to this shell.
  ( sleep $(( END - ${HPCSERVE_WARNING_S} - $(date +%s) > 0 ? END - ${HPCSERVE_WARNING_S} - $(date +%s) : 0 )) \
    && kill -USR1 $$ ) &
  timer_pid=$!
fi

# Ray gives a joining node a fixed 30 s to register; on an overloaded node that can
# pass.  A start that fails early (not drained, within START_WINDOW_S) is retried.
attempts=${HPCSERVE_START_ATTEMPTS:-2}
rc=0
for attempt in $(seq 1 "$attempts"); do
  eval "$("$PY" -m cluster.node_ports "$IP")" || { echo "hpcserve: cannot pick ports" >&2; exit 1; }
  echo "hpcserve[$HPCSERVE_ALLOCATION_ID]: joining $HPCSERVE_HEAD_ADDRESS as $IP (attempt $attempt), wall-time end $END" >&2
  started=$(date +%s)
  # No log monitor here: it only streams logs to Ray drivers (hpcserve has none; logs
  # stay in the node's files) and polls every 0.1 s on the engine's own cores.
  # shellcheck disable=SC2086
  "$RAY" start --address="$HPCSERVE_HEAD_ADDRESS" --block $NODE_ARGS \
    --num-cpus="${HPCSERVE_NUM_CPUS:-1}" --num-gpus="${HPCSERVE_NUM_GPUS:-0}" \
    --resources="$RESOURCES" \
    --labels="hpcserve-allocation=$HPCSERVE_ALLOCATION_ID,hpcserve-pool=$POOL,hpcserve-walltime-end=$END" \
    --include-log-monitor=False --disable-usage-stats &
  ray_pid=$!
  # `wait` returns early when a trapped signal arrives; keep waiting for Ray to finish draining.
  while kill -0 "$ray_pid" 2>/dev/null; do
    wait "$ray_pid"
    rc=$?
  done
  [ "$drained" = 1 ] || [ "$rc" = 0 ] && break
  [ $(( $(date +%s) - started )) -lt "${HPCSERVE_START_WINDOW_S:-90}" ] || break
  echo "hpcserve[$HPCSERVE_ALLOCATION_ID]: ray failed to start ($rc); retrying" >&2
  sleep 2
done
[ -n "${timer_pid:-}" ] && kill "$timer_pid" 2>/dev/null
echo "hpcserve[$HPCSERVE_ALLOCATION_ID]: ray exited ($rc)" >&2
# A drained node ends the job cleanly; Ray failing on its own is the job failing.
[ "$drained" = 1 ] && exit 0
exit "$rc"
