#!/usr/bin/env bash
# Fetches the Debian cloud kernel and busybox-static from the Debian package
# registry (apt-get download), unpacks them into the cache and extracts the
# ELF vmlinux from the compressed bzImage.
#
# Usage: resources/fetch-kernel.sh [--suite SUITE] [--package NAME] [--force]
#
#   --suite SUITE   Debian suite to take the kernel from (default bookworm,
#                   the host's own apt lists). Any other suite (e.g. trixie:
#                   Linux 6.12) is read through a private source list,
#                   $GUEST_CACHE/apt-SUITE/, holding the URI of the host's
#                   bookworm source with that suite; the host's apt sources
#                   and lists are left alone.
#   --package NAME  a concrete linux-image-*-cloud-amd64 package
#   --force         refetch even if the outputs are there
#
# Env:  GUEST_CACHE     cache dir (default: <repo>/build)
#       KERNEL_SUITE    same as --suite
#       KERNEL_PACKAGE  same as --package
#
# Without --package, the concrete package that the metapackage
# linux-image-cloud-amd64 depends on (its candidate version) is used.
#
# Outputs (in $GUEST_CACHE; KDIR is kernel/ for bookworm, kernel-SUITE/
# for any other suite, e.g. kernel-trixie/):
#   KDIR/vmlinux       ELF kernel (PVH entry), loadable directly; the
#                      bzImage itself if no ELF could be extracted
#   KDIR/bzImage       the original compressed kernel (boot/vmlinuz-*)
#   KDIR/modules/      the unpacked [usr/]lib/modules/<release> tree
#   KDIR/VERSION       kernel release, e.g. 6.1.0-56-cloud-amd64
#   KDIR/PACKAGE       "<package> <version>" of the .deb used
#   KDIR/config        the kernel's boot/config-* file
#   busybox            static busybox binary (always from the host's lists)
#   debs/              the downloaded .deb files
# Re-running with all outputs present is a no-op (use --force to refetch).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

