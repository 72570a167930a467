#!/usr/bin/env bash
# install-edge.sh: makes this machine a Kokoa edge: packages, the agent, fallback certificate,
# WireGuard keys, registration (token in /etc/kokoa/edge.env, 0600), nginx.conf include lines,
# a systemd timer (or cron), one agent run. Re-running changes nothing that is already right.
set -Eeuo pipefail
shopt -s inherit_errexit nullglob
export LC_ALL=C
umask 022

PROGRAM=install-edge
SELF_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]:-$0}")" && pwd)
PACKAGES=(wireguard-tools nginx certbot jq curl openssl util-linux)
# Filled in (validated, shell-quoted) by the control plane that serves this script
# (GET /install/edge.sh): its URL and the SHA-256 of the agent.sh it serves. Empty in a checkout,
# where agent.sh is taken from next to this file.
SERVED_CONTROL_PLANE=''
SERVED_AGENT_SHA256=''

ROOT=""
CONTROL_PLANE=$SERVED_CONTROL_PLANE
BOOTSTRAP_TOKEN=${KOKOA_ENROLL_KEY:-${KOKOA_BOOTSTRAP_TOKEN:-}}
EMAIL=""
EDGE_FQDN=""
NAME=""
STAGING=0
INSTALL_PACKAGES=1
RUN_AGENT=1
INIT=auto
WG_IP=""
WG_ENDPOINT=""
WG_INTERFACE=${WG_INTERFACE:-kokoa0}
CHANGES=()
# The edge's hostname grammar, as agent.sh has it: RFC 1123 labels, at most 253 characters, the
# last label with a letter (so never an IP address).
RE_LABEL='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
RE_HOST="^(${RE_LABEL}\.)+${RE_LABEL}\$"

# Agent settings that, when set in this script's environment, are recorded in edge.env.
PASS_THROUGH=(NGINX_BIN CERTBOT_BIN ACME_SERVER ACME_STAGING_SERVER ACME_CA_BUNDLE HTTP_PORT
  HTTPS_PORT LISTEN_ADDRESSES POLL_INTERVAL CONTROL_PLANE_CA KOKOA_INSECURE_HTTP WG_NETWORK
  NGINX_GROUP)
# Every key edge.env may hold (same list as agent.sh).
ENV_KEYS=(CONTROL_PLANE_URL NODE_TOKEN CONFIG_DIR EMAIL NGINX_BIN EDGE_FQDN CERTBOT_BIN
  ACME_SERVER ACME_STAGING_SERVER ACME_STAGING ACME_CA_BUNDLE LETSENCRYPT_DIR STATE_DIR WEBROOT
  WG_INTERFACE HTTP_PORT HTTPS_PORT LISTEN_ADDRESSES FALLBACK_CERT FALLBACK_KEY POLL_INTERVAL
  KOKOA_INSECURE_HTTP CONTROL_PLANE_CA CERT_TIME_BUDGET RENEW_INTERVAL WG_NETWORK AGENT_SCHEMAS
  NGINX_GROUP)
declare -A ENV_VALUES=()
TMP_FILES=()
TMP=""

usage() {
  cat <<EOF
Usage: KOKOA_ENROLL_KEY=... $PROGRAM --control-plane URL --email E [--edge-fqdn F] [--name N]
                [--staging] [--wg-ip IP] [--wg-endpoint HOST:PORT] [--root DIR] [--no-packages]
                [--no-run] [--init auto|systemd|cron|loop]
       curl -fsSL https://CP/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY bash -s --
                --email E [--edge-fqdn F]     (the served copy knows CP and fetches agent.sh)

  --control-plane URL    the control plane (https; http only for loopback)${SERVED_CONTROL_PLANE:+;
                         default $SERVED_CONTROL_PLANE}
  KOKOA_ENROLL_KEY       (environment) an enrollment key from the UI, or the control plane's
                         KOKOA_BOOTSTRAP_TOKEN (also read from KOKOA_BOOTSTRAP_TOKEN)
  --bootstrap-token T    the same on the command line (every local user can read it there)
  --email E              ACME account e-mail
  --edge-fqdn F          this edge's own name (it gets a certificate)
  --name N               edge name at the control plane (default: the host name)
  --staging              always use the ACME staging server on this edge
  --wg-ip IP             this edge's WireGuard address (default: the control plane assigns one);
                         --wg-endpoint HOST:PORT its public endpoint
  --root DIR             install under DIR instead of / (for tests and images)
  --no-packages          do not run apt-get
  --no-run               do not run the agent at the end
  --init KIND            schedule the agent with a systemd timer, a cron job, or a loop started
                         now (no reboot survives it) (default: auto: systemd when it runs, else
                         cron when a cron daemon is installed, else loop)

Agent settings found in the environment (${PASS_THROUGH[*]})
are recorded in edge.env too. Re-running is safe: what is already right is left alone.
EOF
}

