#!/usr/bin/env bash
# Install (or upgrade: run it again) the fedflock device agent as a systemd service.
#
#   sudo deploy/device/install.sh --from 'fedflock[agent]==0.1.0' --config ./agent.toml
#   sudo deploy/device/install.sh --from ./fedflock-0.1.0-py3-none-any.whl --find-links ./wheels --no-index
#   sudo deploy/device/install.sh --system-onnxruntime ...        # 32-bit ARM: Debian's python3-onnxruntime
#   deploy/device/install.sh --dry-run ...                        # print every action, change nothing
#   deploy/device/install.sh --root /tmp/stage ...                # everything under /tmp/stage (tests)
#
# What it does, each step idempotent: creates the system user `fedflock`; the directories
# /etc/fedflock (config, root:fedflock 0750) and /var/lib/fedflock (state, fedflock 0750); a
# virtual environment /opt/fedflock/venv with only the agent (`pip install --upgrade`, so a
# re-run with a newer --from upgrades it); copies --config to /etc/fedflock/agent.toml unless
# one is there (--replace-config overwrites it, keeping the old file as agent.toml.bak); installs
# fedflock-agent.service (+ a restart-backoff drop-in on systemd >= 254); enables the service
# and (re)starts it when a config is in place (--no-start: neither).
#
# --root DIR: every path is under DIR and nothing outside it is touched: the user is not created,
# ownership is not changed and systemctl is not called (each is printed as "skip (--root)").
# docs/deploy.md: per-platform notes, what was tested and what was not.
set -euo pipefail

UNIT=fedflock-agent.service
SERVICE_USER=fedflock
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

ROOT=""
FROM="fedflock[agent]"
CONFIG=""
PYTHON=python3
DRY_RUN=0
NO_START=0
REPLACE_CONFIG=0
SYSTEM_ORT=0
PIP_ARGS=()

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --from SPEC          what pip installs: a requirement ('fedflock[agent]==0.1.0'), a wheel or a
                       source directory (the agent extra is added to a path) [fedflock[agent]]
  --index-url URL      pip index (a mirror, devpi, ...)
  --find-links DIR     extra wheel directory (an offline wheelhouse)
  --no-index           only --find-links / local files, no index
  --config FILE        agent.toml to install as /etc/fedflock/agent.toml
  --replace-config     overwrite an existing agent.toml (the old one is kept as agent.toml.bak)
  --system-onnxruntime venv with --system-site-packages over the system's onnxruntime (Debian's
                       python3-onnxruntime, for 32-bit ARM); the agent is installed with --no-deps
                       plus numpy, paho-mqtt and psutil
  --python PY          interpreter for the venv [python3]
  --no-start           do not enable or (re)start the service
  --root DIR           install under DIR; touch nothing outside it (no user, chown, systemctl)
  --dry-run            print every action and change nothing
  -h, --help           this text
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=${2:?--from needs a value}; shift 2 ;;
    --index-url) PIP_ARGS+=(--index-url "${2:?--index-url needs a value}"); shift 2 ;;
    --find-links) PIP_ARGS+=(--find-links "${2:?--find-links needs a value}"); shift 2 ;;
    --no-index) PIP_ARGS+=(--no-index); shift ;;
    --config) CONFIG=${2:?--config needs a value}; shift 2 ;;
    --replace-config) REPLACE_CONFIG=1; shift ;;
    --system-onnxruntime) SYSTEM_ORT=1; shift ;;
    --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
    --no-start) NO_START=1; shift ;;
    --root) ROOT=${2:?--root needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -n "$ROOT" ]; then
  ROOT=$(cd "$ROOT" 2>/dev/null && pwd) || die "--root $ROOT: no such directory"
fi
VENV=$ROOT/opt/fedflock/venv
ETC=$ROOT/etc/fedflock
STATE=$ROOT/var/lib/fedflock
UNIT_DIR=$ROOT/etc/systemd/system

