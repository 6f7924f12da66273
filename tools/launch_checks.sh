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