pkg="${KERNEL_PACKAGE:-}"
suite="${KERNEL_SUITE:-bookworm}"
force=0
while (($#)); do
    case "$1" in
        --package) [[ $# -ge 2 ]] || die "--package needs a value"; pkg="$2"; shift 2 ;;
        --suite) [[ $# -ge 2 ]] || die "--suite needs a value (bookworm, trixie, ...)"; suite="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
# The suite becomes a directory name and an apt source field.
[[ "$suite" =~ ^[a-z][a-z0-9-]*$ ]] || die "bad --suite '$suite' (expected a Debian suite name such as trixie)"
KERNEL_DIR="$(kernel_dir_for_suite "$suite")"

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

# host_bookworm_source: prints "URI [KEYRING]" of the host's first enabled
# `deb` source for suite bookworm (one-line .list or deb822 .sources files),
# so that another suite is fetched from the same mirror with the same key.
host_bookworm_source() {
    local f all
    all="$(
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f "$f" ]] || continue
            awk '
                $1 != "deb" { next }
                {
                    i = 2; key = ""
                    if ($2 ~ /^\[/) { # options: [a=b c=d]
                        for (; i <= NF; i++) {
                            o = $i; gsub(/[][]/, "", o)
                            if (o ~ /^signed-by=/) key = substr(o, 11)
                            if ($i ~ /\]$/) { i++; break }
                        }
                    }
                    if ($(i + 1) == "bookworm") { print $i, key; exit }
                }' "$f"
        done
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -f "$f" ]] || continue
            awk '
                function flush() {
                    if (enabled && (" " types " ") ~ / deb / && (" " suites " ") ~ / bookworm / && uri != "") {
                        print uri, key; found = 1; exit
                    }
                    types = suites = uri = key = ""; enabled = 1
                }
                BEGIN { enabled = 1 }
                /^[ \t]*$/ { flush(); next }
                /^[ \t#]/ { next } # comments, continuation lines
                {
                    f = tolower($0); sub(/:.*/, "", f)
                    v = $0; sub(/^[^:]*:[ \t]*/, "", v); gsub(/[ \t]+/, " ", v)
                    if (f == "types") types = v
                    else if (f == "suites") suites = v
                    else if (f == "uris") { split(v, u, " "); uri = u[1] }
                    else if (f == "signed-by" && v ~ /^\//) key = v
                    else if (f == "enabled") enabled = (tolower(v) != "no")
                }
                END { if (!found) flush() }' "$f"
        done
    )"
    printf '%s\n' "${all%%$'\n'*}"
}

# apt options for the kernel's suite: none for bookworm (the host's own
# lists); otherwise a private source list, lists and package cache under
# $GUEST_CACHE/apt-SUITE/, so that neither the host's sources nor its
# /var/cache/apt/*.bin are touched.
KAPT=()
if [[ "$suite" != bookworm ]]; then
    host_src="$(host_bookworm_source)"
    [[ -n "$host_src" ]] ||
        die "no enabled 'deb' source for bookworm in /etc/apt/sources.list or /etc/apt/sources.list.d/ (needed for its archive URI)"
    read -r uri keyring <<<"$host_src"
    aptdir="$GUEST_CACHE/apt-$suite"
    mkdir -p "$aptdir/lists/partial" "$aptdir/cache"
    line="deb ${keyring:+[signed-by=$keyring] }$uri $suite main"
    # Rewritten only on change, so that apt keeps trusting the lists.
    [[ "$(cat "$aptdir/sources.list" 2>/dev/null)" == "$line" ]] || printf '%s\n' "$line" >"$aptdir/sources.list"
    KAPT=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache")
    log "suite $suite via $aptdir/sources.list: $line"
fi

# apt_update host|kernel: refreshes the host's lists (needs root) or the
# kernel suite's private ones, each at most once.
updated_host=0
updated_kernel=0
apt_update() {
    if [[ "$1" == kernel && ${#KAPT[@]} -gt 0 ]]; then
        ((updated_kernel)) && return 0
        log "apt-get update (suite $suite, lists in $aptdir/lists)"
        apt-get "${KAPT[@]}" update -qq || die "apt-get update for suite $suite failed (source list $aptdir/sources.list)"
        updated_kernel=1
        return 0
    fi
    ((updated_host)) && return 0
    [[ "$(id -u)" -eq 0 ]] || die "package lists are missing/stale and updating them needs root"
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    updated_host=1
}

# apt_opts host|kernel: sets APT to the options for those lists.
apt_opts() {
    APT=()
    if [[ "$1" == kernel ]]; then APT=("${KAPT[@]}"); fi
}

# candidate host|kernel PKG: the version apt would install, or nothing.
candidate() {
    apt_opts "$1"
    apt-cache "${APT[@]}" policy "$2" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$' || true
}

resolve_kernel_pkg() {
    # The metapackage's candidate depends on exactly one concrete image
    # package. Missing/empty lists (apt-cache fails) print nothing.
    apt-cache "${KAPT[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1 || true
}

if [[ -z "$pkg" ]]; then
    pkg="$(resolve_kernel_pkg)"
    if [[ -z "$pkg" ]]; then
        apt_update kernel
        pkg="$(resolve_kernel_pkg)"
    fi
    [[ -n "$pkg" ]] || die "could not resolve linux-image-cloud-amd64 to a concrete kernel package in suite $suite (apt-cache depends)"
fi
[[ -n "$(candidate kernel "$pkg")" ]] || apt_update kernel
kver_pkg="$(candidate kernel "$pkg")"
[[ -n "$kver_pkg" ]] || die "package $pkg has no install candidate in the apt lists of suite $suite"
# busybox always comes from the host's lists: one busybox serves every
# kernel, and fetching another suite's kernel must not change it.
fetch_bb=1
[[ "$suite" == bookworm || ! -x "$GUEST_CACHE/busybox" ]] || fetch_bb=0
bb_ver=""
if ((fetch_bb)); then
    bb_ver="$(candidate host busybox-static)"
    if [[ -z "$bb_ver" ]]; then
        apt_update host
        bb_ver="$(candidate host busybox-static)"
        [[ -n "$bb_ver" ]] || die "package busybox-static has no install candidate"
    fi
fi
log "kernel package: $pkg $kver_pkg ($suite); busybox-static ${bb_ver:-kept}"

# download host|kernel PKG VER: apt-get download into debs/ unless a
# matching .deb is there.
download() {
    local lists="$1" p="$2" ver="$3" file
    apt_opts "$lists"
    # .deb names encode the epoch's ':' as '%3a'.
    file="$GUEST_CACHE/debs/${p}_${ver//:/%3a}_amd64.deb"
    if [[ -s "$file" ]] && dpkg-deb --info "$file" >/dev/null 2>&1; then
        log "using cached $(basename "$file")"
    else
        log "apt-get download $p=$ver"
        (cd "$GUEST_CACHE/debs" && apt-get "${APT[@]}" download -q "$p=$ver" 2>&1 | grep -v 'unsandboxed' >&2) || true
        if [[ ! -s "$file" ]]; then
            # Stale lists (version gone from the mirror): refresh once and retry.
            apt_update "$lists"
            apt_opts "$lists"
            (cd "$GUEST_CACHE/debs" && apt-get "${APT[@]}" download -q "$p=$ver" 2>&1 | grep -v 'unsandboxed' >&2) || true
        fi
        [[ -s "$file" ]] || die "apt-get download $p=$ver did not produce $file"
    fi
    DL="$file"
}

t0=$SECONDS
download kernel "$pkg" "$kver_pkg"
kdeb="$DL"
bbdeb=""
if ((fetch_bb)); then
    download host busybox-static "$bb_ver"
    bbdeb="$DL"
fi
log "downloads done in $((SECONDS - t0)) s"

work="$(mktemp -d "$GUEST_CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "unpacking $(basename "$kdeb")"
dpkg -x "$kdeb" "$work/k"
[[ -z "$bbdeb" ]] || dpkg -x "$bbdeb" "$work/bb"

shopt -s nullglob
vmlinuz=("$work"/k/boot/vmlinuz-*)
# Merged-/usr packages (trixie) ship the modules under usr/lib/modules/.
mods=("$work"/k/lib/modules/*/ "$work"/k/usr/lib/modules/*/)
shopt -u nullglob
((${#vmlinuz[@]} == 1)) || die "expected one boot/vmlinuz-* in $kdeb, found ${#vmlinuz[@]}"
((${#mods[@]} == 1)) || die "expected one lib/modules/<release>/ or usr/lib/modules/<release>/ in $kdeb, found ${#mods[@]}"
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
if ! extract_vmlinux "$work/out/kernel/bzImage" "$work/out/kernel/vmlinux"; then
    # The VMM and QEMU load bzImages too (only slower: the kernel
    # decompresses itself), so a kernel we cannot unpack still boots.
    log "warning: no ELF vmlinux found in $(basename "${vmlinuz[0]}") (tried lz4, zstd, xz, gzip); vmlinux is a copy of the bzImage"
    cp "$work/out/kernel/bzImage" "$work/out/kernel/vmlinux"
fi
if command -v file >/dev/null 2>&1; then
    log "vmlinux: $(file -b "$work/out/kernel/vmlinux" | cut -c1-100)"
fi
mv "${mods[0]%/}" "$work/out/kernel/modules"
if [[ -f "$work/k/boot/config-$kver" ]]; then
    cp "$work/k/boot/config-$kver" "$work/out/kernel/config"
fi
printf '%s\n' "$kver" >"$work/out/kernel/VERSION"
printf '%s %s\n' "$pkg" "$kver_pkg" >"$work/out/kernel/PACKAGE"

if [[ -n "$bbdeb" ]]; then
    [[ -x "$work/bb/bin/busybox" ]] || die "bin/busybox not found in $bbdeb"
    "$work/bb/bin/busybox" true 2>/dev/null || die "the extracted busybox does not run on this host"
    cp "$work/bb/bin/busybox" "$work/out/busybox"
fi

# Module compression report (informational; build scripts decompress as needed).
nko=$(find "$work/out/kernel/modules" -name '*.ko' | wc -l)
ncomp=$(find "$work/out/kernel/modules" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) | wc -l)
log "modules: $nko plain .ko, $ncomp compressed"

# Swap in atomically-ish: the new tree replaces the old one.
rm -rf "$KERNEL_DIR.old"
[[ -e "$KERNEL_DIR" ]] && mv "$KERNEL_DIR" "$KERNEL_DIR.old"
mv "$work/out/kernel" "$KERNEL_DIR"
[[ -z "$bbdeb" ]] || mv -f "$work/out/busybox" "$GUEST_CACHE/busybox"
rm -rf "$KERNEL_DIR.old"
log "kernel $kver ready in $KERNEL_DIR ($((SECONDS - t0)) s)"
