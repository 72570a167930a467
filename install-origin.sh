#!/usr/bin/env bash
# install-origin.sh: set up a Kokoa origin (a home or office server) as a WireGuard peer of the
# edges. Installs wireguard-tools, writes /etc/wireguard/<iface>.conf (0600) from the control
# plane's wireguard.conf, opens its UDP port in the firewall and brings the interface up.
set -Eeuo pipefail
shopt -s inherit_errexit
export LC_ALL=C
umask 077

PROGRAM=install-origin
# Filled in (validated, shell-quoted) by the control plane that serves this script
# (GET /install/origin.sh): its URL, the default for --control-plane. Empty in a checkout.
SERVED_CONTROL_PLANE=''
ROOT=""
CONFIG_FILE=""
CONTROL_PLANE_URL=""
ORIGIN_ID=""
ADMIN_USER="admin"
PASSWORD_FILE=""
TOKEN_FILE=""
WG_NETWORK=""
ENV_FILE=""
INTERFACE="kokoa0"
NO_PACKAGES=0
REFRESH_TIMER=0
NO_REFRESH=0
TMP_DIR=""
CHANGES=()
REFRESH_COMMAND="/usr/local/sbin/kokoa-install-origin --env-file /etc/kokoa/origin.env --no-packages"
# Without a tunnel network (a control plane from before 0.2), peers must be private.
PRIVATE_RANGES=(10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 100.64.0.0/10 fc00::/7)

usage() {
  cat <<EOF
Usage: $PROGRAM --config FILE [options]
       KOKOA_ORIGIN_TOKEN=... $PROGRAM --control-plane URL [--refresh-timer] [options]
       curl -fsSL https://CP/install/origin.sh | sudo --preserve-env=KOKOA_ORIGIN_TOKEN bash -s
                 (the served copy knows CP and keeps the config fresh: --refresh-timer)
       $PROGRAM --control-plane URL --origin-id ID [--admin-user U] [--password-file F] [options]
       $PROGRAM --env-file /etc/kokoa/origin.env        (what the refresh timer runs)

Makes this machine a Kokoa origin: writes /etc/wireguard/IFACE.conf from the control plane's
wireguard.conf for this origin, opens its UDP port (ufw if active, else nftables, else iptables)
and enables wg-quick@IFACE (or, if it is up, applies the new peers with wg syncconf without
dropping tunnels). Re-running it changes nothing that is already right.

  --config FILE          a wireguard.conf downloaded from the UI or
                         GET /api/v1/origins/{id}/wireguard.conf
  --control-plane URL    fetch it from the control plane instead, with the origin's own token
                         (KOKOA_ORIGIN_TOKEN or --token-file: it reads only this origin's
                         config) or admin credentials (KOKOA_ADMIN_PASSWORD or
                         --password-file, with --origin-id); secrets never in argv
  --token-file F         file holding the origin token (made in the UI: Origins, Token)
  --origin-id ID         the origin's id (with --control-plane and admin credentials)
  --admin-user U         admin user (default admin)
  --password-file F      file holding the admin password
  --env-file F           read CONTROL_PLANE_URL, KOKOA_ORIGIN_TOKEN, ORIGIN_ID,
                         KOKOA_ADMIN_USER, KOKOA_ADMIN_PASSWORD, WG_INTERFACE, WG_NETWORK
                         from F (KEY=VALUE)
  --refresh-timer        also re-fetch the config every 5 minutes, so new or revoked edges
                         reach this origin by themselves: a systemd timer, else a cron job
                         (with a cron daemon), else a loop started now (needs the origin
                         token, stored in /etc/kokoa/origin.env, mode 0600; the admin password
                         is never stored on an origin). The served copy does this by default
  --no-refresh           do not (the served copy's default is --refresh-timer)
  --wg-network CIDR      accept peers only inside this tunnel network (default: the network
                         the control plane names in the config; without one, private ranges)
  --interface NAME       WireGuard interface (default kokoa0)
  --root DIR             install under DIR instead of / (tests): no firewall, no services
  --no-packages          do not apt-get install wireguard-tools
  -h, --help             this help

When edges join or are revoked the origin's peers change: re-run this script (or use
--refresh-timer). Only the [Interface]/[Peer] keys wg-quick needs are accepted from the control
plane; anything else (PostUp and friends run shell commands) is refused, and so is any address
outside the tunnel network (a peer claiming 1.1.1.1 would take that traffic into the tunnel).
EOF
}

