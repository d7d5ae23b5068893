#!/usr/bin/env bash
# The product image, built here from the repo's Dockerfile with no registry and no pulls.
#
#   hack/image.sh base
#       build (or reuse) the local runtime base and print its ref: a stand-in for
#       gcr.io/distroless/cc-debian12:nonroot made from Debian 12 packages with mmdebstrap (glibc,
#       libgcc, libstdc++, libgomp, libssl3, base-files, netbase, tzdata, the CA bundle; passwd and
#       group with nonroot 65532, /home/nonroot, /tmp 1777; no shell, no package manager).
#   hack/image.sh build --tag REF [--binary FILE] [--published-names] [--containerd SOCK]
#       build the Dockerfile with buildah (--pull=never) and print REF.
#       --binary FILE      take this binary (a stripped copy) through the Dockerfile's `prebuilt`
#                          stage instead of compiling in the builder (the tests pass their own
#                          build: seconds instead of a release build in a container)
#       --published-names  leave RUNTIME_IMAGE at its default, the published name, which then
#                          names the local base (tagged so in the private store); otherwise the
#                          local base is passed as --build-arg RUNTIME_IMAGE
#       --builder-image R  the builder's base when compiling (default: the Dockerfile's, which
#                          must then be in the store: it is never pulled)
#       --containerd SOCK  also import the image into that containerd (namespace k8s.io), for
#                          pods that never pull
#   hack/image.sh import --containerd SOCK REF
#       export REF as a docker archive and import it with `ctr -n k8s.io images import`.
#   hack/image.sh buildah ARGS...
#       run buildah on the private store (inspect, push, rmi: what the tests read images with).
#   hack/image.sh clean
#       remove every image from the private store (tests that crashed leave theirs behind).
#
# Everything lives under the cache (~/.cache/mlflow-gateway-operator/): the base's root file
# system keyed by BASE_VERSION, and a private containers store, so nothing touches the host's
# /var/lib/containers. Installs buildah, mmdebstrap, umoci and containerd when missing (Debian).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Bump when the package set or the layout of the base changes: the cached base is rebuilt.
BASE_VERSION=debian12-cc-v1
BASE_REF=localhost/mlflow-gateway-operator/runtime-base:$BASE_VERSION
# What the Dockerfile's default RUNTIME_IMAGE names (kept in step with it by a test).
PUBLISHED_RUNTIME=gcr.io/distroless/cc-debian12:nonroot
# The packages of distroless cc-debian12 (static + base + cc). ca-certificates gives only its bundle.
BASE_PACKAGES=(base-files netbase tzdata media-types libc6 libssl3 libgcc-s1 gcc-12-base libgomp1 libstdc++6)
SUITE=bookworm
MIRRORS=(
  "deb http://deb.debian.org/debian $SUITE main"
  "deb http://deb.debian.org/debian $SUITE-updates main"
  "deb http://deb.debian.org/debian-security $SUITE-security main"
)
# Fixed file times in the base: the same packages give the same layer.
EPOCH=1700000000

IMAGE_CACHE=$CACHE_DIR/image
STORE=(--root "$IMAGE_CACHE/storage" --runroot "$IMAGE_CACHE/run" --storage-driver overlay)

