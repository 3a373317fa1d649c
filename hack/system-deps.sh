#!/usr/bin/env bash
# Debian packages vk-provider's tests and demo need at run time. As root, installs the missing
# ones; otherwise names them. (The control plane build installs its own: see hack/controlplane.sh.)
set -euo pipefail
pkgs=(openssl curl ca-certificates sqlite3 etcd-server docker-registry postgresql)
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "system-deps: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" >&2 || { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
