#!/usr/bin/env bash
# Run duet's fuzz targets in turn, one at a time, at the lowest priority.
#
#   scripts/fuzz.sh [SECONDS_PER_SLICE] [ROUNDS] [TARGET...]
#
# Each round gives every target one slice of SECONDS_PER_SLICE (wall clock;
# default 600) over its corpus in fuzz/corpus/<target>. Crashes land in
# fuzz/artifacts/<target>/. One line per slice is appended to fuzz/runs.log:
#   date target wall_s cpu_s execs new_corpus_files crashes
# The fuzzers must be built first: (cd fuzz && cargo fuzz build -s none -O -a).
# While a slice runs, its PID is in fuzz/current.pid (to pause it with
# kill -STOP / -CONT around a build on a small machine: the per-input
# timeout is 300 s so that a pause does not read as a hang); while
# fuzz/pause exists no new slice starts. cpu_s (user + system CPU seconds)
# is the fuzzing time that counts.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
slice=${1:-600}
rounds=${2:-1}
shift 2 2>/dev/null || shift $#
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(loader_bzimage loader_elf_pvh loader_multiboot cpu_exec device_registers virtio_devices e1000 replay_log)
fi
bin=target/x86_64-unknown-linux-gnu/release
for ((r = 0; r < rounds; r++)); do
    for t in "${targets[@]}"; do
        # A build in progress (see fuzz/pause) has the machine: wait.
        while [ -e pause ]; do sleep 5; done
        mkdir -p "corpus/$t" "artifacts/$t"
        before=$(ls "corpus/$t" | wc -l)
        crashes_before=$(ls "artifacts/$t" | wc -l)
        log=$(mktemp)
        /usr/bin/time -f "%e %U %S" -o "$log.time" \
            nice -n 19 "$bin/$t" "corpus/$t" -max_total_time="$slice" -timeout=300 -report_slow_units=60 \
            -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
            >"$log" 2>&1 &
        pid=$!
        # /usr/bin/time's child is the fuzzer.
        sleep 1
        pgrep -P "$pid" >current.pid || echo "$pid" >current.pid
        wait "$pid"
        rm -f current.pid
        read -r wall user sys < <(tail -1 "$log.time")
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
        after=$(ls "corpus/$t" | wc -l)
        crashes=$(( $(ls "artifacts/$t" | wc -l) - crashes_before ))
        cpu=$(echo "$user + $sys" | bc)
        echo "$(date -u +%FT%TZ) $t $wall $cpu ${execs:-0} $((after - before)) $crashes" >>runs.log
        if [ "$crashes" -gt 0 ]; then
            tail -40 "$log" >"artifacts/$t/last-crash.log"
        fi
        rm -f "$log" "$log.time"
    done
done
