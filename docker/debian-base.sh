#!/usr/bin/env bash
# docker/debian-base.sh MIRROR [TAG]: a Debian bookworm base image with no registry (debootstrap, then
# `docker import`), for the CPU build the tests run (docker/README.md). It carries this host's CA
# certificates: where HTTPS is verified against extra CAs (a proxy's), pip inside the build fails
# without them (CERTIFICATE_VERIFY_FAILED). MIRROR: the Debian mirror of this host's apt sources.
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,5p' "$0" >&2
    exit 2
fi
mirror=$1 tag=${2:-local/debian:bookworm}
rootfs=$(mktemp -d /tmp/adept_ds_rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
# minbase has no ca-certificates: the image's own update-ca-certificates adds these when it installs it.
mkdir -p "$rootfs/usr/local/share/ca-certificates" "$rootfs/etc/ssl/certs"
find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \;
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*_*
tar -C "$rootfs" -c . | docker import - "$tag"
