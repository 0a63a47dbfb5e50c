#!/usr/bin/env bash
# Install edge-agent as a systemd service on Debian / Raspberry Pi OS:
#   a system user `edge-agent` in group `gpio`, a venv in /opt/edge-agent,
#   the config and device profiles in /etc/edge-agent, the unit enabled.
#
#   sudo scripts/install.sh              install, enable (start it with systemctl start)
#   scripts/install.sh --root DIR        lay the same files out under DIR (no user, no systemctl)
set -euo pipefail

root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="${root%/}"
real=$([ "$root" = / ] && echo yes || echo no)

if [ "$real" = yes ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or lay the files out elsewhere with --root DIR" >&2
  exit 2
fi

step() { printf '==> %s\n' "$*"; }

if [ "$real" = yes ]; then
  step "user edge-agent in group gpio"
  getent group gpio >/dev/null || groupadd --system gpio
  if ! id edge-agent >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent
  fi
  usermod -a -G gpio edge-agent
fi

step "venv in $dest/opt/edge-agent/venv"
mkdir -p "$dest/opt/edge-agent"
# System site packages: the GPIO library (python3-lgpio) comes from the distribution.
python3 -m venv --system-site-packages "$dest/opt/edge-agent/venv"
"$dest/opt/edge-agent/venv/bin/python" -m pip install --quiet --upgrade pip
"$dest/opt/edge-agent/venv/bin/python" -m pip install --quiet "$src"
install -m 0644 "$src/README.md" "$dest/opt/edge-agent/README.md"

step "config in $dest/etc/edge-agent"
install -d -m 0750 "$dest/etc/edge-agent/device_profiles"
install -m 0640 "$src"/device_profiles/*.yaml "$dest/etc/edge-agent/device_profiles/"
if [ -e "$dest/etc/edge-agent/config.yaml" ]; then
  echo "    keeping the existing $dest/etc/edge-agent/config.yaml"
else
  install -m 0640 "$src/deploy/config.yaml" "$dest/etc/edge-agent/config.yaml"
fi
install -d -m 0750 "$dest/var/lib/edge-agent"

step "unit $dest/etc/systemd/system/edge-agent.service"
install -D -m 0644 "$src/systemd/edge-agent.service" "$dest/etc/systemd/system/edge-agent.service"

if [ "$real" = yes ]; then
  chown -R root:edge-agent /etc/edge-agent
  chown edge-agent:edge-agent /var/lib/edge-agent
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edge-agent.service
    step "enabled; start it with: sudo systemctl start edge-agent; follow it with: journalctl -u edge-agent -f"
  else
    step "systemd is not running here: enable it later with systemctl enable --now edge-agent"
  fi
fi
"$dest/opt/edge-agent/venv/bin/edge-agent" profile check "$dest/etc/edge-agent/device_profiles/simulated.yaml" >/dev/null
step "installed edge-agent $("$dest/opt/edge-agent/venv/bin/edge-agent" --version | cut -d' ' -f2)"
