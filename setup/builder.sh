#!/usr/bin/env bash
# Make this Debian 12/13 machine (a VM with root) a remote builder for one account:
#
#   bash setup.sh builder ACCOUNT [--authorize PUBKEY_FILE]   (as root)
#
# Installs only what is missing: Docker with buildx and the base image, Apptainer,
# squashfs-tools, util-linux's flock, repo2docker (the version pinned in requirements.txt, in a
# venv under /opt/repo2singularity, linked into /usr/local/bin so that the account's SSH sessions
# find it), the account (created if missing; put in the groups docker and r2s-apptainer), and an
# sshd on port 22 if nothing listens there (started without systemd, logging to /var/log/sshd.log).
# --authorize adds a login node's public key to the account's ~/.ssh/authorized_keys. It ends by
# printing what the login node needs: host, port, user, the host key's fingerprints, and the lines
# for profiles/remote/builder.yaml and ~/.ssh/known_hosts.
#
#   bash setup/builder.sh provision   the machine-wide part only (no account, no sshd started):
#                                     what `bash setup.sh test` needs for tests/hosts
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# the install steps and helpers (apt_install, logged, say, die, ...) of the machine set-up
# shellcheck source=system.sh
source "$HERE/system.sh"
SELF="bash setup.sh builder"

REQUIREMENTS=$HERE/../requirements.txt
REPO2DOCKER_VENV=/opt/repo2singularity/repo2docker
REPO2DOCKER_LINK=/usr/local/bin/repo2docker
# the PATH sshd gives an account's sessions on Debian: a tool the builder runs must be found here
SSH_SESSION_PATH=/usr/local/bin:/usr/bin:/bin
SSH_PORT=22
SSHD_LOG=/var/log/sshd.log
SSHD_WAIT=20

usage() {
    printf 'usage: bash setup.sh builder ACCOUNT [--authorize PUBKEY_FILE]\n' >&2
    exit 2
}

# ---------------------------------------------------------------- machine-wide steps

# A command from a Debian package, installed if missing.
step_tool() {
    local tool=$1 package=$2
    if command -v "$tool" >/dev/null 2>&1; then
        say "$package: present ($tool)"
    else
        say "$package: installing..."
        apt_install "$package"
    fi
}

pinned_repo2docker() {
    local line
    line=$(grep -i '^jupyter-repo2docker==' "$REQUIREMENTS") || die "repo2docker: no jupyter-repo2docker pin in $REQUIREMENTS"
    printf '%s' "${line#*==}"
}

step_repo2docker() {
    step_begin
    local wanted found
    wanted=$(pinned_repo2docker)
    if found=$(env -i PATH="$SSH_SESSION_PATH" repo2docker --version 2>/dev/null); then
        [ "$found" = "$wanted" ] || say "repo2docker: note: $found on the PATH, requirements.txt pins $wanted"
        say "repo2docker: present ($found, $(env -i PATH="$SSH_SESSION_PATH" sh -c 'command -v repo2docker'))"
        return 0
    fi
    # the system's python, not root's own (e.g. pyenv under /root), which the account cannot run
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
        say "repo2docker: installing python3 and python3-venv..."
        apt_install python3 python3-venv
    fi
    say "repo2docker: installing jupyter-repo2docker $wanted into $REPO2DOCKER_VENV..."
    # made in place (a venv's scripts name their python by path); it counts as installed only
    # once the link on the PATH answers, so an interrupted install is simply made again
    rm -rf "$REPO2DOCKER_VENV"
    mkdir -p "$(dirname "$REPO2DOCKER_VENV")"
    logged /usr/bin/python3 -m venv "$REPO2DOCKER_VENV" || die "repo2docker: python3 -m venv failed; see $SETUP_LOG"
    # its dependencies at the versions the workflow is tested with
    logged "$REPO2DOCKER_VENV/bin/python" -m pip install --disable-pip-version-check \
        --constraint "$REQUIREMENTS" "jupyter-repo2docker==$wanted" \
        || die "repo2docker: pip install jupyter-repo2docker==$wanted failed; see $SETUP_LOG"
    ln -sfn "$REPO2DOCKER_VENV/bin/repo2docker" "$REPO2DOCKER_LINK"
    found=$(env -i PATH="$SSH_SESSION_PATH" repo2docker --version 2>/dev/null) \
        || die "repo2docker: installed but \`repo2docker --version\` fails; see $SETUP_LOG"
    say "repo2docker: installed ($found, $REPO2DOCKER_LINK, $(elapsed))"
}

