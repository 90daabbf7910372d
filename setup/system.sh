#!/usr/bin/env bash
# System provisioning for repo2singularity.
#
#   setup/system.sh install   (as root) install only what is missing:
#                             Docker engine + buildx, the base image debian:bookworm,
#                             Apptainer, squashfs-tools (mksquashfs for the fast SIF
#                             conversion), and an unprivileged account in the docker group and
#                             in r2s-apptainer (whose members may run Apptainer on Debian 12)
#   setup/system.sh check     (any user) report what is missing for the CURRENT user;
#                             exit 0 if nothing is missing, 1 otherwise
#
# Environment: R2S_USER (default r2s) names the unprivileged account that runs the workflow;
# R2S_APPTAINER_FOLDERS (Debian 12) adds top-level folders that apptainer sees, e.g. /scratch.
# Written for Debian 12 and 13 machines without systemd and without a container registry.
# Long command output goes to /var/log/repo2singularity-setup.log; dockerd logs to
# /var/log/dockerd.log.
set -euo pipefail

R2S_USER=${R2S_USER:-r2s}
BASE_IMAGE=debian:bookworm
BASE_SUITE=bookworm
ROOTFS=/opt/repo2singularity/apptainer-rootfs
ENTRY=/usr/local/libexec/repo2singularity/apptainer-entry
NAMESPACE_STAGE=/usr/local/libexec/repo2singularity/apptainer-namespace
WRAPPER=/usr/local/bin/apptainer
SUDOERS_FILE=/etc/sudoers.d/repo2singularity
# members may run apptainer through the entry script (Debian 12); the build and test accounts
APPTAINER_GROUP=r2s-apptainer
# folders of this machine that apptainer sees at the same paths (Debian 12): these, the top
# folder of this clone of the project (a clone can live anywhere: /scratch, /check...), those an
# earlier install added, and R2S_APPTAINER_FOLDERS (top-level folders, space-separated)
BOUND_FOLDERS="/home /tmp /var/tmp /work /srv /mnt /opt /media"
# top-level folders that hold the root file system's own system (never covered by the machine's)
SYSTEM_FOLDERS="/bin /boot /dev /etc /lib /lib32 /lib64 /libx32 /proc /root /run /sbin /sys /usr /var /.oldroot /.r2s-dev"
PROJECT_DIR=$(cd "$(dirname "$0")/.." && pwd -P)
SETUP_LOG=/var/log/repo2singularity-setup.log
DOCKERD_LOG=/var/log/dockerd.log
DOCKER_WAIT=${R2S_DOCKER_WAIT:-60}
LOCK_FILE=/run/repo2singularity-setup.lock
DEFAULT_MIRROR=http://deb.debian.org/debian

SELF=$0
APT_UPDATED=0
STEP_START=0
CLEANUP=()   # temporary trees removed on exit, also after a failure

# ---------------------------------------------------------------- helpers

say() { printf '%s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
step_begin() { STEP_START=$SECONDS; }
elapsed() { printf '%ss' "$((SECONDS - STEP_START))"; }

# Run a command with its output going to the setup log.
logged() {
    printf '\n### %s: %s\n' "$(date '+%F %T')" "$*" >>"$SETUP_LOG"
    "$@" >>"$SETUP_LOG" 2>&1
}

apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    logged apt-get update || die "apt-get update failed; see $SETUP_LOG"
    APT_UPDATED=1
}

apt_install() {
    apt_update_once
    DEBIAN_FRONTEND=noninteractive logged apt-get install -y --no-install-recommends "$@" \
        || die "apt-get install $* failed; see $SETUP_LOG"
}

# Major Debian release number (12, 13, ...); testing/sid without a number count as 13+.
debian_major() {
    local v=""
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        v=$(. /etc/os-release && printf '%s' "${VERSION_ID:-}")
    fi
    if [ -z "$v" ] && [ -r /etc/debian_version ]; then
        v=$(cut -d. -f1 /etc/debian_version)
    fi
    case "$v" in
        ''|*[!0-9]*) printf '99' ;;
        *) printf '%s' "$v" ;;
    esac
}

host_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
}

