# Sourced by tools/{dist,slurm}_{train,test}.sh: the input files, checked before anything is
# launched, in tools/train.py's and tools/test.py's words. A missing file was said by every
# process of the launch, under torchrun's 40-line ChildFailedError report (or by each task of a
# queued slurm job).
require_config() {
    if [ -d "$1" ]; then
        echo "error: config $1 is a folder, not a config file; pass a config file in it (docs/configs.md lists them)." >&2
        exit 1
    fi
    if [ ! -f "$1" ]; then
        echo "error: config $1 does not exist; pass the path of a config file, e.g. one under configs/ (docs/configs.md lists them)." >&2
        exit 1
    fi
}

require_checkpoint() {  # a URL is fetched by the tool
    if [[ "$1" != *://* ]] && [ ! -e "$1" ]; then
        echo "error: checkpoint $1 does not exist; pass the .pth file written by training (work_dirs/...) or by tools/fuse.py." >&2
        exit 1
    fi
}

# Run the launch command "$@" and, when it fails, say its processes' `error: ...` sentences once
# more, each once, at the end: a check inside the processes (a class count, a checkpoint of
# another model) printed its one line per process, followed by torchrun's 40-line
# ChildFailedError report (or srun's task summary). The processes' stderr passes through tee
# as it comes (tee -i: a Ctrl-C reaches the launcher, whose shutdown report still comes
# through); stdout is untouched. The exit status is the launcher's, whatever tee meets (a full
# or unwritable TMPDIR: then nothing is restated); without a temporary file it runs as it is.
run_launch() {
    local log status=0
    if ! log=$(mktemp "${TMPDIR:-/tmp}/reparam_mm_launch.XXXXXX" 2>/dev/null); then
        "$@" || status=$?
        return "$status"
    fi
    trap 'rm -f "$log"' EXIT
    ( { "$@" 2>&1 1>&3 3>&- | tee -i "$log" >&2 2>/dev/null; exit "${PIPESTATUS[0]}"; } 3>&1 ) || status=$?
    if [ "$status" -ne 0 ] && grep -q '^error: ' "$log" 2>/dev/null; then
        echo "" >&2
        echo "the run stopped (exit status $status):" >&2
        grep '^error: ' "$log" | awk '!seen[$0]++' >&2
    fi
    rm -f "$log"
    trap - EXIT
    return "$status"
}
