#!/usr/bin/env bash
# Usage: bash guest/prepare.sh DEST
#
# Builds the vballoon test guest in DEST: a User-Mode Linux kernel from Debian sid,
# made runnable on this Debian 12 host with sid's own glibc, and an initramfs made
# of busybox-static, virtio_balloon.ko and guest/init. Nothing outside DEST is
# written: the system's apt sources, lists and caches are left alone.
#
# Guarantees:
#   * DEST/.ready is created last, only after the guest has booted to its ready
#     marker and powered off; it is removed first whenever work is needed.
#   * A second run with the same inputs (this script, guest/init, busybox, the
#     fetched packages) does nothing and takes milliseconds.
#   * Downloads happen only when DEST/debs lacks the packages; rebuilding the
#     initramfs after editing guest/init needs no network.
#
# Results in DEST:
#   linux.uml     the kernel, patched to use DEST/libc (absolute paths: moving DEST
#                 breaks it; rerun this script after a move)
#   initrd.img    gzip'd newc cpio with /init, busybox and the modules
#   VERSIONS      key=value: package versions, kernel release, how virtio_balloon is built
#   debs/         the two .deb files (kept so a rebuild needs no network)
#
# Environment (all optional):
#   VBALLOON_DEBIAN_MIRROR  Debian mirror URI; default: the machine's own apt source
#   VBALLOON_UML_VERSION, VBALLOON_LIBC_VERSION
#                           exact versions to download instead of sid's current ones
#
# Needs: apt-get, dpkg-deb, gzip (Debian essentials) and busybox-static, cpio,
# patchelf (scripts/setup.sh installs them). Works as root or not (tested both);
# as root, apt still downloads as its unprivileged _apt user.
set -euo pipefail

die() { echo "prepare.sh: error: $*" >&2; exit 1; }
log() { echo "prepare.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: bash guest/prepare.sh DEST"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
dest="$(cd "$1" && pwd -P)"   # absolute: patchelf writes it into the binary

readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly READY_MARKER='vballoon-guest: ready'
readonly BUSYBOX=/bin/busybox

# ---------------------------------------------------------------------------
# Inputs and the quick path

check_tools() {
    local t missing=()
    for t in apt-get dpkg-deb gzip cpio patchelf sha256sum; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (run scripts/setup.sh)"
    # The dynamic busybox package also installs /bin/busybox; the initramfs has
    # no libc, so only the static build will run there.
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
        || die "Debian package busybox-static is not installed (run scripts/setup.sh)"
    [ -r "$KEYRING" ] || die "$KEYRING missing (Debian package debian-archive-keyring)"
}

# Everything the result depends on, as one hash. Stored in .ready.
fingerprint() {
    {
        sha256sum "$here/prepare.sh" "$here/init" "$BUSYBOX"
        ls -1 "$dest/debs" 2>/dev/null || true
        echo "$dest"
    } | sha256sum | cut -d' ' -f1
}

quick_path() {
    [ -f "$dest/.ready" ] || return 1
    [ "$(cat "$dest/.ready")" = "$(fingerprint)" ] || return 1
    [ -x "$dest/linux.uml" ] && [ -f "$dest/initrd.img" ] || return 1
    "$dest/linux.uml" --version >/dev/null 2>&1
}

# ---------------------------------------------------------------------------
# Download (private apt configuration)

# Prints the URI of the machine's main Debian archive (not -security, not
# -updates): the stanza whose Suites include a plain codename.
system_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -r "$f" ]; then
        awk '
            BEGIN { RS = ""; FS = "\n" }     # one record per deb822 stanza
            {
                uri = ""; plain = 0; deb = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^[ \t]*#/) continue
                    if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
                    if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); uri = u[2] }
                    if ($i ~ /^Suites:/) {
                        n = split($i, s, /[ \t]+/)
                        for (j = 2; j <= n; j++) if (s[j] != "" && s[j] !~ /-/) plain = 1
                    }
                }
                if (deb && plain && uri != "") { print uri; exit }
            }' "$f"
        return
    fi
    # One-line style, as a netinst install leaves it.
    if [ -r /etc/apt/sources.list ]; then
        awk '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) !~ /-/) { print $i; exit }
            }' /etc/apt/sources.list
    fi
}

# apt-get with every piece of state in $dest/apt. -c clears the hooks that the
# system's apt.conf.d attaches to "update" (they would act on the system, not on
# our lists); the system's other settings (proxy, date checks) still apply.
private_apt() {
    local a="$dest/apt"
    apt-get -q -c "$a/apt.conf" \
        -o "Dir::Etc::SourceList=$a/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o "Dir::State::Lists=$a/lists" \
        -o "Dir::Cache=$a/cache" \
        -o "Dir::Cache::Archives=$a/archives" \
        "$@"
}