need_packages() {
  local missing=() cmd pkg
  for pair in buildah:buildah mmdebstrap:mmdebstrap umoci:umoci ctr:containerd runc:runc strip:binutils; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

bah() { buildah "${STORE[@]}" "$@"; }

# The base's root file system as a tar, built once per BASE_VERSION.
base_rootfs() {
  local dir=$IMAGE_CACHE/base-$BASE_VERSION
  [ -f "$dir/rootfs.tar" ] && { echo "$dir/rootfs.tar"; return; }
  log "building the runtime base $BASE_VERSION from Debian $SUITE packages (mmdebstrap)"
  local work; work=$(mktemp -d "$IMAGE_CACHE/base-work.XXXXXX")
  # mmdebstrap resolves and downloads the packages (signed repositories) and extracts them; we
  # keep its .debs and unpack only the ones named (their dependencies such as perl or debconf are
  # not part of distroless), then add what distroless adds.
  mmdebstrap --quiet --variant=extract --include="$(IFS=,; echo "${BASE_PACKAGES[*]},ca-certificates")" \
    --extract-hook="mkdir -p '$work/debs' && cp \"\$1\"/var/cache/apt/archives/*.deb '$work/debs/'" \
    "$SUITE" /dev/null "${MIRRORS[@]}" >&2
  local root=$work/rootfs
  mkdir -p "$root"/usr/{bin,sbin,lib,lib64}
  # Debian 12's merged /usr.
  ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
  mkdir -p "$root/var/lib/dpkg/status.d"
  local pkg deb
  for pkg in "${BASE_PACKAGES[@]}"; do
    deb=$(ls "$work/debs/${pkg}_"*.deb) || die "mmdebstrap did not fetch $pkg"
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
    # What scanners read in distroless images: each package's control fields.
    dpkg-deb -f "$deb" > "$root/var/lib/dpkg/status.d/$pkg"
  done
  # The CA bundle, as update-ca-certificates would write it (every Mozilla certificate), and
  # the package's copyright; not its scripts or its dependency on openssl.
  deb=$(ls "$work/debs/ca-certificates_"*.deb)
  mkdir -p "$work/ca"
  dpkg-deb -x "$deb" "$work/ca"
  mkdir -p "$root/etc/ssl/certs" "$root/usr/share/doc/ca-certificates"
  find "$work/ca/usr/share/ca-certificates/mozilla" -name '*.crt' | LC_ALL=C sort | xargs cat > "$root/etc/ssl/certs/ca-certificates.crt"
  cp "$work/ca/usr/share/doc/ca-certificates/copyright" "$root/usr/share/doc/ca-certificates/"
  dpkg-deb -f "$deb" > "$root/var/lib/dpkg/status.d/ca-certificates"
  # Documentation beyond the copyright notices is not in distroless either.
  rm -rf "$root"/usr/share/{man,info,lintian,gdb,bash-completion}
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  # distroless's users, groups, name service switch, home directories and /tmp.
  cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > "$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  cat > "$root/etc/nsswitch.conf" <<'EOF'
passwd:         compat
group:          compat
shadow:         compat
gshadow:        files

hosts:          files dns
networks:       files

protocols:      db files
services:       db files
ethers:         db files
rpc:            db files

netgroup:       nis
EOF
  mkdir -p "$root/root" "$root/home/nonroot" "$root/tmp"
  chmod 0700 "$root/root" "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  tar --sort=name --numeric-owner --mtime="@$EPOCH" -C "$root" -cf "$work/rootfs.tar" .
  rm -rf "$dir"; mkdir -p "$dir"
  mv "$work/rootfs.tar" "$dir/rootfs.tar"
  rm -rf "$work"
  echo "$dir/rootfs.tar"
}

# The base as an image in the private store (from the cached rootfs when the store lost it).
base() {
  mkdir -p "$IMAGE_CACHE"
  exec 9>"$IMAGE_CACHE/lock"; flock 9
  if ! bah inspect --type image "$BASE_REF" >/dev/null 2>&1; then
    local tarball c; tarball=$(base_rootfs)
    c=$(bah from --pull=never scratch)
    bah add "$c" "$tarball" / >/dev/null
    bah config --os linux --arch amd64 --user 65532 --workingdir /home/nonroot \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
      --label org.opencontainers.image.description="local stand-in for $PUBLISHED_RUNTIME ($BASE_VERSION)" "$c"
    bah commit --quiet --rm --timestamp "$EPOCH" "$c" "$BASE_REF" >/dev/null
    log "runtime base $BASE_REF ready"
  fi
  flock -u 9
  echo "$BASE_REF"
}

build() {
  local tag="" binary="" published=0 builder="" sock=""
  while [ $# -gt 0 ]; do
    case $1 in
      --tag) tag=$2; shift ;;
      --binary) binary=$2; shift ;;
      --published-names) published=1 ;;
      --builder-image) builder=$2; shift ;;
      --containerd) sock=$2; shift ;;
      *) die "unknown option $1" ;;
    esac; shift
  done
  [ -n "$tag" ] || die "build needs --tag REF"
  local base_ref; base_ref=$(base)
  local args=(--pull=never --layers=false --tag "$tag" --file "$REPO_ROOT/Dockerfile")
  exec 9>"$IMAGE_CACHE/lock"; flock 9
  if [ $published = 1 ]; then
    bah tag "$base_ref" "$PUBLISHED_RUNTIME"
  else
    args+=(--build-arg "RUNTIME_IMAGE=$base_ref")
  fi
  [ -n "$builder" ] && args+=(--build-arg "BUILDER_IMAGE=$builder")
  if [ -z "$binary" ]; then
    local b=${builder:-$(sed -n 's/^ARG BUILDER_IMAGE=//p' "$REPO_ROOT/Dockerfile")}
    bah inspect --type image "$b" >/dev/null 2>&1 \
      || die "the builder image $b is not in the store (nothing is pulled): pass --binary FILE, or --builder-image REF of a Rust 1.95 image built here"
  fi
  if [ -n "$binary" ]; then
    [ -x "$binary" ] || die "no executable at $binary"
    # The context's one file of target/ (.dockerignore), stripped: debug info is most of a test
    # build's size and nothing reads it in a pod.
    mkdir -p "$REPO_ROOT/target/image"
    strip -o "$REPO_ROOT/target/image/mlflow-gateway-operator" "$binary"
    args+=(--build-arg BINARY=prebuilt)
  fi
  # Fixed times: the same binary on the same base gives the same layers, whatever the base's name.
  bah build --quiet --timestamp "$EPOCH" "${args[@]}" "$REPO_ROOT" >/dev/null
  # The stages' images (the `prebuilt` stage's copy of the binary) are not kept; buildah 1.28
  # leaves a working container on each stage that another stage copies from. Under the lock no
  # other build's containers exist, and nothing else here makes any.
  bah rm --all >/dev/null
  bah rmi --prune >/dev/null
  [ -n "$sock" ] && import_image --containerd "$sock" "$tag" >/dev/null
  flock -u 9
  echo "$tag"
}

