"""The hosts as the README's set-up commands leave them: `bash setup.sh builder ACCOUNT --authorize
KEY` on the builder (as root), `bash setup.sh login remote` on the login node (as the user)."""

import re

from .lab import PROJECT, accepted_logins, log_size
from .topology import ADDRESSES, BUILD_ACCOUNT, PARTITION, run


def test_each_host_has_its_name_address_and_stock_hosts_file(lab):
    for name, address in ADDRESSES.items():
        host = lab.network[name]
        assert host.run(["hostname"]).stdout.strip() == name
        assert address in host.run(["hostname", "-I"]).stdout.split()
        # Debian's installer maps the machine's own name to 127.0.1.1
        assert host.run(["getent", "hosts", name]).stdout.split()[0] == "127.0.1.1"
    assert lab.node.run(["getent", "hosts", "login"]).stdout.split()[0] == ADDRESSES["login"]
    # the user's own machine reaches the login node, and no compute node
    assert lab.laptop.connects("10.233.1.1", 22)
    assert not lab.laptop.connects(ADDRESSES["node1"], 6818)
    # the second cluster: its node is node1 at its own address, the machine's own cluster untouched
    assert lab.login.run(["sinfo", "--noheader", "--format=%P %N %T"]).stdout.split() == [f"{PARTITION}*", "node1", "idle"]
    assert "node1" not in run(["sinfo", "--noheader", "--format=%N"]).stdout


def test_the_accounts_cannot_read_each_other_and_the_login_account_has_no_docker(lab, builder_report):
    login, build = lab.login_account, lab.build_account
    assert "docker" not in login.groups() and "docker" in build.groups()
    for reader, other in ((login, build), (build, login)):
        result = run([*reader.prefix(), "ls", other.home], check=False)
        assert result.returncode != 0 and "Permission denied" in result.stderr
    refused = lab.login.run(["docker", "version"], user=login, check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr.lower()


def test_the_builder_command_prints_what_the_login_node_needs(lab, builder_report):
    report = builder_report
    assert (report.host, report.port, report.user) == (ADDRESSES["builder"], 22, BUILD_ACCOUNT)
    fingerprint = run(["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[1]
    assert fingerprint in report.fingerprints
    key = open("/etc/ssh/ssh_host_ed25519_key.pub").read().split()[1]
    assert any(line.split()[0].split(",")[0] == ADDRESSES["builder"] and line.split()[2] == key for line in report.known_hosts_lines)
    # its sshd listens on the builder's own address (port 22), and the login account's key is authorized
    listening = {(address, port) for address, port, _ in lab.builder.listening()}
    assert ("0.0.0.0", 22) in listening
    assert lab.login.connects(ADDRESSES["builder"], 22)
    authorized = (lab.build_account.home / ".ssh" / "authorized_keys").read_text()
    assert (lab.login_account.home / ".ssh" / "id_ed25519.pub").read_text().split()[1] in authorized


def test_the_builder_command_again_changes_nothing(lab, builder_report):
    pubkey = lab.login_account.home / ".ssh" / "id_ed25519.pub"
    again = lab.builder.run(["bash", "setup.sh", "builder", BUILD_ACCOUNT, "--authorize", pubkey], cwd=PROJECT, timeout=900)
    assert "sshd: port 22 is already served" in again.stdout
    assert "0 key(s) added" in again.stdout
    assert not re.search(r"installing|installed \(", again.stdout), again.stdout
    refused = lab.builder.run(["bash", "setup.sh", "builder", BUILD_ACCOUNT, "--authorize", lab.login_account.home / ".ssh" / "id_ed25519"],
                              cwd=PROJECT, check=False)
    assert refused.returncode != 0 and "is a private key" in refused.stderr


def test_the_login_command_lists_what_is_missing_then_is_content(lab, login_ready):
    before, after = login_ready
    assert before.returncode != 0
    missing = [line for line in before.stdout.splitlines() if line.startswith("MISSING: ")]
    assert len(missing) == 1 and "builder.yaml: fill in host" in missing[0], before.stdout
    assert "docker" not in (before.stdout + before.stderr + after.stdout + after.stderr).lower()
    assert after.returncode == 0
    assert f"ok: builder {BUILD_ACCOUNT}@{ADDRESSES['builder']}:22" in after.stdout
    assert "ok: the builder's host key is in" in after.stdout
    assert f"partitions: {PARTITION}*" in after.stdout


def test_the_login_command_refuses_root_and_names_missing_slurm(lab, login_ready):
    as_root = lab.login.run(["bash", "setup.sh", "login", "remote"], cwd=lab.checkout, check=False)
    assert as_root.returncode != 0 and "not as root" in as_root.stderr
    # the builder host has no Slurm controller: one line says so
    on_builder = lab.builder.run(["bash", "setup.sh", "login", "slurm"], user=lab.login_account, env=lab.venv_env(), cwd=lab.checkout, check=False)
    assert on_builder.returncode != 0
    assert [line for line in on_builder.stdout.splitlines() if line.startswith("MISSING: ")] == [
        line for line in on_builder.stdout.splitlines() if line.startswith("MISSING: Slurm: `sinfo` gets no answer")
    ]


def test_the_login_account_reaches_the_builders_tools_over_ssh(lab, login_ready):
    """With the known_hosts line the builder printed (StrictHostKeyChecking), the tools are on the
    PATH of the build account's SSH sessions, and the builder's sshd records the login."""
    before = log_size()
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", f"{BUILD_ACCOUNT}@{ADDRESSES['builder']}"]
    found = lab.login.run([*ssh, "command -v repo2docker apptainer docker flock mksquashfs"], user=lab.login_account).stdout.split()
    assert len(found) == 5, found
    assert len(accepted_logins(before)) == 1
