# Sourced by the set-up scripts: install Debian packages, and only when one is missing.
# apt_install TAG AGAIN PACKAGE...   (TAG prefixes messages; AGAIN is the command to run afterwards)
apt_install() {
  local tag=$1 again=$2
  shift 2
  [ $# -gt 0 ] || return 0
  if ! command -v apt-get >/dev/null; then
    echo "[$tag] missing: $*; install them with your package manager, then run '$again' again." >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "[$tag] missing: $*; run as root or install them, then run '$again' again." >&2; exit 1; }
    sudo="sudo"
  fi
  printf '\033[1m[%s]\033[0m installing %s (Debian packages)\n' "$tag" "$*" >&2
  # Only refresh the package lists when a package is really missing.
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
