#!/usr/bin/env bash
# Fetch the Prometheus, promtool and VictoriaMetrics binaries used by the
# integration tests.
#
# Debian bookworm ships Prometheus 2.42 and VictoriaMetrics 1.79 (which has no
# OpenTelemetry ingestion), so the packages come from the trixie suite of the
# mirror the system's apt sources already use.
# The system's apt configuration and state are never modified: apt runs with a
# private sources list, lists and cache under the backends folder, and the
# packages are unpacked with `dpkg -x` instead of being installed.
#
# Environment:
#   OTEL_LLM_BACKENDS_DIR   where binaries live (default ~/.cache/otel_llm/backends)
#   OTEL_LLM_DEBIAN_MIRROR  mirror URI to use instead of the one from apt sources
#   OTEL_LLM_DEBIAN_SUITE   suite to fetch from (default trixie)
#
# Prints the absolute paths of prometheus, promtool and victoria-metrics.
set -euo pipefail

BACKENDS_DIR="${OTEL_LLM_BACKENDS_DIR:-$HOME/.cache/otel_llm/backends}"
SUITE="${OTEL_LLM_DEBIAN_SUITE:-trixie}"
PACKAGES=(prometheus promtool victoria-metrics)
# Package name -> required upstream version prefix.
declare -A WANT_VERSION=([prometheus]="2.53." [promtool]="2.53." [victoria-metrics]="1.112.")
BINARIES=(prometheus promtool victoria-metrics)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "fetch_backends: $*" >&2; }
die() { log "error: $*"; exit 1; }

bin_path() { echo "$BACKENDS_DIR/usr/bin/$1"; }

# Runs a binary's version flag; VictoriaMetrics uses Go's single-dash flags.
run_version() {
    local name=$1 path
    path=$(bin_path "$name")
    [[ -x $path ]] || return 1
    case $name in
        victoria-metrics) timeout 20 "$path" -version ;;
        *) timeout 20 "$path" --version ;;
    esac
}

binaries_ok() {
    local name
    for name in "${BINARIES[@]}"; do
        run_version "$name" >/dev/null 2>&1 || return 1
    done
}

report() {
    local name
    for name in "${BINARIES[@]}"; do
        bin_path "$name"
    done
    if [[ -f $BACKENDS_DIR/versions.txt ]]; then
        sed 's/^/fetch_backends: package /' "$BACKENDS_DIR/versions.txt" >&2
    fi
    # The Debian VictoriaMetrics build prints an empty version string, so the
    # package versions above are the authoritative ones.
    for name in "${BINARIES[@]}"; do
        log "$name runs: $(run_version "$name" 2>&1 | head -n1 | grep . || echo '(no version string)')"
    done
}