log() {
  printf '%s: %s\n' "$PROGRAM" "$*"
}

die() {
  printf '%s: %s\n' "$PROGRAM" "$*" >&2
  exit 1
}

cmd() {
  log "[#] $*"
  "$@"
}

changed() {
  CHANGES+=("$*")
  log "$*"
}

cleanup() {
  local rc=$?
  if ((${#TMP_FILES[@]})); then
    rm -f -- "${TMP_FILES[@]}"
  fi
  exit "$rc"
}

make_tmp() {
  TMP=$(mktemp "${1%/*}/.${1##*/}.tmp.XXXXXX") || return
  TMP_FILES+=("$TMP")
}

# Install stdin as $1 with mode $2, only if the content or mode differs. Returns 0 if unchanged,
# 0 and records a change otherwise.
put_file() {
  local dest=$1 mode=$2 what=$3 tmp
  # shellcheck disable=SC2310  # returns mktemp's status
  make_tmp "$dest" || return
  tmp=$TMP
  cat >"$tmp" || return
  if [[ -f $dest ]] && cmp -s -- "$tmp" "$dest"; then
    rm -f -- "$tmp"
    if [[ $(stat -c %a -- "$dest") != "${mode#0}" ]]; then
      chmod "$mode" -- "$dest" || return
      changed "fixed the mode of $what ($dest)"
    fi
    return 0
  fi
  chmod "$mode" -- "$tmp" || return
  sync -- "$tmp" || return
  mv -f -- "$tmp" "$dest" || return
  changed "wrote $what ($dest)"
}

ensure_dir() {
  local mode=$1 dir
  shift
  for dir in "$@"; do
    if [[ ! -d $dir ]]; then
      install -d -m "$mode" -- "$dir" || return
      changed "created $dir"
    fi
  done
}

# Secrets go to the control plane: plain http only to loopback, or when explicitly allowed.
check_secure_url() {
  local url=$1
  if [[ $url =~ ^https://[^[:space:]]+$ || ${KOKOA_INSECURE_HTTP:-} == 1 ]]; then
    return 0
  fi
  [[ $url =~ ^http://(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]+)?(/[^@[:space:]]*)?$ ]] \
    || die "refusing $url: use https (secrets would travel in clear), or set KOKOA_INSECURE_HTTP=1"
}

is_hostname() {
  local h=$1
  ((${#h} <= 253)) && [[ $h =~ $RE_HOST && ${h##*.} == *[a-z]* ]]
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --control-plane | --bootstrap-token | --email | --edge-fqdn | --name | --wg-ip | \
        --wg-endpoint | --root | --init)
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
          --control-plane) CONTROL_PLANE=${2%/} ;;
          --bootstrap-token)
            BOOTSTRAP_TOKEN=$2
            log "warning: --bootstrap-token puts the secret where every local user can read it" \
              "(/proc/PID/cmdline); set KOKOA_BOOTSTRAP_TOKEN in the environment instead"
            ;;
          --email) EMAIL=$2 ;;
          --edge-fqdn) EDGE_FQDN=${2,,} ;;
          --name) NAME=$2 ;;
          --wg-ip) WG_IP=$2 ;;
          --wg-endpoint) WG_ENDPOINT=$2 ;;
          --root) ROOT=${2%/} ;;
          --init) INIT=$2 ;;
        esac
        shift 2
        ;;
      --staging) STAGING=1 && shift ;;
      --no-packages) INSTALL_PACKAGES=0 && shift ;;
      --no-run) RUN_AGENT=0 && shift ;;
      *) die "unknown argument: $1 (see --help)" ;;
    esac
  done
  [[ -n $CONTROL_PLANE ]] || die "--control-plane is required"
  check_secure_url "$CONTROL_PLANE"
  [[ -n $EMAIL ]] || die "--email is required"
  [[ $EMAIL =~ ^[^[:space:]@]+@[^[:space:]@]+$ ]] || die "--email does not look like an address"
  [[ -z $ROOT || $ROOT == /* ]] || die "--root must be an absolute path"
  [[ $INIT =~ ^(auto|systemd|cron|loop)$ ]] || die "--init must be auto, systemd, cron or loop"
  if [[ $INIT == auto ]]; then
    INIT=loop
    if [[ -d /run/systemd/system ]]; then
      INIT=systemd
    elif [[ -x $ROOT/usr/sbin/cron || -n $ROOT ]]; then
      INIT=cron
    fi
  fi
  [[ $WG_INTERFACE =~ ^[A-Za-z0-9_=+.-]{1,15}$ ]] || die "bad WG_INTERFACE: $WG_INTERFACE"
  if [[ -n $EDGE_FQDN ]]; then
    # shellcheck disable=SC2310  # a predicate
    is_hostname "$EDGE_FQDN" || die "--edge-fqdn is not a valid hostname: $EDGE_FQDN"
  fi
  if [[ -z $NAME ]]; then
    NAME=${EDGE_FQDN:-$(hostname)}
  fi
  if [[ -z $WG_ENDPOINT && -n $EDGE_FQDN ]]; then
    WG_ENDPOINT=$EDGE_FQDN:51820
  fi
}

set_paths() {
  AGENT_BIN=$ROOT/usr/local/bin/kokoa-edge-agent
  ETC_KOKOA=$ROOT/etc/kokoa
  ENV_FILE=$ETC_KOKOA/edge.env
  FALLBACK_CERT=$ETC_KOKOA/fallback.crt
  FALLBACK_KEY=$ETC_KOKOA/fallback.key
  NGINX_CONF=$ROOT/etc/nginx/nginx.conf
  CONFIG_DIR=$ROOT/etc/nginx/kokoa
  STATE_DIR=$ROOT/var/lib/kokoa-edge
  WEBROOT=$ROOT/var/www/kokoa-acme
  LETSENCRYPT_DIR=$ROOT/etc/letsencrypt
  WG_DIR=$ROOT/etc/wireguard
  WG_CONF=$WG_DIR/$WG_INTERFACE.conf
}

install_packages() {
  if ((!INSTALL_PACKAGES)); then
    return 0
  fi
  local pkg missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    cmd apt-get update -q
    # No recommends: wireguard-tools would pull in a kernel image where none is installed.
    DEBIAN_FRONTEND=noninteractive cmd apt-get install -y -q --no-install-recommends \
      "${missing[@]}"
    changed "installed packages: ${missing[*]}"
  fi
}

check_dependencies() {
  local tool
  for tool in curl jq openssl wg flock install mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required (apt-get install ${PACKAGES[*]})"
  done
  if [[ -z $SERVED_AGENT_SHA256 ]]; then
    [[ -f $SELF_DIR/agent.sh ]] || die "agent.sh not found next to $PROGRAM ($SELF_DIR)"
  fi
}

install_agent() {
  local source=$SELF_DIR/agent.sh
  ensure_dir 0755 "$ROOT/usr/local/bin"
  if [[ -n $SERVED_AGENT_SHA256 ]]; then
    # shellcheck disable=SC2310  # each step in fetch_agent ends in || return
    fetch_agent || return
    source=$TMP
  fi
  put_file "$AGENT_BIN" 0755 "the agent" <"$source"
}

# The served installer takes agent.sh from the control plane that served it, over verified TLS
# (curl's system CAs, or CONTROL_PLANE_CA), and installs it only if its SHA-256 is the one the
# control plane put into this script.
fetch_agent() {
  local url=$CONTROL_PLANE/install/agent.sh sum out
  # shellcheck disable=SC2310  # returns mktemp's status
  make_tmp "$AGENT_BIN" || return
  log "[#] curl $url"
  if ! out=$(curl --fail --silent --show-error --max-time 60 --retry 2 --proto =https,http \
      ${CONTROL_PLANE_CA:+--cacert "$CONTROL_PLANE_CA"} -o "$TMP" -- "$url" 2>&1); then
    die "cannot fetch the agent from $url: ${out##*$'\n'}; nothing installed"
  fi
  sum=$(sha256sum <"$TMP") || return
  [[ ${sum%% *} == "$SERVED_AGENT_SHA256" ]] || die "the agent from $url has SHA-256" \
    "${sum%% *}, not the $SERVED_AGENT_SHA256 this installer was served with; nothing installed"
}

make_fallback_cert() {
  if [[ -s $FALLBACK_CERT && -s $FALLBACK_KEY ]]; then
    return 0
  fi
  local out key crt
  # shellcheck disable=SC2310  # returns mktemp's status
  make_tmp "$FALLBACK_KEY" || return
  key=$TMP
  # shellcheck disable=SC2310  # returns mktemp's status
  make_tmp "$FALLBACK_CERT" || return
  crt=$TMP
  if ! out=$(openssl req -x509 -newkey rsa:2048 -nodes -days 3650 \
    -subj "/CN=${EDGE_FQDN:-kokoa-edge-fallback}" -keyout "$key" -out "$crt" 2>&1); then
    printf '%s\n' "$out" >&2
    die "openssl could not create the fallback certificate; nothing installed for it"
  fi
  chmod 0600 -- "$key" && chmod 0644 -- "$crt" || return
  mv -f -- "$key" "$FALLBACK_KEY" && mv -f -- "$crt" "$FALLBACK_CERT" || return
  changed "created the fallback certificate $FALLBACK_CERT"
}

make_wireguard_keys() {
  local private public address
  if [[ $WG_INTERFACE == none ]]; then
    return 0
  fi
  ensure_dir 0700 "$WG_DIR"
  if [[ ! -s $WG_DIR/$WG_INTERFACE.key ]]; then
    private=$(umask 077 && wg genkey) || return
    put_file "$WG_DIR/$WG_INTERFACE.key" 0600 "the WireGuard private key" \
      < <(printf '%s\n' "$private")
  fi
  IFS= read -r private <"$WG_DIR/$WG_INTERFACE.key" || return
  public=$(printf '%s\n' "$private" | wg pubkey) || return
  put_file "$WG_DIR/$WG_INTERFACE.pub" 0644 "the WireGuard public key" \
    < <(printf '%s\n' "$public")
  WG_PUBLIC_KEY=$public
  if [[ -f $WG_CONF ]]; then
    address=$(sed -n 's/^Address = //p' -- "$WG_CONF")
    if [[ -n $WG_IP && -n $address && $address != "$WG_IP" ]]; then
      die "this edge is registered with WireGuard address $address; to change it, revoke" \
        "the edge in the control plane, remove $WG_CONF and re-run"
    fi
    WG_IP=${WG_IP:-$address}
  fi
}

# Write the interface config, with the address given, kept or assigned at registration.
write_wireguard_conf() {
  local private
  if [[ $WG_INTERFACE == none ]]; then
    return 0
  fi
  IFS= read -r private <"$WG_DIR/$WG_INTERFACE.key" || return
  put_file "$WG_CONF" 0600 "the WireGuard interface config" < <(
    printf '# Kokoa edge WireGuard interface (install-edge.sh); the agent manages its peers.\n'
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\n' "$private"
    if [[ -n $WG_IP ]]; then
      printf 'Address = %s\n' "$WG_IP"
    fi
  )
}

# Read edge.env (KEY=VALUE, allow-listed keys only) into ENV_VALUES.
read_env_file() {
  local line key value k
  [[ -f $ENV_FILE ]] || return 0
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*)=(.*)$ ]] || continue
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    for k in "${ENV_KEYS[@]}"; do
      if [[ $k == "$key" ]]; then
        ENV_VALUES[$key]=$value
      fi
    done
  done <"$ENV_FILE"
}

register() {
  local body code response token out assigned network
  if [[ -n ${ENV_VALUES[NODE_TOKEN]:-} && ${ENV_VALUES[CONTROL_PLANE_URL]:-} == "$CONTROL_PLANE" ]]
  then
    return 0
  fi
  [[ -n $BOOTSTRAP_TOKEN ]] || die "--bootstrap-token is required to register this edge"
  body=$(BT=$BOOTSTRAP_TOKEN NAME=$NAME KEY=${WG_PUBLIC_KEY:-} IP=$WG_IP EP=$WG_ENDPOINT \
    jq -n -c '{bootstrap_token: env.BT, name: env.NAME}
      + (if env.KEY != "" then {wg_public_key: env.KEY} else {} end)
      + (if env.IP != "" then {wg_ip: env.IP} else {} end)
      + (if env.EP != "" then {wg_endpoint: env.EP} else {} end)') || return
  # shellcheck disable=SC2310  # returns mktemp's status
  make_tmp "$STATE_DIR/register.json" || return
  response=$TMP
  log "[#] curl -X POST $CONTROL_PLANE/api/v1/edge-nodes/register (name $NAME)"
  if ! code=$(printf '%s' "$body" | curl --silent --show-error --max-time 30 \
    --proto =http,https -o "$response" -w '%{http_code}' -X POST \
    -H 'Content-Type: application/json' --data-binary @- \
    "$CONTROL_PLANE/api/v1/edge-nodes/register" 2>&1); then
    die "cannot reach the control plane at $CONTROL_PLANE: ${code##*$'\n'}; nothing registered"
  fi
  if [[ $code != 201 ]]; then
    out=$(jq -r '.error.message // empty' -- "$response" 2>/dev/null) || true
    die "registration refused (HTTP $code${out:+: $out})$([[ $code == 409 ]] \
      && printf '; the name %s is taken: pass --name, or revoke the old edge' "$NAME")"
  fi
  token=$(jq -r '.token // empty' -- "$response") || return
  [[ $token =~ ^[A-Za-z0-9._~+/=-]{16,512}$ ]] || die "the control plane returned no usable token"
  ENV_VALUES[NODE_TOKEN]=$token
  assigned=$(jq -r '.wg_ip // empty' -- "$response") || return
  network=$(jq -r '.wg_network // empty' -- "$response") || return
  if [[ -n $assigned ]]; then
    [[ $assigned =~ ^[0-9a-f.:]{2,45}$ ]] || die "the control plane assigned a strange address"
    WG_IP=$assigned
  fi
  if [[ -n $network ]]; then
    [[ $network =~ ^[0-9a-f.:]{2,45}/[0-9]{1,3}$ ]] || die "the control plane sent a strange network"
    ENV_VALUES[WG_NETWORK]=$network      # the agent refuses peers and upstreams outside it
  fi
  changed "registered this edge as $NAME (id $(jq -r '.id' -- "$response"))"
}

write_env_file() {
  local key
  ENV_VALUES[CONTROL_PLANE_URL]=$CONTROL_PLANE
  ENV_VALUES[EMAIL]=$EMAIL
  ENV_VALUES[CONFIG_DIR]=$CONFIG_DIR
  ENV_VALUES[STATE_DIR]=$STATE_DIR
  ENV_VALUES[WEBROOT]=$WEBROOT
  ENV_VALUES[LETSENCRYPT_DIR]=$LETSENCRYPT_DIR
  ENV_VALUES[FALLBACK_CERT]=$FALLBACK_CERT
  ENV_VALUES[FALLBACK_KEY]=$FALLBACK_KEY
  ENV_VALUES[WG_INTERFACE]=$WG_INTERFACE
  if [[ -n $EDGE_FQDN ]]; then
    ENV_VALUES[EDGE_FQDN]=$EDGE_FQDN
  fi
  if ((STAGING)); then
    ENV_VALUES[ACME_STAGING]=1
  else
    unset 'ENV_VALUES[ACME_STAGING]'
  fi
  for key in "${PASS_THROUGH[@]}"; do
    if [[ -n ${!key:-} ]]; then
      ENV_VALUES[$key]=${!key}
    fi
  done
  put_file "$ENV_FILE" 0600 "the agent settings" < <(
    printf '# Kokoa edge agent settings, written by install-edge.sh. KEY=VALUE, never sourced.\n'
    for key in "${ENV_KEYS[@]}"; do
      if [[ -n ${ENV_VALUES[$key]:-} ]]; then
        printf '%s=%s\n' "$key" "${ENV_VALUES[$key]}"
      fi
    done
  )
}

# Before anything is registered or written: nginx.conf must not set what the agent's files set
# (hash sizes that grow with the hostnames); nginx refuses a directive set twice.
check_nginx_conf() {
  [[ -f $NGINX_CONF ]] || die "$NGINX_CONF not found; is nginx installed?"
  if grep -HnE '^[[:space:]]*(server_names|map)_hash_(max|bucket)_size' -- "$NGINX_CONF" \
      "$ROOT"/etc/nginx/conf.d/*.conf 2>/dev/null; then
    die "the lines above set nginx hash sizes that Kokoa's files manage; remove them and re-run"
  fi
}

hook_nginx_conf() {
  local include1="include $CONFIG_DIR/*.conf;" include2="include $CONFIG_DIR/servers/*.conf;"
  local site=$ROOT/etc/nginx/sites-enabled/default sum
  [[ -f $NGINX_CONF ]] || die "$NGINX_CONF not found; is nginx installed?"
  if ! grep -qF -- "$include1" "$NGINX_CONF"; then
    grep -qE '^[[:space:]]*http[[:space:]]*\{' "$NGINX_CONF" \
      || die "no 'http {' line in $NGINX_CONF; add '$include1 $include2' to it by hand"
    put_file "$NGINX_CONF" "$(stat -c %a -- "$NGINX_CONF")" "the include lines in nginx.conf" \
      < <(awk -v a="    $include1" -v b="    $include2" '
        { print }
        !done && /^[[:space:]]*http[[:space:]]*\{/ {
          print "    # Kokoa edge (install-edge.sh): files written by kokoa-edge-agent"
          print a; print b; done = 1 }' "$NGINX_CONF")
  fi
  # Debian's default site claims default_server on port 80, which the agent's default.conf owns.
  # Only the untouched package file is switched off: an operator's own site there stays.
  if [[ -L $site ]]; then
    sum=$(md5sum <"$site") || return
    if ! dpkg-query -W -f='${Conffiles}\n' nginx-common 2>/dev/null \
        | grep -qx " /etc/nginx/sites-available/default ${sum%% *}"; then
      die "$site is not Debian's stock site; move its default_server elsewhere (or remove" \
        "the link) and re-run; nothing was changed in it"
    fi
    rm -f -- "$site" || return
    changed "disabled Debian's stock default nginx site (sites-enabled/default)"
  fi
}

install_schedule() {
  local agent=$AGENT_BIN env=$ENV_FILE
  if [[ $INIT == systemd ]]; then
    ensure_dir 0755 "$ROOT/etc/systemd/system"
    put_file "$ROOT/etc/systemd/system/kokoa-edge-agent.service" 0644 "the agent service" <<EOF
[Unit]
Description=Kokoa edge agent (one poll/apply)
After=network-online.target nginx.service
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=$agent --env-file $env once
TimeoutStartSec=30min
NoNewPrivileges=yes
PrivateTmp=yes
ProtectHome=yes
UMask=0022
EOF
    put_file "$ROOT/etc/systemd/system/kokoa-edge-agent.timer" 0644 "the agent timer" <<EOF
[Unit]
Description=Run the Kokoa edge agent every 30 seconds

[Timer]
OnBootSec=15s
OnUnitInactiveSec=30s
AccuracySec=1s
RandomizedDelaySec=5s

[Install]
WantedBy=timers.target
EOF
    ensure_dir 0755 "$ROOT/etc/systemd/system/nginx.service.d"
    put_file "$ROOT/etc/systemd/system/nginx.service.d/kokoa.conf" 0644 \
      "nginx's drop-in that repairs an interrupted apply before nginx starts" <<EOF
# A power loss in the middle of an agent apply could leave files nginx refuses at boot:
# put the previous ones back first ("-": never keep nginx from starting).
[Service]
ExecStartPre=-$agent --env-file $env recover
EOF
    if [[ -z $ROOT ]] && ! systemctl is-enabled --quiet kokoa-edge-agent.timer 2>/dev/null; then
      cmd systemctl daemon-reload
      cmd systemctl enable --now kokoa-edge-agent.timer
      changed "enabled kokoa-edge-agent.timer"
    fi
  elif [[ $INIT == loop ]]; then
    return 0                            # started by run_agent, once WireGuard is up
  else
    ensure_dir 0755 "$ROOT/etc/cron.d"
    put_file "$ROOT/etc/cron.d/kokoa-edge-agent" 0644 "the agent cron job" <<EOF
# Kokoa edge agent: poll the control plane every minute (install-edge.sh).
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
* * * * * root $agent --env-file $env once >/dev/null 2>&1
EOF
  fi
}

# Neither systemd nor cron (a container, a chroot): the agent's own loop (`run`), started now in
# its own session under a lock, so that a second install finds it running. It does not survive
# a reboot: start it again from the boot scripts, or install cron.
start_loop() {
  local lock=$ROOT/run/kokoa-edge-agent.loop.lock log=$ROOT/var/log/kokoa-edge-agent.log
  if ! flock -n "$lock" true; then
    log "the agent loop is running already (lock $lock)"
    return 0
  fi
  log "[#] setsid flock -n $lock $AGENT_BIN --env-file $ENV_FILE run >>$log &"
  setsid flock -n "$lock" "$AGENT_BIN" --env-file "$ENV_FILE" run </dev/null >>"$log" 2>&1 &
  changed "started the agent loop (no systemd, no cron; log $log; not kept over a reboot)"
}

# Brings the edge's interface up now and at boot; the agent then keeps its peers in step.
bring_up_wireguard() {
  if [[ -n $ROOT || $WG_INTERFACE == none ]] || wg show "$WG_INTERFACE" >/dev/null 2>&1; then
    return 0
  fi
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    # shellcheck disable=SC2310  # cmd runs one command; its status is that command's
    cmd systemctl enable --now "wg-quick@$WG_INTERFACE" \
      || die "could not start wg-quick@$WG_INTERFACE; see journalctl -u wg-quick@$WG_INTERFACE"
  else
    # shellcheck disable=SC2310  # cmd runs one command; its status is that command's
    cmd wg-quick up "$WG_INTERFACE" || die "wg-quick up $WG_INTERFACE failed"
  fi
  changed "brought up WireGuard interface $WG_INTERFACE"
}

# The agent reloads nginx, so nginx must run. Debian starts it when the package is installed,
# except where no init system runs (a container, a chroot: invoke-rc.d refuses to): start it
# here then (and it is not started again at boot: the same goes for the agent's loop).
start_nginx() {
  local pid=""
  if [[ -n $ROOT || -d /run/systemd/system ]]; then
    return 0
  fi
  if [[ -s /run/nginx.pid ]]; then
    IFS= read -r pid </run/nginx.pid || true
  fi
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    return 0
  fi
  # shellcheck disable=SC2310  # cmd runs one command; its status is that command's
  cmd nginx || die "nginx does not start (see above); the agent is installed but cannot apply"
  changed "started nginx (no init system runs here)"
}

run_agent() {
  local rc=0
  if ((RUN_AGENT)); then
    log "[#] $AGENT_BIN --env-file $ENV_FILE once"
    "$AGENT_BIN" --env-file "$ENV_FILE" once || rc=$?
  fi
  if [[ $INIT == loop ]]; then
    start_loop
  fi
  ((rc == 0)) || die "installed, but the first agent run failed (see above); the $INIT will retry"
}

main() {
  trap cleanup EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  parse_args "$@"
  if [[ -z $ROOT && $EUID -ne 0 ]]; then
    die "run me as root (or with --root DIR)"
  fi
  set_paths
  install_packages
  check_dependencies
  check_nginx_conf
  ensure_dir 0755 "$ETC_KOKOA" "$CONFIG_DIR" "$CONFIG_DIR/servers" "$WEBROOT" "$LETSENCRYPT_DIR"
  ensure_dir 0700 "$STATE_DIR"
  install_agent
  make_fallback_cert
  make_wireguard_keys
  read_env_file
  register
  write_wireguard_conf
  write_env_file
  hook_nginx_conf
  install_schedule
  bring_up_wireguard
  start_nginx
  if ((${#CHANGES[@]})); then
    log "done: ${#CHANGES[@]} change(s)"
    if [[ -n ${WG_PUBLIC_KEY:-} ]]; then
      log "this edge's WireGuard public key is $WG_PUBLIC_KEY"
    fi
  else
    log "done: nothing to change"
  fi
  run_agent
}

main "$@"
