#!/usr/bin/env bash
# Checks deploy/ as CI runs it:
#
#   bash deploy/validate.sh target/debug/tagward
#
# 1. deploy/Dockerfile: every file a COPY/ADD takes from the build context
#    (the repository root) exists, read with Docker's own parser; hadolint.
# 2. Every kustomization under deploy/kubernetes/ (the base and each
#    overlay): the files it names exist; it renders with `kustomize build`
#    or `kubectl kustomize` (whichever is on PATH; without either, each
#    resource file is validated as it stands and the rendering is skipped);
#    every rendered resource validates against the Kubernetes JSON schemas of
#    $K8S_VERSIONS in strict mode (kubernetes-validate: unknown fields fail);
#    the rendered workloads keep the promises of deploy/README.md (native
#    sidecar, gRPC probes on the data port, volumes, non-root read-only
#    containers, admin not exposed while on loopback, Services target ports
#    the pod declares, every TAGWARD_* variable is one `tagward serve --help`
#    lists).
# 3. Every world file (deploy/world/ and the worlds the kustomizations put in
#    ConfigMaps) loads: `tagward serve --world FILE` on loopback ports must
#    come up and stay up (a bad world exits 2 at once). Needs the binary:
#    the first argument, default target/debug/tagward; skipped without it.
#
# The tools install into deploy/.venv (python3 -m venv) from
# deploy/requirements.txt, again whenever that file changes; after that
# everything runs offline. Prints one line per check and closes with
# `N passed, N failed` (`, N skipped` when something was skipped). Exit code
# 0 when nothing failed, 1 otherwise.
#
# Environment: PYTHON (the interpreter that creates the venv; default
# python3), K8S_VERSIONS (default "1.29.0,1.37.0": the first release with
# native sidecars on by default, and the newest the validator bundles).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${1:-$root/target/debug/tagward}"
case "$bin" in
  /*) ;;
  *) bin="$PWD/$bin" ;;
esac
versions="${K8S_VERSIONS:-1.29.0,1.37.0}"
cd "$root" || exit 2

passed=0 failed=0 skipped=0
pass() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
skip() { skipped=$((skipped + 1)); echo "skip  $*"; }
finish() {
  echo
  if [ "$failed" -gt 0 ]; then
    echo "validate.sh: $failed check(s) failed: the lines marked FAIL above say which and why"
  fi
  if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
  else
    echo "$passed passed, $failed failed"
  fi
  [ "$failed" -eq 0 ]
  exit
}

tmp="$(mktemp -d)"
server_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Runs a validate.py subcommand and counts its PASS/FAIL lines (WORLD and
# RESOURCE lines are appended to $tmp/worlds and $tmp/resources). A crash
# without a FAIL line is a failure.
checks() {
  local what="$1" line rc any_fail=0
  shift
  "$py" "$here/validate.py" "$@" > "$tmp/out" 2> "$tmp/err"
  rc=$?
  while IFS= read -r line; do
    case "$line" in
      "PASS "*) pass "${line#PASS }" ;;
      "FAIL "*) fail "${line#FAIL }"; any_fail=1 ;;
      "WORLD "*) echo "${line#WORLD }" >> "$tmp/worlds" ;;
      "RESOURCE "*) echo "${line#RESOURCE }" >> "$tmp/resources" ;;
      *) echo "      $line" ;;
    esac
  done < "$tmp/out"
  if [ "$rc" -ne 0 ] && [ "$any_fail" -eq 0 ]; then
    fail "$what: validate.py exited $rc"
    sed 's/^/      /' "$tmp/err"
  fi
}

echo "== tools (deploy/.venv)"
venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  rm -rf "$venv"
  if ! "${PYTHON:-python3}" -m venv "$venv"; then
    fail "'${PYTHON:-python3} -m venv' (on Debian/Ubuntu: apt-get install python3-venv)"
    finish
  fi
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "installing deploy/requirements.txt"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$here/requirements.txt"; then
    fail "pip install -r deploy/requirements.txt"
    finish
  fi
  echo "$want" > "$stamp"
fi
py="$venv/bin/python"
: > "$tmp/worlds"

echo "== deploy/Dockerfile"
checks "deploy/Dockerfile COPY sources" copy-sources deploy/Dockerfile .
if "$venv/bin/hadolint" deploy/Dockerfile > "$tmp/hadolint" 2>&1; then
  pass "hadolint deploy/Dockerfile"
else
  fail "hadolint deploy/Dockerfile:"
  sed 's/^/      /' "$tmp/hadolint"
fi

echo "== deploy/kubernetes"
if command -v kustomize > /dev/null 2>&1; then
  render=(kustomize build)
elif command -v kubectl > /dev/null 2>&1 && kubectl kustomize --help > /dev/null 2>&1; then
  render=(kubectl kustomize)
else
  render=()
  echo "neither kustomize nor kubectl is on PATH: resource files are validated as they stand"
fi
# The environment variables tagward reads, from its own help (plus the log
# filter, which the logger reads): a misspelt name in a manifest fails.
if [ -x "$bin" ] && names="$("$bin" serve --help 2>/dev/null | grep -o 'env: TAGWARD_[A-Z0-9_]*')"; then
  TAGWARD_ENV_NAMES="$(printf '%s\n' "$names" | sed 's/^env: //' | sort -u | paste -sd, -),TAGWARD_LOG"
  export TAGWARD_ENV_NAMES
else
  skip "checking the TAGWARD_* names in the manifests (no tagward binary at $bin)"
fi
mapfile -t dirs < <(find deploy/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
if [ "${#dirs[@]}" -eq 0 ]; then
  fail "no kustomization.yaml under deploy/kubernetes"
fi
n=0
for dir in "${dirs[@]}"; do
  n=$((n + 1))
  : > "$tmp/resources"
  checks "$dir inputs" kustomization "$dir"
  if [ "${#render[@]}" -gt 0 ]; then
    out="$tmp/rendered-$n.yaml"
    if "${render[@]}" "$dir" > "$out" 2> "$tmp/render-err"; then
      pass "${render[*]} $dir"
      SHOWN_AS="$dir (rendered)" checks "$dir schemas" schema "$versions" "$out"
      SHOWN_AS="$dir (rendered)" checks "$dir policy" policy "$out"
    else
      fail "${render[*]} $dir:"
      sed 's/^/      /' "$tmp/render-err"
    fi
  else
    # The resource files it names validate as they stand; generated
    # ConfigMaps and Secrets, patches and images only once rendered.
    skip "rendering $dir, its generators and patches (no kustomize)"
    mapfile -t files < "$tmp/resources"
    if [ "${#files[@]}" -gt 0 ]; then
      checks "$dir schemas" schema "$versions" "${files[@]}"
    fi
  fi
done

echo "== world files"
mapfile -t worlds < <({ find deploy/world -maxdepth 1 -type f \( -name '*.json' -o -name '*.yaml' -o -name '*.yml' \); cat "$tmp/worlds"; } | sort -u)
if [ ! -x "$bin" ]; then
  skip "loading ${#worlds[@]} world file(s): no tagward binary at $bin (cargo build, then pass its path)"
else
  for world in "${worlds[@]}"; do
    log="$tmp/serve.log"
    data="$(mktemp -d "$tmp/data.XXXXXX")"
    env -i PATH="$PATH" TAGWARD_DATA_DIR="$data" TAGWARD_LOG=info TAGWARD_LOG_FORMAT=plain \
      "$bin" serve --world "$world" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 > "$log" 2>&1 &
    server_pid=$!
    # Up when it says "serving"; a bad world makes it exit at once. Wait at
    # least a second in any case, at most ten.
    for i in $(seq 1 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      if [ "$i" -ge 10 ] && grep -q serving "$log"; then break; fi
      sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      kill "$server_pid"
      wait "$server_pid" 2>/dev/null
      server_pid=""
      pass "tagward serve --world $world"
    else
      wait "$server_pid"
      rc=$?
      server_pid=""
      fail "tagward serve --world $world exited $rc:"
      sed 's/^/      /' "$log"
    fi
  done
fi

finish
