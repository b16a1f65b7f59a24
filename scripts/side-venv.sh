# Side venvs for the CI lanes that test another release of one dependency (transformers 4.45.1,
# a newer Triton) next to the project's locked .venv. Sourced, not run:
#
#   source "$root/scripts/side-venv.sh"
#   side_venv_make DIR LABEL ORDER PIP_ARGS... [-- LATER_PIP_ARGS...]
#                                                  # made once; DIR/.installed marks it whole
#   side_venv_check DIR LABEL MODULE[=VERSION]...  # what Python imports there, and from where
#
# ORDER says when .venv's packages (torch and the rest) join the side venv's path: "base-first"
# (pip sees them and installs only what is missing) or "base-last" (pip resolves the release's own
# dependencies into the side venv; .venv's packages come after them). LATER_PIP_ARGS are installed
# after .venv joins (e.g. --no-deps PACKAGE, whose dependencies .venv already has). A failed install
# stops with pip's output. Needs $root (the repository) and .venv (scripts/with-env.sh makes it).

side_venv_site() {  # the purelib folder of the venv at $1
    "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

_side_venv_pip() {  # _side_venv_pip SIDE LABEL ARGS...: pip install, its output shown only on failure
    local side="$1" label="$2" log
    shift 2
    log="$(mktemp)"
    if ! "$side/bin/python" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "$label: installing $* failed" >&2
        return 1
    fi
    rm -f "$log"
}

side_venv_make() {
    local side="$1" label="$2" order="$3"
    shift 3
    case "$order" in
        base-first|base-last) ;;
        *) echo "side_venv_make: ORDER must be base-first or base-last, got '$order'" >&2; return 2 ;;
    esac
    # PIP_ARGS [-- LATER_ARGS]: LATER_ARGS are installed once .venv's packages are on the path
    local first=() later=() seen=0 arg
    for arg in "$@"; do
        if [ "$arg" = "--" ]; then seen=1; elif [ "$seen" = 1 ]; then later+=("$arg"); else first+=("$arg"); fi
    done
    local stamp="$*"
    if [ -x "$side/bin/python" ] && [ -f "$side/.installed" ] && [ "$(cat "$side/.installed")" = "$stamp" ]; then
        return 0
    fi
    local base_site site
    base_site="$(side_venv_site "$root/.venv")"
    rm -rf "$side"
    python3 -m venv "$side"
    site="$(side_venv_site "$side")"
    if [ "$order" = base-first ]; then
        echo "$base_site" > "$site/zz_base_venv.pth"
    fi
    _side_venv_pip "$side" "$label" "${first[@]}"
    if [ "$order" = base-last ]; then
        echo "$base_site" > "$site/zz_base_venv.pth"   # after the side's own packages
    fi
    if [ "${#later[@]}" -gt 0 ]; then
        _side_venv_pip "$side" "$label" "${later[@]}"
    fi
    printf '%s' "$stamp" > "$side/.installed"   # what it was made with: other arguments remake it
}

side_venv_check() {
    # Each MODULE must import from the side venv; with =VERSION, its version must be VERSION or
    # start with VERSION. (3.9 accepts 3.9.0). Prints every version and where it came from.
    local side="$1" label="$2"
    shift 2
    "$side/bin/python" - "$side" "$label" "$@" <<'PY'
import importlib
import sys

side, label, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
for spec in specs:
    name, _, want = spec.partition("=")
    mod = importlib.import_module(name)
    got = getattr(mod, "__version__", "?")
    print(f"{label}: {name} {got} from {mod.__file__}")
    if want and got != want and not got.startswith(want + "."):
        sys.exit(f"{label}: expected {name} {want}, imported {got}")
    if not mod.__file__.startswith(side):
        sys.exit(f"{label}: {name} imported from {mod.__file__}, not from {side}")
PY
}
