#!/usr/bin/env bash
# Usage: bash guest/prepare_qemu.sh DEST
#
# Builds the vballoon QEMU test bed in DEST: Debian sid's qemu-system-x86_64 (QEMU >= 11
# is the first that can front a vhost-user balloon: vhost-user-test-device-pci), made
# runnable on this Debian 12 host with sid's own glibc and exactly the shared libraries
# the binary loads; a sid x86_64 kernel; and an initramfs made of busybox-static,
# virtio_balloon.ko and guest/qemu_init. Nothing outside DEST is written: the system's
# apt sources, lists, caches and dpkg database are left alone.
#
# Guarantees:
#   * DEST/.ready is created last, only after the guest has booted under QEMU (TCG)
#     to its ready marker and powered off; it is removed first whenever work is needed.
#   * A second run with the same inputs (this script, guest/qemu_init, busybox, the
#     fetched packages) does nothing and takes milliseconds.
#   * Downloads happen only when DEST/debs lacks a complete package set; rebuilding
#     after editing guest/qemu_init needs no network.
#   * The versions are sid's current ones at download time (recorded in VERSIONS,
#     never pinned here).
#
# Results in DEST:
#   root/         the unpacked packages; root/usr/bin/qemu-system-x86_64 is patched to
#                 use root's ld.so and libraries (absolute paths: moving DEST breaks it;
#                 rerun this script after a move). Firmware: -L root/usr/share/seabios
#                 -L root/usr/share/qemu.
#   vmlinuz       the guest kernel
#   initrd.img    gzip'd newc cpio with /init, busybox and the modules
#   VERSIONS      key=value: QEMU version, kernel release, package versions, sizes
#   debs/         the .deb files, MANIFEST (file package version), FLAVOUR and MIRROR
#                 (kept so a rebuild needs no network)
#
# Environment (all optional):
#   VBALLOON_DEBIAN_MIRROR        Debian mirror URI; default: the machine's own apt source
#   VBALLOON_QEMU_KERNEL_FLAVOUR  sid kernel flavour: cloud-amd64 (default; its modules
#                                 package is 24 MB instead of 110 MB, same virtio and
#                                 memory-management configuration) or amd64
#
# Needs: apt-get, apt-cache, dpkg-deb, tar, gzip (Debian essentials) and busybox-static,
# cpio, patchelf (scripts/setup.sh installs them). As root, apt still downloads as
# its unprivileged _apt user.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) is a failure

die() { echo "prepare_qemu.sh: error: $*" >&2; exit 1; }
log() { echo "prepare_qemu.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: bash guest/prepare_qemu.sh DEST"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
dest="$(cd "$1" && pwd -P)"   # absolute: patchelf writes it into the binary

readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly READY_MARKER='vballoon-guest: ready'
readonly BUSYBOX=/bin/busybox
readonly FLAVOUR="${VBALLOON_QEMU_KERNEL_FLAVOUR:-cloud-amd64}"
# What QEMU needs besides shared libraries: firmware (seabios), option ROMs and
# keymaps (qemu-system-data), and sid's glibc, which the binary is linked against.
readonly QEMU_PACKAGES=(qemu-system-x86 qemu-system-data seabios libc6)
readonly QEMU_REL=usr/bin/qemu-system-x86_64
readonly MULTIARCH=x86_64-linux-gnu
# Where Debian packages put shared libraries (merged /usr first).
readonly LIB_RELS=("usr/lib/$MULTIARCH" "lib/$MULTIARCH")

# ---------------------------------------------------------------------------
# Inputs and the quick path

check_tools() {
    local t missing=()
    for t in apt-get apt-cache dpkg-deb tar gzip cpio patchelf sha256sum flock timeout; do
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
        sha256sum "$here/prepare_qemu.sh" "$here/qemu_init" "$BUSYBOX"
        cat "$dest/debs/MANIFEST" 2>/dev/null || true
        echo "$dest $FLAVOUR"
    } | sha256sum | cut -d' ' -f1
}

quick_path() {
    [ -f "$dest/.ready" ] || return 1
    [ "$(cat "$dest/.ready")" = "$(fingerprint)" ] || return 1
    [ -x "$dest/root/$QEMU_REL" ] && [ -f "$dest/vmlinuz" ] && [ -f "$dest/initrd.img" ] || return 1
    # Catches a moved DEST or a damaged root: the interpreter path is absolute.
    "$dest/root/$QEMU_REL" --version >/dev/null 2>&1
}

