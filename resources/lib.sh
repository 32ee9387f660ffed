# shellcheck shell=bash
# Shared helpers for the resources/*.sh scripts. Source it, do not run it.
#
#   RESOURCES_DIR  directory holding these scripts
#   REPO_ROOT      directory containing resources/
#   GUEST_CACHE    cache/output directory (default: $REPO_ROOT/build)
#   KERNEL_DIR     the default kernel cache, $GUEST_CACHE/kernel (bookworm)
#   GUEST_KERNEL_DIR  kernel cache of the L2 guest (env; default KERNEL_DIR)
#   L1_KERNEL_DIR     kernel cache of the L1 VM (env; default KERNEL_DIR)
# fetch-kernel.sh --suite SUITE fills kernel_dir_for_suite SUITE; point
# GUEST_KERNEL_DIR / L1_KERNEL_DIR there to use that kernel.

RESOURCES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$RESOURCES_DIR/.." && pwd)"
GUEST_CACHE="${GUEST_CACHE:-$REPO_ROOT/build}"
# The release binaries (.cargo/config.toml names the target, see there).
BIN_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/x86_64-unknown-linux-gnu/release"
KERNEL_DIR="$GUEST_CACHE/kernel"
export GUEST_CACHE

# kernel_dir_for_suite SUITE: one cache per Debian suite so that kernels
# coexist; bookworm keeps the historical path build/kernel.
kernel_dir_for_suite() {
    if [[ "$1" == bookworm ]]; then
        printf '%s\n' "$GUEST_CACHE/kernel"
    else
        printf '%s\n' "$GUEST_CACHE/kernel-$1"
    fi
}

# usage: prints the calling script's header comment (its help text).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

log() { printf '[resources] %s\n' "$*" >&2; }
die() { printf '[resources] ERROR: %s\n' "$*" >&2; exit 1; }

# need_cmd CMD [HINT]: fail clearly when a host tool is missing.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found on PATH${2:+ ($2)}; run resources/install-host-deps.sh"
}

# Absolute path of a possibly relative path (file need not exist).
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

# Which kernel the guest and the L1 use (absolute, so a relative value from
# the caller's directory keeps working after a cd).
GUEST_KERNEL_DIR="$(abspath "${GUEST_KERNEL_DIR:-$KERNEL_DIR}")"
GUEST_KERNEL_DIR="${GUEST_KERNEL_DIR%/}"
L1_KERNEL_DIR="$(abspath "${L1_KERNEL_DIR:-$KERNEL_DIR}")"
L1_KERNEL_DIR="${L1_KERNEL_DIR%/}"

# fetch_hint DIR: the fetch-kernel.sh command that fills kernel cache DIR.
fetch_hint() {
    local suite
    suite="$(suite_of_kernel_dir "$1")"
    case "$suite" in
        bookworm) printf 'resources/fetch-kernel.sh\n' ;;
        '') printf 'resources/fetch-kernel.sh (its outputs go to %s/kernel[-SUITE])\n' "$GUEST_CACHE" ;;
        *) printf 'resources/fetch-kernel.sh --suite %s\n' "$suite" ;;
    esac
}

# suite_of_kernel_dir DIR: the suite whose fetch fills kernel cache DIR,
# or nothing for a directory fetch-kernel.sh does not write.
suite_of_kernel_dir() {
    local base
    base="$(basename "$1")"
    if [[ "$1" == "$KERNEL_DIR" ]]; then
        printf 'bookworm\n'
    elif [[ "$(dirname "$1")" == "$GUEST_CACHE" && "$base" == kernel-* ]]; then
        printf '%s\n' "${base#kernel-}"
    fi
}

# guest_initramfs_path: build-initramfs.sh's default output for
# GUEST_KERNEL_DIR: guest-initramfs.cpio.gz for the default kernel,
# guest-initramfs-NAME.cpio.gz for kernel-NAME (so that images built from
# different kernels do not replace each other).
guest_initramfs_path() {
    local name
    if [[ "$GUEST_KERNEL_DIR" == "$KERNEL_DIR" ]]; then
        printf '%s\n' "$GUEST_CACHE/guest-initramfs.cpio.gz"
    else
        name="$(basename "$GUEST_KERNEL_DIR")"
        printf '%s\n' "$GUEST_CACHE/guest-initramfs-${name#kernel-}.cpio.gz"
    fi
}

