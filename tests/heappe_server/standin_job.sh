#!/bin/bash
# Stand-in for cluster/worker_job.sh behind the HEAppE test server: same contract
# (configured only by environment, TERM ends it) but it records what it saw.
#   STANDIN_MARKER_DIR  where to write <allocation>.env / .term (required)
#   STANDIN_RUN_S       exit by itself after this many seconds (default: run until killed)
#   STANDIN_EXIT_CODE   exit code when it ends by itself (default 0)
set -u
umask 077
dir=${STANDIN_MARKER_DIR:?}
id=${HPCSERVE_ALLOCATION_ID:?}
{ env | grep -E '^(HPCSERVE_|RAY_AUTH_TOKEN=|STANDIN_)' | sort; echo "PID=$$"; } >"$dir/$id.env.tmp"
mv "$dir/$id.env.tmp" "$dir/$id.env"
sleep "${STANDIN_RUN_S:-3600}" &
child=$!
on_term() { date +%s >>"$dir/$id.term"; kill "$child" 2>/dev/null; exit 0; }
trap on_term TERM
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
exit "${STANDIN_EXIT_CODE:-0}"