# Print "MIRROR SECURITY_MIRROR" read from the machine's own apt sources (one-line .list
# and deb822 .sources files).  The main mirror is the first "deb" URI serving the host's
# codename; the security mirror is the one serving CODENAME-security (may be empty).
apt_mirrors() {
    local codename files=() f etc=${APT_ETC:-/etc/apt}
    codename=$(host_codename)
    [ -f "$etc/sources.list" ] && files+=("$etc/sources.list")
    for f in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || { printf '%s \n' "$DEFAULT_MIRROR"; return 0; }
    awk -v cn="$codename" -v def="$DEFAULT_MIRROR" '
        function consider(uri, suite) {
            sub(/\/+$/, "", uri)
            if (suite == cn && main == "") main = uri
            if (suite == cn "-security" && sec == "") sec = uri
        }
        function flush(   i, j, nu, ns, u, s) {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled) {
                nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
                for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++)
                    if (u[i] != "" && s[j] != "") consider(u[i], s[j])
            }
            types = ""; uris = ""; suites = ""; enabled = 1
        }
        FNR == 1 { if (deb822) flush(); deb822 = (FILENAME ~ /\.sources$/); enabled = 1 }
        deb822 {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/) next
            line = $0; key = tolower(line); sub(/:.*/, "", key)
            val = line; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "enabled" && tolower(val) ~ /^no/) enabled = 0
            next
        }
        /^[ \t]*deb[ \t]/ {
            line = $0
            sub(/#.*/, "", line)
            gsub(/\[[^]]*\]/, "", line)
            n = split(line, w, /[ \t]+/)
            k = (w[1] == "") ? 2 : 1
            if (w[k] == "deb" && n >= k + 2) consider(w[k + 1], w[k + 2])
        }
        END {
            if (deb822) flush()
            if (main == "") main = def
            print main " " sec
        }
    ' "${files[@]}"
}

docker_answers() { timeout 20 docker info >/dev/null 2>&1; }
docker_server_version() { timeout 20 docker info --format '{{.ServerVersion}}' 2>/dev/null || true; }

# apptainer (or singularity) command that answers "version", printed with its version.
apptainer_found() {
    local c v
    for c in apptainer singularity; do
        command -v "$c" >/dev/null 2>&1 || continue
        if v=$(cd / && timeout 60 "$c" version 2>/dev/null) && [ -n "$v" ]; then
            printf '%s %s' "$c" "$v"
            return 0
        fi
    done
    return 1
}

cleanup() {
    local d
    for d in "${CLEANUP[@]}"; do remove_tree "$d"; done
}

# Remove a directory tree left by an interrupted debootstrap without crossing into any
# file system still mounted below it.
remove_tree() {
    local dir=$1 m
    [ -e "$dir" ] || return 0
    # unmount leftovers, deepest first
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    rm -rf --one-file-system "$dir"
}

# ---------------------------------------------------------------- check

# Each check prints one line for a missing requirement.  Sets MISSING.
MISSING=0
missing() { say "MISSING: $*"; MISSING=$((MISSING + 1)); }

run_checks() {
    local me engine_ok=0 err found
    me=$(id -un)
    MISSING=0

    if ! command -v docker >/dev/null 2>&1; then
        missing "docker client: run \`sudo bash $SELF install\` (or \`sudo apt-get install docker.io\`)"
    elif docker_answers; then
        engine_ok=1
        say "ok: docker engine answers for $me ($(docker_server_version))"
    else
        err=$(timeout 20 docker info 2>&1 >/dev/null || true)
        if [[ "${err,,}" == *"permission denied"* ]]; then
            missing "docker engine: $me may not use /var/run/docker.sock: add $me to the docker group (\`sudo usermod -aG docker $me\`, then log in again), or run the workflow as the account '$R2S_USER'"
        else
            missing "docker engine: not answering (\`docker info\`: $(printf '%s' "$err" | grep -v '^ *$' | tail -n 1)): run \`sudo bash $SELF install\` (starts dockerd, log in $DOCKERD_LOG)"
        fi
    fi

    if command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
        say "ok: docker buildx ($(docker buildx version 2>/dev/null | awk '{print $2}'))"
    else
        missing "docker buildx: plugin missing (\`docker buildx version\` fails): run \`sudo bash $SELF install\` (Debian 13: \`sudo apt-get install docker-buildx\`)"
    fi
    if [ "$engine_ok" != 1 ]; then
        missing "base image $BASE_IMAGE: not verified (needs a docker engine this user can reach)"
    elif docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "ok: base image $BASE_IMAGE"
    else
        missing "base image $BASE_IMAGE: run \`sudo bash $SELF install\` (builds it with debootstrap, no registry needed)"
    fi

    if found=$(apptainer_found); then
        say "ok: $found"
    elif command -v apptainer >/dev/null 2>&1 || command -v singularity >/dev/null 2>&1; then
        err=$(cd / || exit; timeout 60 apptainer version 2>&1 || true)
        missing "apptainer: on PATH but \`apptainer version\` fails ($(printf '%s' "$err" | tail -n 1)): run \`sudo bash $SELF install\`"
    else
        missing "apptainer: not on PATH: run \`sudo bash $SELF install\`"
    fi

    check_squashfs_tools

    if command -v git >/dev/null 2>&1; then
        say "ok: git ($(git --version | awk '{print $3}'))"
    else
        missing "git: run \`sudo apt-get install git\`"
    fi
}

