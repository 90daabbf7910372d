#!/usr/bin/env bash
# Get a login node ready to run the workflow, as the ordinary user who runs it (no root, no Docker):
#
#   bash setup.sh login [remote|slurm|local]     (default: remote)
#
# Makes the Python environment (.venv, setup/python.sh), then checks only what this node needs
# for that profile: Python with venv, git, apptainer or singularity, Slurm's client commands
# where the profile uses Slurm, for slurm what a rootless Podman build needs (builder: podman),
# and for remote an SSH key and a filled-in
# profiles/remote/builder.yaml whose host key is in known_hosts (or, for a build service,
# `kind: http`, its url and your token in the environment). One line per missing thing;
# the exit status is 1 if anything is missing. Nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# say, missing (counts into MISSING) and apptainer_found of the machine set-up
# shellcheck source=system.sh
source setup/system.sh

profile=${1:-remote}
case "$profile" in
    remote | slurm | local) ;;
    *)
        printf 'usage: bash setup.sh login [remote|slurm|local]\n' >&2
        exit 2
        ;;
esac
if [ "$(id -u)" = 0 ]; then
    printf 'setup.sh login: run this as the account that runs the workflow, not as root (e.g. runuser -u USER -- bash setup.sh login %s)\n' "$profile" >&2
    exit 1
fi

MISSING=0
me=$(id -un)

if ! command -v python3 >/dev/null 2>&1; then
    missing "python3: not on the PATH (ask for Debian's python3 and python3-venv)"
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing "python3 venv: $(command -v python3) cannot make virtual environments (ask for python3-venv)"
elif ! bash setup/python.sh; then
    missing "python environment: setup/python.sh could not make .venv (see above)"
fi

if command -v git >/dev/null 2>&1; then
    say "ok: git ($(git --version | awk '{print $3}'))"
else
    missing "git: not on the PATH (ask for Debian's git)"
fi

if found=$(apptainer_found); then
    say "ok: $found"
else
    missing "apptainer or singularity: neither answers \`version\` on the PATH (on a cluster: \`module load apptainer\`, or ask for it)"
fi

if [ "$profile" != local ]; then
    for tool in sbatch squeue scancel sinfo; do
        command -v "$tool" >/dev/null 2>&1 || missing "Slurm: $tool is not on the PATH (profile $profile submits jobs; on a cluster: \`module load slurm\`)"
    done
    if command -v sinfo >/dev/null 2>&1; then
        if partitions=$(timeout 30 sinfo --noheader --format=%P 2>&1); then
            say "ok: Slurm answers (partitions: $(printf '%s' "$partitions" | paste -sd ' '))"
        else
            missing "Slurm: \`sinfo\` gets no answer from the controller: $(printf '%s' "$partitions" | tail -n 1)"
        fi
    fi
fi

# on a cluster, the build itself can run here or in a job without Docker (`builder: podman`):
# what rootless Podman needs, one line each, as the builder checks it (docs/podman.md)
if [ "$profile" = slurm ]; then
    if [ ! -x .venv/bin/python ]; then
        missing "rootless podman: not checked (no python environment)"
    else
        while IFS= read -r line; do
            case "$line" in
                "MISSING: "*) missing "rootless podman (builder: podman): ${line#MISSING: }" ;;
                *) say "$line" ;;
            esac
        done < <(PYTHONPATH=workflow/scripts .venv/bin/python -W ignore::RuntimeWarning:runpy -m repo2singularity.builders.podman --check 2>&1 || true)
    fi
fi

# builder.yaml, read as the workflow reads it (validated, the schema's defaults filled in), and
# what the remote profile needs of this account (repo2singularity/login_check.py)
if [ "$profile" = remote ]; then
    if [ ! -x .venv/bin/python ]; then
        missing "profiles/remote/builder.yaml: not checked (no python environment)"
    else
        while IFS= read -r line; do
            case "$line" in
                "MISSING: "*) missing "${line#MISSING: }" ;;
                *) say "$line" ;;
            esac
        done < <(.venv/bin/python -m repo2singularity.login_check profiles/remote/builder.yaml 2>&1 || echo "MISSING: profiles/remote/builder.yaml: the check itself failed (above)")
    fi
fi

if [ "$MISSING" -gt 0 ]; then
    say "login: $MISSING thing(s) missing for --profile $profile (user $me); fix them and run this again"
    exit 1
fi
say "login: ready for --profile $profile (user $me)"
if [ "$profile" = remote ]; then
    say "  next: source .venv/bin/activate && snakemake --profile remote check_builder"
fi
say "  then: snakemake --profile $profile --config repo=URL ref=BRANCH"
