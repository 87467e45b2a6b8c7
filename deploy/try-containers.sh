#!/usr/bin/env bash
# Build the CPU image and run a tree from it for real, once: root, a node (the default model),
# the HTTP and TCP gateways, each in its own container with the tree's keys and an API key; one
# chat request through each gateway; then everything stops and is removed.
#
#   sudo deploy/try-containers.sh            # podman (Debian: apt-get install podman), as root
#
# No registry of images is needed. The base image is made here from Debian's own packages:
# `debootstrap` (apt-get install debootstrap) writes a Debian 12 with python3 into a folder, and
# `podman import` turns that folder into the image `localhost/treechat-base:bookworm`. Python
# packages come from PyPI during the build, trusting this machine's CAs (/etc/ssl/certs is lent
# to the build's steps). Where download.pytorch.org is not reachable, torch's CPU wheel
# (torch-2.13.0+cpu) must be in a folder of wheels: WHEELS, else pip's own --find-links here.
#
# Settings (environment): BASE (an existing image with python3 and python3-venv, instead of the
# debootstrap one), IMAGE (default treechat:cpu), WHEELS (a folder of wheels), KEEP=1 (leave
# the containers running).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-localhost/treechat-base:bookworm}
IMAGE=${IMAGE:-treechat:cpu}
NAME=treechat-try
work=$(mktemp -d /var/tmp/treechat-try.XXXXXX)
say() { printf '\n== %s\n' "$*"; }
podman_=(podman)
containers=()
stop() {
  [ "${KEEP:-}" = 1 ] && { echo "left running: ${containers[*]} (keys in $work)"; return; }
  [ "${#containers[@]}" -gt 0 ] && say "stopping"
  for c in "${containers[@]}"; do "${podman_[@]}" rm -f -t 10 "$c" >/dev/null || true; done
  rm -rf "$work"
}
trap stop EXIT

command -v podman >/dev/null || { echo "needs podman: apt-get install podman" >&2; exit 2; }

# --- the base image -----------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  command -v debootstrap >/dev/null || { echo "needs debootstrap: apt-get install debootstrap" >&2; exit 2; }
  say "making $BASE with debootstrap (Debian 12, python3)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
  rm -rf "$work/rootfs"
fi

# --- a runtime that starts here -----------------------------------------------------------------
# Some hosts refuse what podman asks of the kernel by default: crun cannot run on a host that
# mounts cgroups v1 and v2 side by side ("cgroups in hybrid mode not supported"; runc can), and
# a process without CAP_SYS_RESOURCE cannot raise its open-files and processes limits to podman's
# defaults. Each try below says why it failed.
run_=()
found=
for try in "" "--ulimit nofile=4096:4096 --ulimit nproc=4096:4096" \
           "runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096"; do
  global=(); flags=($try)
  if [ "${flags[0]:-}" = runc ]; then global=(--runtime runc); flags=("${flags[@]:1}"); fi
  if out=$(podman "${global[@]}" run --rm "${flags[@]}" "$BASE" true 2>&1); then
    podman_=(podman "${global[@]}"); run_=("${flags[@]}"); found=1; break
  fi
  echo "podman ${global[*]} run ${flags[*]}: $out" >&2
done
[ -n "$found" ] || { echo "no container runtime starts here (errors above)" >&2; exit 1; }
say "runtime: ${podman_[*]} run ${run_[*]}"

# --- the image ----------------------------------------------------------------------------------
# FLAVOR given: buildah 1.28 takes a stage named by an ARG's default for an image to pull.
build=(--build-arg FLAVOR=cpu --build-arg "CPU_BASE=$BASE")
pytorch='import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/")'
if ! timeout 20 python3 -c "$pytorch" 2>/dev/null; then
  build+=(--build-arg TORCH_INDEX=)  # not reachable: PyPI and --find-links