# fetch_kernels: runs fetch-kernel.sh for the default kernel and for the
# suites behind GUEST_KERNEL_DIR and L1_KERNEL_DIR (each once; a no-op when
# cached).
fetch_kernels() {
    local -A done_=()
    local d s
    for d in "$KERNEL_DIR" "$GUEST_KERNEL_DIR" "$L1_KERNEL_DIR"; do
        s="$(suite_of_kernel_dir "$d")"
        [[ -n "$s" && -z "${done_[$s]:-}" ]] || continue
        done_[$s]=1
        "$RESOURCES_DIR/fetch-kernel.sh" --suite "$s"
    done
}

# need_kernel [DIR]: fail clearly when fetch-kernel.sh has not filled kernel
# cache DIR (default KERNEL_DIR); sets KVER and MODDIR from it.
need_kernel() {
    local dir="${1:-$KERNEL_DIR}"
    [[ -s "$dir/VERSION" && -s "$dir/vmlinux" && -d "$dir/modules" ]] ||
        die "no kernel in $dir; run $(fetch_hint "$dir") first"
    [[ -x "$GUEST_CACHE/busybox" ]] ||
        die "busybox not found in $GUEST_CACHE; run resources/fetch-kernel.sh first"
    KVER="$(cat "$dir/VERSION")"
    MODDIR="$dir/modules"
}

# install_module SRC DESTFILE: copies a module to DESTFILE (plain .ko),
# decompressing it when needed (busybox insmod cannot load compressed ones).
install_module() {
    local src="$1" dest="$2"
    mkdir -p "$(dirname "$dest")"
    case "$src" in
        *.ko.xz) need_cmd xz; xz -dc "$src" >"$dest" ;;
        *.ko.zst) need_cmd zstd; zstd -q -dc "$src" >"$dest" ;;
        *.ko.gz) gzip -dc "$src" >"$dest" ;;
        *) cp "$src" "$dest" ;;
    esac
}

# fill_root ROOT MODULE...: the skeleton both initramfs images share: the
# usual directories (a sticky, world-writable /tmp), busybox with its
# applets, and MODULE... with their dependencies and load order.
fill_root() {
    local root="$1"
    shift
    mkdir -p "$root"/{proc,sys,dev,tmp,run,etc,root}
    chmod 1777 "$root/tmp"
    populate_busybox "$root"
    stage_modules "$root" "$@"
}

# populate_busybox ROOT: puts the static busybox at ROOT/bin/busybox and a
# symlink for every applet it has (the equivalent of `busybox --install -s`,
# done at build time so /init can use plain applet names).
populate_busybox() {
    local root="$1" applet dir
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$GUEST_CACHE/busybox" "$root/bin/busybox"
    chmod 0755 "$root/bin/busybox"
    # `busybox --list-full` prints e.g. "sbin/insmod", "usr/bin/nproc".
    while IFS= read -r applet; do
        [[ -n "$applet" && "$applet" != bin/busybox ]] || continue
        dir="$(dirname "$applet")"
        mkdir -p "$root/$dir"
        [[ -e "$root/$applet" || -L "$root/$applet" ]] ||
            ln -s /bin/busybox "$root/$applet"
    done < <("$GUEST_CACHE/busybox" --list-full)
    # Also /bin/sh for scripts, whatever --list-full says.
    [[ -e "$root/bin/sh" || -L "$root/bin/sh" ]] || ln -s busybox "$root/bin/sh"
}