# ---------------------------------------------------------------------------
# Private apt configuration (for sid, inside $dest/apt)

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

# Runs apt-get or apt-cache ($1) with every piece of state in $dest/apt. -c clears
# the hooks that the system's apt.conf.d attaches to "update" and dpkg runs (they
# would act on the system, not on our lists); the empty status file keeps the host's
# installed packages out of every answer. The binary caches are turned back on (Docker
# images turn them off): without them every apt-cache call parses the lists, ~1.4 s.
private_apt() {
    local tool="$1" a="$dest/apt"
    shift
    "$tool" -q -c "$a/apt.conf" \
        -o "Dir::Etc::SourceList=$a/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o "Dir::State::Lists=$a/lists" \
        -o "Dir::State::status=$a/status" \
        -o "Dir::Cache=$a/cache" \
        -o "Dir::Cache::Archives=$a/archives" \
        -o Dir::Cache::pkgcache=pkgcache.bin \
        -o Dir::Cache::srcpkgcache=srcpkgcache.bin \
        "$@"
}

apt_setup() {
    local mirror="$1" a="$dest/apt"
    rm -rf "$a"
    mkdir -p "$a/lists/partial" "$a/cache" "$a/archives/partial"
    echo "deb [signed-by=$KEYRING] $mirror sid main" >"$a/sources.list"
    printf '#clear %s;\n' APT::Update::Pre-Invoke APT::Update::Post-Invoke \
        APT::Update::Post-Invoke-Success DPkg::Pre-Invoke DPkg::Post-Invoke \
        DPkg::Pre-Install-Pkgs >"$a/apt.conf"
    : >"$a/status"
    log "apt-get update (private lists, $mirror sid)"
    private_apt apt-get update >&2
}

# Downloads packages ($2...) into directory $1 (sid's candidate versions).
apt_download() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    # apt drops privileges to _apt for downloads; let it write here so the
    # sandbox stays on (otherwise apt warns and downloads as root).
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$dir"; fi
    log "apt-get download $*"
    (cd "$dir" && private_apt apt-get download "$@" >&2)
    chown -R "$(id -u):$(id -g)" "$dir"
}

# Prints the real packages that package $1 depends on (Depends and Pre-Depends, every
# alternative), one per line. Virtual packages (<name>) are left out.
depends_of() {
    load_depends "$1"
    printf '%s\n' ${DEPS[$1]}
}