fi
# This machine's trusted CAs (an egress proxy's too) and its folder of wheels, lent to the build.
build+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
WHEELS=${WHEELS:-${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}}
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  build+=(-v "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels)
fi
say "building $IMAGE"
"${podman_[@]}" build "${run_[@]}" "${build[@]}" -f deploy/docker/Dockerfile -t "$IMAGE" .

# --- keys, ports --------------------------------------------------------------------------------
ports=($(python3 -c '
import socket
def free(n):  # n consecutive free ports
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); base = s.getsockname()[1]
        try:
            for i in range(n):
                with socket.socket() as s: s.bind(("127.0.0.1", base + i))
            return base
        except OSError: pass
print(free(3), free(1), free(1))'))
ROOT=${ports[0]} HTTP=${ports[1]} TCP=${ports[2]}
mkdir -p "$work/keys"
"${podman_[@]}" run --rm "${run_[@]}" --user root -v "$work/keys:/keys" --entrypoint sh "$IMAGE" -c '
  treechat keys /keys/tree >/dev/null &&
  treechat keys /keys/tree --add node-1 --add http-gateway --add tcp-gateway >/dev/null &&
  python -c "import secrets; print(\"sk-\" + secrets.token_urlsafe(24))" > /keys/api-keys &&
  chown -R treechat /keys'

start() {  # start NAME TREECHAT-ARGS...: one detached container on the host's network
  local name=$NAME-$1; shift
  "${podman_[@]}" run -d "${run_[@]}" --name "$name" --network host -v "$work/keys:/keys:ro" \
    "$IMAGE" "$@" >/dev/null
  containers+=("$name")
}
logs() { for c in "${containers[@]}"; do echo "--- $c"; "${podman_[@]}" logs --tail 20 "$c" 2>&1; done; }

say "starting root :$ROOT, node-1, http :$HTTP, tcp :$TCP"
start root root --port "$ROOT" --curve /keys/tree
start node-1 node --name node-1 --root "127.0.0.1:$ROOT" --curve /keys/tree
start http gateway http --root "127.0.0.1:$ROOT" --port "$HTTP" --api-key-file /keys/api-keys \
  --curve /keys/tree --member http-gateway
start tcp gateway tcp --root "127.0.0.1:$ROOT" --port "$TCP" --api-key-file /keys/api-keys \
  --curve /keys/tree --member tcp-gateway

# --- one request through each gateway, from a client container ---------------------------------
say "one chat request through each gateway"
if ! "${podman_[@]}" run --rm "${run_[@]}" --network host -v "$work/keys:/keys:ro" \
    --entrypoint python "$IMAGE" -c '
import json, socket, sys, time, urllib.request
http, tcp = sys.argv[1:3]
key = open("/keys/api-keys").read().strip()
deadline = time.monotonic() + 300  # the node loads its model first
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the HTTP gateway never became ready (no node joined?)")
        time.sleep(1)
body = json.dumps({"messages": [{"role": "user", "content": "Say hello in three words."}],
                   "max_tokens": 16, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/chat/completions", body,
                             {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
print("HTTP:", json.dumps(answer["choices"][0]["message"]["content"]), answer["usage"])
with socket.create_connection(("127.0.0.1", int(tcp)), timeout=120) as s:
    f = s.makefile("rwb")
    print("TCP hello:", f.readline().decode().strip())
    for line in ({"hello": {"app": "try-containers", "api_key": key}},
                 {"id": "q1", "text": "Say hello in three words.", "max_tokens": 16}):
        f.write(json.dumps(line).encode() + b"\n")
    f.flush()
    while True:
        msg = json.loads(f.readline())
        if "delta" not in msg:
            print("TCP:", json.dumps(msg))
        if msg.get("id") == "q1" and ("done" in msg or "error" in msg or "text" in msg):
            break
' "$HTTP" "$TCP"; then
  logs
  exit 1
fi
say "status"
"${podman_[@]}" run --rm "${run_[@]}" --network host -v "$work/keys:/keys:ro" "$IMAGE" \
  status --root "127.0.0.1:$ROOT" --curve /keys/tree
