#!/usr/bin/env bash
# Make this Debian 12/13 machine the build service for many users (docs/build-service.md):
#
#   bash setup.sh build-service [--account NAME] [--listen ADDRESS] [--port N] [--name HOST]
#                               [--cert FILE --key FILE]                                (as root)
#
# Installs only what is missing: what a builder needs (Docker, buildx, the base image, Apptainer,
# squashfs-tools, git: setup/builder.sh's provision), a copy of this checkout in
# /opt/repo2singularity/service with its Python environment, the service's account (default
# r2s-service, in the groups docker and r2s-apptainer) owning /srv/repo2singularity-service,
# /etc/repo2singularity/service.yaml (kept when present), a TLS certificate (the one given, else
# a self-signed one made once, whose SHA-256 fingerprint is printed), and
# /usr/local/bin/repo2singularity-service. It then (re)starts the service: as a systemd unit
# where systemd runs, else as a plain process under a small supervisor that restarts it when it
# dies (log /var/log/repo2singularity-service.log). It ends with the service's URL, the
# certificate's fingerprint and how to add a user and get the user's token.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/.." && pwd)
# Docker, Apptainer, ... and the build account's checks (apt_install, say, die, logged, ...)
# shellcheck source=builder.sh
source "$HERE/builder.sh"

APP=${R2S_SERVICE_APP:-/opt/repo2singularity/service}
ETC=${R2S_SERVICE_ETC:-/etc/repo2singularity}
WORK=${R2S_SERVICE_WORK:-/srv/repo2singularity-service}
SETTINGS=$ETC/service.yaml
COMMAND=/usr/local/bin/repo2singularity-service
SUPERVISOR=/usr/local/lib/repo2singularity/supervise-service
PIDFILE=/run/repo2singularity-service.pid
SERVICE_LOG=/var/log/repo2singularity-service.log
UNIT=/etc/systemd/system/repo2singularity-service.service
START_WAIT=60

usage() {
    printf 'usage: bash setup.sh build-service [--account NAME] [--listen ADDRESS] [--port N] [--name HOST] [--cert FILE --key FILE]\n' >&2
    exit 2
}

# ---------------------------------------------------------------- the program and its settings

step_app() {
    step_begin
    # a copy, so that the running service does not change under it while the checkout is edited
    local partial=$APP.partial
    rm -rf "$partial"
    mkdir -p "$partial"
    tar -C "$CHECKOUT" --exclude=./.git --exclude=./.venv --exclude=./results --exclude=./.snakemake \
        --exclude='__pycache__' -cf - . | tar -C "$partial" -xf -
    if [ -d "$APP/.venv" ]; then
        mv "$APP/.venv" "$partial/.venv"  # python.sh updates it only if requirements.txt changed
    fi
    rm -rf "$APP"
    mv "$partial" "$APP"
    chown -R root:root "$APP"
    chmod -R go-w,a+rX "$APP"
    # the system's python (root's own, e.g. pyenv, may not run for the account)
    (cd "$APP" && env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 bash setup/python.sh) >>"$SETUP_LOG" 2>&1 \
        || die "python environment: setup/python.sh failed in $APP; see $SETUP_LOG"
    say "program: $APP ($(elapsed))"
}

step_command() {
    mkdir -p "$(dirname "$SUPERVISOR")"
    # as root it runs as the service's account, so that what it writes stays the account's
    cat >"$COMMAND.partial" <<SCRIPT
#!/bin/sh
# repo2singularity-service (made by setup.sh build-service): serve | add-user NAME
if [ "\$(id -u)" = 0 ]; then
    exec runuser -u $ACCOUNT -- env PYTHONPATH=$APP/workflow/scripts PYTHONDONTWRITEBYTECODE=1 $APP/.venv/bin/python -m repo2singularity.service --config $SETTINGS "\$@"
fi
PYTHONPATH=$APP/workflow/scripts PYTHONDONTWRITEBYTECODE=1 exec $APP/.venv/bin/python -m repo2singularity.service --config $SETTINGS "\$@"
SCRIPT
    chmod 0755 "$COMMAND.partial"
    mv "$COMMAND.partial" "$COMMAND"
    say "command: $COMMAND"
}