fetch_debs() {
    local mirror="${VBALLOON_DEBIAN_MIRROR:-$(system_mirror)}"
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt (set VBALLOON_DEBIAN_MIRROR)"
    local a="$dest/apt"
    mkdir -p "$a/lists/partial" "$a/cache" "$a/archives/partial"
    echo "deb [signed-by=$KEYRING] $mirror sid main" >"$a/sources.list"
    printf '#clear %s;\n' APT::Update::Pre-Invoke APT::Update::Post-Invoke \
        APT::Update::Post-Invoke-Success DPkg::Pre-Invoke DPkg::Post-Invoke \
        DPkg::Pre-Install-Pkgs >"$a/apt.conf"
    log "apt-get update (private lists, $mirror sid)"
    private_apt update >&2

    local dl="$dest/.work/dl"
    rm -rf "$dl" && mkdir -p "$dl"
    # apt drops privileges to _apt for downloads; let it write here so the
    # sandbox stays on (otherwise apt warns and downloads as root).
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
    local uml=user-mode-linux libc=libc6
    [ -z "${VBALLOON_UML_VERSION:-}" ] || uml="$uml=$VBALLOON_UML_VERSION"
    [ -z "${VBALLOON_LIBC_VERSION:-}" ] || libc="$libc=$VBALLOON_LIBC_VERSION"
    log "apt-get download $uml $libc"
    (cd "$dl" && private_apt download "$uml" "$libc" >&2)
    chown -R "$(id -u):$(id -g)" "$dl"
    # Publish only complete downloads.
    rm -rf "$dest/debs" && mv "$dl" "$dest/debs"
    echo "$mirror" >"$dest/debs/MIRROR"
    # The lists (25 MB) only served this download.
    rm -rf "$a"
}

have_debs() {
    compgen -G "$dest/debs/user-mode-linux_*.deb" >/dev/null \
        && compgen -G "$dest/debs/libc6_*.deb" >/dev/null
}

# ---------------------------------------------------------------------------
# Unpack and patch

# Extracts both packages, installs the patched kernel and sid's libc in $dest and
# leaves the UML package tree in $dest/.work/uml for the module steps.
unpack() {
    local uml_deb libc_deb
    uml_deb="$(ls "$dest"/debs/user-mode-linux_*.deb)"
    libc_deb="$(ls "$dest"/debs/libc6_*.deb)"
    rm -rf "$dest/.work/uml" "$dest/libc.new" "$dest/libc"
    mkdir -p "$dest/.work"
    dpkg-deb -x "$uml_deb" "$dest/.work/uml"
    dpkg-deb -x "$libc_deb" "$dest/libc.new"
    mv "$dest/libc.new" "$dest/libc"

    local lib="$dest/libc/usr/lib/x86_64-linux-gnu"
    [ -x "$lib/ld-linux-x86-64.so.2" ] || die "no dynamic loader in $libc_deb"
    # sid's kernel is linked against a newer glibc than bookworm's: point it at
    # the unpacked one (on a copy, so the extracted tree stays pristine).
    cp "$dest/.work/uml/usr/bin/linux.uml" "$dest/linux.uml.new"
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --set-rpath "$lib" "$dest/linux.uml.new"
    "$dest/linux.uml.new" --version >/dev/null || die "patched linux.uml does not run"
    mv "$dest/linux.uml.new" "$dest/linux.uml"
}

# Prints the kernel release (the modules directory name, e.g. 7.2.7).
kernel_release() {
    local d
    d="$(ls -1 "$dest/.work/uml/usr/lib/uml/modules")"
    [ "$(echo "$d" | wc -l)" -eq 1 ] || die "expected one modules directory, found: $d"
    echo "$d"
}

# Copies $1 (a module path relative to the modules dir, maybe compressed) to $2
# as a plain .ko: the initramfs' insmod is busybox's, which we do not rely on to
# decompress.
install_module() {
    local src="$moddir/$1" out
    out="$2/$(basename "${1%%.ko*}").ko"
    case "$src" in
        *.ko) cp "$src" "$out" ;;
        *.ko.xz) "$BUSYBOX" xz -dc "$src" >"$out" ;;
        *.ko.gz) gzip -dc "$src" >"$out" ;;
        *.ko.zst)
            command -v zstd >/dev/null || die "$1 is zstd-compressed: install the Debian package zstd"
            zstd -q -dc "$src" >"$out" ;;
        *) die "unknown module format: $1" ;;
    esac
}

# Prints virtio_balloon and its dependencies, one per line, in load order
# (dependencies first), as paths relative to the modules directory.
balloon_load_order() {
    local line deps=() i
    line="$(grep -E '(^|/)virtio_balloon\.ko(\.[a-z]+)?:' "$moddir/modules.dep" || true)"
    [ -n "$line" ] || return 0
    read -r -a deps <<<"${line#*:}"
    # modules.dep lists a module's dependencies so that the last must be loaded first.
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do echo "${deps[$i]}"; done
    echo "${line%%:*}"
}

# ---------------------------------------------------------------------------
# Initramfs

