#!/usr/bin/env bash
# Set up everything repo2singularity needs (only what is missing), then:
#   bash setup.sh example   build the bundled example, launch Jupyter from it, print how to connect
#   bash setup.sh test      run the test suite
#   bash setup.sh check     say what is missing, change nothing
# Or set up one host of a split installation:
#   bash setup.sh builder ACCOUNT [--authorize PUBKEY_FILE]   (root) a remote builder for ACCOUNT
#   bash setup.sh login [remote|slurm|local]   (the workflow's user) a login node: no root, no Docker
#   bash setup.sh build-service [options]      (root) the build service for many users (docs/build-service.md)
# Run as root, the system is provisioned and the workflow then runs as the unprivileged account
# $R2S_USER (default r2s, in the docker group): Apptainer does not run as root on every host,
# and on HPC it never does. Run as any other user, nothing is installed system-wide: the script
# says what is missing, or goes ahead when all is there.
set -euo pipefail
cd "$(dirname "$0")"
checkout=$(pwd)
action=${1:-example}
account=${R2S_USER:-r2s}

case "$action" in
    example | test | check) ;;
    builder)
        shift
        exec bash setup/builder.sh "$@"
        ;;
    login)
        shift
        exec bash setup/login.sh "$@"
        ;;
    build-service)
        shift
        exec bash setup/build_service.sh "$@"
        ;;
    *)
        echo "usage: bash setup.sh [example|test|check] | builder ACCOUNT [--authorize PUBKEY_FILE] | login [remote|slurm|local] | build-service [options]" >&2
        exit 2
        ;;
esac

as_account() {
    # a clean login-like environment for the account, in $workspace
    runuser -u "$account" -- env -i HOME="$(getent passwd "$account" | cut -d: -f6)" USER="$account" \
        LOGNAME="$account" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 CI="${CI:-}" \
        R2S_RUNTIME="${R2S_RUNTIME:-}" bash -c 'cd "$1" && shift && exec "$@"' _ "$workspace" "$@"
}

install_without_starting() {
    # only the program is needed: policy-rc.d keeps the package from starting a system service
    local package=$1 policy=/usr/sbin/policy-rc.d made_policy=0
    echo "$package: installing (not started)"
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    if [ "$made_policy" = 1 ]; then
        rm -f "$policy" && trap - EXIT
    fi
}

if [ "$action" = check ]; then
    exec bash setup/system.sh check
fi