step_sshd_program() {
    if [ -x /usr/sbin/sshd ]; then
        say "openssh-server: present"
    else
        say "openssh-server: installing (no service is started by the package)..."
        local made_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && made_policy=1
        fi
        apt_install openssh-server || true
        [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
        [ -x /usr/sbin/sshd ] || die "openssh-server: installed but /usr/sbin/sshd is missing; see $SETUP_LOG"
    fi
    # host keys of every default type that is missing (the package makes them too; a copied VM
    # image may have none)
    ssh-keygen -A >/dev/null
}

provision() {
    local found
    : >>"$SETUP_LOG"
    trap cleanup EXIT
    exec 9>"$LOCK_FILE"
    flock 9
    step_docker_engine
    step_buildx
    step_base_image
    # only when missing: refreshing the scripts of an existing installation is `setup.sh`'s job
    if found=$(apptainer_found); then
        say "apptainer: present ($found)"
    else
        step_apptainer
    fi
    step_tool mksquashfs squashfs-tools
    step_tool flock util-linux
    step_repo2docker
    step_sshd_program
    step_tool git git
}

# ---------------------------------------------------------------- the account and its sshd

step_build_account() {
    local account=$1 group home
    for group in docker "$APPTAINER_GROUP"; do
        getent group "$group" >/dev/null || logged groupadd --system "$group" \
            || die "account: cannot create the group $group; see $SETUP_LOG"
    done
    if ! id "$account" >/dev/null 2>&1; then
        # '*': no password, but not locked either (sshd without PAM refuses locked accounts)
        logged useradd --create-home --shell /bin/bash --password '*' --groups "docker,$APPTAINER_GROUP" "$account" \
            || die "account: useradd $account failed; see $SETUP_LOG"
        home=$(getent passwd "$account" | cut -d: -f6)
        # the build work folder holds the sources of private repositories
        chmod 0700 "$home"
        say "account $account: created (uid $(id -u "$account"), home $home, groups docker and $APPTAINER_GROUP)"
    else
        for group in docker "$APPTAINER_GROUP"; do
            if [[ " $(id -nG "$account") " != *" $group "* ]]; then
                logged usermod -aG "$group" "$account" || die "account: usermod -aG $group $account failed"
                say "account $account: added to group $group"
            fi
        done
        say "account $account: present (uid $(id -u "$account"), groups $(id -nG "$account" | tr ' ' ','))"
    fi
    (cd / && runuser -u "$account" -- timeout 20 docker info >/dev/null 2>&1) \
        || die "account: $account cannot reach the Docker engine (\`ls -l /var/run/docker.sock\`: it must belong to the group docker)"
    (cd / && runuser -u "$account" -- timeout 60 apptainer version >/dev/null 2>&1) \
        || die "account: $account cannot run \`apptainer version\` (try \`runuser -u $account -- apptainer version\`)"
}

port_served() {
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
}

step_sshd() {
    if port_served "$SSH_PORT"; then
        say "sshd: port $SSH_PORT is already served"
        return 0
    fi
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    logged /usr/sbin/sshd -t || die "sshd: /etc/ssh/sshd_config does not pass \`sshd -t\`; see $SETUP_LOG"
    # no systemd: sshd daemonizes itself; its own session, without the set-up's lock descriptor
    setsid /usr/sbin/sshd -E "$SSHD_LOG" </dev/null >/dev/null 2>&1 9>&- \
        || die "sshd: did not start; see $SSHD_LOG"
    local waited=0
    until port_served "$SSH_PORT"; do
        [ "$waited" -lt "$SSHD_WAIT" ] || die "sshd: started but nothing listens on port $SSH_PORT after ${SSHD_WAIT}s; see $SSHD_LOG"
        sleep 1
        waited=$((waited + 1))
    done
    say "sshd: started on port $SSH_PORT (pid $(cat /run/sshd.pid 2>/dev/null || echo '?'), log $SSHD_LOG)"
}

# Add the public key(s) of PUBKEY_FILE to the account's authorized_keys, each once.
authorize() {
    local account=$1 file=$2 home dir keys tmp line added=0
    [ -r "$file" ] || die "--authorize: cannot read $file"
    if grep -q 'PRIVATE KEY' "$file"; then
        die "--authorize: $file is a private key; give the .pub file"
    fi
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        [[ "$line" =~ ^(ssh-|ecdsa-|sk-) ]] || die "--authorize: $file: not a public key line: ${line:0:40}..."
    done <"$file"
    ssh-keygen -lf "$file" >/dev/null 2>&1 || die "--authorize: $file holds no public key ssh-keygen can read"
    home=$(getent passwd "$account" | cut -d: -f6)
    dir=$home/.ssh
    keys=$dir/authorized_keys
    runuser -u "$account" -- mkdir -p "$dir"
    chmod 0700 "$dir"
    tmp=$(runuser -u "$account" -- mktemp "$dir/.authorized_keys.XXXXXX")
    [ -f "$keys" ] && cat "$keys" >"$tmp"
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        if ! grep -qxF -- "$line" "$tmp"; then
            printf '%s\n' "$line" >>"$tmp"
            added=$((added + 1))
        fi
    done <"$file"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$keys"
    say "authorized_keys of $account: $added key(s) added from $file ($(ssh-keygen -lf "$file" | awk '{print $2}' | paste -sd ' '))"
}

# ---------------------------------------------------------------- what the login node needs

report() {
    local account=$1 addresses name host pub kind key known
    read -r -a addresses <<<"$(hostname -I 2>/dev/null || true)"
    name=$(hostname -f 2>/dev/null || hostname)
    host=${addresses[0]:-$name}
    known=$(printf '%s,' "${addresses[@]}" "$name")
    known=${known%,}
    say ""
    say "builder ready for $account. On the login node:"
    say "  host: $host   (addresses: ${addresses[*]:-none}; name: $name)"
    say "  port: $SSH_PORT"
    say "  user: $account"
    for pub in /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub; do
        [ -r "$pub" ] && say "  host key: $(ssh-keygen -lf "$pub")"
    done
    say ""
    say "profiles/remote/builder.yaml (host, port, user under builder:):"
    say "  builder:"
    say "    host: $host"
    say "    port: $SSH_PORT"
    say "    user: $account"
    say ""
    say "~/.ssh/known_hosts (append):"
    for pub in /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub; do
        [ -r "$pub" ] || continue
        read -r kind key _ <"$pub"
        say "  $known $kind $key"
    done
    say ""
    say "then, on the login node: snakemake --profile remote check_builder"
}

main() {
    [ "$(id -u)" = 0 ] || die "setup.sh builder installs system packages and an sshd: run it as root"
    if [ "${1:-}" = provision ]; then
        provision
        return 0
    fi
    local account="" pubkey=""
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --authorize)
                [ "$#" -ge 2 ] || usage
                pubkey=$2
                shift 2
                ;;
            --authorize=*) pubkey=${1#*=}; shift ;;
            -*) usage ;;
            *)
                [ -z "$account" ] || usage
                account=$1
                shift
                ;;
        esac
    done
    [ -n "$account" ] || usage
    [[ "$account" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "account name '$account' is not a valid user name"
    [ "$account" != root ] || die "the builder account must not be root (Apptainer runs as an ordinary user)"
    [ -z "$pubkey" ] || [ -r "$pubkey" ] || die "--authorize: cannot read $pubkey"
    local start=$SECONDS
    provision
    step_build_account "$account"
    [ -z "$pubkey" ] || authorize "$account" "$pubkey"
    step_sshd
    exec 9>&-
    say "builder: done in $((SECONDS - start))s"
    report "$account"
}

# sourced by setup/build_service.sh for its machine-wide steps and account
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