# pack_cpio ROOT OUT [COMPRESSOR...]: cpio newc piped through COMPRESSOR
# (default: gzip -6 -n), root-owned entries, stable order, written atomically.
pack_cpio() {
    local root="$1" out="$2" tmp
    shift 2
    (($#)) || set -- gzip -6 -n
    need_cmd cpio
    mkdir -p "$(dirname "$out")"
    tmp="$(mktemp "$out.tmp.XXXXXX")"
    if ! (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc -R 0:0 | "$@") >"$tmp"; then
        rm -f "$tmp"
        die "packing $out failed"
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$out"
}

# stamp_digest: reads "descriptor" lines on stdin (free text; a line
# "file:PATH" is replaced by the sha256 of PATH's content, or a directory's
# listing+contents) and prints one sha256 of it all. Used to decide whether an
# output built from those inputs is current.
stamp_digest() {
    local line p
    while IFS= read -r line; do
        case "$line" in
            file:*)
                p="${line#file:}"
                if [[ -d "$p" ]]; then
                    printf 'dir %s\n' "$p"
                    (cd "$p" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
                elif [[ -e "$p" ]]; then
                    printf 'file %s %s\n' "$p" "$(sha256sum <"$p" | cut -d' ' -f1)"
                else
                    printf 'missing %s\n' "$p"
                fi
                ;;
            *) printf '%s\n' "$line" ;;
        esac
    done | sha256sum | cut -d' ' -f1
}

# is_current OUT DIGEST: true when OUT exists and was built from DIGEST.
is_current() {
    [[ -s "$1" && -f "$1.stamp" && "$(cat "$1.stamp")" == "$2" ]]
}

# ---------------------------------------------------------------------------
# Kernel modules

declare -A MOD_PATH=()
# index_modules: maps every module name (with '-' normalised to '_') to its
# file under $MODDIR/kernel.
index_modules() {
    local f b
    MOD_PATH=()
    while IFS= read -r -d '' f; do
        b="$(basename "$f")"
        b="${b%%.ko*}"
        MOD_PATH["${b//-/_}"]="$f"
    done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
}

# module_depends FILE: prints the module's "depends=" list, one per line.
module_depends() {
    local f="$1"
    {
        case "$f" in
            *.ko.xz) xz -dc "$f" ;;
            *.ko.zst) zstd -q -dc "$f" ;;
            *.ko.gz) gzip -dc "$f" ;;
            *) cat "$f" ;;
        esac
    } | tr '\0' '\n' | LC_ALL=C grep -a '^depends=' | head -n1 | cut -d= -f2 | tr ',' '\n' | sed '/^$/d' || true
}

# module_is_builtin NAME: true when modules.builtin lists NAME.
module_is_builtin() {
    local n="${1//_/[-_]}"
    [[ -f "$MODDIR/modules.builtin" ]] && LC_ALL=C grep -Eq "/${n}\\.ko\$" "$MODDIR/modules.builtin"
}