build_initramfs() {
    local root="$dest/.work/root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    cp "$here/init" "$root/init"
    chmod 0755 "$root/init" "$root/bin/busybox"
    # The kernel opens /dev/console from the initramfs before running /init;
    # making the node needs root, and init copes without it.
    mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true

    : >"$root/etc/modules.order"
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        install_module "$m" "$root/lib/modules"
        echo "$(basename "${m%%.ko*}").ko" >>"$root/etc/modules.order"
    done < <(balloon_load_order)

    (cd "$root" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$dest/initrd.img.new"
    mv "$dest/initrd.img.new" "$dest/initrd.img"
}

# How the kernel carries virtio_balloon: module, builtin or absent.
balloon_kind() {
    if grep -qE '(^|/)virtio_balloon\.ko' "$moddir/modules.builtin" 2>/dev/null; then
        echo builtin
    elif [ -s "$dest/.work/root/etc/modules.order" ]; then
        echo module
    else
        echo absent
    fi
}

write_versions() {
    local release="$1" f="$dest/VERSIONS.new" d
    {
        for d in "$dest"/debs/*.deb; do
            echo "$(dpkg-deb -f "$d" Package)=$(dpkg-deb -f "$d" Version)"
        done
        echo "kernel_release=$release"
        echo "kernel_version=$("$dest/linux.uml" --version 2>/dev/null | head -n1)"
        echo "virtio_balloon=$(balloon_kind)"
        echo "modules=$(tr '\n' ' ' <"$dest/.work/root/etc/modules.order" | sed 's/ $//')"
        echo "busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
        echo "mirror=$(cat "$dest/debs/MIRROR" 2>/dev/null || echo unknown)"
    } >"$f"
    mv "$f" "$dest/VERSIONS"
}

# ---------------------------------------------------------------------------
# Smoke test: boot without devices, see the ready marker, power off.

# Picks a directory for the guest RAM file: tmpfs if possible, and never noexec
# (UML maps its RAM file PROT_EXEC).
smoke_tmpdir() {
    local base
    for base in /dev/shm "${TMPDIR:-/tmp}" "$dest"; do
        if [ ! -d "$base" ] || [ ! -w "$base" ]; then continue; fi
        if ! findmnt -no OPTIONS --target "$base" 2>/dev/null | tr ',' '\n' | grep -qx noexec; then
            mktemp -d "$base/vballoon-prepare.XXXXXX"
            return
        fi
    done
    die "no writable directory without noexec for the guest RAM file"
}

# Boots the guest as a coprocess: the console must stay open until the guest has
# powered off (an EOF on its stdin hangs up the console and the guest with it).
smoke_test() {
    local tmp line seen=0 rc=0 log="$dest/.work/smoke.log"
    local deadline=$((SECONDS + 60))
    tmp="$(smoke_tmpdir)"
    : >"$log"
    # timeout(1) signals its whole process group, so UML's helpers go too.
    coproc GUEST {
        TMPDIR="$tmp" exec timeout -k 5 90 "$dest/linux.uml" mem=128M \
            initrd="$dest/initrd.img" con=null con0=fd:0,fd:1 \
            initcall_blacklist=raid6_init uml_dir="$tmp" 2>&1
    }
    local pid=$GUEST_PID in=${GUEST[1]} out=${GUEST[0]}
    while ((SECONDS < deadline)) && IFS= read -r -t $((deadline - SECONDS)) line <&"$out"; do
        echo "$line" >>"$log"
        if [[ $line == *"$READY_MARKER"* ]]; then
            seen=1
            break
        fi
    done
    if ((seen)); then
        echo 'poweroff -f' >&"$in"
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    # Bounded by timeout(1): its -k makes sure the pipe reaches EOF.
    while IFS= read -r line <&"$out"; do echo "$line" >>"$log"; done
    wait "$pid" || rc=$?
    rm -rf "$tmp"
    if ((!seen)) || [ $rc -ne 0 ]; then
        tail -n 30 "$log" >&2
        die "guest smoke test failed (ready marker seen: $seen, exit status $rc)"
    fi
    grep '^vballoon-guest: balloon' "$log" >&2 || true
}

# ---------------------------------------------------------------------------

main() {
    check_tools
    # Two builds into one DEST (parallel make, two checkouts) would trample each other.
    exec {lock_fd}>"$dest/.lock"
    flock -w 600 "$lock_fd" || die "$dest is locked by another prepare.sh"
    if quick_path; then
        # make may have called us for a newer mtime with unchanged content:
        # refresh the stamp so it stops asking.
        touch "$dest/.ready"
        exit 0
    fi
    rm -f "$dest/.ready"
    # Not "have_debs || fetch_debs": bash ignores errexit inside the right-hand side.
    if ! have_debs; then
        fetch_debs
    fi
    log "unpacking into $dest"
    unpack
    local release
    release="$(kernel_release)"
    moddir="$dest/.work/uml/usr/lib/uml/modules/$release"
    build_initramfs
    write_versions "$release"
    log "booting the guest once (smoke test)"
    smoke_test
    # The unpacked package is 180 MB of modules we do not use.
    rm -rf "$dest/.work"
    fingerprint >"$dest/.ready"
    log "ready: $(tr '\n' ' ' <"$dest/VERSIONS")"
}

moddir=""
lock_fd=""
main
