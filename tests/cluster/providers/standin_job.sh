#!/bin/bash
# Stand-in for cluster/worker_job.sh in provider tests: same contract (configured
# by environment, early warning = USR1 to the batch shell, TERM at wall-time),
# but it only records what it saw so tests can assert real SLURM behaviour.
#   STANDIN_MARKER_DIR   where to write <jobid>.env / .usr1 / .term (required)
#   STANDIN_EXIT_ON_USR1 1: exit 0 on the warning (like a drained worker)
set -u
umask 077
dir=${STANDIN_MARKER_DIR:?}
id=${SLURM_JOB_ID:?}
# Traps first: squeue says RUNNING before this script runs, and a USR1 that lands
# before the trap kills the shell (SLURM then reports JobLaunchFailure). The .env
# marker below tells tests the traps are in place.
child=""
on_usr1() {
    date +%s >>"$dir/$id.usr1"
    if [[ ${STANDIN_EXIT_ON_USR1:-0} == 1 ]]; then kill "$child" 2>/dev/null; exit 0; fi
}
on_term() { date +%s >>"$dir/$id.term"; kill "$child" 2>/dev/null; exit 0; }
trap on_usr1 USR1
trap on_term TERM
# What a worker job would compute: SLURM 22.05 sets no SLURM_JOB_END_TIME, so
# ask the scheduler for this job's wall-time end (epoch via SLURM_TIME_FORMAT).
end=$(SLURM_TIME_FORMAT=%s squeue --noheader --jobs="$id" --format=%e 2>/dev/null)
{ env | grep -E '^(HPCSERVE_|STANDIN_|SECRET_)' | sort; echo "WALLTIME_END=$end"; } >"$dir/$id.env.tmp"
mv "$dir/$id.env.tmp" "$dir/$id.env"

sleep 3600 &
child=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting for the child.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
