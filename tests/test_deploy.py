"""The deployment files in deploy/ are checked by what runs here: systemd's own verifier, the node's
own argument parser and config loader for every command line and config they hold, and a structural
read of the Kubernetes manifests and the Containerfile (no container engine or cluster runs here)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swarm import cli, config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "swarm-node.service"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
FLEET_TOML = DEPLOY / "swarm-node.toml"
VENV_BIN = "/opt/swarm/.venv/bin/swarm-node"


def _unit_lines() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _parses(argv: list[str]) -> None:
    """The node's own parser accepts the command line (argparse exits 2 on an unknown option)."""
    args = cli.build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    exe = Path(sys.executable).with_name("swarm-node")
    unit = tmp_path / "swarm-node.service"
    unit.write_text(UNIT.read_text().replace(VENV_BIN, str(exe)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): the unit must draw none at all.
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_systemd_unit_runs_the_node_hardened() -> None:
    u = _unit_lines()
    (exec_start,) = u["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == VENV_BIN
    _parses(argv[1:])
    assert u["User"] == ["swarm"] and u["NoNewPrivileges"] == ["yes"]
    assert u["ProtectSystem"] == ["strict"] and u["CapabilityBoundingSet"] == [""]
    assert u["KillSignal"] == ["SIGTERM"]
    env = dict(e.split("=", 1) for e in u["Environment"])
    assert env["SWARM_HOME"] == "/var/lib/swarm" and u["StateDirectory"] == ["swarm"]
    assert env["HF_HUB_CACHE"].startswith("/var/cache/" + u["CacheDirectory"][0])


def test_fleet_config_loads(tmp_path: Path) -> None:
    # The shipped TOML names swarm.key beside it: load it the way /etc/swarm would hold it.
    (tmp_path / "swarm.key").write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32 + "\n")
    toml = tmp_path / "swarm-node.toml"
    shutil.copy(FLEET_TOML, toml)
    got = config.load_toml(toml)
    assert got["psk"] == "ab" * 32 and got["listen"] == ("/ip4/0.0.0.0/tcp/4001",)


def test_fleet_config_without_key_is_a_clear_error(tmp_path: Path) -> None:
    toml = tmp_path / "swarm-node.toml"
    shutil.copy(FLEET_TOML, toml)
    with pytest.raises(config.ConfigError, match=r"swarm\.key"):
        config.load_toml(toml)


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]


def test_daemonset_shape(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _docs()}
    assert set(docs) == {"ConfigMap", "DaemonSet"}
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["hf-cache"]["hostPath"]["path"] == "/var/cache/huggingface/hub"
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    for c in spec["initContainers"] + spec["containers"]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
    (node,) = spec["containers"]
    _parses(node["args"])
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = node[probe]["exec"]["command"]
        assert cmd[0] == "swarm-node"
        _parses(cmd[1:])
        assert cmd[1] == "status"
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    # The ConfigMap's TOML is a valid node config (its psk path is the mounted secret's file).
    key_dir = next(m["mountPath"] for m in node["volumeMounts"] if m["name"] == "swarm-key")
    text = docs["ConfigMap"]["data"]["swarm-node.toml"]
    key = tmp_path / "swarm.key"
    key.write_text("cd" * 32)
    toml = tmp_path / "swarm-node.toml"
    toml.write_text(text.replace(f"{key_dir}/swarm.key", str(key)))
    assert config.load_toml(toml)["psk"] == "cd" * 32


def _containerfile() -> list[tuple[str, str]]:
    out, cont = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cont += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = cont.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cont = ""
    return out


def test_containerfile_shape() -> None:
    import json

    steps = _containerfile()
    assert [w for w, _ in steps].count("FROM") == 2  # build stage, slim runtime stage
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
    cmd = dict(steps)
    entry, run = json.loads(cmd["ENTRYPOINT"]), json.loads(cmd["CMD"])
    assert entry == ["swarm-node"]
    _parses(run)
    assert cmd["USER"] == "swarm" and cmd["STOPSIGNAL"] == "SIGTERM"
    health = cmd["HEALTHCHECK"]
    _parses(json.loads(health[health.index("CMD") + 3 :].strip())[1:])