if [ "$(id -u)" -eq 0 ]; then
    R2S_USER=$account bash setup/system.sh install
    # rootless Podman for `builder: podman`, with the base image in the account's own store
    R2S_USER=$account bash setup/podman.sh install
    if [ "$action" = test ]; then
        # the Slurm tests need a running single-node cluster (tests/test_slurm.py)
        bash setup/slurm.sh
        # the full-disk test writes results onto a small file system (tests/test_faults.py)
        small=/mnt/r2s-small
        if ! mountpoint -q "$small"; then
            mkdir -p "$small"
            mount -t tmpfs -o size=600m,mode=0755 r2s-small "$small"
        fi
        chown "$account:" "$small"
        # the remote-builder tests run an sshd of their own as the account (tests/test_remote.py), and
        # the three-host suite (tests/hosts, run as root below) makes a namespace a builder with
        # `setup.sh builder`, which finds here what it would install (the namespace has no network)
        bash setup/builder.sh provision
        # the registry tests run Debian's registry of their own on loopback (tests/test_registry.py)
        [ -x /usr/bin/docker-registry ] || install_without_starting docker-registry
        # tests/hosts opens the notebook list in a real browser
        [ -x /usr/bin/chromium ] || install_without_starting chromium
    fi
    # the account needs a python it can run: root's own may live under /root
    if ! runuser -u "$account" -- env -i PATH=/usr/local/bin:/usr/bin:/bin python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "python: installing python3 and python3-venv for $account"
        apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    workspace=$checkout
    if ! runuser -u "$account" -- test -r "$checkout/Snakefile" -a -x "$checkout/workflow"; then
        # the account cannot read this checkout (e.g. it is under /root): work on a copy
        workspace=$(getent passwd "$account" | cut -d: -f6)/repo2singularity
        echo "workspace: $account cannot read $checkout; copying it to $workspace"
        mkdir -p "$workspace"
        # a fresh copy each time, keeping only the environment and the results
        find "$workspace" -mindepth 1 -maxdepth 1 ! -name .venv ! -name results ! -name .snakemake -exec rm -rf {} +
        tar -c --exclude=./.venv --exclude=./results --exclude=./.snakemake . | tar -x -C "$workspace"
        chown -R "$account:" "$workspace"
    fi
    # the bundled example is read from this git repository, which belongs to root: let the
    # account's git trust exactly this one (git refuses repositories of other owners)
    for trusted in "$workspace" "$workspace/.git"; do
        if ! as_account git config --global --get-all safe.directory | grep -qxF "$trusted"; then
            as_account git config --global --add safe.directory "$trusted"
        fi
    done
    for writable in .venv results .snakemake; do
        mkdir -p "$workspace/$writable"
        chown -R "$account:" "$workspace/$writable"
    done
    as_account bash setup/python.sh
    if [ "$action" = example ]; then
        as_account .venv/bin/snakemake --cores 2
        echo "(the server runs as $account; stop it with: runuser -u $account -- bash -c 'cd $workspace && .venv/bin/snakemake --cores 1 stop')"
    else
        # pytest.ini leaves out tests/hosts, which runs as root (it makes network namespaces and
        # acts as each host's accounts itself), beside the account's run: it mostly waits (on
        # Slurm, idle culling, keepalives), so the two together take little longer than one
        # a full disk fails every later test at once: say how much there was, to tell it apart
        echo "disk: $(df -h --output=avail /tmp | tail -1 | tr -d ' ') free in /tmp before the tests"
        hosts_log=$(mktemp /tmp/r2s-tests-hosts.XXXXXX)
        (cd "$workspace" && PYTHONDONTWRITEBYTECODE=1 exec .venv/bin/python -m pytest -p no:cacheprovider tests/hosts) >"$hosts_log" 2>&1 &
        hosts=$!
        started=$SECONDS
        status=0
        as_account .venv/bin/python -m pytest -p no:cacheprovider tests || status=$?
        echo "tests/ (as $account) took $((SECONDS - started)) s; $(df -h --output=avail /tmp | tail -1 | tr -d ' ') free in /tmp"
        # tests/root, as root with throw-away accounts: the Debian 12 apptainer entry wherever
        # it is installed or expected (its sid root file system is there), and what holds for
        # every installation; only a native Apptainer (Debian 13, HPC) has no entry to check
        apptainer_path=$(command -v apptainer || true)
        root_tests=(tests/root)
        if ! grep -qs 'Installed by repo2singularity' "$apptainer_path"; then
            root_tests=(tests/root/test_port_taken_by_another_account.py)
            if [ -z "$apptainer_path" ] || [ -d /opt/repo2singularity/apptainer-rootfs ]; then
                echo "tests/root: FAILED: apptainer is ${apptainer_path:-not on PATH}, not the Debian 12 entry of setup/system.sh (/opt/repo2singularity/apptainer-rootfs); run bash setup.sh as root" >&2
                status=1
            else
                echo "tests/root/test_apptainer_entry.py: not run ($apptainer_path is a native Apptainer, without the Debian 12 entry)"
            fi
        fi
        (cd "$workspace" && PYTHONDONTWRITEBYTECODE=1 .venv/bin/python -m pytest -p no:cacheprovider "${root_tests[@]}") || status=$?
        wait "$hosts" || status=$?
        echo "---- tests/hosts, as root, beside the runs above (its log: $hosts_log), ended after $((SECONDS - started)) s:"
        cat "$hosts_log"
        exit "$status"
    fi
else
    if ! bash setup/system.sh check; then
        echo "setup: the tools above are missing; install them (as root: bash setup.sh $action) and run this again" >&2
        exit 1
    fi
    bash setup/python.sh
    if [ "$action" = example ]; then
        .venv/bin/snakemake --cores 2
    else
        .venv/bin/python -m pytest tests
    fi
fi