# Prints "URI SUITE..." for every enabled `deb` entry in the apt sources,
# covering both the one-line (*.list) and the deb822 (*.sources) formats.
list_apt_entries() {
    local srclist srcparts f
    eval "$(apt-config shell srclist Dir::Etc::sourcelist/f srcparts Dir::Etc::sourceparts/d)"
    local -a one_line=() deb822=()
    [[ -n ${srclist:-} && -f $srclist ]] && one_line+=("$srclist")
    if [[ -n ${srcparts:-} && -d $srcparts ]]; then
        for f in "$srcparts"/*.list; do [[ -f $f ]] && one_line+=("$f"); done
        for f in "$srcparts"/*.sources; do [[ -f $f ]] && deb822+=("$f"); done
    fi
    if ((${#one_line[@]})); then
        sed -e 's/#.*//' -e 's/\[[^]]*\]//g' "${one_line[@]}" |
            awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
    fi
    if ((${#deb822[@]})); then
        for f in "${deb822[@]}"; do
            awk '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "")
                        { n = split(uris, u, " "); for (i = 1; i <= n; i++) print u[i], suites }
                    types = uris = suites = ""; enabled = "yes"
                }
                BEGIN { enabled = "yes" }
                /^#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { next }
                {
                    key = tolower($0); sub(/:.*/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                END { flush() }
            ' "$f"
        done
    fi
}

# Picks the mirror serving the system's own release (not -security/-updates).
find_mirror() {
    if [[ -n ${OTEL_LLM_DEBIAN_MIRROR:-} ]]; then
        echo "${OTEL_LLM_DEBIAN_MIRROR%/}"
        return
    fi
    local codename="" entries uri
    # shellcheck disable=SC1091
    [[ -r /etc/os-release ]] && codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    entries=$(list_apt_entries)
    [[ -n $entries ]] || die "no 'deb' entries found in the apt sources; set OTEL_LLM_DEBIAN_MIRROR"
    uri=""
    if [[ -n $codename ]]; then
        uri=$(awk -v c="$codename" '{ for (i = 2; i <= NF; i++) if ($i == c) { print $1; exit } }' <<<"$entries")
    fi
    if [[ -z $uri ]]; then
        uri=$(awk '$1 ~ /\/debian\/?$/ { print $1; exit }' <<<"$entries")
    fi
    [[ -n $uri ]] || die "could not find a Debian mirror in the apt sources; set OTEL_LLM_DEBIAN_MIRROR"
    echo "${uri%/}"
}

fetch() {
    local mirror work apt_dir signed_by="" pkg deb version name
    mirror=$(find_mirror)
    log "using $mirror $SUITE"
    work=$(mktemp -d "$BACKENDS_DIR/.work.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    apt_dir="$work/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$work/debs" "$work/root"
    [[ -r $KEYRING ]] && signed_by="[signed-by=$KEYRING] "
    echo "deb ${signed_by}$mirror $SUITE main" >"$apt_dir/sources.list"

    local -a apt_opts=(
        -q -o Dir::Etc::sourcelist="$apt_dir/sources.list"
        -o Dir::Etc::sourceparts=-
        -o Dir::State::Lists="$apt_dir/lists"
        -o Dir::Cache="$apt_dir/cache"
        # The private folders may sit where the _apt sandbox user cannot write.
        -o APT::Sandbox::User=root
    )
    apt-get "${apt_opts[@]}" update >&2
    (cd "$work/debs" && apt-get "${apt_opts[@]}" download "${PACKAGES[@]}" >&2)

    : >"$work/versions.txt"
    for pkg in "${PACKAGES[@]}"; do
        deb=$(ls "$work/debs/${pkg}_"*.deb)
        version=$(dpkg-deb -f "$deb" Version)
        [[ $version == "${WANT_VERSION[$pkg]}"* ]] ||
            die "$pkg $version from $SUITE does not match ${WANT_VERSION[$pkg]}*"
        echo "$pkg $version" >>"$work/versions.txt"
        dpkg -x "$deb" "$work/root"
    done

    # Keep only the binaries the tests run (the VictoriaMetrics package also
    # carries vmagent, vmctl, ... worth ~130 MB of cache).
    mkdir -p "$work/keep/usr/bin"
    for name in "${BINARIES[@]}"; do
        mv "$work/root/usr/bin/$name" "$work/keep/usr/bin/$name"
    done
    # Swap the tree in only once it is complete, so an interrupted run never
    # leaves truncated binaries behind.
    rm -rf "${BACKENDS_DIR:?}/usr"
    mv "$work/keep/usr" "$BACKENDS_DIR/usr"
    mv "$work/versions.txt" "$BACKENDS_DIR/versions.txt"
    rm -rf "$work"
    trap - EXIT
}

main() {
    local start=$SECONDS name
    mkdir -p "$BACKENDS_DIR"
    BACKENDS_DIR=$(cd "$BACKENDS_DIR" && pwd -P)
    # Serialise concurrent runs sharing one cache folder.
    exec 9>"$BACKENDS_DIR/.lock"
    flock 9

    if binaries_ok; then
        log "already present in $BACKENDS_DIR"
    else
        fetch
        for name in "${BINARIES[@]}"; do
            run_version "$name" >/dev/null 2>&1 || die "$(bin_path "$name") does not run"
        done
        log "fetched in $((SECONDS - start))s"
    fi
    report
}

main "$@"
