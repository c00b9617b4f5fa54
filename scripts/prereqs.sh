#!/usr/bin/env bash
# Installs what building and testing Tessera needs, when it is missing:
# libclang (bindgen for RocksDB's bindings), a C++ compiler, protoc (for the
# etcd-client crate), and for the tests Debian's etcd server and etcdctl
# (the reference implementation), curl, openssl, and the tools the data
# plane's tests put volumes through (losetup, mkfs.ext4/e2fsck, mkfs.xfs).
# Usage: scripts/prereqs.sh [build|test]
set -euo pipefail
want=${1:-build}
pkgs=()
dpkg -s libclang-dev >/dev/null 2>&1 || pkgs+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || pkgs+=(g++)
# tessera-store depends on the etcd-client crate, which compiles its protos
# with protoc.
command -v protoc >/dev/null 2>&1 || pkgs+=(protobuf-compiler)
if [ "$want" = test ]; then
  command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || pkgs+=(etcd-client)
  # the data plane's tests: loop devices, filesystems on volumes
  command -v losetup >/dev/null 2>&1 || pkgs+=(mount)
  command -v blkid >/dev/null 2>&1 || pkgs+=(util-linux)
  command -v mkfs.ext4 >/dev/null 2>&1 || pkgs+=(e2fsprogs)
  command -v mkfs.xfs >/dev/null 2>&1 || pkgs+=(xfsprogs)
  # the volume benchmark's parser is tested on real fio output
  command -v fio >/dev/null 2>&1 || pkgs+=(fio)
  # deploy/validate.sh: kubectl, and a venv for kubernetes-validate
  command -v kubectl >/dev/null 2>&1 || pkgs+=(kubernetes-client)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
  # the JSON gateway tests send their requests with curl
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  # the TLS tests probe ports with openssl s_client; the JWT test makes keys
  command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
  # chaos/: hosts in network namespaces (ip), partitions as nftables rules
  command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
  command -v nft >/dev/null 2>&1 || pkgs+=(nftables)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "installing: ${pkgs[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust from https://rustup.rs first" >&2
  exit 1
fi
