"""The `ldap` registry backend against a real OpenLDAP slapd (authentication on) and real processes:
registrations are written through to cn=<node>,ou=Nodes,dc=treechat,dc=local and withdrawn when a
node leaves or dies; only the registrar may write; a root with bad credentials refuses to start."""

from __future__ import annotations

from ldap3 import MODIFY_REPLACE

from conftest import connect, free_ports, run, wait_for, wait_tree
from ldap_fixtures import slapd_fixture  # noqa: F401  (provides the `slapd` fixture)

NODES = "ou=Nodes,dc=treechat,dc=local"


async def directory_has(slapd, names: set[str], timeout: float = 20.0) -> dict:
    """Wait until the directory holds exactly the nodes `names`; return their entries."""
    def check():
        entries = slapd.nodes()
        return entries if set(entries) == names else None
    try:
        return await wait_for(check, timeout)
    except TimeoutError:
        raise AssertionError(f"directory holds {sorted(slapd.nodes())}, expected {sorted(names)}")


def test_nodes_appear_while_registered_and_vanish_when_they_leave_or_die(slapd, cluster):
    tree = cluster.tree(["node-1", "node-2", ("node-3", "node-1")], root_args=slapd.root_args())

    async def scenario():
        entries = await directory_has(slapd, {"node-1", "node-2", "node-3"})
        for name in ("node-1", "node-2", "node-3"):
            entry = entries[name]
            assert entry["dn"] == f"cn={name},{NODES}"
            assert entry["labeledURI"] == tree.procs[name].info["endpoint"]
            assert {"applicationProcess", "labeledURIObject"} <= entry["objectClass"]
            assert entry["description"]["engine"] == "fake"
        assert entries["node-3"]["description"]["parent"] == "node-1"
        assert entries["node-1"]["description"]["parent"] is None

        assert tree.procs["node-2"].terminate() == 0  # leaves cleanly (Bye)
        await directory_has(slapd, {"node-1", "node-3"})
        tree.procs["node-3"].kill()  # dies: the root declares it dead after missed heartbeats
        await directory_has(slapd, {"node-1"})

        again = cluster.node(tree.root, "node-3", "node-1")
        entries = await directory_has(slapd, {"node-1", "node-3"})
        assert entries["node-3"]["labeledURI"] == again.info["endpoint"]

    run(scenario())


def test_requests_flow_through_an_ldap_registered_tree(slapd, cluster):
    up = cluster.up("--engine", "fake", "--nodes", "2", "--fanout", "1", *slapd.root_args())

    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, {"node-1", "node-2"})
        entries = await directory_has(slapd, {"node-1", "node-2"})
        for node in st["nodes"]:
            assert entries[node["name"]]["labeledURI"] == node["endpoint"]
        results = [await s for s in [client.submit({"prompt": "hi there"}).collect()
                                     for _ in range(3)]]
        for text, final in results:
            assert (text, final.kind, final.finish_reason) == ("hi there ", "done", "stop")
        client.close()

    run(scenario())
    # A clean shutdown withdraws what the root published: it no longer vouches for those nodes.
    assert up.proc.terminate() == 0
    assert slapd.nodes() == {}


def test_only_the_registrar_may_write(slapd):
    attrs = {"cn": "intruder", "labeledURI": "tcp://203.0.113.9:1"}
    dn = f"cn=intruder,{NODES}"

    anonymous = slapd.connect()
    assert not anonymous.add(dn, ["applicationProcess", "labeledURIObject"], attrs)
    # slapd refuses anonymous updates before the ACLs are even consulted (strongerAuthRequired);
    # with `allow update_anon` the ACL would still say insufficientAccessRights.
    assert anonymous.result["description"] in ("strongerAuthRequired", "insufficientAccessRights")

    guest = slapd.connect(slapd.guest, slapd.guest_password)  # authenticated, but not the registrar
    assert guest.bound
    assert not guest.add(dn, ["applicationProcess", "labeledURIObject"], attrs)
    assert guest.result["description"] == "insufficientAccessRights"

    wrong = slapd.connect(slapd.registrar, "not-the-password")
    assert not wrong.bound
    assert wrong.result["description"] == "invalidCredentials"
    assert not wrong.add(dn, ["applicationProcess", "labeledURIObject"], attrs)

    registrar = slapd.connect(slapd.registrar, slapd.password)
    assert registrar.add(dn, ["applicationProcess", "labeledURIObject"], attrs)
    assert not guest.modify(dn, {"labeledURI": [(MODIFY_REPLACE, ["tcp://198.51.100.1:2"])]})
    assert not anonymous.delete(dn)
    assert slapd.nodes()["intruder"]["labeledURI"] == "tcp://203.0.113.9:1"
    for conn in (anonymous, guest, wrong, registrar):
        conn.unbind()


