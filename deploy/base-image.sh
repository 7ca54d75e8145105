#!/usr/bin/env bash
# Build the local Debian base image the Collab image is built FROM when no registry is reachable:
#   deploy/base-image.sh [IMAGE]           (default localhost/collab-base:bookworm)
# It is a minimal Debian bookworm with python3, venv and pip, made with debootstrap from the
# machine's own Debian mirror (COLLAB_DEBIAN_MIRROR overrides it) and imported into podman.
# With a registry at hand, skip this: the Dockerfile's default base is python:3.11-slim.
set -euo pipefail
image="${1:-localhost/collab-base:bookworm}"
# The podman command and its global flags (deploy/stack.sh passes its own COLLAB_PODMAN on).
read -r -a podman_cmd <<<"${COLLAB_PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"
podman_() { "${podman_cmd[@]}" "$@"; }

if podman_ image exists "$image"; then
  echo "base-image: $image exists"
  exit 0
fi

mirror="${COLLAB_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  # The first Debian archive the machine's apt sources name (deb822 or one-line format).
  mirror="$(grep -hoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | grep -v security | head -n1 | tr -d ' ' || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

root="$(mktemp -d "${TMPDIR:-/var/tmp}/collab-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" >/dev/null
# An image needs no apt lists or caches: smaller, and nothing stale to trust later.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | podman_ import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base-image: built $image"
