#!/usr/bin/env bash
# Checks a built smaregi-relay .deb without installing it: its files
# (dpkg-deb -c), conffiles, maintainer scripts, Depends and architecture.
#
#   packaging/check-deb.sh PACKAGE.deb [amd64|arm64|armhf]
#
# Prints every problem and exits 1 if there is any.
set -euo pipefail

deb=${1:?usage: check-deb.sh PACKAGE.deb [ARCH]}
arch=${2:-amd64}
problems=0
problem() {
    printf 'check-deb: %s\n' "$*" >&2
    problems=$((problems + 1))
}

contents=$(dpkg-deb -c "$deb")
# "MODE PATH" for each file that must be in the package.
expected=(
    "-rwxr-xr-x ./usr/bin/smaregi-relay"
    "-rw-r--r-- ./usr/lib/systemd/system/smaregi-relay.service"
    "-rw-r--r-- ./etc/smaregi-relay/config.toml"
    "-rw-r--r-- ./usr/share/doc/smaregi-relay/README.md"
    "-rw-r--r-- ./usr/share/doc/smaregi-relay/copyright"
    "-rw-r--r-- ./usr/share/doc/smaregi-relay/changelog.Debian.gz"
    "-rw-r--r-- ./usr/share/doc/smaregi-relay/examples/config.toml"
    "-rw-r--r-- ./usr/share/man/man1/smaregi-relay.1.gz"
    "-rw-r--r-- ./usr/share/man/man1/smaregi-relay-run.1.gz"
    "-rw-r--r-- ./usr/share/man/man1/smaregi-relay-check-config.1.gz"
    "-rw-r--r-- ./usr/share/bash-completion/completions/smaregi-relay"
    "-rw-r--r-- ./usr/share/zsh/vendor-completions/_smaregi-relay"
    "-rw-r--r-- ./usr/share/fish/vendor_completions.d/smaregi-relay.fish"
    "-rw-r--r-- ./usr/share/lintian/overrides/smaregi-relay"
)
for entry in "${expected[@]}"; do
    mode=${entry%% *}
    path=${entry#* }
    line=$(awk -v p="$path" '$6 == p' <<<"$contents")
    if [ -z "$line" ]; then
        problem "missing $path"
    elif [ "$(awk '{ print $1 }' <<<"$line")" != "$mode" ]; then
        problem "$path is $(awk '{ print $1 }' <<<"$line"), expected $mode"
    fi
done
# Everything belongs to root; nothing lands outside the expected trees.
not_root=$(awk '$2 != "0/0" { print $6 }' <<<"$contents")
[ -z "$not_root" ] || problem "not owned by root: $not_root"
unexpected=$(awk '{ print $6 }' <<<"$contents" |
    grep -v -E '^\./(usr/bin/|usr/lib/systemd/system/|etc/smaregi-relay/|usr/share/(doc|man|bash-completion|zsh|fish|lintian)/|usr/$|usr/lib/$|usr/lib/systemd/$|usr/share/$|etc/$)' || true)
[ -z "$unexpected" ] || problem "unexpected files: $unexpected"

control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT
dpkg-deb -e "$deb" "$control"
[ "$(cat "$control/conffiles")" = "/etc/smaregi-relay/config.toml" ] ||
    problem "conffiles is '$(cat "$control/conffiles")', expected /etc/smaregi-relay/config.toml"
for script in postinst prerm postrm; do
    [ -x "$control/$script" ] || problem "no executable $script"
done
grep -q 'deb-systemd-helper enable smaregi-relay.service' "$control/postinst" || problem "postinst does not enable the unit"
# shellcheck disable=SC2016 # the literal text of the generated snippet
grep -q -F 'deb-systemd-invoke $_dh_action smaregi-relay.service' "$control/postinst" || problem "postinst does not start the unit"
grep -q 'adduser --system' "$control/postinst" || problem "postinst does not create the system user"
grep -q 'rm -rf /var/lib/smaregi-relay' "$control/postrm" || problem "postrm does not remove the state on purge"
grep -q '#DEBHELPER#' "$control/postinst" "$control/postrm" && problem "an unexpanded #DEBHELPER# is left"

depends=$(dpkg-deb -f "$deb" Depends)
for needed in libc6 libsystemd0 adduser; do
    grep -q -E "(^|, )$needed( |,|$)" <<<"$depends" || problem "Depends lacks $needed: $depends"
done
[ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || problem "Architecture is $(dpkg-deb -f "$deb" Architecture), expected $arch"

if [ "$problems" -gt 0 ]; then
    echo "check-deb: $problems problem(s) in $deb" >&2
    exit 1
fi
echo "check-deb: $deb ok ($(wc -l <<<"$contents") entries; Depends: $depends)"