import_image() {
  local sock="" ref=""
  while [ $# -gt 0 ]; do
    case $1 in
      --containerd) sock=$2; shift ;;
      *) ref=$1 ;;
    esac; shift
  done
  [ -n "$sock" ] && [ -n "$ref" ] || die "usage: hack/image.sh import --containerd SOCK REF"
  local archive; archive=$(mktemp "$IMAGE_CACHE/export.XXXXXX.tar")
  rm -f "$archive"
  bah push --quiet "$ref" "docker-archive:$archive:$ref" >/dev/null
  ctr --address "$sock" -n k8s.io images import "$archive" >&2 || { rm -f "$archive"; die "ctr import into $sock failed"; }
  rm -f "$archive"
  echo "$ref"
}

need_packages
mkdir -p "$IMAGE_CACHE"
case ${1:-} in
  base) shift; base ;;
  build) shift; build "$@" ;;
  import) shift; import_image "$@" ;;
  buildah) shift; bah "$@" ;;
  clean) shift; bah rmi --all --force >/dev/null 2>&1 || true; log "removed every image of $IMAGE_CACHE/storage (the base is rebuilt from its cached root file system)" ;;
  *) die "usage: hack/image.sh base | build --tag REF [--binary FILE] [--published-names] [--builder-image REF] [--containerd SOCK] | import --containerd SOCK REF | buildah ARGS... | clean" ;;
esac