# Print an action, then run it (unless --dry-run).
run() {
  echo "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# An action on the running system: skipped under --root.
system() {
  if [ -n "$ROOT" ]; then
    echo "skip (--root): $*"
  else
    run "$@"
  fi
}

# A pip spec for a local wheel or directory gets the agent extra; a requirement is used as given.
agent_spec() {
  case "$FROM" in
    *.whl|/*|./*|../*) if [ "$SYSTEM_ORT" -eq 1 ]; then echo "$FROM"; else echo "${FROM}[agent]"; fi ;;
    *) echo "$FROM" ;;
  esac
}

# systemd's version (FEDFLOCK_SYSTEMD_VERSION overrides it, for tests); 0 if unknown.
systemd_version() {
  if [ -n "${FEDFLOCK_SYSTEMD_VERSION:-}" ]; then echo "$FEDFLOCK_SYSTEMD_VERSION"; return; fi
  systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 + 0 }' || echo 0
}

check_inputs() {
  [ -z "$CONFIG" ] || [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
  case "$FROM" in
    *.whl|/*|./*|../*) [ -e "$FROM" ] || die "--from $FROM: no such file or directory" ;;
  esac
  command -v "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: not found"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PYTHON is older than Python 3.10"
  "$PYTHON" -c 'import venv' 2>/dev/null || die "$PYTHON has no venv module (Debian: apt-get install python3-venv)"
  if [ "$SYSTEM_ORT" -eq 1 ]; then
    "$PYTHON" -c 'import onnxruntime' 2>/dev/null \
      || die "--system-onnxruntime: $PYTHON cannot import onnxruntime (Debian: apt-get install python3-onnxruntime)"
  fi
}

create_user() {
  if [ -z "$ROOT" ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
    echo "user $SERVICE_USER exists"
  else
    system useradd --system --user-group --home-dir /var/lib/fedflock --no-create-home \
      --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
}

create_dirs() {
  run install -d -m 0755 "$ROOT/opt/fedflock" "$UNIT_DIR"
  run install -d -m 0750 "$ETC" "$STATE"
  system chown "root:$SERVICE_USER" "$ETC"
  system chown "$SERVICE_USER:$SERVICE_USER" "$STATE"
}

install_venv() {
  if [ -x "$VENV/bin/python" ]; then
    echo "venv $VENV exists: upgrading in place"
  elif [ "$SYSTEM_ORT" -eq 1 ]; then
    run "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    run "$PYTHON" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check install --upgrade ${PIP_ARGS[@]+"${PIP_ARGS[@]}"})
  if [ "$SYSTEM_ORT" -eq 1 ]; then
    # onnxruntime (and numpy, psutil where Debian has them) come from the system's site-packages
    run "${pip[@]}" --no-deps "$(agent_spec)"
    run "${pip[@]}" "numpy>=1.24" "paho-mqtt>=2.0,<3" "psutil>=5.9" "tomli>=1.1; python_version < '3.11'"
  else
    run "${pip[@]}" "$(agent_spec)"
  fi
  run "$VENV/bin/python" -I -c 'import onnxruntime, edge_agent.agent; print("agent imports, onnxruntime", onnxruntime.__version__)'
}

install_config() {
  local target=$ETC/agent.toml
  run install -m 0640 "$SCRIPT_DIR/agent.toml.example" "$ETC/agent.toml.example"
  if [ -z "$CONFIG" ]; then
    [ -f "$target" ] && echo "keeping $target" || echo "no config yet: write $target (see $ETC/agent.toml.example)"
  elif [ -f "$target" ] && [ "$REPLACE_CONFIG" -eq 0 ]; then
    if cmp -s "$CONFIG" "$target"; then echo "keeping $target (unchanged)"; else
      echo "keeping $target (differs from $CONFIG: --replace-config overwrites it)"; fi
  else
    [ -f "$target" ] && run cp -p "$target" "$target.bak"
    run install -m 0640 "$CONFIG" "$target"
  fi
  system chown "root:$SERVICE_USER" "$ETC/agent.toml.example"
  if [ -f "$target" ] || [ "$DRY_RUN" -eq 1 ]; then system chown "root:$SERVICE_USER" "$target"; fi
}

install_unit() {
  run install -m 0644 "$SCRIPT_DIR/$UNIT" "$UNIT_DIR/$UNIT"
  if [ "$(systemd_version)" -ge 254 ]; then
    run install -d -m 0755 "$UNIT_DIR/$UNIT.d"
    run install -m 0644 "$SCRIPT_DIR/backoff.conf" "$UNIT_DIR/$UNIT.d/backoff.conf"
  fi
  system systemctl daemon-reload
}

start_service() {
  if [ "$NO_START" -eq 1 ]; then
    echo "not starting (--no-start)"
  elif [ ! -f "$ETC/agent.toml" ] && [ "$DRY_RUN" -eq 0 ]; then
    echo "not starting: no $ETC/agent.toml yet; then: systemctl enable --now $UNIT"
  else
    system systemctl enable "$UNIT"
    system systemctl restart "$UNIT"
  fi
}

check_inputs
create_user
create_dirs
install_venv
install_config
install_unit
start_service
echo "done: fedflock agent in $VENV (logs: journalctl -u ${UNIT%.service})"
