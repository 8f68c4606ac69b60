# Shared setup for the examples' run scripts (sourced, not run): redis-server, a virtual
# environment with the example's pinned requirements, and a stormwall binary built from this
# checkout. Each function prints what it does to stderr, so the table on stdout stays clean.

# redis-server (and redis-cli) from Debian's packages when missing, as scripts/quickstart does.
ensure_redis_server() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "redis-server is missing: install it (Debian: apt-get install redis-server redis-tools)" >&2
    exit 1
  fi
  echo "installing redis-server and redis-tools from Debian's packages" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
}

# ensure_venv DIR: DIR/.venv with DIR/requirements.txt installed. Every package is pinned with
# its hash and installed with --no-deps, so what runs is exactly what the file lists. The
# install is redone only when requirements.txt changes (a copy of it is kept in the venv).
ensure_venv() {
  local dir="$1" venv="$1/.venv"
  local python="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating a virtual environment in $venv" >&2
    if ! "$python" -m venv "$venv" 2>/dev/null; then
      rm -rf "$venv"
      # Debian's python3 has no venv module without python3-venv.
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing python3-venv from Debian's packages" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$python" -m venv "$venv"
      else
        echo "$python -m venv failed: install python3-venv (Debian) and run again" >&2
        exit 1
      fi
    fi
  fi
  if ! cmp -s "$dir/requirements.txt" "$venv/requirements.installed"; then
    echo "installing $dir/requirements.txt into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      --require-hashes --no-deps -r "$dir/requirements.txt"
    cp "$dir/requirements.txt" "$venv/requirements.installed"
  fi
}

# ensure_stormwall ROOT: sets STORMWALL_BIN. An explicit STORMWALL_BIN is used as it is;
# otherwise the release binary of this checkout is built (cargo does nothing when it is
# already up to date, so an old binary is never measured by mistake).
ensure_stormwall() {
  local root="$1"
  if [ -n "${STORMWALL_BIN:-}" ]; then
    if [ ! -x "$STORMWALL_BIN" ]; then
      echo "STORMWALL_BIN=$STORMWALL_BIN is not an executable" >&2
      exit 1
    fi
  else
    echo "building stormwall (cargo build --release --bin stormwall; the first build takes minutes)" >&2
    (cd "$root" && cargo build --release --quiet --bin stormwall)
    local target="${CARGO_TARGET_DIR:-target}"
    case "$target" in /*) ;; *) target="$root/$target" ;; esac
    STORMWALL_BIN="$target/release/stormwall"
  fi
  export STORMWALL_BIN
}