step_tls() {
    local tls=$ETC/tls
    mkdir -p "$tls"
    chmod 0755 "$ETC" "$tls"
    if [ -n "$CERT" ]; then
        openssl x509 -noout -in "$CERT" 2>/dev/null || die "--cert: $CERT is not a PEM certificate"
        openssl pkey -noout -in "$KEY" 2>/dev/null || die "--key: $KEY is not a PEM private key"
        install -m 0644 -o root -g root "$CERT" "$tls/service.crt"
        install -m 0640 -o root -g "$ACCOUNT" "$KEY" "$tls/service.key"
        say "TLS: the certificate given ($CERT)"
    elif [ -s "$tls/service.crt" ] && [ -s "$tls/service.key" ] && openssl x509 -noout -checkhost "$NAME" -in "$tls/service.crt" 2>/dev/null | grep -q ' does match '; then
        say "TLS: present ($tls/service.crt)"
    elif [ -s "$tls/service.crt" ] && ! self_signed "$tls/service.crt"; then
        # a site's certificate is never replaced; clients checking the name will refuse it
        say "TLS: present ($tls/service.crt), but it does not name $NAME: clients will refuse it (give --cert and --key)"
    else
        if [ -s "$tls/service.crt" ]; then
            # a self-signed certificate made for another name (set-up run again with --name): a new
            # one, the old pair kept beside it
            mv -f "$tls/service.crt" "$tls/service.crt.replaced"
            mv -f "$tls/service.key" "$tls/service.key.replaced" 2>/dev/null || true
            say "TLS: $tls/service.crt did not name $NAME; kept as service.crt.replaced, users need the new one"
        fi
        local names="DNS:$NAME,DNS:localhost,IP:127.0.0.1" address
        for address in $(hostname -I 2>/dev/null || true); do
            names="$names,IP:$address"
        done
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 -subj "/CN=$NAME" \
            -addext "subjectAltName=$names" -keyout "$tls/service.key.partial" -out "$tls/service.crt.partial" >>"$SETUP_LOG" 2>&1 \
            || die "TLS: openssl could not make a certificate; see $SETUP_LOG"
        chown "root:$ACCOUNT" "$tls/service.key.partial"
        chmod 0640 "$tls/service.key.partial"
        chmod 0644 "$tls/service.crt.partial"
        mv "$tls/service.key.partial" "$tls/service.key"
        mv "$tls/service.crt.partial" "$tls/service.crt"
        say "TLS: made a self-signed certificate for $names"
    fi
}

self_signed() {
    [ "$(openssl x509 -noout -subject -nameopt RFC2253 -in "$1" | cut -d= -f2-)" = "$(openssl x509 -noout -issuer -nameopt RFC2253 -in "$1" | cut -d= -f2-)" ]
}

step_settings() {
    mkdir -p "$WORK"
    chown "$ACCOUNT:" "$WORK"
    chmod 0700 "$WORK"
    if [ -f "$SETTINGS" ] && [ -z "$CHANGED" ]; then
        say "settings: kept $SETTINGS"
    else
        cat >"$SETTINGS.partial" <<YAML
# repo2singularity build service; every key, its meaning and default:
# $APP/workflow/schemas/service.schema.yaml
listen_address: "$LISTEN"
port: $PORT
tls_cert: $ETC/tls/service.crt
tls_key: $ETC/tls/service.key
work_dir: $WORK
public_url: "https://$NAME:$PORT"
max_builds: 2
max_builds_per_user: 4
max_total_builds: 50
heartbeat_seconds: 15
YAML
        chown "root:$ACCOUNT" "$SETTINGS.partial"
        chmod 0640 "$SETTINGS.partial"
        mv "$SETTINGS.partial" "$SETTINGS"
        say "settings: wrote $SETTINGS"
    fi
    "$COMMAND" check >>"$SETUP_LOG" 2>&1 || die "settings: $("$COMMAND" check 2>&1 | tail -1)"
}

# ---------------------------------------------------------------- running it, supervised

step_supervisor() {
    cat >"$SUPERVISOR.partial" <<'SCRIPT'
#!/bin/bash
# Keeps the build service running where there is no systemd: restarts it when it dies, and
# passes SIGTERM on (the service then fails its unfinished builds cleanly and exits).
child=
stop() { [ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0; }
trap stop TERM INT
while true; do
    /usr/local/bin/repo2singularity-service serve &
    child=$!
    wait "$child"
    status=$?
    echo "$(date '+%F %T') supervisor: the service ended (status $status); restarting in 2 s"
    sleep 2
done
SCRIPT
    chmod 0755 "$SUPERVISOR.partial"
    mv "$SUPERVISOR.partial" "$SUPERVISOR"
}

supervised_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/cmdline" 2>/dev/null | tr '\0' ' ')" = "/bin/bash $SUPERVISOR " ] && printf '%s' "$pid"
}

