#!/usr/bin/env bash
# System (Debian/Ubuntu) packages the test suite needs; installs only what is missing, so a
# second run does nothing (no apt-get update either). `make test` runs it before pytest.
#   docker-compose   tests/test_compose.py checks docker-compose.yml with it (Debian's 1.29.2
#                    parses the file offline; the Docker engine is NOT installed or needed)
#   chromium, chromium-driver, fonts-liberation
#                    tests/e2e's browser check (headless Chromium through selenium)
#   orthanc, orthanc-dicomweb
#                    tests/backend/test_pacs_import.py's real PACS (DICOMweb plugin)
# To add a package: one `need COMMAND PACKAGE...` line below.
set -euo pipefail

missing=()
need() {
  # need COMMAND PACKAGE...: queue the packages when COMMAND is not on PATH.
  local cmd="$1"
  shift
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$@")
}
need_file() {
  # need_file PATH PACKAGE...: queue the packages when PATH does not exist (a daemon in
  # /usr/sbin, off a normal user's PATH, or a plugin library).
  local path="$1"
  shift
  [ -e "$path" ] || missing+=("$@")
}

need docker-compose docker-compose
need chromium chromium fonts-liberation
need chromedriver chromium-driver
need_file /usr/sbin/Orthanc orthanc
need_file /usr/share/orthanc/plugins/libOrthancDicomWeb.so orthanc-dicomweb

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup-system: nothing to install"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-system: no apt-get here; install these with your package manager: ${missing[*]}" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
echo "setup-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# No recommends: docker-compose would pull in the whole Docker engine (docker.io).
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
