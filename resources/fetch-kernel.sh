#!/usr/bin/env bash
# Fetches the Debian cloud kernel and busybox-static from the Debian package
# registry (apt-get download), unpacks them into the cache and extracts the
# ELF vmlinux from the compressed bzImage.
#
# Usage: resources/fetch-kernel.sh [--package linux-image-X-cloud-amd64] [--force]
#
# Env:  GUEST_CACHE     cache dir (default: <repo>/build)
#       KERNEL_PACKAGE  same as --package
#
# Without --package, the concrete package that the metapackage
# linux-image-cloud-amd64 depends on (its candidate version) is used.
#
# Outputs (in $GUEST_CACHE):
#   kernel/vmlinux     ELF kernel (PVH entry), loadable directly
#   kernel/bzImage     the original compressed kernel (boot/vmlinuz-*)
#   kernel/modules/    the unpacked lib/modules/<release> tree
#   kernel/VERSION     kernel release, e.g. 6.1.0-56-cloud-amd64
#   kernel/PACKAGE     "<package> <version>" of the .deb used
#   kernel/config      the kernel's boot/config-* file
#   busybox            static busybox binary
#   debs/              the downloaded .deb files
# Re-running with all outputs present is a no-op (use --force to refetch).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

pkg="${KERNEL_PACKAGE:-}"
force=0
while (($#)); do
    case "$1" in
        --package) [[ $# -ge 2 ]] || die "--package needs a value"; pkg="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

outputs_ok() {
    [[ -s "$KERNEL_DIR/VERSION" && -s "$KERNEL_DIR/vmlinux" && -s "$KERNEL_DIR/bzImage" &&
        -d "$KERNEL_DIR/modules/kernel" && -x "$GUEST_CACHE/busybox" ]] || return 1
    if [[ -n "$pkg" ]]; then
        [[ -s "$KERNEL_DIR/PACKAGE" && "$(cut -d' ' -f1 "$KERNEL_DIR/PACKAGE")" == "$pkg" ]] || return 1
    fi
}

if ((force == 0)) && outputs_ok; then
    log "kernel $(cat "$KERNEL_DIR/VERSION") ($(cat "$KERNEL_DIR/PACKAGE" 2>/dev/null || echo '?')) and busybox already in $GUEST_CACHE"
    exit 0
fi

# Serialise concurrent fetches into the same cache; re-check after waiting.
mkdir -p "$GUEST_CACHE"
exec 9>"$GUEST_CACHE/.fetch-kernel.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if ((force == 0)) && outputs_ok; then
        log "kernel $(cat "$KERNEL_DIR/VERSION") fetched meanwhile by another process"
        exit 0
    fi
fi

need_cmd apt-get
need_cmd apt-cache
need_cmd dpkg
need_cmd lz4
need_cmd cpio

mkdir -p "$GUEST_CACHE/debs"

updated=0
apt_update() {
    ((updated)) && return 0
    [[ "$(id -u)" -eq 0 ]] || die "package lists are missing/stale and updating them needs root"
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    updated=1
}

candidate() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$' || true
}

resolve_kernel_pkg() {
    # The metapackage's candidate depends on exactly one concrete image package.
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}

if [[ -z "$pkg" ]]; then
    pkg="$(resolve_kernel_pkg)"
    if [[ -z "$pkg" ]]; then
        apt_update
        pkg="$(resolve_kernel_pkg)"
    fi
    [[ -n "$pkg" ]] || die "could not resolve linux-image-cloud-amd64 to a concrete kernel package (apt-cache depends)"
fi
[[ -n "$(candidate "$pkg")" ]] || apt_update
kver_pkg="$(candidate "$pkg")"
[[ -n "$kver_pkg" ]] || die "package $pkg has no install candidate in the apt lists"
bb_ver="$(candidate busybox-static)"
if [[ -z "$bb_ver" ]]; then
    apt_update
    bb_ver="$(candidate busybox-static)"
    [[ -n "$bb_ver" ]] || die "package busybox-static has no install candidate"
fi
log "kernel package: $pkg $kver_pkg; busybox-static $bb_ver"

# download PKG: apt-get download into debs/ unless a matching .deb is there.
download() {
    local p="$1" ver="$2" file
    # .deb names encode the epoch's ':' as '%3a'.
    file="$GUEST_CACHE/debs/${p}_${ver//:/%3a}_amd64.deb"
    if [[ -s "$file" ]] && dpkg-deb --info "$file" >/dev/null 2>&1; then
        log "using cached $(basename "$file")"
    else
        log "apt-get download $p=$ver"
        (cd "$GUEST_CACHE/debs" && apt-get download -q "$p=$ver" 2>&1 | grep -v 'unsandboxed' >&2) || true
        if [[ ! -s "$file" ]]; then
            # Stale lists (version gone from the mirror): refresh once and retry.
            apt_update
            (cd "$GUEST_CACHE/debs" && apt-get download -q "$p=$ver" 2>&1 | grep -v 'unsandboxed' >&2) || true
        fi
        [[ -s "$file" ]] || die "apt-get download $p=$ver did not produce $file"
    fi
    DL="$file"
}

t0=$SECONDS
download "$pkg" "$kver_pkg"
kdeb="$DL"
download busybox-static "$bb_ver"
bbdeb="$DL"
log "downloads done in $((SECONDS - t0)) s"

work="$(mktemp -d "$GUEST_CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "unpacking $(basename "$kdeb")"
dpkg -x "$kdeb" "$work/k"
dpkg -x "$bbdeb" "$work/bb"

shopt -s nullglob
vmlinuz=("$work"/k/boot/vmlinuz-*)
mods=("$work"/k/lib/modules/*/)
shopt -u nullglob
((${#vmlinuz[@]} == 1)) || die "expected one boot/vmlinuz-* in $kdeb, found ${#vmlinuz[@]}"
((${#mods[@]} == 1)) || die "expected one lib/modules/<release>/ in $kdeb, found ${#mods[@]}"
kver="$(basename "${mods[0]}")"
[[ "$(basename "${vmlinuz[0]}")" == "vmlinuz-$kver" ]] ||
    log "warning: $(basename "${vmlinuz[0]}") does not match modules release $kver"

is_elf() { [[ "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; }

# extract_vmlinux BZIMAGE OUT: find the compressed payload by its magic and
# decompress it; the payload is followed by other data, so decompressors may
# complain about trailing garbage; the result is checked for the ELF magic.
extract_vmlinux() {
    local bz="$1" out="$2" magic tool off
    local -a tries=(
        '\x02\x21\x4c\x18:lz4 -dc'
        '\x28\xb5\x2f\xfd:zstd -dc -q'
        '\xfd\x37\x7a\x58\x5a\x00:xz -dc -q'
        '\x1f\x8b\x08:gzip -dc -q'
    )
    for t in "${tries[@]}"; do
        magic="${t%%:*}"
        tool="${t#*:}"
        command -v "${tool%% *}" >/dev/null 2>&1 || continue
        # First few offsets of the magic only: the real payload comes early.
        # Only the offsets reach `read`: bash's read fails on the raw
        # (invalid UTF-8) magic bytes in a UTF-8 locale.
        while read -r off; do
            [[ -n "$off" ]] || continue
            # shellcheck disable=SC2086 # $tool is "cmd args"
            tail -c "+$((off + 1))" "$bz" | $tool >"$out" 2>/dev/null || true
            if [[ -s "$out" ]] && is_elf "$out"; then
                log "vmlinux: ${tool%% *} payload at offset $off"
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$magic" "$bz" | cut -d: -f1 | head -n 5)
    done
    rm -f "$out"
    return 1
}

mkdir -p "$work/out/kernel"
cp "${vmlinuz[0]}" "$work/out/kernel/bzImage"
extract_vmlinux "$work/out/kernel/bzImage" "$work/out/kernel/vmlinux" ||
    die "could not extract an ELF vmlinux from ${vmlinuz[0]}"
if command -v file >/dev/null 2>&1; then
    log "vmlinux: $(file -b "$work/out/kernel/vmlinux" | cut -c1-100)"
fi
mv "${mods[0]%/}" "$work/out/kernel/modules"
if [[ -f "$work/k/boot/config-$kver" ]]; then
    cp "$work/k/boot/config-$kver" "$work/out/kernel/config"
fi
printf '%s\n' "$kver" >"$work/out/kernel/VERSION"
printf '%s %s\n' "$pkg" "$kver_pkg" >"$work/out/kernel/PACKAGE"

[[ -x "$work/bb/bin/busybox" ]] || die "bin/busybox not found in $bbdeb"
"$work/bb/bin/busybox" true 2>/dev/null || die "the extracted busybox does not run on this host"
cp "$work/bb/bin/busybox" "$work/out/busybox"

# Module compression report (informational; build scripts decompress as needed).
nko=$(find "$work/out/kernel/modules" -name '*.ko' | wc -l)
ncomp=$(find "$work/out/kernel/modules" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) | wc -l)
log "modules: $nko plain .ko, $ncomp compressed"

# Swap in atomically-ish: the new tree replaces the old one.
rm -rf "$KERNEL_DIR.old"
[[ -e "$KERNEL_DIR" ]] && mv "$KERNEL_DIR" "$KERNEL_DIR.old"
mv "$work/out/kernel" "$KERNEL_DIR"
mv -f "$work/out/busybox" "$GUEST_CACHE/busybox"
rm -rf "$KERNEL_DIR.old"
log "kernel $kver ready in $KERNEL_DIR ($((SECONDS - t0)) s)"
