# shellcheck shell=bash
# Sourced by hack/setup.sh; tested by tests/deploy.rs against fake roots.
#
# debian_archive_uri [ROOT]
#   Prints the address of the Debian archive that apt on this machine (or under
#   ROOT) already uses, so that a node behind a mirror fetches from its mirror
#   and setup names no host itself. The archive is the entry of type `deb` for
#   this release's own suite (VERSION_CODENAME of os-release, else bookworm)
#   with the `main` component, over http or https: that rules out the security
#   archive (suite `<codename>-security`) and third-party repositories (other
#   suites, or other components). deb822 `.sources` files are read first, as
#   Debian 12 writes them, then the classic `sources.list`. Fails, saying so,
#   when there is none.
debian_archive_uri() {
  local root=${1:-} codename uri f
  codename=$(sed -n 's/^VERSION_CODENAME=//p' "$root/etc/os-release" 2>/dev/null | tr -d '"')
  codename=${codename:-bookworm}
  local deb822=() classic=()
  for f in "$root"/etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && deb822+=("$f"); done
  for f in "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && classic+=("$f")
  done
  uri=
  if [ ${#deb822[@]} -gt 0 ]; then uri=$(_deb822_archive "$codename" "${deb822[@]}"); fi
  if [ -z "$uri" ] && [ ${#classic[@]} -gt 0 ]; then uri=$(_classic_archive "$codename" "${classic[@]}"); fi
  if [ -z "$uri" ]; then
    echo "no Debian archive found in $root/etc/apt: need a 'deb' entry for suite $codename," \
      "component main, over http(s), in sources.list.d/*.sources or sources.list" >&2
    return 1
  fi
  printf '%s\n' "$uri"
}

# deb822: stanzas separated by blank lines, `Field: value` lines, `#` comments.
# Field names are case-insensitive; a stanza may be switched off by `Enabled: no`.
_deb822_archive() {
  awk -v want="$1" '
    BEGIN { RS = ""; FS = "\n" }
    {
      split("", f)
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^[ \t]*#/ || $i !~ /^[A-Za-z-]+:/) continue
        c = index($i, ":")
        v = " " substr($i, c + 1) " "
        gsub(/[ \t]+/, " ", v)
        f[tolower(substr($i, 1, c - 1))] = v
      }
      if (f["enabled"] ~ / (no|false) /) next
      if (f["types"] !~ / deb / || f["suites"] !~ (" " want " ") || f["components"] !~ / main /) next
      split(f["uris"], u, " ")
      if (u[1] ~ /^https?:\/\//) { print u[1]; exit }
    }' "${@:2}"
}

# One-line form: `deb [options] URI SUITE COMPONENT...`; the options may hold spaces.
_classic_archive() {
  awk -v want="$1" '
    { sub(/#.*/, "") }
    $1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
      if ($i !~ /^https?:\/\// || $(i + 1) != want) next
      for (j = i + 2; j <= NF; j++) if ($j == "main") { print $i; exit }
    }' "${@:2}"
}
