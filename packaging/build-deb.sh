#!/usr/bin/env bash
# Builds the smaregi-relay Debian package with cargo-deb.
#
#   packaging/build-deb.sh [--target amd64|arm64|armhf] [--deb-version VERSION]
#                          [--no-build] [--output DIR]
#
# amd64 builds natively. arm64 (Raspberry Pi OS 64-bit, Pi 3/4/5) and armhf
# (Raspberry Pi OS 32-bit on ARMv7: Pi 2/3/4/5; not the ARMv6 Pi 1/Zero)
# cross-compile with Debian's cross toolchains and multiarch libsystemd-dev;
# the script installs them (apt, as root or through sudo) when they are
# missing, and the Rust standard library of the target through rustup.
#
# --deb-version overrides the package version (e.g. 0.1.0-1+b1 for a
# rebuild); --no-build packages the binary already in target/. The built
# binary runs `--version` (cross builds: under qemu-user-static) and writes
# the man pages and completions. Prints the path of the .deb on its last
# line.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=amd64
deb_version=""
no_build=""
output_dir="target/debian"
while [ $# -gt 0 ]; do
    case "$1" in
        --target) arch="${2:?--target needs amd64, arm64 or armhf}"; shift 2 ;;
        --deb-version) deb_version="${2:?--deb-version needs a version}"; shift 2 ;;
        --no-build) no_build=1; shift ;;
        --output) output_dir="${2:?--output needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# Installs the Debian packages given that are not installed yet.
ensure_packages() {
    local missing=()
    local package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$package")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "build-deb.sh: installing ${missing[*]}" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

case "$arch" in
    amd64) triple="" ;;
    arm64) triple="aarch64-unknown-linux-gnu"; gnu="aarch64-linux-gnu" ;;
    armhf) triple="armv7-unknown-linux-gnueabihf"; gnu="arm-linux-gnueabihf" ;;
    *) echo "build-deb.sh: --target must be amd64, arm64 or armhf, not $arch" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null; then
    echo "build-deb.sh: cargo-deb is missing: cargo install --locked cargo-deb" >&2
    exit 1
fi
# dpkg-dev: dpkg-shlibdeps, which computes Depends ($auto) from the binary.
ensure_packages pkg-config dpkg-dev

# The binary is built here, not by cargo-deb, so that it can write the man
# pages and completions the package ships before cargo-deb packs them.
cargo_deb_args=(--locked --no-build --output "$output_dir")
if [ -n "$deb_version" ]; then cargo_deb_args+=(--deb-version "$deb_version"); fi
cargo_build_args=(--release --locked --bin smaregi-relay)
run_binary=()

if [ -z "$triple" ]; then
    ensure_packages libsystemd-dev
else
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
        $sudo dpkg --add-architecture "$arch"
        $sudo apt-get update -qq
    fi
    ensure_packages "gcc-$gnu" "libc6-dev-$arch-cross" qemu-user-static
    if ! rustup target list --installed | grep -qx "$triple"; then
        rustup target add "$triple"
    fi
    triple_env=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${triple_env}_LINKER=$gnu-gcc"
    # ring's C and assembly, and anything else the cc crate builds.
    export "CC_${triple//-/_}=$gnu-gcc"
    export "AR_${triple//-/_}=$gnu-ar"
    export PKG_CONFIG_ALLOW_CROSS=1

    # libsystemd for the target: multiarch libsystemd-dev:$arch if it can
    # be installed. Multi-Arch: same wants the host's libraries at exactly
    # the same versions, which a machine behind on updates (or a mirror
    # mid-sync) cannot give; then the target's packages are unpacked into
    # a sysroot under target/ instead, leaving the host untouched.
    libdirs=()
    if dpkg-query -W -f='${Status}' "libsystemd-dev:$arch" 2>/dev/null | grep -q 'ok installed' ||
        $sudo apt-get install -y -qq --no-install-recommends "libsystemd-dev:$arch" >/dev/null 2>&1; then
        echo "build-deb.sh: libsystemd from multiarch libsystemd-dev:$arch" >&2
        export PKG_CONFIG_LIBDIR="/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
        libdirs=("/usr/lib/$gnu" "/lib/$gnu")
    else
        sysroot="$PWD/target/sysroot-$arch"
        echo "build-deb.sh: libsystemd-dev:$arch cannot be installed; unpacking it into $sysroot" >&2
        if [ ! -e "$sysroot/usr/lib/$gnu/libsystemd.so" ]; then
            downloads=$(mktemp -d)
            (cd "$downloads" && apt-get download -qq \
                "libsystemd-dev:$arch" "libsystemd0:$arch" "liblzma5:$arch" "libzstd1:$arch" \
                "liblz4-1:$arch" "libcap2:$arch" "libgcrypt20:$arch" "libgpg-error0:$arch")
            mkdir -p "$sysroot"
            for package in "$downloads"/*.deb; do dpkg-deb -x "$package" "$sysroot"; done
            rm -rf "$downloads"
        fi
        export PKG_CONFIG_LIBDIR="$sysroot/usr/lib/$gnu/pkgconfig:$sysroot/usr/share/pkgconfig"
        export PKG_CONFIG_SYSROOT_DIR="$sysroot"
        libdirs=("$sysroot/usr/lib/$gnu" "$sysroot/lib/$gnu")
        # dpkg-shlibdeps cannot see the sysroot: Depends from the variant.
        cargo_deb_args+=(--variant sysroot)
        # libsystemd.so.0's own dependencies are found here at link time.
        export "CARGO_TARGET_${triple_env}_RUSTFLAGS=-C link-arg=-Wl,-rpath-link,${libdirs[0]}:${libdirs[1]}"
    fi
    cargo_deb_args+=(--target "$triple")
    cargo_build_args+=(--target "$triple")
    # The target's binary runs here under qemu-user (binfmt is not needed).
    qemu="qemu-$([ "$arch" = arm64 ] && echo aarch64 || echo arm)-static"
    library_path=$(IFS=:; echo "${libdirs[*]}")
    run_binary=("$qemu" -L "/usr/$gnu" -E "LD_LIBRARY_PATH=$library_path")
fi

if [ -z "$no_build" ]; then
    cargo build "${cargo_build_args[@]}"
fi
binary="target/${triple:+$triple/}release/smaregi-relay"
[ -x "$binary" ] || { echo "build-deb.sh: no binary at $binary (drop --no-build)" >&2; exit 1; }
file "$binary" >&2 || true
"${run_binary[@]}" "$binary" --version >&2

# Man pages (gzipped, as Debian ships them) and completions, from the CLI.
docs=target/generated-docs
rm -rf "$docs"
"${run_binary[@]}" "$binary" generate-docs --out "$docs"
gzip -9n "$docs"/man/*.1

mkdir -p "$output_dir"
deb=$(cargo deb "${cargo_deb_args[@]}" | tail -n 1)
echo "$deb"