step_start() {
    if [ -d /run/systemd/system ]; then
        cat >"$UNIT" <<UNIT
[Unit]
Description=repo2singularity build service
After=network-online.target docker.service
Wants=network-online.target

[Service]
ExecStart=$COMMAND serve
Restart=on-failure
RestartSec=2
KillMode=mixed
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
UNIT
        systemctl daemon-reload
        systemctl enable repo2singularity-service >/dev/null 2>&1
        systemctl restart repo2singularity-service || die "service: systemctl restart failed (journalctl -u repo2singularity-service)"
        say "service: (re)started by systemd (repo2singularity-service.service)"
    else
        step_supervisor
        local pid waited=0
        if pid=$(supervised_pid); then
            kill -TERM "$pid"
            while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
            say "service: stopped the running one (pid $pid) to start the new one"
        fi
        # its own session, without the set-up's lock descriptor
        setsid "$SUPERVISOR" </dev/null >>"$SERVICE_LOG" 2>&1 9>&- &
        echo $! >"$PIDFILE"
        say "service: started, supervised (pid $(cat "$PIDFILE"), log $SERVICE_LOG; stop: kill \$(cat $PIDFILE))"
    fi
    local waited=0
    until curl -fsS --cacert "$ETC/tls/service.crt" --resolve "$NAME:$PORT:127.0.0.1" -o /dev/null "https://$NAME:$PORT/badge.svg" 2>/dev/null \
        || curl -fsS -k -o /dev/null "https://127.0.0.1:$PORT/badge.svg" 2>/dev/null; do
        [ "$waited" -lt "$START_WAIT" ] || die "service: not answering on port $PORT after ${START_WAIT}s; see $SERVICE_LOG"
        sleep 1
        waited=$((waited + 1))
    done
}

report() {
    local fingerprint
    fingerprint=$(openssl x509 -noout -fingerprint -sha256 -in "$ETC/tls/service.crt" | cut -d= -f2)
    say ""
    say "build service ready: https://$NAME:$PORT  (listening on $LISTEN:$PORT, as $ACCOUNT)"
    say "  certificate: $ETC/tls/service.crt"
    say "  SHA-256 fingerprint: $fingerprint"
    say "  (clients check it: copy the certificate to the login node and set builder: ca_file:)"
    say ""
    say "add a user (prints the user's token once; run again to replace a lost token):"
    say "  $COMMAND add-user NAME"
    say "the user then sets, on the login node:"
    say "  export R2S_SERVICE_TOKEN=<the token>"
    say "  builder: {kind: http, url: https://$NAME:$PORT, token_env: R2S_SERVICE_TOKEN, ca_file: service.crt}"
    say "or opens https://$NAME:$PORT/ in a browser and signs in with the token"
}

main() {
    [ "$(id -u)" = 0 ] || die "setup.sh build-service installs packages, an account and a service: run it as root"
    ACCOUNT=r2s-service LISTEN=0.0.0.0 PORT=8443 NAME=$(hostname -f 2>/dev/null || hostname) CERT="" KEY="" CHANGED=""
    while [ "$#" -gt 0 ]; do
        [ "$#" -ge 2 ] || usage
        case "$1" in
            --account) ACCOUNT=$2 ;;
            --listen) LISTEN=$2 CHANGED=1 ;;
            --port) PORT=$2 CHANGED=1 ;;
            --name) NAME=$2 CHANGED=1 ;;
            --cert) CERT=$2 ;;
            --key) KEY=$2 ;;
            *) usage ;;
        esac
        shift 2
    done
    [[ "$ACCOUNT" =~ ^[a-z_][a-z0-9_-]*$ ]] && [ "$ACCOUNT" != root ] || die "--account: '$ACCOUNT' is not a valid account name (nor root)"
    [[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port: '$PORT' is not a port number"
    [[ "$NAME" =~ ^[A-Za-z0-9.-]+$ ]] || die "--name: '$NAME' is not a host name"
    [ -z "$CERT$KEY" ] || { [ -r "$CERT" ] && [ -r "$KEY" ]; } || die "--cert and --key go together, and must be readable"
    local start=$SECONDS
    provision
    exec 9>&-
    step_build_account "$ACCOUNT"
    step_tool openssl openssl
    step_tool curl curl
    step_app
    step_command
    step_tls
    step_settings
    step_start
    say "build service: done in $((SECONDS - start))s"
    report
}

main "$@"