log() { printf '%s: %s\n' "$PROGRAM" "$*" >&2; }
die() { log "error: $*"; exit 1; }
cmd() { log "[#] $*"; "$@"; }

cleanup() {
  if [[ -n $TMP_DIR ]]; then
    rm -rf -- "$TMP_DIR"
  fi
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --config) CONFIG_FILE=${2:?--config needs a file}; shift 2 ;;
      --control-plane) CONTROL_PLANE_URL=${2:?--control-plane needs a URL}; shift 2 ;;
      --origin-id) ORIGIN_ID=${2:?--origin-id needs an id}; shift 2 ;;
      --admin-user) ADMIN_USER=${2:?--admin-user needs a name}; shift 2 ;;
      --password-file) PASSWORD_FILE=${2:?--password-file needs a file}; shift 2 ;;
      --token-file) TOKEN_FILE=${2:?--token-file needs a file}; shift 2 ;;
      --wg-network) WG_NETWORK=${2:?--wg-network needs a CIDR}; shift 2 ;;
      --env-file) ENV_FILE=${2:?--env-file needs a file}; shift 2 ;;
      --interface) INTERFACE=${2:?--interface needs a name}; shift 2 ;;
      --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
      --no-packages) NO_PACKAGES=1; shift ;;
      --refresh-timer) REFRESH_TIMER=1; shift ;;
      --no-refresh) NO_REFRESH=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument: $1" ;;
    esac
  done
}

# Reads an allow-listed KEY=VALUE file; never sources it.
read_env_file() {
  local file=$1 line key value
  [[ -r $file ]] || die "cannot read $file"
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line =~ ^([A-Z_]+)=(.*)$ ]] || die "$file: not a KEY=VALUE line: $line"
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    case $key in
      CONTROL_PLANE_URL) CONTROL_PLANE_URL=$value ;;
      KOKOA_ORIGIN_TOKEN) KOKOA_ORIGIN_TOKEN=$value ;;
      WG_NETWORK) WG_NETWORK=$value ;;
      ORIGIN_ID) ORIGIN_ID=$value ;;
      KOKOA_ADMIN_USER) ADMIN_USER=$value ;;
      KOKOA_ADMIN_PASSWORD) KOKOA_ADMIN_PASSWORD=$value ;;
      WG_INTERFACE) INTERFACE=$value ;;
      *) log "warning: $file: ignoring unknown key $key" ;;
    esac
  done < "$file"
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

# Tunnel addresses #############################################################################

