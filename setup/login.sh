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

# builder.yaml's settings, one "key<TAB>value" line each, read with the environment's YAML reader
builder_settings() {
    .venv/bin/python - "$1" <<'EOF'
import sys, yaml
builder = (yaml.safe_load(open(sys.argv[1])) or {}).get("builder")
if isinstance(builder, dict):
    for key in ("kind", "url", "token_env", "ca_file", "host", "port", "user", "key_file", "known_hosts"):
        value = builder.get(key)
        print(f"{key}\t{'' if value is None else value}")
EOF
}

setting() { printf '%s\n' "$settings" | awk -F '\t' -v k="$1" '$1 == k { print $2 }'; }
expand() { case "$1" in "~") printf '%s' "$HOME" ;; "~/"*) printf '%s/%s' "$HOME" "${1#\~/}" ;; *) printf '%s' "$1" ;; esac; }

if [ "$profile" = remote ]; then
    file=profiles/remote/builder.yaml
    if [ ! -x .venv/bin/python ]; then
        missing "$file: not checked (no python environment)"
    elif ! settings=$(builder_settings "$file" 2>&1); then
        missing "$file: not valid YAML: $(printf '%s' "$settings" | tail -n 1)"
    elif [ -z "$settings" ]; then
        missing "$file: no builder: mapping"
    elif [ "$(setting kind)" = http ]; then
        # a build service (docs/http-builder.md): no SSH, a token in the environment
        url=$(setting url)
        token_env=$(setting token_env)
        token_env=${token_env:-R2S_SERVICE_TOKEN}
        ca_file=$(expand "$(setting ca_file)")
        if [ -z "$url" ]; then
            missing "$file: fill in url (the build service, e.g. https://builder.example:8443) under builder:"
        else
            say "ok: build service $url ($file)"
        fi
        if ! [[ $token_env =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
            missing "$file: token_env is not a variable name: $token_env"
        elif [ -n "${!token_env:-}" ]; then
            say "ok: your token for the build service is in \$$token_env"
        else
            missing "your token for the build service: export $token_env=... (its administrator gives it to you)"
        fi
        if [ -n "$ca_file" ] && [ ! -r "$ca_file" ]; then
            missing "$file: ca_file $ca_file is not readable"
        fi
    else
        host=$(setting host)
        port=$(setting port)
        port=${port:-22}
        user=$(setting user)
        user=${user:-$me}
        key_file=$(expand "$(setting key_file)")
        known_hosts=$(expand "$(setting known_hosts)")
        known_hosts=${known_hosts:-$HOME/.ssh/known_hosts}
        if [ -z "$host" ] || [ "$host" = builder.example.org ]; then
            missing "$file: fill in host (and port, user): the lines \`bash setup.sh builder ACCOUNT\` printed on the builder"
        else
            say "ok: builder $user@$host:$port ($file)"
            if [ "$port" = 22 ]; then entry=$host; else entry="[$host]:$port"; fi
            if [ -r "$known_hosts" ] && ssh-keygen -F "$entry" -f "$known_hosts" >/dev/null 2>&1; then
                say "ok: the builder's host key is in $known_hosts"
            else
                missing "the builder's host key: $entry is not in $known_hosts (append the line \`bash setup.sh builder\` printed, or run \`ssh -p $port $user@$host true\` once and compare the fingerprint it printed)"
            fi
        fi
        if [ -n "$key_file" ]; then
            if [ -r "$key_file" ]; then
                say "ok: SSH key $key_file"
            else
                missing "an SSH key: $key_file (key_file in $file) does not exist: run \`ssh-keygen -t ed25519 -f $key_file\` and have $key_file.pub authorized on the builder (bash setup.sh builder ACCOUNT --authorize FILE)"
            fi
        elif [ -n "${SSH_AUTH_SOCK:-}" ] && ssh-add -l >/dev/null 2>&1; then
            say "ok: SSH keys in the agent"
        elif compgen -G "$HOME/.ssh/id_*" >/dev/null; then
            say "ok: SSH key $(compgen -G "$HOME/.ssh/id_*" | grep -v '\.pub$' | head -n 1)"
        else
            missing "an SSH key: key_file is empty, no ssh-agent holds a key and there is no ~/.ssh/id_*: run \`ssh-keygen -t ed25519\`"
        fi
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
