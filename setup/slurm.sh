#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the Slurm profile and its tests.
#
#   bash setup/slurm.sh        (as root) install only what is missing (munge, slurmctld, slurmd,
#                              slurm-client), write /etc/slurm/slurm.conf for one node named
#                              $(hostname) with a default partition `debug`, start munged,
#                              slurmctld and slurmd in the background (no systemd), and wait
#                              until `sinfo` shows the node idle.
#
# Run it again at any time: it changes nothing that is already in place. Long output goes to
# /var/log/repo2singularity-setup.log; the daemons log under /var/log/slurm/.
set -euo pipefail

SETUP_LOG=/var/log/repo2singularity-setup.log
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=debug
WAIT_SECONDS=${R2S_SLURM_WAIT:-60}
NODE=$(hostname)

say() { printf 'slurm: %s\n' "$*"; }
die() { printf 'slurm: ERROR: %s\n' "$*" >&2; exit 1; }
logged() {
    printf '\n### %s: %s\n' "$(date '+%F %T')" "$*" >>"$SETUP_LOG"
    "$@" >>"$SETUP_LOG" 2>&1
}
running() { [ -r "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"

# ---- packages
missing=()
command -v munged >/dev/null 2>&1 || missing+=(munge)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}..."
    logged apt-get update || die "apt-get update failed; see $SETUP_LOG"
    # no daemon may start from a package's maintainer script: they are started below
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    DEBIAN_FRONTEND=noninteractive logged apt-get install -y --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed; see $SETUP_LOG"
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
else
    say "packages: munge, slurmctld, slurmd, slurm-client already installed ($(sinfo --version))"
fi

# ---- munge
for dir in /run/munge /var/log/munge /var/lib/munge /etc/munge; do
    mkdir -p "$dir"
    chown munge:munge "$dir"
done
chmod 0755 /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "munge: creating a key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if running /run/munge/munged.pid; then
    say "munge: munged already running (pid $(cat /run/munge/munged.pid))"
else
    say "munge: starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start; see /var/log/munge/munged.log"
fi

# ---- slurm.conf
# RealMemory must not exceed what slurmd finds, else the node is drained; leave 10 % to the system
real_memory=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
cpus=$(nproc)
mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
wanted=$(
    cat <<EOF
# Written by repo2singularity setup/slurm.sh: one node, no accounting database, no cgroups.
ClusterName=r2s
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
# finished jobs stay visible to squeue this long: the executor plugin polls with squeue
MinJobAge=300
NodeName=$NODE CPUs=$cpus RealMemory=$real_memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$wanted" ]; then
    say "config: $CONF up to date (node $NODE, $cpus CPUs, ${real_memory} MB, partition $PARTITION)"
else
    say "config: writing $CONF (node $NODE, $cpus CPUs, ${real_memory} MB, partition $PARTITION)"
    printf '%s\n' "$wanted" >"$CONF"
    chmod 0644 "$CONF"
    changed=1
fi

# ---- daemons
for daemon in slurmctld slurmd; do
    pid_file=/run/$daemon.pid
    if running "$pid_file" && [ "$changed" = 1 ]; then
        say "$daemon: restarting for the new configuration"
        pid=$(cat "$pid_file")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    if running "$pid_file"; then
        say "$daemon: already running (pid $(cat "$pid_file"))"
    else
        say "$daemon: starting"
        # the daemons fork into the background themselves; no inherited descriptors
        logged setsid "/usr/sbin/$daemon" </dev/null || die "$daemon did not start; see /var/log/slurm/$daemon.log"
    fi
done

# ---- wait for the node
say "waiting for node $NODE to be idle in partition $PARTITION..."
deadline=$((SECONDS + WAIT_SECONDS))
while :; do
    state=$(sinfo --noheader --partition "$PARTITION" --nodes "$NODE" --format '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated) break ;;
        drained* | draining* | down*)
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "node $NODE is '${state:-not listed}' after ${WAIT_SECONDS}s; see /var/log/slurm/"
    sleep 1
done
say "ready: node $NODE is $state ($(sinfo --version))"