# Prints an IPv4 address as a 32-bit integer; fails unless it is one (no leading zeros).
ipv4_int() {
  local ip=$1 octet value=0
  [[ $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  local -a octets
  IFS=. read -ra octets <<<"$ip"
  for octet in "${octets[@]}"; do
    [[ $octet =~ ^(0|[1-9][0-9]*)$ ]] && ((10#$octet <= 255)) || return 1
    value=$(( (value << 8) | 10#$octet ))
  done
  printf '%d\n' "$value"
}

# Prints an IPv6 address as 32 hex digits; fails unless it is one (no zone, no dotted tail).
ipv6_hex() {
  local addr=${1,,} group out="" fill i
  local -a head=() tail=() groups=()
  [[ $addr =~ ^[0-9a-f:]{2,39}$ && $addr == *:* ]] || return 1
  if [[ $addr == *::* ]]; then
    [[ ${addr#*::} != *::* ]] || return 1
    IFS=: read -ra head <<<"${addr%%::*}"
    IFS=: read -ra tail <<<"${addr#*::}"
    fill=$(( 8 - ${#head[@]} - ${#tail[@]} ))
    ((fill >= 1)) || return 1
    groups=("${head[@]}")
    for ((i = 0; i < fill; i++)); do groups+=(0); done
    groups+=("${tail[@]}")
  else
    IFS=: read -ra groups <<<"$addr"
  fi
  ((${#groups[@]} == 8)) || return 1
  for group in "${groups[@]}"; do
    [[ $group =~ ^[0-9a-f]{1,4}$ ]] || return 1
    printf -v group '%04x' "0x$group"
    out+=$group
  done
  printf '%s\n' "$out"
}

# True if CIDR is ADDRESS/PREFIX with a prefix the address family allows.
# shellcheck disable=SC2310  # ipv4_int/ipv6_hex are predicates here
check_cidr() {
  local address=${1%/*} prefix=${1##*/}
  [[ $1 == */* && $prefix =~ ^(0|[1-9][0-9]{0,2})$ ]] || return 1
  if ipv4_int "$address" >/dev/null; then
    ((prefix <= 32))
  else
      ipv6_hex "$address" >/dev/null && ((prefix <= 128))
  fi
}

# True if ADDRESS lies inside CIDR (same family, first PREFIX bits equal).
# shellcheck disable=SC2310  # ipv4_int/ipv6_hex are predicates here
in_network() {
  local address=$1 network=${2%/*} prefix=${2##*/} a n mask full rest
  if a=$(ipv4_int "$address"); then
      n=$(ipv4_int "$network") || return 1
    mask=$(( prefix == 0 ? 0 : (0xffffffff << (32 - prefix)) & 0xffffffff ))
    (( (a & mask) == (n & mask) ))
  elif a=$(ipv6_hex "$address"); then
      n=$(ipv6_hex "$network") || return 1
    full=$((prefix / 4)) rest=$((prefix % 4))
    [[ ${a:0:full} == "${n:0:full}" ]] || return 1
    ((rest == 0)) && return 0
    mask=$(( (0xf << (4 - rest)) & 0xf ))
    (( (0x${a:full:1} & mask) == (0x${n:full:1} & mask) ))
  else
    return 1
  fi
}

# Every Address and AllowedIPs entry must be one host inside the tunnel network: given by
# --wg-network (or the refresh timer's env file), else named by the control plane in the config,
# else (an older control plane) one of the private ranges.
check_addresses() {
  local file=$1 networks=() line entry entries address prefix network inside
  if [[ -n $WG_NETWORK ]]; then
    networks=("$WG_NETWORK")
  else
    network=$(sed -n 's/^# kokoa-wg-network: \([0-9a-f.:/]\{1,50\}\)$/\1/p' "$file" | head -n 1)
    if [[ -n $network ]]; then
      # shellcheck disable=SC2310  # a predicate
      check_cidr "$network" || die "the config names an invalid tunnel network: $network"
      WG_NETWORK=$network
      networks=("$network")
    else
      networks=("${PRIVATE_RANGES[@]}")
    fi
  fi
  while IFS= read -r line; do
    IFS=', ' read -ra entries <<<"${line#* = }"
    for entry in "${entries[@]}"; do
      address=${entry%/*} prefix=${entry##*/}
      inside=0
      for network in "${networks[@]}"; do
        # shellcheck disable=SC2310  # a predicate
        if in_network "$address" "$network"; then
          inside=1
          break
        fi
      done
      if [[ $inside -eq 0 || $entry != */* ]] \
          || ! [[ ($prefix == 32 && $address == *.*) || ($prefix == 128 && $address == *:*) ]]
      then
        die "refusing ${line%% *} $entry: not one address inside ${networks[*]}" \
          "(a peer there would take that traffic into the tunnel)"
      fi
    done
  done < <(grep -E '^(Address|AllowedIPs) = ' "$file")
}

# The served copy: its control plane by default, and a refresh schedule with the origin token.
served_defaults() {
  if [[ -z $SERVED_CONTROL_PLANE || -n $CONFIG_FILE || -n $ENV_FILE ]]; then
    return 0
  fi
  CONTROL_PLANE_URL=${CONTROL_PLANE_URL:-$SERVED_CONTROL_PLANE}
  if [[ -n ${KOKOA_ORIGIN_TOKEN:-} || -n $TOKEN_FILE ]] && ((!NO_REFRESH)); then
    REFRESH_TIMER=1
  fi
}

validate_args() {
  [[ $INTERFACE =~ ^[A-Za-z0-9_=+.-]{1,15}$ ]] || die "invalid interface name: $INTERFACE"
  if [[ -n $CONFIG_FILE && -n $CONTROL_PLANE_URL ]]; then
    die "give --config or --control-plane, not both"
  fi
  if [[ -z $CONFIG_FILE && -z $CONTROL_PLANE_URL ]]; then
    usage >&2
    die "give --config FILE or --control-plane URL --origin-id ID"
  fi
  if [[ -n $WG_NETWORK ]]; then
    # shellcheck disable=SC2310  # a predicate
    check_cidr "$WG_NETWORK" || die "--wg-network must be a CIDR such as 10.8.0.0/24"
  fi
  if [[ -n $CONTROL_PLANE_URL ]]; then
    [[ $CONTROL_PLANE_URL =~ ^https?://[^[:space:]]+$ ]] || die "invalid URL: $CONTROL_PLANE_URL"
    check_secure_url "$CONTROL_PLANE_URL"
    if [[ -n $TOKEN_FILE ]]; then
      KOKOA_ORIGIN_TOKEN=$(<"$TOKEN_FILE")
    fi
    if [[ -n ${KOKOA_ORIGIN_TOKEN:-} ]]; then
      [[ $KOKOA_ORIGIN_TOKEN =~ ^kokoa-ot-[A-Za-z0-9_-]{20,100}$ ]] \
        || die "KOKOA_ORIGIN_TOKEN is not an origin token (kokoa-ot-...)"
    else
      [[ $REFRESH_TIMER -eq 0 ]] || die "--refresh-timer needs the origin's own token" \
        "(KOKOA_ORIGIN_TOKEN or --token-file; make one in the UI: Origins, Token):" \
        "the admin password is never stored on an origin"
      [[ $ORIGIN_ID =~ ^[0-9a-f-]{36}$ ]] || die "--origin-id must be the origin's UUID"
      if [[ -n $PASSWORD_FILE ]]; then
        KOKOA_ADMIN_PASSWORD=$(<"$PASSWORD_FILE")
      fi
      [[ -n ${KOKOA_ADMIN_PASSWORD:-} ]] || die "set KOKOA_ORIGIN_TOKEN (or --token-file)," \
        "or KOKOA_ADMIN_PASSWORD (or --password-file), to fetch from the control plane"
    fi
  fi
  if [[ -z $ROOT && $(id -u) -ne 0 ]]; then
    die "run as root (or give --root DIR)"
  fi
}

install_packages() {
  local needed=(wireguard-tools iproute2)
  [[ -n $CONTROL_PLANE_URL ]] && needed+=(curl)
  if [[ $NO_PACKAGES -eq 1 ]]; then
    return 0
  fi
  if command -v wg >/dev/null && command -v ip >/dev/null \
      && { [[ -z $CONTROL_PLANE_URL ]] || command -v curl >/dev/null; }; then
    return 0
  fi
  command -v apt-get >/dev/null || die "install ${needed[*]} first (no apt-get here)"
  cmd apt-get update -q
  # No recommends: wireguard-tools would pull in a kernel image where none is installed.
  DEBIAN_FRONTEND=noninteractive cmd apt-get install -y -q --no-install-recommends "${needed[@]}"
}

check_dependencies() {
  command -v wg >/dev/null || die "wg is required (apt-get install wireguard-tools)"
  if [[ -n $CONTROL_PLANE_URL ]]; then
    command -v curl >/dev/null || die "curl is required"
  fi
}

# Fetches the origin's wireguard.conf; the token or password goes to curl on stdin, never argv.
fetch_config() {
  local out=$1 url credentials option
  if [[ -n ${KOKOA_ORIGIN_TOKEN:-} ]]; then
    url="${CONTROL_PLANE_URL%/}/api/v1/origins/me/wireguard.conf"
    option="header = \"Authorization: Bearer $KOKOA_ORIGIN_TOKEN\""   # checked: no quotes
  else
    url="${CONTROL_PLANE_URL%/}/api/v1/origins/$ORIGIN_ID/wireguard.conf"
    credentials="$ADMIN_USER:$KOKOA_ADMIN_PASSWORD"
    credentials=${credentials//\\/\\\\}       # curl config quoting: \ and " escaped
    credentials=${credentials//\"/\\\"}
    option="user = \"$credentials\""
  fi
  if ! curl --fail --silent --show-error --max-time 30 --retry 2 -K - -o "$out" "$url" \
      <<<"$option"; then
    die "could not fetch $url; nothing changed"
  fi
}

# Accepts only what wg-quick needs; PostUp/PreUp/... would run commands as root.
validate_config() {
  local file=$1 line number=0 section="" interfaces=0
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line=${line%$'\r'}
    if [[ $line =~ ^[[:space:]]*(#.*)?$ ]]; then
      continue
    elif [[ $line == "[Interface]" ]]; then
      section=interface
      interfaces=$((interfaces + 1))
    elif [[ $line == "[Peer]" ]]; then
      section=peer
    elif [[ $section == interface && $line =~ ^(Address|ListenPort|PrivateKey)\ =\ [A-Za-z0-9+/=.:,\ ]+$ ]]; then
      continue
    elif [[ $section == peer && $line =~ ^(PublicKey|AllowedIPs|Endpoint|PersistentKeepalive)\ =\ [][A-Za-z0-9+/=.:,\ -]+$ ]]; then
      continue
    else
      die "refusing line $number of the WireGuard config: ${line:0:80}"
    fi
  done < "$file"
  [[ $interfaces -eq 1 ]] || die "the WireGuard config must have exactly one [Interface]"
}

# The control plane may not hold the private key: keep the one already configured here.
complete_private_key() {
  local file=$1 live=$2 key
  if grep -q '^PrivateKey = ' "$file"; then
    return 0
  fi
  key=""
  if [[ -r $live ]]; then
    key=$(sed -n 's/^PrivateKey = \([A-Za-z0-9+/=]\{44\}\)$/\1/p' "$live" | head -n 1)
  fi
  [[ -n $key ]] || die "the config has no PrivateKey and $live has none to keep: add" \
    "'PrivateKey = <this origin's private key>' under [Interface] in $CONFIG_FILE"
  sed -i "s|^\\[Interface\\]\$|[Interface]\\nPrivateKey = $key|" "$file"
}

write_config() {
  local new=$1 dir live
  dir="$ROOT/etc/wireguard"
  live="$dir/$INTERFACE.conf"
  complete_private_key "$new" "$live"
  install -d -m 0700 "$dir"
  write_if_changed "$live" 0600 "$(<"$new")"
}

listen_port() {
  local port
  port=$(sed -n 's/^ListenPort = \([0-9]\{1,5\}\)$/\1/p' "$ROOT/etc/wireguard/$INTERFACE.conf")
  printf '%s\n' "${port:-51820}"
}

open_firewall() {
  local port=$1
  if command -v ufw >/dev/null && ufw status 2>/dev/null | grep -q '^Status: active'; then
    if ufw status | grep -qE "^$port/udp[[:space:]]+ALLOW"; then
      log "firewall (ufw): UDP $port already allowed"
    else
      cmd ufw allow "$port/udp"
      CHANGES+=("ufw: allowed UDP $port")
    fi
  elif command -v nft >/dev/null && nft list chain inet filter input >/dev/null 2>&1; then
    if nft list chain inet filter input | grep -q "udp dport $port accept"; then
      log "firewall (nftables): UDP $port already accepted in inet filter input"
    else
      cmd nft insert rule inet filter input udp dport "$port" accept
      CHANGES+=("nftables: accepted UDP $port (add it to /etc/nftables.conf to persist)")
    fi
  elif command -v iptables >/dev/null; then
    if iptables -C INPUT -p udp --dport "$port" -j ACCEPT 2>/dev/null; then
      log "firewall (iptables): UDP $port already accepted"
    else
      cmd iptables -I INPUT -p udp --dport "$port" -j ACCEPT
      CHANGES+=("iptables: accepted UDP $port (save it with iptables-persistent)")
    fi
  else
    log "firewall: no ufw, nftables filter or iptables found; make sure UDP $port is open"
  fi
}

bring_up() {
  local cidr
  if wg show "$INTERFACE" >/dev/null 2>&1; then
    log "[#] wg syncconf $INTERFACE <(wg-quick strip $INTERFACE)"
    wg syncconf "$INTERFACE" <(wg-quick strip "$INTERFACE")
    # wg-quick routes the peers' addresses only at "up": route the ones syncconf just added.
    for cidr in $(sed -n 's/^AllowedIPs = //p' "/etc/wireguard/$INTERFACE.conf" | tr ',' ' '); do
      cmd ip route replace "$cidr" dev "$INTERFACE"
    done
  elif command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    cmd systemctl enable --now "wg-quick@$INTERFACE"
    CHANGES+=("enabled wg-quick@$INTERFACE")
  else
    cmd wg-quick up "$INTERFACE"
    CHANGES+=("brought up $INTERFACE (no systemd: add it to your boot scripts)")
  fi
}

# Atomically replace target with content (mode, in its own directory), unless it is the same.
# A missing directory is created 0755; an existing one keeps its mode (0700 for secrets).
write_if_changed() {
  local target=$1 mode=$2 content=$3 dir staged
  if [[ -f $target ]] && [[ $(<"$target") == "$content" ]]; then
    return 0
  fi
  dir=$(dirname "$target")
  [[ -d $dir ]] || install -d -m 0755 "$dir"
  staged=$(mktemp "$dir/.${target##*/}.XXXXXX")
  printf '%s\n' "$content" > "$staged"
  chmod "$mode" "$staged"
  sync "$staged"
  mv -f "$staged" "$target"
  CHANGES+=("wrote $target")
  log "wrote $target"
}

# This script's own text, for the refresh job: the file it runs from, or (piped into bash from
# the control plane) the control plane's copy again, over the same verified TLS.
own_copy() {
  local out=$1 self=${BASH_SOURCE[0]:-}
  if [[ -n $self && -f $self ]]; then
    cat -- "$self" >"$out"
    return
  fi
  curl --fail --silent --show-error --max-time 30 --retry 2 -o "$out" \
    -- "${CONTROL_PLANE_URL%/}/install/origin.sh" || die "could not fetch" \
    "${CONTROL_PLANE_URL%/}/install/origin.sh for the refresh job; the config is installed"
}

install_refresh_timer() {
  local self
  [[ -n $CONTROL_PLANE_URL ]] || die "--refresh-timer needs --control-plane and the origin token"
  self=$TMP_DIR/kokoa-install-origin
  own_copy "$self"
  if ! cmp -s "$self" "$ROOT/usr/local/sbin/kokoa-install-origin"; then
    install -D -m 0755 "$self" "$ROOT/usr/local/sbin/kokoa-install-origin"
    CHANGES+=("installed $ROOT/usr/local/sbin/kokoa-install-origin")
  fi
  install -d -m 0700 "$ROOT/etc/kokoa"
  write_if_changed "$ROOT/etc/kokoa/origin.env" 0600 "$(printf '%s\n' \
    "# kokoa origin refresh credentials (root only)" \
    "CONTROL_PLANE_URL=$CONTROL_PLANE_URL" "KOKOA_ORIGIN_TOKEN=$KOKOA_ORIGIN_TOKEN" \
    "WG_INTERFACE=$INTERFACE" ${WG_NETWORK:+"WG_NETWORK=$WG_NETWORK"})"
  write_if_changed "$ROOT/etc/systemd/system/kokoa-origin-refresh.service" 0644 "$(cat <<EOF
[Unit]
Description=Refresh the Kokoa origin's WireGuard peers from the control plane
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=$REFRESH_COMMAND
EOF
)"
  write_if_changed "$ROOT/etc/systemd/system/kokoa-origin-refresh.timer" 0644 "$(cat <<EOF
[Unit]
Description=Refresh the Kokoa origin's WireGuard peers every 5 minutes

[Timer]
OnBootSec=1min
OnUnitActiveSec=5min
RandomizedDelaySec=30s

[Install]
WantedBy=timers.target
EOF
)"
  if [[ -n $ROOT ]]; then
    return 0
  elif command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    cmd systemctl daemon-reload
    cmd systemctl enable --now kokoa-origin-refresh.timer
  elif [[ -x /usr/sbin/cron ]]; then
    write_if_changed /etc/cron.d/kokoa-origin-refresh 0644 "$(printf '%s\n' \
      "# Kokoa origin: refresh the WireGuard peers every 5 minutes (install-origin.sh)." \
      "*/5 * * * * root $REFRESH_COMMAND >/dev/null 2>&1")"
  else
    start_refresh_loop
  fi
}

# Neither systemd nor cron (a container, a chroot): a loop started now in its own session under
# a lock, so that a second install finds it running. It does not survive a reboot.
start_refresh_loop() {
  local lock=/run/kokoa-origin-refresh.lock log=/var/log/kokoa-origin-refresh.log
  if ! flock -n "$lock" true; then
    log "the refresh loop is running already (lock $lock)"
    return 0
  fi
  log "[#] setsid flock -n $lock: every 300 s $REFRESH_COMMAND >>$log &"
  # shellcheck disable=SC2016  # $0 is expanded by the loop's own shell
  setsid flock -n "$lock" bash -c 'while sleep 300; do "$0" --env-file /etc/kokoa/origin.env \
    --no-packages || true; done' /usr/local/sbin/kokoa-install-origin </dev/null >>"$log" 2>&1 &
  CHANGES+=("started the refresh loop (no systemd, no cron; log $log; not kept over a reboot)")
}

summary() {
  local change
  if [[ ${#CHANGES[@]} -eq 0 ]]; then
    log "no changes: everything was already in place"
  else
    log "changes:"
    for change in "${CHANGES[@]}"; do
      log "  - $change"
    done
  fi
  if [[ $REFRESH_TIMER -eq 0 ]]; then
    log "when edges join or are revoked, run this again (or add --refresh-timer)"
  fi
}

main() {
  local fetched
  parse_args "$@"
  if [[ -n $ENV_FILE ]]; then
    read_env_file "$ENV_FILE"
  fi
  served_defaults
  validate_args
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  install_packages
  check_dependencies
  TMP_DIR=$(mktemp -d)
  fetched="$TMP_DIR/wireguard.conf"
  if [[ -n $CONTROL_PLANE_URL ]]; then
    fetch_config "$fetched"
  else
    [[ -r $CONFIG_FILE ]] || die "cannot read $CONFIG_FILE"
    cat "$CONFIG_FILE" > "$fetched"
  fi
  validate_config "$fetched"
  check_addresses "$fetched"
  write_config "$fetched"
  if [[ -z $ROOT ]]; then
    open_firewall "$(listen_port)"
    bring_up
  else
    log "--root given: firewall and services left alone"
  fi
  if [[ $REFRESH_TIMER -eq 1 ]]; then
    install_refresh_timer
  fi
  summary
}

main "$@"