# resolve_modules NAME...: sets MOD_ORDER to the modules to load, dependencies
# first, each once. Unknown modules are reported and skipped; built-in ones
# are skipped silently (with a note).
MOD_ORDER=()
resolve_modules() {
    local -A seen=()
    local name
    MOD_ORDER=()
    ((${#MOD_PATH[@]})) || index_modules
    _visit() {
        local n="${1//-/_}" d
        [[ -z "${seen[$n]:-}" ]] || return 0
        seen[$n]=1
        if [[ -z "${MOD_PATH[$n]:-}" ]]; then
            if module_is_builtin "$n"; then
                log "module $n is built into kernel $KVER; nothing to load"
            else
                log "warning: module $n not found in kernel $KVER; skipped"
            fi
            return 0
        fi
        while IFS= read -r d; do
            _visit "$d"
        done < <(module_depends "${MOD_PATH[$n]}")
        MOD_ORDER+=("$n")
    }
    for name in "$@"; do
        _visit "$name"
    done
}

# stage_modules ROOT NAME...: resolves NAME... with dependencies, copies them
# (decompressed) to ROOT/lib/modules/NAME.ko, writes the load order to
# ROOT/lib/modules/load-order and a loader script ROOT/lib/modules/load.sh.
stage_modules() {
    local root="$1" n
    shift
    resolve_modules "$@"
    mkdir -p "$root/lib/modules"
    : >"$root/lib/modules/load-order"
    for n in "${MOD_ORDER[@]}"; do
        install_module "${MOD_PATH[$n]}" "$root/lib/modules/$n.ko"
        printf '%s\n' "$n" >>"$root/lib/modules/load-order"
    done
    cat >"$root/lib/modules/load.sh" <<'LOADER'
#!/bin/sh
# Loads /lib/modules/*.ko in the order given by /lib/modules/load-order
# (dependencies first), skipping missing files with a message.
# Generated by resources/lib.sh (stage_modules).
prefix="${1:-modules}"
while read -r m; do
    [ -n "$m" ] || continue
    if [ ! -f "/lib/modules/$m.ko" ]; then
        echo "$prefix: module $m missing, skipped"
        continue
    fi
    if grep -q "^$m " /proc/modules 2>/dev/null; then
        continue
    fi
    insmod "/lib/modules/$m.ko" || echo "$prefix: insmod $m failed"
done < /lib/modules/load-order
LOADER
    chmod 0755 "$root/lib/modules/load.sh"
    log "modules (load order): ${MOD_ORDER[*]:-none}"
}

# ---------------------------------------------------------------------------
# Adding host files to an image root

# is_dynamic_elf FILE: true when FILE is a dynamically linked ELF (per ldd).
is_dynamic_elf() {
    [[ -f "$1" && "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]] || return 1
    ldd "$1" >/dev/null 2>&1 || return 1
    ! ldd "$1" 2>&1 | grep -qE 'not a dynamic executable|statically linked'
}

# copy_libs ROOT FILE: copies FILE's shared libraries (per ldd) and the
# dynamic loader into ROOT at the same absolute paths; fails on unresolved ones.
copy_libs() {
    local root="$1" file="$2" line lib
    if ldd "$file" | grep -q 'not found'; then
        ldd "$file" >&2 || true
        die "$file has unresolved shared libraries"
    fi
    while read -r line; do
        lib=""
        case "$line" in
            *'=> /'*) lib="${line#*=> }"; lib="${lib%% (*}" ;;
            /*) lib="${line%% (*}" ;;
        esac
        lib="${lib//[[:space:]]/}"
        [[ -n "$lib" && -e "$lib" ]] || continue
        if [[ ! -e "$root$lib" ]]; then
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        fi
        LIB_DIRS["$(dirname "$lib")"]=1
    done < <(ldd "$file")
}

declare -A LIB_DIRS=()
# add_path ROOT SRC DEST: copies host file/dir SRC to DEST (an absolute path in
# the image; a DEST ending in '/' means DEST/basename(SRC)). Dynamic ELF files
# get their libraries too. Replaces whatever was at DEST (e.g. a busybox applet
# symlink) instead of writing through it.
add_path() {
    local root="$1" src="$2" dest="$3" f
    [[ -e "$src" ]] || die "file to add not found: $src"
    [[ "$dest" == /* ]] || dest="/$dest"
    [[ "$dest" != */ ]] || dest="$dest$(basename "$src")"
    mkdir -p "$root$(dirname "$dest")"
    rm -rf "${root:?}$dest"
    if [[ -d "$src" ]]; then
        mkdir -p "$root$dest"
        cp -a "$src/." "$root$dest/"
        while IFS= read -r -d '' f; do
            if is_dynamic_elf "$f"; then copy_libs "$root" "$f"; fi
        done < <(find "$src" -type f -perm -u+x -print0)
    else
        cp -L --preserve=mode,timestamps "$src" "$root$dest"
        if is_dynamic_elf "$src"; then copy_libs "$root" "$src"; fi
    fi
    log "added $src -> $dest ($(du -sh "$root$dest" | cut -f1))"
}

# finish_libs ROOT: writes ROOT/etc/ld.so.conf and an ld.so.cache when any
# shared libraries were added, so the loader finds them wherever they live.
finish_libs() {
    local root="$1" d
    ((${#LIB_DIRS[@]})) || return 0
    mkdir -p "$root/etc"
    for d in "${!LIB_DIRS[@]}"; do printf '%s\n' "$d"; done | LC_ALL=C sort >"$root/etc/ld.so.conf"
    if command -v ldconfig >/dev/null 2>&1; then
        ldconfig -r "$root" 2>/dev/null || log "warning: ldconfig -r failed (libraries are still at their host paths)"
    fi
}

# split_spec SPEC: "SRC:DEST" -> SPEC_SRC, SPEC_DEST (DEST defaults to /basename).
split_spec() {
    local spec="$1"
    if [[ "$spec" == *:* ]]; then
        SPEC_SRC="${spec%:*}"
        SPEC_DEST="${spec##*:}"
    else
        SPEC_SRC="$spec"
        SPEC_DEST="/$(basename "$spec")"
    fi
    [[ -n "$SPEC_SRC" && -n "$SPEC_DEST" ]] || die "bad SRC:DEST spec: $spec"
    SPEC_SRC="$(abspath "$SPEC_SRC")"
    [[ -e "$SPEC_SRC" ]] || die "file to add not found: $SPEC_SRC"
}

# specs_descriptors SPEC...: descriptor lines (for stamp_digest) of --add/--extra specs.
specs_descriptors() {
    local s
    for s in "$@"; do
        split_spec "$s"
        printf 'spec %s -> %s\n' "$SPEC_SRC" "$SPEC_DEST"
        printf 'file:%s\n' "$SPEC_SRC"
        if is_dynamic_elf "$SPEC_SRC"; then ldd "$SPEC_SRC" | sed 's/ (0x[0-9a-f]*)//'; fi
    done
}
