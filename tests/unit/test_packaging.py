"""The container image, docker-compose.yml and deploy/ (issue: run as a fake node in kind).

There is no container engine here, so what a build would prove is checked directly: every file
the Dockerfile copies exists and is in the build context, the image's command runs, and the
environment the image, Compose and the Deployment give the agent is a valid configuration that
agrees with the image (volume, user, port, node name). docker-compose.yml is validated against the
Compose Specification's JSON schema (tests/data/compose-spec.json; its source is noted there).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from vk_provider import __version__, catalogs
from vk_provider.config import KubeletSettings, load_settings
from vk_provider.kube import imagecaches
from vk_provider.registry import migrate

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
VENV_BIN = Path(sys.executable).parent
POD_IP = {"POD_IP": "10.244.0.7"}


# ------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def image_user() -> tuple[int, int]:
    [user] = instructions("USER")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid)


def copies() -> list[str]:
    """The sources of every COPY from the build context."""
    sources: list[str] = []
    for args in instructions("COPY"):
        parts = shlex.split(args)
        assert not any(p.startswith("--from") for p in parts), "no multi-stage copies expected"
        *srcs, _dest = (p for p in parts if not p.startswith("--"))
        sources.extend(s.rstrip("/") for s in srcs)
    return sources


# .dockerignore: Go filepath.Match patterns plus "**"; the last matching line decides, "!" re-includes,
# and a pattern that matches a directory excludes everything under it.
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip().strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _ignore_regex(line[1:] if negate else line)))
    return rules


def in_build_context(path: str) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in dockerignore():
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pyproject.toml", True),
        ("vk_provider/cli.py", True),
        ("migrations/versions/0001_initial.py", True),
        ("config/images.yaml", True),
        ("vk_provider/__pycache__/cli.cpython-311.pyc", False),
        ("kubeconfig.kind", False),
        ("registry.db", False),
        (".venv/bin/python", False),
        (".git/config", False),
        ("tests/unit/test_packaging.py", False),
        ("vk_provider.egg-info/PKG-INFO", False),
    ],
)
def test_the_build_context_is_what_the_image_needs_and_no_secrets(path: str, expected: bool) -> None:
    assert in_build_context(path) is expected


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    sources = copies()
    assert {"pyproject.toml", "vk_provider", "migrations", "config"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the checkout"
        files = (
            [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts] if path.is_dir() else [path]
        )
        assert files, f"COPY {source}: nothing to copy"
        excluded = [str(f.relative_to(ROOT)) for f in files if not in_build_context(str(f.relative_to(ROOT)))]
        assert not excluded, f"COPY {source}: excluded by .dockerignore: {excluded[:5]}"


def test_what_the_package_finds_beside_itself_is_copied() -> None:
    # Neither is package data: the code looks for them relative to the checkout (see the Dockerfile).
    needed = [
        migrate.MIGRATIONS_DIR / "env.py",
        *migrate.MIGRATIONS_DIR.glob("versions/*.py"),
        catalogs.SHIPPED,
        imagecaches.CRD_MANIFEST,
    ]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    needed.append(ROOT / readme)  # the build reads it
    sources = copies()
    for path in needed:
        relative = str(path.relative_to(ROOT))
        assert path.is_file(), relative
        assert any(relative == s or relative.startswith(s + "/") for s in sources), f"{relative} is not copied"
        assert in_build_context(relative), relative


def build_context_copy(target: Path) -> Path:
    """What `docker build` sends: the checkout less what .dockerignore excludes."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    reincluded = [line[1:].strip("/") for line in lines if line.startswith("!")]
    for top, dirs, files in os.walk(ROOT):
        here = Path(top).relative_to(ROOT).as_posix()
        prefix = "" if here == "." else here + "/"
        # Skip excluded trees (.venv, .git) unless a "!" line may bring something back inside.
        dirs[:] = [
            d for d in dirs if in_build_context(prefix + d) or any(r.startswith(prefix + d + "/") for r in reincluded)
        ]
        for name in files:
            relative = prefix + name
            if in_build_context(relative) and not (ROOT / relative).is_symlink():
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                (target / relative).write_bytes((ROOT / relative).read_bytes())
    return target


