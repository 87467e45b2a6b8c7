"""TLS at the edges, over real sockets: `treechat up --tls-cert --tls-key` (fake engine) serves
HTTPS and TLS on the TCP gateway with a certificate this module makes (a CA and a server
certificate for 127.0.0.1, by the `openssl` command), with an API key, as at a real edge;
`treechat chat` and `treechat bench` speak TLS to both and refuse a certificate they cannot
verify."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys

import orjson
import pytest
import requests

from conftest import REPO, Cluster
from test_bench import bench
from test_chat_cli import Chat

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")

FAKE = ("--engine", "fake", "--fake-delay", "0.002", "--nodes", "1")
KEY = "sk-edge-key"  # TLS and API keys together, as at a real edge
AUTH = {"Authorization": f"Bearer {KEY}"}


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(where, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=treechat test {name}", cwd=where)


def make_certs(where, ips: tuple[str, ...] = ("127.0.0.1",)) -> None:
    """ca.pem signs server.pem (for `ips` and localhost); other-ca.pem signs nothing."""
    make_ca(where, "ca")
    make_ca(where, "other-ca")
    names = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    (where / "ext.cnf").write_text(f"subjectAltName={names}\n"
                                   "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=where)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=where)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    where = tmp_path_factory.mktemp("tls")
    make_certs(where)
    return where


@pytest.fixture(scope="module")
def up(certs, tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tls-up"))
    try:
        up = cluster.up(*FAKE, "--api-key", KEY, "--tls-cert", str(certs / "server.pem"),
                        "--tls-key", str(certs / "server.key"))
        up.https = f"https://127.0.0.1:{up.http_port}"
        yield up
    finally:
        cluster.close()


def tls_line_client(port: int, ca) -> tuple[ssl.SSLSocket, object]:
    ctx = ssl.create_default_context(cafile=str(ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                           server_hostname="127.0.0.1")
    return sock, sock.makefile("rb")


def test_up_announces_https_and_tls(up):
    banner = "\n".join(up.proc.lines)
    assert f"https://127.0.0.1:{up.http_port}" in banner
    assert f"tcp://127.0.0.1:{up.tcp_port} (TLS)" in banner


def test_https_answers_with_a_verified_certificate(up, certs):
    resp = requests.post(f"{up.https}/v1/chat/completions", verify=str(certs / "ca.pem"),
                         headers=AUTH, json={"messages": [{"role": "user", "content": "over tls please"}]},
                         timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "over tls please "
    assert requests.get(f"{up.https}/readyz", verify=str(certs / "ca.pem"), timeout=30).ok


def test_https_is_refused_by_a_client_that_does_not_trust_the_ca(up, certs):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{up.https}/healthz", verify=str(certs / "other-ca.pem"), timeout=30)


def test_plain_http_to_the_tls_port_gets_no_answer_and_tls_still_serves(up, certs):
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{up.http_port}/healthz", timeout=30)
    assert requests.get(f"{up.https}/healthz", verify=str(certs / "ca.pem"), timeout=30).ok


def test_tcp_line_protocol_over_tls(up, certs):
    sock, lines = tls_line_client(up.tcp_port, certs / "ca.pem")
    try:
        assert json.loads(lines.readline())["hello"] == "treechat"
        sock.sendall(json.dumps({"hello": {"api_key": KEY}}).encode() + b"\n")
        assert json.loads(lines.readline()) == {"authenticated": True}
        sock.sendall(b'{"id": "t1", "text": "one two three"}\n')
        while not (msg := json.loads(lines.readline())).get("done"):
            assert "error" not in msg, msg
        assert msg["text"] == "one two three "
    finally:
        sock.close()


def test_a_plain_client_on_the_tls_tcp_port_does_not_stop_the_gateway(up, certs):
    with socket.create_connection(("127.0.0.1", up.tcp_port), timeout=30) as plain:
        plain.sendall(b"TEXT\nhello\n")
        try:
            answer = plain.recv(4096)  # a TLS alert or a close, never a greeting
        except ConnectionResetError:
            answer = b""
        assert b"treechat" not in answer
    sock, lines = tls_line_client(up.tcp_port, certs / "ca.pem")
    with sock:
        assert json.loads(lines.readline())["hello"] == "treechat"


@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_chat_speaks_tls_to_both_gateways(up, certs, kind):
    where = ["--tcp", f"127.0.0.1:{up.tcp_port}", "--tls"] if kind == "tcp" else ["--http", up.https]
    chat = Chat(*where, "--tls-ca", str(certs / "ca.pem"), "--api-key", KEY)
    chat.say("secret words")
    chat.wait_output(lambda out: out.endswith("\n"))
    assert chat.finish() == 0
    assert chat.out == "secret words \n"


@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_chat_refuses_a_certificate_it_cannot_verify(up, certs, kind):
    where = ["--tcp", f"127.0.0.1:{up.tcp_port}", "--tls"] if kind == "tcp" else ["--http", up.https]
    chat = Chat(*where, "--tls-ca", str(certs / "other-ca.pem"), "--api-key", KEY)
    try:
        chat.say("hello")  # over TCP the handshake fails first, and the chat may be gone already
    except BrokenPipeError:
        pass
    assert chat.finish() == 1
    assert "did not verify" in chat.proc.stderr.read()
    assert chat.out == ""


def test_chat_tls_no_verify_is_for_self_signed_testing(up):
    chat = Chat("--tcp", f"127.0.0.1:{up.tcp_port}", "--tls-no-verify", "--api-key", KEY)
    chat.say("unchecked")
    chat.wait_output(lambda out: out.endswith("\n"))
    assert chat.finish() == 0
    assert chat.out == "unchecked \n"


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_bench_over_tls_with_an_api_key(up, certs, tmp_path, kind):
    target = ["--base-url", up.https] if kind == "http" else \
        ["--tcp", f"127.0.0.1:{up.tcp_port}", "--tls"]
    out = tmp_path / "b.json"
    r = bench(*target, "--tls-ca", str(certs / "ca.pem"), "--api-key", KEY, "--num-requests", "12",
              "--max-concurrency", "4", "--random-output-len", "5", "--ignore-eos",
              "--save-result", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    s = orjson.loads(out.read_bytes())["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (12, 0, 60)


def test_bench_over_tcp_without_the_key_is_refused(up, certs, tmp_path):
    out = tmp_path / "nokey.json"
    r = bench("--tcp", f"127.0.0.1:{up.tcp_port}", "--tls-ca", str(certs / "ca.pem"), "--api-key",
              "sk-wrong", "--num-requests", "3", "--warmup", "0", "--save-result", str(out))
    assert r.returncode == 1
    assert orjson.loads(out.read_bytes())["summary"]["errors"] == {"unauthorized": 3}


def test_bench_names_a_certificate_failure(up, certs, tmp_path):
    out = tmp_path / "bad.json"
    r = bench("--base-url", up.https, "--tls-ca", str(certs / "other-ca.pem"), "--num-requests", "3",
              "--warmup", "0", "--save-result", str(out))
    assert r.returncode == 1
    assert orjson.loads(out.read_bytes())["summary"]["errors"] == {"tls": 3}


def test_bad_tls_flags_fail_at_start_with_a_clear_message(certs, tmp_path):
    def treechat(*args):
        return subprocess.run([sys.executable, "-m", "treechat.cli", *args], cwd=REPO, text=True,
                              capture_output=True, timeout=60)
    r = treechat("up", *FAKE, "--tls-cert", str(certs / "server.pem"))
    assert r.returncode == 2 and "--tls-cert and --tls-key go together" in r.stderr
    r = treechat("gateway", "tcp", "--port", "0", "--tls-cert", str(certs / "server.pem"),
                 "--tls-key", str(tmp_path / "missing.key"))
    assert r.returncode == 2 and "missing.key" in r.stderr
    r = treechat("gateway", "http", "--port", "0", "--tls-cert", str(certs / "ca.pem"),
                 "--tls-key", str(certs / "server.key"))  # a key that does not match the cert
    assert r.returncode == 2 and "cannot load --tls-cert" in r.stderr
    r = treechat("chat", "--http", "http://127.0.0.1:1", "--tls-ca", str(certs / "ca.pem"))
    assert r.returncode == 2 and "https://" in r.stderr