# Fills DEPS[pkg] (space-separated, as depends_of prints them) for the packages $@ not
# loaded yet, with one apt-cache call. Call it outside $(...) to keep the results.
load_depends() {
    local todo=() p out line cur=""
    for p; do [ -n "${DEPS[$p]+set}" ] || todo+=("$p"); done
    [ ${#todo[@]} -gt 0 ] || return 0
    out="$(private_apt apt-cache depends --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "${todo[@]}")"
    for p in "${todo[@]}"; do DEPS[$p]=""; done
    while IFS= read -r line; do
        if [[ $line =~ ^[^[:space:]] ]]; then
            cur="$line"
        elif [[ -n $cur && $line =~ ^\ [\ \|](Pre)?Depends:\ ([^\<][^ ]*)$ ]]; then
            DEPS[$cur]+="${BASH_REMATCH[2]} "
        fi
    done <<<"$out"
}

# Prints "package section" for each of the packages $@ (sid's candidate versions).
sections_of() {
    private_apt apt-cache show --no-all-versions "$@" \
        | awk '/^Package: / { p = $2 } /^Section: / { print p, $2 }' | sort -u
}

# ---------------------------------------------------------------------------
# Which packages: the kernel

# Prints the sid packages that carry the kernel image and its modules for $FLAVOUR.
# linux-image-<flavour> is a metapackage; its linux-image-<abi>-<flavour> is one too
# since Linux 7 (kernel in linux-binary-*, modules in linux-modules-*). Older layouts
# ship both in linux-image-<abi>-<flavour> itself.
kernel_packages() {
    local meta="linux-image-$FLAVOUR" image deps binary modules
    image="$(depends_of "$meta" | grep -E "^linux-image-[0-9].*-$FLAVOUR\$" | grep -v -- '-dbg$' | head -n1 || true)"
    [ -n "$image" ] || die "sid's $meta depends on no linux-image-<abi>-$FLAVOUR (flavour gone?)"
    deps="$(depends_of "$image")"
    binary="$(grep -E "^linux-binary-[0-9].*-$FLAVOUR\$" <<<"$deps" | head -n1 || true)"
    modules="$(grep -E "^linux-modules-[0-9].*-$FLAVOUR\$" <<<"$deps" | head -n1 || true)"
    if [ -n "$binary" ] && [ -n "$modules" ]; then
        echo "$binary" "$modules"
    else
        echo "$image"
    fi
}

# ---------------------------------------------------------------------------
# Which packages: QEMU's shared libraries

# Extracts deb $1 into $2 and records its file list for owner().
extract_into() {
    local deb="$1" root="$2" pkg
    pkg="$(dpkg-deb -f "$deb" Package)"
    dpkg-deb -x "$deb" "$root"
    mkdir -p "$root.lists"
    dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./||' >"$root.lists/$pkg"
}

# Prints the package that shipped $2 (a path relative to root $1).
owner() {
    local hit
    hit="$(grep -lxF -- "$2" "$1.lists"/* | head -n1 || true)"
    [ -n "$hit" ] || die "no package in $1 owns $2"
    basename "$hit"
}

# Prints the first lib dir of root $1 that has soname $2, relative to the root.
find_lib() {
    local rel
    for rel in "${LIB_RELS[@]}"; do
        if [ -e "$1/$rel/$2" ]; then
            echo "$rel/$2"
            return 0
        fi
    done
    return 1
}

# Walks DT_NEEDED from the QEMU binary through root $1 and prints "soname requester"
# for every library no lib dir of the root has (requester: the package whose ELF
# file needs it).
missing_libs() {
    local root="$1" rel so found req
    local -A seen=()
    local queue=("$QEMU_REL")
    while [ ${#queue[@]} -gt 0 ]; do
        rel="${queue[0]}"
        queue=("${queue[@]:1}")
        while read -r so; do
            [ -n "$so" ] && [ -z "${seen[$so]:-}" ] || continue
            seen[$so]=1
            if found="$(find_lib "$root" "$so")"; then
                queue+=("$found")
            else
                req="$(owner "$root" "$rel")"
                echo "$so $req"
            fi
        done < <(patchelf --print-needed "$root/$rel")
    done
}

# True if package name $2 looks like the Debian library package for soname $1 (policy
# 8.1: libfoo-1.2.so.3 -> libfoo1.2-3, maybe with a t64 suffix; punctuation ignored).
named_for() {
    local stem="${1%%.so*}" ver="${1#*.so}" n p
    ver="${ver#.}"
    ver="${ver%%.*}"
    n="${stem,,}"; n="${n//[-_.+]/}"
    p="${2,,}"; p="${p//[-_.+]/}"
    [[ $p == "$n"* ]] && [[ ${p#"$n"} == "$ver"* ]]
}

# True if file list $1 (paths relative to the root) has one of sonames $2... in a lib dir.
provides_any() {
    local files="$1" so rel
    shift
    for so in "$@"; do
        for rel in "${LIB_RELS[@]}"; do
            grep -qxF "$rel/$so" <<<"$files" && return 0
        done
    done
    return 1
}

# Downloads into $1 and extracts into root $2 the packages that provide the missing
# libraries, round after round, until the binary's whole DT_NEEDED closure is in the
# root. Only packages that provide a needed soname are kept.
resolve_libs() {
    local dl="$1" root="$2" round=0 so req cand deb pkg
    local -A have=()
    for deb in "$dl"/*.deb; do have[$(dpkg-deb -f "$deb" Package)]=1; done
    while :; do
        local missing
        missing="$(missing_libs "$root")"
        [ -n "$missing" ] || break
        round=$((round + 1))
        ((round <= 30)) || die "library closure does not converge; still missing: $missing"
        local -A want=() unmatched=()
        load_depends $(awk '{ print $2 }' <<<"$missing" | sort -u)
        while read -r so req; do
            local hit=""
            for cand in ${DEPS[$req]}; do
                [ -z "${have[$cand]:-}" ] || continue
                if named_for "$so" "$cand"; then hit="$cand"; break; fi
            done
            if [ -n "$hit" ]; then want[$hit]=1; else unmatched["$so"]="$req"; fi
        done <<<"$missing"
        if [ ${#want[@]} -gt 0 ]; then
            local batch="$dl.round$round"
            rm -rf "$batch"
            apt_download "$batch" "${!want[@]}"
            for deb in "$batch"/*.deb; do
                extract_into "$deb" "$root"
                have[$(dpkg-deb -f "$deb" Package)]=1
                mv "$deb" "$dl/"
            done
            rm -rf "$batch"
            continue   # names are cheap to check; fetch unnamed ones only if still missing
        fi
        # No package is named for these sonames (zlib1g ships libz.so.1): fetch the
        # requesters' library dependencies and keep those that contain one.
        local cands=()
        for so in "${!unmatched[@]}"; do
            for cand in ${DEPS[${unmatched[$so]}]}; do
                if [ -z "${have[$cand]:-}" ]; then cands+=("$cand"); fi
            done
        done
        [ ${#cands[@]} -gt 0 ] || die "no sid package found for: $(tr '\n' ';' <<<"$missing")"
        cands=($(sections_of "${cands[@]}" | awk '$2 == "libs" || $2 ~ /\/libs$/ { print $1 }'))
        [ ${#cands[@]} -gt 0 ] || die "no library package among the dependencies for: $(tr '\n' ';' <<<"$missing")"
        local batch="$dl.probe$round"
        rm -rf "$batch"
        apt_download "$batch" "${cands[@]}"
        local kept=0
        for deb in "$batch"/*.deb; do
            pkg="$(dpkg-deb -f "$deb" Package)"
            have[$pkg]=1
            local files
            files="$(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./||')"
            if provides_any "$files" "${!unmatched[@]}"; then
                extract_into "$deb" "$root"
                mv "$deb" "$dl/"
                kept=1
            fi
        done
        rm -rf "$batch"
        ((kept)) || die "no dependency of the requesters provides: ${!unmatched[*]}"
    done
    log "shared libraries resolved in $round round(s)"
}

# ---------------------------------------------------------------------------
# Download

fetch_debs() {
    local mirror="${VBALLOON_DEBIAN_MIRROR:-$(system_mirror)}"
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt (set VBALLOON_DEBIAN_MIRROR)"
    apt_setup "$mirror"

    local work="$dest/.work" dl="$dest/.work/dl" root="$dest/.work/resolve"
    rm -rf "$dl" "$root" "$root.lists"
    mkdir -p "$work" "$root"
    local kernel
    read -r -a kernel <<<"$(kernel_packages)"
    apt_download "$dl" "${QEMU_PACKAGES[@]}" "${kernel[@]}"
    local deb
    for deb in "$dl"/*.deb; do
        case "$(dpkg-deb -f "$deb" Package)" in
            linux-*) ;;   # not part of QEMU's root
            *) extract_into "$deb" "$root" ;;
        esac
    done
    resolve_libs "$dl" "$root"
    rm -rf "$root" "$root.lists"

    # The manifest is written last: debs/ without it is an interrupted download.
    {
        for deb in "$dl"/*.deb; do
            echo "$(basename "$deb") $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
        done
    } >"$dl/MANIFEST.new"
    echo "$mirror" >"$dl/MIRROR"
    echo "$FLAVOUR" >"$dl/FLAVOUR"
    mv "$dl/MANIFEST.new" "$dl/MANIFEST"
    rm -rf "$dest/debs" && mv "$dl" "$dest/debs"
    # The lists (25 MB) only served this download.
    rm -rf "$dest/apt"
}

have_debs() {
    [ -f "$dest/debs/MANIFEST" ] || return 1
    local file pkg version
    while read -r file pkg version; do
        [ -f "$dest/debs/$file" ] || return 1
    done <"$dest/debs/MANIFEST"
    # A kernel of the flavour asked for: changing VBALLOON_QEMU_KERNEL_FLAVOUR refetches.
    [ "$(cat "$dest/debs/FLAVOUR" 2>/dev/null)" = "$FLAVOUR" ] \
        && grep -q ' qemu-system-x86 ' "$dest/debs/MANIFEST"
}

# ---------------------------------------------------------------------------
# Unpack and patch

lib_path() {
    local rel out=()
    for rel in "${LIB_RELS[@]}"; do
        [ -d "$1/$rel" ] && out+=("$1/$rel")
    done
    (IFS=:; echo "${out[*]}")
}

# Extracts QEMU and its libraries into $dest/root and patches the binary to use them.
unpack_qemu() {
    local new="$dest/root.new" deb
    rm -rf "$new" "$dest/root"
    mkdir -p "$new"
    while read -r deb _; do
        case "$deb" in linux-*) continue ;; esac
        dpkg-deb -x "$dest/debs/$deb" "$new"
    done <"$dest/debs/MANIFEST"
    # Unused here: documentation and the other two emulators (about 40 MB).
    rm -rf "$new/usr/share/doc" "$new/usr/share/man" "$new/usr/share/lintian" \
        "$new/usr/bin/qemu-system-i386" "$new/usr/bin/qemu-system-x86_64-microvm"

    [ -x "$new/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2" ] || die "no dynamic loader in sid's libc6"
    mv "$new" "$dest/root"
    # Patched in place, so the paths written into it are the final ones. DT_RPATH, not
    # RUNPATH: RUNPATH would not apply to the libraries' own dependencies, which would
    # then come from the host's (older) libraries.
    local ld="$dest/root/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2"
    patchelf --set-interpreter "$ld" --force-rpath --set-rpath "$(lib_path "$dest/root")" \
        "$dest/root/$QEMU_REL"

    # Every library must come from the root, none from the host.
    local listing outside
    listing="$("$ld" --list "$dest/root/$QEMU_REL" 2>&1)" \
        || die "the dynamic loader cannot load $QEMU_REL: $listing"
    outside="$(awk -v root="$dest/root/" '$2 == "=>" && index($3, root) != 1' <<<"$listing")"
    [ -z "$outside" ] || die "libraries resolved outside $dest/root: $outside"
    "$dest/root/$QEMU_REL" --version >/dev/null || die "patched $QEMU_REL does not run"
    nlibs="$(grep -c '=>' <<<"$listing")"
}

# Extracts the kernel packages into $dest/.work/kernel; sets kernel_dir to the
# directory with vmlinuz (or /boot) and moddir to the modules of its release.
unpack_kernel() {
    local k="$dest/.work/kernel" deb
    rm -rf "$k"
    mkdir -p "$k"
    while read -r deb _; do
        case "$deb" in linux-*) dpkg-deb -x "$dest/debs/$deb" "$k" ;; esac
    done <"$dest/debs/MANIFEST"
    local vmlinuz
    vmlinuz="$(find "$k" \( -path '*/usr/lib/modules/*/vmlinuz' -o -path '*/boot/vmlinuz-*' \) -type f | head -n1)"
    [ -n "$vmlinuz" ] || die "no vmlinuz in the kernel packages"
    case "$vmlinuz" in
        */boot/vmlinuz-*) release="${vmlinuz##*/vmlinuz-}" ;;
        *) release="$(basename "$(dirname "$vmlinuz")")" ;;
    esac
    moddir="$k/usr/lib/modules/$release"
    [ -d "$moddir" ] || moddir="$k/lib/modules/$release"
    [ -d "$moddir" ] || die "no modules directory for $release"
    cp "$vmlinuz" "$dest/vmlinuz.new"
    mv "$dest/vmlinuz.new" "$dest/vmlinuz"
}

# Prints the path (relative to $moddir) of module $1, trying - and _ spellings.
module_path() {
    local alt="${1//_/-}" hit
    hit="$(cd "$moddir" && find kernel -type f \( -name "$1.ko" -o -name "$1.ko.*" \
        -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n1)"
    [ -n "$hit" ] && echo "$hit"
}

# Copies module $1 (relative to $moddir, maybe compressed) to $2 as a plain .ko:
# busybox's insmod is not relied on to decompress.
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

# The depends= field of a plain .ko's modinfo, as words.
module_depends() {
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

# Installs module $1 and, first, its dependencies (from their own modinfo: sid's
# packages ship no modules.dep) into $root/lib/modules; appends to etc/modules.order.
add_module() {
    local name="$1" root="$2" rel dep
    grep -qx "$name.ko" "$root/etc/modules.order" && return 0
    rel="$(module_path "$name")" || return 1
    install_module "$rel" "$root/lib/modules"
    for dep in $(module_depends "$root/lib/modules/$(basename "${rel%%.ko*}").ko"); do
        add_module "$dep" "$root" || die "module $name needs $dep, which is not in the package"
    done
    echo "$name.ko" >>"$root/etc/modules.order"
}

build_initramfs() {
    local root="$dest/.work/initramfs"
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    cp "$here/qemu_init" "$root/init"
    chmod 0755 "$root/init" "$root/bin/busybox"
    # The kernel opens /dev/console from the initramfs before running /init;
    # making the node needs root, and init copes without it.
    mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true
    : >"$root/etc/modules.order"
    # Absent means built in (or not configured): init tells which at boot.
    add_module virtio_balloon "$root" || true
    (cd "$root" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$dest/initrd.img.new"
    mv "$dest/initrd.img.new" "$dest/initrd.img"
    balloon="absent"
    if [ -s "$root/etc/modules.order" ]; then
        balloon=module
    elif grep -qE '(^|/)virtio_balloon\.ko' "$moddir/modules.builtin" 2>/dev/null; then
        balloon=builtin
    fi
    modules="$(tr '\n' ' ' <"$root/etc/modules.order" | sed 's/ $//')"
}

write_versions() {
    local f="$dest/VERSIONS.new" file pkg version dl_bytes unpacked
    dl_bytes="$(awk '{ print $1 }' "$dest/debs/MANIFEST" | (cd "$dest/debs" && xargs stat -c %s) \
        | awk '{ s += $1 } END { print s }')"
    unpacked="$(du -sb "$dest/root" "$dest/vmlinuz" "$dest/initrd.img" | awk '{ s += $1 } END { print s }')"
    {
        echo "qemu_version=$("$dest/root/$QEMU_REL" --version | head -n1 | sed -E 's/^QEMU emulator version //')"
        echo "kernel_release=$release"
        echo "kernel_flavour=$FLAVOUR"
        echo "virtio_balloon=$balloon"
        echo "modules=$modules"
        while read -r file pkg version; do
            echo "$pkg=$version"
        done <"$dest/debs/MANIFEST"
        echo "shared_libraries=$nlibs"
        echo "download_bytes=$dl_bytes"
        echo "unpacked_bytes=$unpacked"
        echo "busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
        echo "mirror=$(cat "$dest/debs/MIRROR" 2>/dev/null || echo unknown)"
    } >"$f"
    mv "$f" "$dest/VERSIONS"
}

# ---------------------------------------------------------------------------
# Smoke test: boot under TCG without devices, see the ready marker, power off.

# QEMU runs as a coprocess: its serial console is our pair of pipes, and they must
# stay open until the guest has powered off.
smoke_test() {
    local line seen=0 rc=0 log="$dest/.work/smoke.log"
    local deadline=$((SECONDS + 120))
    : >"$log"
    coproc GUEST {
        exec timeout -k 5 150 "$dest/root/$QEMU_REL" -accel tcg -cpu max -smp 1 -m 128M \
            -machine q35 -nodefaults -display none -serial stdio -no-reboot \
            -L "$dest/root/usr/share/seabios" -L "$dest/root/usr/share/qemu" \
            -kernel "$dest/vmlinuz" -initrd "$dest/initrd.img" \
            -append "console=ttyS0 panic=-1 quiet" 2>&1
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
    flock -w 900 "$lock_fd" || die "$dest is locked by another prepare_qemu.sh"
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
    mkdir -p "$dest/.work"
    unpack_qemu
    unpack_kernel
    build_initramfs
    write_versions
    log "booting the guest once under QEMU/TCG (smoke test)"
    smoke_test
    # The unpacked kernel packages are mostly modules we do not use.
    rm -rf "$dest/.work"
    fingerprint >"$dest/.ready"
    log "ready: $(tr '\n' ' ' <"$dest/VERSIONS")"
}

declare -A DEPS=()
lock_fd=""
moddir=""
release=""
balloon=""
modules=""
nlibs=0
main
