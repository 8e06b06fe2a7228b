#!/usr/bin/env bash
# Remove the fedflock device agent that deploy/device/install.sh installed.
#
#   sudo deploy/device/uninstall.sh            # stop + disable the service, remove the unit and the venv
#   sudo deploy/device/uninstall.sh --purge    # also the config (/etc/fedflock), the state
#                                              # (/var/lib/fedflock: models, undelivered results) and the user
#   deploy/device/uninstall.sh --root DIR --dry-run
#
# Without --purge the config and the state stay, so a later install.sh picks them up again.
set -euo pipefail

UNIT=fedflock-agent.service
SERVICE_USER=fedflock
ROOT=""
DRY_RUN=0
PURGE=0

die() { echo "uninstall.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1; shift ;;
    --root) ROOT=${2:?--root needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [ -n "$ROOT" ]; then
  ROOT=$(cd "$ROOT" 2>/dev/null && pwd) || die "--root $ROOT: no such directory"
fi

run() {
  echo "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

system() {
  if [ -n "$ROOT" ]; then echo "skip (--root): $*"; else run "$@"; fi
}

if [ -n "$ROOT" ] || systemctl cat "$UNIT" >/dev/null 2>&1; then
  system systemctl disable --now "$UNIT"
fi
for path in "$ROOT/etc/systemd/system/$UNIT" "$ROOT/etc/systemd/system/$UNIT.d" "$ROOT/opt/fedflock"; do
  if [ -e "$path" ]; then run rm -rf "$path"; fi
done
system systemctl daemon-reload
if [ "$PURGE" -eq 1 ]; then
  for path in "$ROOT/etc/fedflock" "$ROOT/var/lib/fedflock"; do
    if [ -e "$path" ]; then run rm -rf "$path"; fi
  done
  if [ -n "$ROOT" ] || id -u "$SERVICE_USER" >/dev/null 2>&1; then system userdel "$SERVICE_USER"; fi
else
  echo "kept $ROOT/etc/fedflock and $ROOT/var/lib/fedflock (--purge removes them)"
fi
echo "done"