def test_the_copied_tree_alone_runs_the_agents_startup_steps(tmp_path: Path) -> None:
    # The image's /app is the build context's copied sources: from them alone, the package must find
    # its migrations, its image catalog and the CRD manifest, as the agent does at start.
    app = tmp_path / "app"
    app.mkdir()
    sources = copies()
    for source in sources:
        assert in_build_context(source)
    build_context_copy(app)
    for stray in [p for p in app.iterdir() if p.name not in sources]:
        assert stray.name in (".dockerignore",), f"{stray.name} reaches the build context but is not copied"
    env = {"PYTHONPATH": str(app), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    db = tmp_path / "registry.db"
    upgrade = subprocess.run(
        [sys.executable, "-m", "vk_provider", "db", "upgrade", "--db", str(db)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    assert "at revision" in upgrade.stdout
    probe = (
        "import vk_provider, vk_provider.catalogs as c, vk_provider.kube.imagecaches as i;"
        "print(vk_provider.__file__); print(len(c.load_catalogs('', []).images) > 0);"
        "print(i.load_crd_manifest()['metadata']['name'])"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr
    where, catalog, crd = ran.stdout.split()
    assert Path(where).is_relative_to(app)
    assert catalog == "True"
    assert crd == imagecaches.CRD_NAME


def test_the_base_is_slim_python_of_the_supported_version() -> None:
    [base] = instructions("FROM")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = requires.removeprefix(">=")
    assert re.fullmatch(rf"python:{re.escape(minimum)}-slim(-\w+)?", base), base


def test_the_image_runs_as_a_non_root_user_with_the_database_on_a_volume() -> None:
    uid, gid = image_user()
    assert uid > 0
    assert gid > 0
    [volume] = [exec_form(v) for v in instructions("VOLUME")]
    env = image_env()
    settings = load_settings(env={**env, **POD_IP})
    assert PurePosixPath(settings.registry.db).parent == PurePosixPath(volume[0])
    assert PurePosixPath(settings.kubelet.cert_dir).is_relative_to(volume[0])
    assert settings.node.internal_ip == POD_IP["POD_IP"]  # auto: the container's own address
    # The volume directory is created and handed to that user before the volume is declared.
    [run] = [r for r in instructions("RUN") if "chown" in r]
    assert f"chown {uid}:{gid} {volume[0]}" in run


def test_the_entrypoint_command_runs() -> None:
    [entrypoint] = [exec_form(e) for e in instructions("ENTRYPOINT")]
    [cmd] = [exec_form(c) for c in instructions("CMD")]
    program = VENV_BIN / entrypoint[0]
    assert program.is_file(), f"{program} missing: install the package into the venv (pip install -e .)"
    command = [str(program), *entrypoint[1:], *cmd]
    ran = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    assert "--kubeconfig" in ran.stdout
    version = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"vk-provider {__version__}"


def test_the_healthcheck_probes_the_exposed_kubelet_port() -> None:
    [expose] = instructions("EXPOSE")
    assert int(expose) == KubeletSettings().port
    [check] = instructions("HEALTHCHECK")
    probe = exec_form(check[check.index("CMD") + len("CMD") :].strip())
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "<healthcheck>", "exec")
    assert f"https://127.0.0.1:{expose}/healthz" in probe[2]


# ------------------------------------------------------------------ docker-compose.yml


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def compose_validator() -> jsonschema.protocols.Validator:
    # Source and licence of the schema: tests/data/compose-spec.SOURCE.md.
    schema = json.loads((DATA / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validator


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["services"]["agent"].update(restart=["always"]),
        lambda c: c["services"]["agent"].update(volumes="registry"),
        lambda c: c["services"]["agent"].update(netwroks=["kind"]),
        lambda c: c["volumes"].update(registry=["not", "a", "mapping"]),
    ],
    ids=["restart-list", "volumes-string", "misspelt-key", "volume-list"],
)
def test_the_schema_check_catches_a_broken_compose_file(breakage: Any) -> None:
    broken = copy.deepcopy(compose())
    breakage(broken)
    assert list(compose_validator().iter_errors(broken))


def test_compose_runs_the_agent_on_kinds_network_with_the_registry_on_a_named_volume() -> None:
    c = compose()
    agent = c["services"]["agent"]
    assert c["networks"]["kind"] == {"external": True}
    assert agent["networks"] == ["kind"]
    assert agent["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
    env = {k: str(v) for k, v in agent["environment"].items()}
    assert env["VK_PROVIDER_NODE_INTERNAL_IP"] == "auto"  # the default route's interface, in the container
    settings = load_settings(env={**env, **POD_IP})
    [volume] = [exec_form(v) for v in instructions("VOLUME")]
    mounts = {m["target"]: m for m in agent["volumes"]}
    registry = mounts[volume[0]]
    assert registry["type"] == "volume"
    assert registry["source"] in c["volumes"]
    assert PurePosixPath(settings.registry.db).parent == PurePosixPath(volume[0])
    kubeconfig = mounts[settings.kube.kubeconfig]
    assert kubeconfig == {
        "type": "bind",
        "source": "./kubeconfig.kind",
        "target": settings.kube.kubeconfig,
        "read_only": True,
    }
    assert not in_build_context("kubeconfig.kind")
    # The SQL browser reads the same file, as the agent's user (SQLite's WAL files are shared).
    browser = c["services"]["sqlite-web"]
    assert browser["profiles"] == ["browse"]
    assert browser["user"] == "{}:{}".format(*image_user())
    assert browser["command"][-1] == settings.registry.db
    assert "--read-only" in browser["command"]
    assert any(m["source"] == registry["source"] and m["target"] == volume[0] for m in browser["volumes"])


# ------------------------------------------------------------------ deploy/


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def deploy_objects() -> list[dict[str, Any]]:
    return [d for f in sorted((ROOT / "deploy").glob("*.yaml")) for d in documents(f)]


def find(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in deploy_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_deployment_agrees_with_the_image_and_the_rbac() -> None:
    deployment = find("Deployment", "vk-provider")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[item["name"]] = POD_IP["POD_IP"]
    settings = load_settings(env=env)
    assert settings.node.internal_ip == POD_IP["POD_IP"]
    assert env["POD_IP"]  # from the Downward API
    uid, gid = image_user()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [cmd] = instructions("CMD")
    assert container["args"] == exec_form(cmd)
    [port] = container["ports"]
    assert port["containerPort"] == KubeletSettings().port
    # The database and the certificates are on the claim, not in the read-only root.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    registry = PurePosixPath(mounts["registry"])
    assert PurePosixPath(settings.registry.db).parent == registry
    assert PurePosixPath(settings.kubelet.cert_dir).is_relative_to(registry)
    claim = volumes["registry"]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # It runs as the ServiceAccount the roles are bound to, under the node name the roles allow.
    assert pod["serviceAccountName"] == "vk-provider"
    for binding in (find("ClusterRoleBinding", "vk-provider"), find("RoleBinding", "vk-provider")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "vk-provider", "namespace": deployment["metadata"]["namespace"]}
        ]
    named = [
        rule["resourceNames"]
        for role in (find("ClusterRole", "vk-provider"), find("Role", "vk-provider"))
        for rule in role["rules"]
        if "resourceNames" in rule
    ]
    assert named
    assert all(names == [settings.node.name] for names in named)


def test_the_deployed_crd_is_the_one_the_agent_installs() -> None:
    config = imagecaches.CRD_MANIFEST
    assert config.is_file(), f"{config} (the ImageCache CRD) is missing"
    assert documents(ROOT / "deploy" / "10-crd-imagecache.yaml") == documents(config)


@pytest.mark.parametrize("role", ["vk-provider-crd-installer", "vk-provider-pull-secrets"])
def test_the_optional_roles_are_defined_but_not_bound(role: str) -> None:
    # Granted only when a user binds them for the feature that needs them (docs/kind.md).
    assert find("ClusterRole", role)["rules"]
    bound = [d["roleRef"]["name"] for d in deploy_objects() if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert bound
    assert role not in bound