cmd_check() {
    run_checks
    if [ "$MISSING" -gt 0 ]; then
        say "check: $MISSING requirement(s) missing for $(id -un)"
        return 1
    fi
    say "check: all requirements met for $(id -un)"
}

# ---------------------------------------------------------------- install steps

step_docker_engine() {
    step_begin
    if docker_answers; then
        say "docker engine: running ($(docker_server_version))"
        return 0
    fi
    local pkgs=()
    command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    if ! command -v docker >/dev/null 2>&1; then
        # Debian 13 ships the client separately (docker-cli, only recommended by docker.io)
        if [ "$(debian_major)" -ge 13 ]; then pkgs+=(docker-cli); else pkgs+=(docker.io); fi
    fi
    if [ "${#pkgs[@]}" -gt 0 ]; then
        mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
        say "docker engine: installing ${pkgs[*]}..."
        apt_install "${pkgs[@]}"
        if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
            die "docker engine: ${pkgs[*]} installed but dockerd or docker not found; see $SETUP_LOG"
        fi
    fi
    local pid=""
    if [ -r /var/run/docker.pid ]; then
        pid=$(cat /var/run/docker.pid 2>/dev/null || true)
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then pid=""; fi
    fi
    if [ -n "$pid" ]; then
        say "docker engine: dockerd (pid $pid) already running, waiting for it..."
    else
        say "docker engine: starting dockerd (log: $DOCKERD_LOG)..."
        # detached: own session, no inherited descriptors (the lock on fd 9 included)
        setsid dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
        pid=$!
    fi
    local waited=0
    until [ -S /var/run/docker.sock ] && docker_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            die "docker engine: dockerd exited during start-up; see the end of $DOCKERD_LOG"
        fi
        if [ "$waited" -ge "$DOCKER_WAIT" ]; then
            die "docker engine: no answer from /var/run/docker.sock after ${DOCKER_WAIT}s; see $DOCKERD_LOG"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "docker engine: running ($(docker_server_version), started in $(elapsed))"
}

step_buildx() {
    step_begin
    if docker buildx version >/dev/null 2>&1; then
        say "docker buildx: present ($(docker buildx version | awk '{print $2}'))"
        return 0
    fi
    local major mirror tmp deb
    major=$(debian_major)
    if [ "$major" -ge 13 ]; then
        say "docker buildx: installing docker-buildx..."
        apt_install docker-buildx
    else
        # Debian 12 has no docker-buildx; the Debian 13 .deb (libc6 >= 2.34 only) works.
        # It is fetched with a private apt state (own source list, lists and cache), so the
        # machine's apt sources and package lists are never touched.
        say "docker buildx: installing docker-buildx from Debian 13 (trixie) .deb..."
        read -r mirror _ < <(apt_mirrors)
        tmp=$(mktemp -d /var/tmp/r2s-buildx.XXXXXX)
        CLEANUP+=("$tmp")
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts" "$tmp/deb"
        printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' \
            "$mirror" >"$tmp/trixie.list"
        local aptopts=(-o "Dir::Etc::SourceList=$tmp/trixie.list" -o "Dir::Etc::SourceParts=$tmp/parts"
            -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
            -o "Acquire::Check-Valid-Until=false" -o "APT::Get::List-Cleanup=false")
        logged apt-get "${aptopts[@]}" update \
            || die "docker buildx: apt-get update of the temporary trixie source failed; see $SETUP_LOG"
        (cd "$tmp/deb" && logged apt-get "${aptopts[@]}" download docker-buildx) \
            || die "docker buildx: apt-get download docker-buildx (trixie) failed; see $SETUP_LOG"
        deb=$(find "$tmp/deb" -name 'docker-buildx_*.deb' | head -n 1)
        [ -n "$deb" ] || die "docker buildx: no docker-buildx .deb was downloaded; see $SETUP_LOG"
        logged dpkg -i "$deb" || die "docker buildx: dpkg -i $(basename "$deb") failed; see $SETUP_LOG"
        remove_tree "$tmp"
    fi
    docker buildx version >/dev/null 2>&1 \
        || die "docker buildx: installed but \`docker buildx version\` fails; see $SETUP_LOG"
    say "docker buildx: installed ($(docker buildx version | awk '{print $2}'), $(elapsed))"
}

