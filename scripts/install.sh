#!/usr/bin/env bash
# Install edge-agent as a systemd service on Debian / Raspberry Pi OS:
#   a system user `edge-agent` in group `gpio`, a venv per install under
#   /opt/edge-agent/venvs with /opt/edge-agent/venv linking the one in use,
#   the config and device profiles in /etc/edge-agent, the unit enabled.
#
#   sudo scripts/install.sh              install (or upgrade), enable; a running service is restarted
#   sudo scripts/install.sh --rollback   switch back to the venv in use before the last switch
#   scripts/install.sh --root DIR        lay the same files out under DIR (no user, no systemctl)
#   ... --no-check                       switch without asking the new version whether it can take over the log
#
# Before switching, the new version's `edge-agent upgrade check` reads the installed
# config's log: if it cannot take it over, nothing is switched. The previous venv is
# kept (venv.previous) for --rollback; older ones are removed.
set -euo pipefail

root=/
action=install
check=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="$2"; shift 2 ;;
    --rollback) action=rollback; shift ;;
    --no-check) check=no; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${root%/}"
real=$([ "$root" = / ] && echo yes || echo no)
opt="$dest/opt/edge-agent"
config="$dest/etc/edge-agent/config.yaml"

if [ "$real" = yes ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or lay the files out elsewhere with --root DIR" >&2
  exit 2
fi

step() { printf '==> %s\n' "$*"; }
fail() { echo "install.sh: $*" >&2; exit 1; }

# The version a venv runs ("?" if it does not run).
version_of() { "$1/bin/edge-agent" --version 2>/dev/null | cut -d' ' -f2 || echo '?'; }

# Point the link $1 at $2 (relative to $opt) in one rename: there is never a moment without it.
switch_link() {
  ln -sfn "$2" "$opt/.$1.new"
  mv -Tf "$opt/.$1.new" "$opt/$1"
}

# After a switch: the running service runs the old code until restarted.
restart_if_running() {
  if [ "$real" = yes ] && [ -d /run/systemd/system ] && systemctl is-active --quiet edge-agent.service; then
    systemctl restart edge-agent.service
    step "edge-agent restarted; follow it with: journalctl -u edge-agent -f"
  fi
}

if [ "$action" = rollback ]; then
  [ -L "$opt/venv.previous" ] || fail "nothing to roll back to: $opt/venv.previous does not exist"
  current=$(readlink "$opt/venv")
  previous=$(readlink "$opt/venv.previous")
  switch_link venv "$previous"
  switch_link venv.previous "$current"
  step "rolled back from edge-agent $(version_of "$opt/$current") to $(version_of "$opt/$previous") ($opt/$previous)"
  restart_if_running
  exit 0
fi

if [ "$real" = yes ]; then
  step "user edge-agent in group gpio"
  getent group gpio >/dev/null || groupadd --system gpio
  if ! id edge-agent >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent
  fi
  usermod -a -G gpio edge-agent
fi

mkdir -p "$opt/venvs"
if [ -d "$opt/venv" ] && [ ! -L "$opt/venv" ]; then
  # A venv from before versioned venvs. Its scripts name /opt/edge-agent/venv/bin/python,
  # which is the link once this is done: it still runs whenever the link points at it.
  legacy="venvs/$(version_of "$opt/venv")-installed-before"
  mv -T "$opt/venv" "$opt/$legacy"
  switch_link venv "$legacy"
fi

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$src/edge_agent/__init__.py")
# Made at its final path: a venv's scripts name its own path, so it cannot be moved.
new=$(mktemp -d "$opt/venvs/$version-$(date -u +%Y%m%dT%H%M%SZ)-XXXX")
chmod 0755 "$new"
trap 'rm -rf "$new"' EXIT # until it is switched to
step "venv in $new"
# System site packages: the GPIO library (python3-lgpio) comes from the distribution.
python3 -m venv --system-site-packages "$new"
"$new/bin/python" -m pip install --quiet --upgrade pip
"$new/bin/python" -m pip install --quiet "$src"

if [ -L "$opt/venv" ] && [ "$check" = yes ]; then
  # An upgrade: can the new version take over the log the installed one writes?
  step "upgrade check by edge-agent $version of the log of $config"
  if [ "$real" = yes ]; then
    # As the agent's user: a file SQLite makes beside the log must stay the agent's.
    checking=(runuser -u edge-agent -- "$new/bin/edge-agent" upgrade check --config "$config")
  else
    # The layout's own data folder, not this machine's /var/lib/edge-agent.
    export EDGE_AGENT_DATA_DIR="${EDGE_AGENT_DATA_DIR:-$dest/var/lib/edge-agent}"
    checking=("$new/bin/edge-agent" upgrade check --config "$config")
  fi
  set +e
  verdict=$("${checking[@]}" 2>&1)
  code=$?
  set -e
  printf '%s\n' "$verdict" | sed 's/^/    /'
  if [ "$code" -ne 0 ]; then
    if grep -q "No such command" <<<"$verdict"; then
      fail "edge-agent $version has no 'upgrade check' to say whether it can take over the log; nothing was switched (--no-check switches anyway)"
    fi
    fail "edge-agent $version cannot take over the log (upgrade check exit $code, above); nothing was switched"
  fi
fi

install -m 0644 "$src/README.md" "$opt/README.md"

step "config in $dest/etc/edge-agent"
install -d -m 0750 "$dest/etc/edge-agent/device_profiles"
install -m 0640 "$src"/device_profiles/*.yaml "$dest/etc/edge-agent/device_profiles/"
if [ -e "$config" ]; then
  echo "    keeping the existing $config"
else
  install -m 0640 "$src/deploy/config.yaml" "$config"
fi
install -d -m 0750 "$dest/var/lib/edge-agent"

step "unit $dest/etc/systemd/system/edge-agent.service"
install -D -m 0644 "$src/systemd/edge-agent.service" "$dest/etc/systemd/system/edge-agent.service"

if [ "$real" = yes ]; then
  chown -R root:edge-agent /etc/edge-agent
  chown edge-agent:edge-agent /var/lib/edge-agent
fi
"$new/bin/edge-agent" profile check "$dest/etc/edge-agent/device_profiles/simulated.yaml" >/dev/null

step "switching $opt/venv to ${new#"$opt/"}"
if [ -L "$opt/venv" ]; then
  old=$(readlink "$opt/venv")
  for kept in "$opt"/venvs/*; do # all but the one in use, now the previous one, and the new one
    case "venvs/${kept##*/}" in "$old" | "${new#"$opt/"}") ;; *) rm -rf "$kept" ;; esac
  done
  switch_link venv.previous "$old"
fi
switch_link venv "${new#"$opt/"}"
trap - EXIT

if [ "$real" = yes ]; then
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edge-agent.service
    restart_if_running
    step "enabled; start it with: sudo systemctl start edge-agent; follow it with: journalctl -u edge-agent -f"
  else
    step "systemd is not running here: enable it later with systemctl enable --now edge-agent"
  fi
fi
step "installed edge-agent $(version_of "$opt/venv")"