def test_root_refuses_to_start_with_bad_credentials_or_no_directory(slapd, cluster, tmp_path):
    bad = tmp_path / "bad.password"
    bad.write_text("guessing\n")
    nowhere = f"ldap://127.0.0.1:{free_ports(1)[0]}"
    cases = [(slapd.root_args(bad),
              f"LDAP bind as {slapd.registrar} failed: invalid credentials"),
             (["--registry", "ldap", "--ldap-url", nowhere, "--ldap-bind-dn", slapd.registrar,
               "--ldap-password-file", str(slapd.password_file)],
              f"the LDAP directory at {nowhere} is unreachable"),
             (slapd.root_args(tmp_path / "missing.password"), "cannot read the LDAP password file"),
             ([*slapd.root_args(), "--ldap-base", "dc=elsewhere,dc=local"],
              f"LDAP creating ou=Nodes,dc=elsewhere,dc=local as {slapd.registrar} failed")]
    for i, (args, message) in enumerate(cases):
        proc = cluster.start(f"root-{i}", "root", "--port", str(free_ports(1, span=3)[0]), *args)
        assert proc.proc.wait(30) != 0
        log = proc.log.read_text()
        assert message in log, log
        assert "Traceback" not in log, log
        assert proc.info is None  # never said READY


def test_a_new_root_replaces_stale_entries_and_sweeps_the_dead(slapd, cluster):
    """kill -9 the root: its entries stay behind. A node that also died while it was down is
    swept by the next root; one that re-registers keeps its entry, brought up to date."""
    tree = cluster.tree(["a", "b"], root_args=slapd.root_args())
    port = tree.root.rsplit(":", 1)[1]

    async def scenario():
        await directory_has(slapd, {"a", "b"})
        tree.procs["root"].kill()
        tree.procs["b"].kill()
        assert set(slapd.nodes()) == {"a", "b"}  # nobody withdrew them
        cluster.root(*slapd.root_args(), port=int(port))
        client = await connect(tree.root)
        await wait_tree(client, {"a"})
        entries = await directory_has(slapd, {"a"})
        assert entries["a"]["labeledURI"] == tree.procs["a"].info["endpoint"]
        client.close()

    run(scenario())


def test_the_directory_catches_up_after_an_outage(slapd, cluster):
    tree = cluster.tree(["a", "b"], root_args=slapd.root_args())

    async def scenario():
        client = await connect(tree.root)
        await directory_has(slapd, {"a", "b"})
        slapd.stop()
        tree.procs["b"].terminate()  # the withdraw fails: the directory is down
        c = cluster.node(tree.root, "c")  # and so does this publish
        await wait_tree(client, {"a", "c"})
        results = await client.submit({"prompt": "still serving"}).collect()
        assert results[0] == "still serving "  # the root serves on without its directory
        slapd.start()
        entries = await directory_has(slapd, {"a", "c"})
        assert entries["c"]["labeledURI"] == c.info["endpoint"]
        client.close()

    run(scenario())


def test_an_entry_of_another_shape_is_replaced(slapd, cluster):
    """A hand-made `device` entry under the node's name cannot simply gain a labeledURI: the
    root replaces it with a proper node entry instead of failing the registration."""
    registrar = slapd.connect(slapd.registrar, slapd.password)
    assert registrar.add(f"cn=solo,{NODES}", ["device"], {"cn": "solo", "description": "by hand"})
    registrar.unbind()
    tree = cluster.tree(["solo"], root_args=slapd.root_args())

    async def scenario():
        entries = await directory_has(slapd, {"solo"})
        assert entries["solo"]["labeledURI"] == tree.procs["solo"].info["endpoint"]
        assert entries["solo"]["description"]["parent"] is None

    run(scenario())