step_base_image() {
    step_begin
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE: present"
        return 0
    fi
    if logged timeout 30 docker pull "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE: pulled ($(elapsed))"
        return 0
    fi
    say "base image $BASE_IMAGE: no registry, building it with debootstrap (about 1 min)..."
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local mirror security dir cvu
    read -r mirror security < <(apt_mirrors)
    dir=$(mktemp -d /var/tmp/r2s-bookworm.XXXXXX)
    CLEANUP+=("$dir")
    logged debootstrap --variant=minbase "$BASE_SUITE" "$dir" "$mirror" \
        || die "base image: debootstrap $BASE_SUITE from $mirror failed; see $SETUP_LOG"
    # apt inside the image uses the same mirror as this machine
    {
        printf 'deb %s %s main\n' "$mirror" "$BASE_SUITE"
        printf 'deb %s %s-updates main\n' "$mirror" "$BASE_SUITE"
        [ -n "$security" ] && printf 'deb %s %s-security main\n' "$security" "$BASE_SUITE"
    } >"$dir/etc/apt/sources.list"
    # a snapshot mirror may serve Release files past their Valid-Until date; carry over
    # the machine's own setting
    cvu=$(apt-config dump 2>/dev/null | grep -i '^Acquire::Check-Valid-Until ' || true)
    if [[ "${cvu,,}" == *'"false"'* || "${cvu,,}" == *'"0"'* || "${cvu,,}" == *'"no"'* ]]; then
        printf 'Acquire::Check-Valid-Until "false";\n' >"$dir/etc/apt/apt.conf.d/99repo2singularity-valid-until"
    fi
    rm -rf "${dir:?}"/var/cache/apt/archives/*.deb "${dir:?}"/var/lib/apt/lists/* 2>/dev/null || true
    tar -C "$dir" --one-file-system -c . | logged docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" \
        || die "base image: docker import failed; see $SETUP_LOG"
    remove_tree "$dir"
    if ! logged timeout 300 docker run --rm "$BASE_IMAGE" apt-get update; then
        docker image rm "$BASE_IMAGE" >/dev/null 2>&1 || true
        die "base image: apt-get update inside $BASE_IMAGE failed (mirror $mirror); see $SETUP_LOG"
    fi
    say "base image $BASE_IMAGE: imported ($(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%d MB", $1/1e6}'), apt works inside, $(elapsed))"
}

# The Debian 12 route (see TESTBED notes): apptainer from the sid root file system in ROOTFS,
# started through a root-owned entry script that sudo runs for the members of APPTAINER_GROUP.
# The entry makes a private mount namespace (the next stage, which no sudo rule names, does the
# mounts there), shows the root file system as / with the folders of BOUND_FOLDERS and the
# account files of this machine, and drops back to the caller, who then enters the working
# folder: root never creates, mounts or enters anything that the caller named.
# Their files are setup/templates/, each as it is installed but for the @NAME@ of a setting
# (ROOTFS, ENTRY, ...): a reviewer reads there what root will run.
TEMPLATES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/templates

# render_template NAME: setup/templates/NAME with each @SETTING@ replaced by its value, and a
# line @ROOT_PREAMBLE@ by the template root-preamble (the start of both root-run stages).
render_template() {
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        if [ "$line" = "@ROOT_PREAMBLE@" ]; then
            render_template root-preamble
            continue
        fi
        line=${line//@ROOTFS@/"$ROOTFS"}
        line=${line//@ENTRY@/"$ENTRY"}
        line=${line//@NAMESPACE_STAGE@/"$NAMESPACE_STAGE"}
        line=${line//@SUDOERS_FILE@/"$SUDOERS_FILE"}
        line=${line//@APPTAINER_GROUP@/"$APPTAINER_GROUP"}
        line=${line//@BOUND_FOLDERS@/"$BOUND_FOLDERS"}
        printf '%s\n' "$line"
    done <"$TEMPLATES/$1"
}

# install_template TEMPLATE DEST MODE: write the rendered template to DEST (root-owned,
# atomically) unless DEST already has exactly that content; returns 1 when unchanged.
install_template() {
    local template=$1 dest=$2 mode=$3 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
    render_template "$template" >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    chmod "$mode" "$tmp"
    chown root:root "$tmp"
    if [ "$dest" = "$SUDOERS_FILE" ] && ! logged visudo -cf "$tmp"; then
        rm -f "$tmp"
        die "apptainer: the sudoers rule did not validate (visudo -cf); see $SETUP_LOG"
    fi
    mv -f "$tmp" "$dest"
}

# The group whose members may run apptainer through the entry script, with R2S_USER in it
# once the account exists. Prints what it changed.
ensure_apptainer_group() {
    if ! getent group "$APPTAINER_GROUP" >/dev/null; then
        logged groupadd --system "$APPTAINER_GROUP" || die "apptainer: cannot create the group $APPTAINER_GROUP; see $SETUP_LOG"
        printf 'group %s created; ' "$APPTAINER_GROUP"
    fi
    if id "$R2S_USER" >/dev/null 2>&1 && [[ " $(id -nG "$R2S_USER") " != *" $APPTAINER_GROUP "* ]]; then
        logged usermod -aG "$APPTAINER_GROUP" "$R2S_USER" || die "apptainer: usermod -aG $APPTAINER_GROUP $R2S_USER failed"
        printf '%s added to %s (for sessions that begin from now on); ' "$R2S_USER" "$APPTAINER_GROUP"
    fi
}

# BOUND_FOLDERS plus the project's top folder, the installed list and R2S_APPTAINER_FOLDERS;
# a folder of the root file system's own system is refused with the reason.
extend_bound_folders() {
    local d installed="" top
    top="/$(printf '%s' "${PROJECT_DIR#/}" | cut -d/ -f1)"
    if [ -f "$NAMESPACE_STAGE" ]; then
        installed=$(sed -n 's/^BOUND_FOLDERS=(\(.*\))$/\1/p' "$NAMESPACE_STAGE")
    fi
    for d in $installed $top ${R2S_APPTAINER_FOLDERS:-}; do
        case " $BOUND_FOLDERS " in *" $d "*) continue ;; esac
        if ! [[ "$d" =~ ^/[A-Za-z0-9._-]+$ ]] || [ "$d" = /. ] || [ "$d" = /.. ]; then
            die "apptainer: R2S_APPTAINER_FOLDERS: '$d' is not a top-level folder such as /scratch"
        fi
        if [[ " $SYSTEM_FOLDERS " == *" $d "* ]]; then
            if [ "$d" = "$top" ]; then
                say "apptainer: note: this project ($PROJECT_DIR) is under $d, which apptainer cannot see here; clone it under one of $BOUND_FOLDERS" >&2
                continue
            fi
            die "apptainer: R2S_APPTAINER_FOLDERS: $d is a folder of apptainer's own root file system"
        fi
        BOUND_FOLDERS="$BOUND_FOLDERS $d"
    done
}

# What the namespace stage mounts onto: made here, once, so that it never writes to ROOTFS.
prepare_rootfs() {
    local d f
    for d in $BOUND_FOLDERS /.oldroot /.r2s-dev; do
        [ -e "$ROOTFS$d" ] || [ -L "$ROOTFS$d" ] || mkdir -p "$ROOTFS$d"
    done
    for f in /etc/passwd /etc/group /etc/hosts /etc/resolv.conf /etc/subuid /etc/subgid; do
        [ -L "$ROOTFS$f" ] && rm -f "$ROOTFS$f"
        [ -e "$ROOTFS$f" ] || : >"$ROOTFS$f"
    done
}

# Group, mount points, entry scripts, sudo rule and wrapper of the sid rootfs route; prints what
# changed. The group and its members come before the rule that names it.
install_rootfs_scripts() {
    local changed=()
    command -v visudo >/dev/null 2>&1 || die "apptainer: visudo not found (package sudo)"
    ensure_apptainer_group
    extend_bound_folders
    prepare_rootfs
    if install_template apptainer-namespace "$NAMESPACE_STAGE" 0755; then changed+=("$NAMESPACE_STAGE"); fi
    if install_template apptainer-entry "$ENTRY" 0755; then changed+=("$ENTRY"); fi
    if install_template sudoers "$SUDOERS_FILE" 0440; then changed+=("$SUDOERS_FILE"); fi
    if install_template apptainer-wrapper "$WRAPPER" 0755; then changed+=("$WRAPPER"); fi
    printf '%s' "${changed[*]}"
}

step_apptainer() {
    step_begin
    local found major mirror partial changed
    if found=$(apptainer_found); then
        # our own sid-rootfs wrapper: keep its generated scripts current (no reinstall)
        if [ "$(command -v apptainer)" = "$WRAPPER" ] && [ -x "$ROOTFS/usr/bin/apptainer" ] \
            && grep -q 'Installed by repo2singularity' "$WRAPPER" 2>/dev/null; then
            changed=$(install_rootfs_scripts)
            if [ -n "$changed" ]; then
                say "apptainer: present ($found, sid rootfs), updated: $changed"
                return 0
            fi
        fi
        say "apptainer: present ($found)"
        return 0
    fi
    major=$(debian_major)
    read -r mirror _ < <(apt_mirrors)
    if [ "$major" -ge 13 ]; then
        say "apptainer: installing apptainer from sid (pinned low, only apptainer)..."
        cat >/etc/apt/sources.list.d/repo2singularity-sid.sources <<EOF
# Added by repo2singularity setup/system.sh for apptainer (pinned low, see preferences.d)
Types: deb
URIs: $mirror
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no
EOF
        cat >/etc/apt/preferences.d/repo2singularity-sid <<'EOF'
Package: *
Pin: release n=sid
Pin-Priority: 100
EOF
        APT_UPDATED=0   # the new source needs its lists
        apt_install apptainer/sid
    else
        command -v sudo >/dev/null 2>&1 || { say "apptainer: installing sudo..."; apt_install sudo; }
        if [ ! -x "$ROOTFS/usr/bin/apptainer" ]; then
            say "apptainer: installing sid rootfs in $ROOTFS (about 1 min)..."
            command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
            partial="$ROOTFS.partial"
            remove_tree "$partial"
            mkdir -p "$(dirname "$ROOTFS")"
            logged debootstrap --variant=minbase \
                --include=apptainer,squashfs-tools,squashfuse,fuse2fs,ca-certificates,util-linux,mount \
                sid "$partial" "$mirror" \
                || die "apptainer: debootstrap of sid into $partial failed; see $SETUP_LOG"
            printf 'Acquire::Check-Valid-Until "false";\n' \
                >"$partial/etc/apt/apt.conf.d/99repo2singularity-valid-until"
            rm -f "$partial/etc/resolv.conf" && : >"$partial/etc/resolv.conf"
            rm -rf "${partial:?}"/var/cache/apt/archives/*.deb
            remove_tree "$ROOTFS"
            mv "$partial" "$ROOTFS"
        fi
        install_rootfs_scripts >/dev/null
    fi
    hash -r
    if ! found=$(apptainer_found); then
        die "apptainer: installed but \`apptainer version\` fails (try it by hand; see $SETUP_LOG)"
    fi
    say "apptainer: installed ($found, $(elapsed))"
}

# mksquashfs >= 4.5 reads a tar stream on stdin (-tar): the fast SIF conversion
# (archive_to_sif.py) streams the image into it; Debian 12 has 4.5.1, Debian 13 4.6.1.
SQUASHFS_MIN=4.5

mksquashfs_version() {
    command -v mksquashfs >/dev/null 2>&1 || return 1
    mksquashfs -version 2>/dev/null | awk 'NR == 1 { print $3; exit }'
}

mksquashfs_recent() {
    local v
    v=$(mksquashfs_version) || return 1
    [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$SQUASHFS_MIN" "$v" | sort -V | head -n 1)" = "$SQUASHFS_MIN" ]
}

check_squashfs_tools() {
    if mksquashfs_recent; then
        say "ok: mksquashfs ($(mksquashfs_version))"
    elif command -v mksquashfs >/dev/null 2>&1; then
        missing "mksquashfs: $(mksquashfs_version) is older than $SQUASHFS_MIN (no -tar): install squashfs-tools from a newer release"
    else
        missing "mksquashfs: not on PATH: run \`sudo bash $SELF install\` (or \`sudo apt-get install squashfs-tools\`)"
    fi
}

step_squashfs_tools() {
    step_begin
    if mksquashfs_recent; then
        say "squashfs-tools: present (mksquashfs $(mksquashfs_version))"
        return 0
    fi
    say "squashfs-tools: installing..."
    apt_install squashfs-tools
    mksquashfs_recent || die "squashfs-tools: installed, but mksquashfs $(mksquashfs_version || true) is older than $SQUASHFS_MIN"
    say "squashfs-tools: installed (mksquashfs $(mksquashfs_version), $(elapsed))"
}

step_account() {
    step_begin
    local joined
    getent group docker >/dev/null || logged groupadd --system docker \
        || die "account: cannot create the docker group; see $SETUP_LOG"
    if ! id "$R2S_USER" >/dev/null 2>&1; then
        logged useradd --create-home --home-dir "/home/$R2S_USER" --shell /bin/bash \
            --groups docker "$R2S_USER" || die "account: useradd $R2S_USER failed; see $SETUP_LOG"
        say "account $R2S_USER: created (uid $(id -u "$R2S_USER"), home /home/$R2S_USER, in group docker)"
    elif [[ " $(id -nG "$R2S_USER") " != *" docker "* ]]; then
        logged usermod -aG docker "$R2S_USER" || die "account: usermod -aG docker $R2S_USER failed"
        say "account $R2S_USER: added to group docker"
    else
        say "account $R2S_USER: present (uid $(id -u "$R2S_USER"), in group docker)"
    fi
    joined=$(ensure_apptainer_group)
    [ -z "$joined" ] || say "account $R2S_USER: ${joined%; }"
    (cd / && runuser -u "$R2S_USER" -- timeout 20 docker info >/dev/null 2>&1) \
        || die "account: '$R2S_USER' cannot reach the docker engine (is /var/run/docker.sock group docker? \`ls -l /var/run/docker.sock\`; a dockerd started before the docker group existed must be restarted)"
    (cd / && runuser -u "$R2S_USER" -- timeout 60 apptainer version >/dev/null 2>&1) \
        || die "account: '$R2S_USER' cannot run \`apptainer version\` (try \`runuser -u $R2S_USER -- apptainer version\`)"
}

cmd_install() {
    if [ "$(id -u)" != 0 ]; then
        run_checks || true
        if [ "$MISSING" -eq 0 ]; then
            say "install: nothing is missing for $(id -un); nothing to do"
            return 0
        fi
        say "install: $MISSING requirement(s) missing; installing needs root: run \`sudo bash $SELF install\`"
        return 1
    fi
    : >>"$SETUP_LOG"
    trap cleanup EXIT
    exec 9>"$LOCK_FILE"
    flock -n 9 || die "another setup/system.sh install is running (lock $LOCK_FILE)"
    local start=$SECONDS
    step_docker_engine
    step_buildx
    step_base_image
    step_apptainer
    step_squashfs_tools
    step_account
    if ! command -v git >/dev/null 2>&1; then
        say "git: installing..."
        apt_install git
        say "git: installed ($(git --version | awk '{print $3}'))"
    fi
    say "install: done in $((SECONDS - start))s"
    exec 9>&-
}

main() {
    case "${1:-}" in
        install) cmd_install ;;
        check) cmd_check ;;
        *) printf 'usage: %s install|check\n' "$SELF" >&2; exit 2 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
