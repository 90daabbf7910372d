#!/usr/bin/env bash
# Rootless Podman for `builder: podman` (repo2docker with the Podman engine, as the user, no daemon):
#
#   setup/podman.sh install   (as root) only what is missing: podman, uidmap (newuidmap and
#                             newgidmap), fuse-overlayfs and slirp4netns; subordinate uids and gids
#                             for the account R2S_USER (default r2s); the base image debian:bookworm
#                             copied from this machine's Docker into the account's Podman store
#                             (there is no registry to pull it from)
#   setup/podman.sh base ACCOUNT   (as root) only that copy of the base image, for ACCOUNT
#
# The checks a user runs (`bash setup.sh login slurm`) are the builder's own:
# workflow/scripts/repo2singularity/builders/podman.py --check.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# say, die, apt_install, logged, step_begin, elapsed, BASE_IMAGE, R2S_USER
# shellcheck source=system.sh
source "$HERE/system.sh"

# subordinate ids handed out by this script start here (useradd's own default range)
SUBID_FIRST=100000
SUBID_COUNT=65536

# Run a command as ACCOUNT in its home with a login-like environment (rootless Podman keeps its
# store and runtime folders under the account's own HOME and XDG_RUNTIME_DIR).
as_user() {
    local account=$1 home
    shift
    home=$(getent passwd "$account" | cut -d: -f6)
    (cd / && runuser -u "$account" -- env -i HOME="$home" USER="$account" LOGNAME="$account" \
        PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@")
}

step_podman_packages() {
    step_begin
    local wanted=() tool package
    for tool in podman:podman newuidmap:uidmap fuse-overlayfs:fuse-overlayfs slirp4netns:slirp4netns; do
        package=${tool#*:}
        command -v "${tool%%:*}" >/dev/null 2>&1 || wanted+=("$package")
    done
    if [ "${#wanted[@]}" -eq 0 ]; then
        say "podman: present ($(podman --version | awk '{print $3}'), uidmap, fuse-overlayfs, slirp4netns)"
        return 0
    fi
    say "podman: installing ${wanted[*]}..."
    apt_install "${wanted[@]}"
    command -v podman >/dev/null 2>&1 || die "podman: installed but not on the PATH; see $SETUP_LOG"
    say "podman: installed ($(podman --version | awk '{print $3}'), $(elapsed))"
}

# The first free block of SUBID_COUNT ids at or above SUBID_FIRST in FILE (/etc/subuid or /etc/subgid).
free_subid_start() {
    awk -F: -v first="$SUBID_FIRST" -v count="$SUBID_COUNT" '
        NF >= 3 { start[NR] = $2; end[NR] = $2 + $3 }
        END {
            candidate = first
            do {
                moved = 0
                for (i in start) if (candidate < end[i] && candidate + count > start[i]) { candidate = end[i]; moved = 1 }
            } while (moved)
            print candidate
        }' "$1"
}

has_subids() {
    local account=$1 file=$2 uid
    uid=$(id -u "$account")
    [ -r "$file" ] && awk -F: -v a="$account" -v u="$uid" '($1 == a || $1 == u) && $3 >= 65536 { found = 1 } END { exit !found }' "$file"
}

step_subids() {
    local account=$1 start
    touch /etc/subuid /etc/subgid
    if has_subids "$account" /etc/subuid && has_subids "$account" /etc/subgid; then
        say "podman: $account has subordinate uids and gids"
        return 0
    fi
    if ! has_subids "$account" /etc/subuid; then
        start=$(free_subid_start /etc/subuid)
        logged usermod --add-subuids "$start-$((start + SUBID_COUNT - 1))" "$account" || die "podman: usermod --add-subuids for $account failed; see $SETUP_LOG"
    fi
    if ! has_subids "$account" /etc/subgid; then
        start=$(free_subid_start /etc/subgid)
        logged usermod --add-subgids "$start-$((start + SUBID_COUNT - 1))" "$account" || die "podman: usermod --add-subgids for $account failed; see $SETUP_LOG"
    fi
    say "podman: $account given $SUBID_COUNT subordinate uids and gids"
}

# A storage driver that does not copy every layer: the kernel's overlay where an unprivileged user
# may mount it (Linux 5.13 and later), else fuse-overlayfs where /dev/fuse lets the account in;
# else Podman's own choice, vfs (works, but copies each layer in full). Written only for an account
# with neither a storage.conf nor a store yet: a store keeps the driver it was made with.
step_storage_for() {
    local account=$1 home conf probe driver="" mount_program=""
    home=$(getent passwd "$account" | cut -d: -f6)
    conf=$home/.config/containers/storage.conf
    if [ -e "$conf" ] || [ -e "$home/.local/share/containers/storage" ]; then
        say "podman: $account's storage: $(as_user "$account" podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null || echo 'unreadable (podman info fails)') (kept)"
        return 0
    fi
    probe=$(as_user "$account" mktemp -d /tmp/r2s-podman-probe.XXXXXX)
    if as_user "$account" podman --root "$probe/root" --runroot "$probe/run" --storage-driver overlay \
        info --format '{{.Store.GraphDriverName}}' >>"$SETUP_LOG" 2>&1; then
        driver=overlay
    elif as_user "$account" podman --root "$probe/root" --runroot "$probe/run" --storage-driver overlay \
        --storage-opt overlay.mount_program=/usr/bin/fuse-overlayfs info >>"$SETUP_LOG" 2>&1; then
        driver=overlay mount_program=/usr/bin/fuse-overlayfs
    fi
    # as root: `podman unshare` would make the account's default store before its storage.conf
    rm -rf "$probe"
    if [ -z "$driver" ]; then
        say "podman: $account's storage: neither native overlay nor fuse-overlayfs works here; Podman will use vfs (slow)"
        return 0
    fi
    as_user "$account" mkdir -p "$(dirname "$conf")"
    {
        printf '# Written by repo2singularity setup/podman.sh: rootless overlay, measured faster than vfs\n'
        printf '[storage]\ndriver = "%s"\n' "$driver"
        [ -z "$mount_program" ] || printf '[storage.options.overlay]\nmount_program = "%s"\n' "$mount_program"
    } | as_user "$account" tee "$conf" >/dev/null
    say "podman: $account's storage: $driver${mount_program:+ with fuse-overlayfs} ($conf)"
}

# The machine's debian:bookworm (built by system.sh without a registry) in ACCOUNT's Podman store,
# under both the name Docker gives it and the one a `FROM debian:bookworm` resolves to.
step_base_image_for() {
    local account=$1 docker_id podman_id
    docker_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null) \
        || die "podman: Docker has no $BASE_IMAGE to copy into $account's Podman store (run setup/system.sh install first)"
    podman_id=$(as_user "$account" podman image inspect --format '{{.Id}}' "docker.io/library/$BASE_IMAGE" 2>/dev/null || true)
    if [ -n "$podman_id" ] && [ "sha256:$podman_id" = "$docker_id" ]; then
        say "podman: $BASE_IMAGE present in $account's Podman store"
        return 0
    fi
    step_begin
    # the account cannot read Docker's socket: root saves, the account loads from a pipe
    docker save "$BASE_IMAGE" | as_user "$account" podman load >>"$SETUP_LOG" 2>&1 \
        || die "podman: loading $BASE_IMAGE into $account's Podman store failed; see $SETUP_LOG"
    as_user "$account" podman tag "$BASE_IMAGE" "docker.io/library/$BASE_IMAGE" >>"$SETUP_LOG" 2>&1 \
        || die "podman: podman tag $BASE_IMAGE failed for $account; see $SETUP_LOG"
    say "podman: $BASE_IMAGE copied into $account's Podman store ($(elapsed))"
}

cmd_install() {
    [ "$(id -u)" = 0 ] || die "setup/podman.sh install: run as root"
    : >>"$SETUP_LOG"
    id "$R2S_USER" >/dev/null 2>&1 || die "podman: no account $R2S_USER (setup/system.sh install makes it)"
    step_podman_packages
    step_subids "$R2S_USER"
    step_storage_for "$R2S_USER"
    step_base_image_for "$R2S_USER"
}

case "${1:-}" in
    install) cmd_install ;;
    base)
        [ -n "${2:-}" ] || die "usage: setup/podman.sh base ACCOUNT"
        step_subids "$2"
        step_storage_for "$2"
        step_base_image_for "$2"
        ;;
    *)
        printf 'usage: %s install | base ACCOUNT\n' "$0" >&2
        exit 2
        ;;
esac
