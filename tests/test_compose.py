"""Structural checks of docker-compose.yaml and the Dockerfile (no Docker needed).

Docker is not available where these run, so the compose file has to be right by
construction; these tests tie it to config.settings.Settings and to itself.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"postgres", "redis", "app", "ray-worker", "simulator"}
PROJECT_SERVICES = ("app", "ray-worker", "simulator")

# Environment names set on project services that are deliberately NOT Settings fields.
# Keep this small and explicit: anything else must be a Settings field.
NON_SETTINGS_ENV = {
    "PYTHONUNBUFFERED",  # Python runtime
    "OPERATOR_TOKEN",  # simulator only: fed to `powerbank simulate --token`
    "RAY_worker_niceness",  # read by the raylet of `ray start` (a local Ray gets RAY_WORKER_NICENESS)
}

SETTINGS_ENV = {name.upper() for name in Settings.model_fields}
RAY_GCS_PORT = 6380
REDIS_PORT = 6379

_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a `KEY=VALUE` list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def depends_of(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}; the short list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def command_of(service: dict[str, Any]) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def interpolate(value: str) -> str:
    """Resolve compose `${VAR}`, `${VAR:-default}`, `${VAR:?err}` as an unset shell would,
    with a placeholder for required variables. `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        op, arg = m.group("op"), m.group("arg")
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            return f"required-{m.group('name').lower()}"
        return ""

    return _INTERP.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def published(service: dict[str, Any]) -> dict[int, int]:
    """{container port: host port} from short-syntax or long-syntax `ports`."""
    out: dict[int, int] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out[int(entry["target"])] = int(entry.get("published", entry["target"]))
            continue
        parts = str(entry).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


# ---------------------------------------------------------------- compose: shape


def test_compose_spec_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_all_services_exist(services: dict[str, Any]) -> None:
    assert set(services) >= SERVICES


def test_project_services_share_one_image_and_build(services: dict[str, Any]) -> None:
    images = {services[name].get("image") for name in PROJECT_SERVICES}
    builds = [services[name].get("build") for name in PROJECT_SERVICES]
    assert len(images) == 1 and None not in images, images
    assert all(b == builds[0] for b in builds) and builds[0], builds
    build = builds[0]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE.parent / context / dockerfile).resolve() == DOCKERFILE


def test_third_party_images(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"].split(":")[0] == "postgres"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["redis"]["image"].split(":")[1].startswith("7")


def test_backing_services_have_healthchecks(services: dict[str, Any]) -> None:
    pg = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg
    redis = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli" in redis and "ping" in redis


def test_app_waits_for_healthy_postgres_and_redis(services: dict[str, Any]) -> None:
    deps = depends_of(services["app"])
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("redis") == "service_healthy"


def test_ray_worker_and_simulator_wait_for_app(services: dict[str, Any]) -> None:
    assert "app" in depends_of(services["ray-worker"])
    assert depends_of(services["simulator"]).get("app") == "service_healthy"


def test_every_depends_on_target_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, condition in depends_of(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s missing healthcheck"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in services.values():
        for mount in service.get("volumes", []):
            if isinstance(mount, dict):
                if mount.get("type", "volume") == "volume" and mount.get("source"):
                    used.add(mount["source"])
                continue
            source = str(mount).split(":")[0]
            if ":" in str(mount) and not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used, "expected named volumes (postgres data, app data)"
    assert used <= declared, f"undeclared volumes: {used - declared}"


def test_postgres_and_redis_data_are_on_volumes(services: dict[str, Any]) -> None:
    pg_targets = [str(v).split(":")[1] for v in services["postgres"].get("volumes", [])]
    assert "/var/lib/postgresql/data" in pg_targets
    redis_targets = [str(v).split(":")[1] for v in services["redis"].get("volumes", [])]
    assert "/data" in redis_targets


# ---------------------------------------------------------------- compose: env vs Settings


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_project_env_names_are_settings_fields(services: dict[str, Any], name: str) -> None:
    env = env_of(services[name])
    assert env, f"{name} sets no environment"
    unknown = set(env) - SETTINGS_ENV - NON_SETTINGS_ENV
    assert not unknown, f"{name} sets env vars that config.settings.Settings does not read: {unknown}"


def test_allow_list_does_not_shadow_settings_fields() -> None:
    assert not NON_SETTINGS_ENV & SETTINGS_ENV


@pytest.mark.parametrize("name", ["app", "ray-worker"])
def test_project_env_is_valid_for_settings(services: dict[str, Any], name: str) -> None:
    env = {k: interpolate(v) for k, v in env_of(services[name]).items() if k in SETTINGS_ENV}
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})
    assert str(settings.data_dir) == env["DATA_DIR"]
    assert settings.database_url == env["DATABASE_URL"]
    assert settings.redis_url == env["REDIS_URL"]


def test_app_listens_on_all_interfaces(services: dict[str, Any]) -> None:
    env = env_of(services["app"])
    assert env["HTTP_HOST"] == "0.0.0.0"
    assert env["MQTT_HOST"] == "0.0.0.0"
    assert "MQTT_PUBLIC_HOST" in env


def test_app_ports_match_settings_defaults(services: dict[str, Any]) -> None:
    http = Settings.model_fields["http_port"].default
    mqtt = Settings.model_fields["mqtt_port"].default
    assert (http, mqtt) == (8010, 1883)
    ports = published(services["app"])
    assert ports.get(http) == http
    assert ports.get(mqtt) == mqtt
    env = env_of(services["app"])
    # If the compose file sets the ports explicitly they must agree with what is published.
    assert int(env.get("HTTP_PORT", http)) == http
    assert int(env.get("MQTT_PORT", mqtt)) == mqtt


def test_backing_services_are_not_published(services: dict[str, Any]) -> None:
    assert not services["postgres"].get("ports")
    assert not services["redis"].get("ports")


def test_database_url_points_at_postgres_service(services: dict[str, Any]) -> None:
    pg_env = env_of(services["postgres"])
    for name in ("app", "ray-worker"):
        url = urlsplit(interpolate(env_of(services[name])["DATABASE_URL"]))
        assert url.scheme == "postgresql+asyncpg"
        assert url.hostname == "postgres" and url.hostname in services
        assert (url.port or 5432) == 5432
        assert url.username == pg_env["POSTGRES_USER"]
        assert url.password == pg_env["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_redis_url_points_at_redis_service(services: dict[str, Any]) -> None:
    for name in ("app", "ray-worker"):
        url = urlsplit(interpolate(env_of(services[name])["REDIS_URL"]))
        assert url.scheme == "redis"
        assert url.hostname == "redis" and url.hostname in services
        assert (url.port or REDIS_PORT) == REDIS_PORT


def test_jwt_secret_is_required_not_defaulted(services: dict[str, Any]) -> None:
    assert re.fullmatch(r"\$\{JWT_SECRET:\?[^}]+\}", env_of(services["app"])["JWT_SECRET"])


def test_data_dir_is_on_a_volume(services: dict[str, Any]) -> None:
    app = services["app"]
    data_dir = env_of(app)["DATA_DIR"]
    targets = [str(v).split(":")[1] for v in app.get("volumes", [])]
    assert data_dir in targets


# ---------------------------------------------------------------- compose: Ray topology


def test_app_starts_ray_head_then_powerbank_up(services: dict[str, Any]) -> None:
    cmd = command_of(services["app"])
    head, sep, rest = cmd.partition("&&")
    assert sep, "ray start must succeed before the app starts"
    head_args = shlex.split(head.split("-c", 1)[-1])
    assert head_args[:3] == ["ray", "start", "--head"]
    assert f"--port={RAY_GCS_PORT}" in head_args
    assert any(a.startswith("--num-cpus=") for a in head_args)
    assert "--dashboard-host=0.0.0.0" in head_args
    assert shlex.split(rest)[-2:] == ["powerbank", "up"]


def test_app_driver_attaches_to_local_head(services: dict[str, Any]) -> None:
    address = env_of(services["app"])["RAY_ADDRESS"]
    assert address in {"auto", f"127.0.0.1:{RAY_GCS_PORT}"}


def test_ray_gcs_port_differs_from_redis() -> None:
    assert RAY_GCS_PORT != REDIS_PORT


def test_ray_worker_joins_app_head(services: dict[str, Any]) -> None:
    args = shlex.split(command_of(services["ray-worker"]))
    assert args[:2] == ["ray", "start"]
    assert f"--address=app:{RAY_GCS_PORT}" in args
    assert "--block" in args
    assert "--head" not in args


def test_ray_nodes_get_shared_memory(services: dict[str, Any]) -> None:
    for name in ("app", "ray-worker"):
        assert services[name].get("shm_size"), f"{name} needs a /dev/shm for Ray's object store"


def test_app_healthcheck_hits_healthz_without_curl(services: dict[str, Any]) -> None:
    test = services["app"]["healthcheck"]["test"]
    joined = " ".join(test)
    assert "curl" not in joined and "urllib" in joined
    assert test[:2] == ["CMD", "python"]
    url = re.search(r"http://[^'\"\s]+", joined)
    assert url, joined
    parts = urlsplit(url.group(0))
    assert parts.path == "/healthz"
    assert parts.port == Settings.model_fields["http_port"].default


def test_simulator_targets_app_api(services: dict[str, Any]) -> None:
    args = shlex.split(interpolate(command_of(services["simulator"])).split("-c", 1)[-1])
    i = args.index("powerbank")
    assert args[i + 1] == "simulate"
    api = urlsplit(args[args.index("--api") + 1])
    assert api.hostname == "app" and api.port == Settings.model_fields["http_port"].default
    for flag in ("--token", "--count", "--boards", "--holes"):
        assert flag in args
    # The token is a runtime requirement of the container, fed from OPERATOR_TOKEN.
    assert "OPERATOR_TOKEN" in command_of(services["simulator"])
    assert "OPERATOR_TOKEN" in env_of(services["simulator"])


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_and_install() -> None:
    instructions = dockerfile_instructions()
    froms = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(r"pip install (?:[^&;]* )?\.(?:\s|$)", runs), runs


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for word, args in final_stage(dockerfile_instructions()) if word == "USER"]
    assert users, "final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_exposes_settings_ports() -> None:
    exposed = {
        int(port.split("/")[0])
        for word, args in final_stage(dockerfile_instructions())
        if word == "EXPOSE"
        for port in args.split()
    }
    assert exposed >= {
        Settings.model_fields["http_port"].default,
        Settings.model_fields["mqtt_port"].default,
    }


def test_dockerfile_cmd_is_powerbank_up() -> None:
    cmds = [args for word, args in final_stage(dockerfile_instructions()) if word == "CMD"]
    assert cmds
    cmd = yaml.safe_load(cmds[-1]) if cmds[-1].startswith("[") else shlex.split(cmds[-1])
    assert cmd == ["powerbank", "up"]


def test_powerbank_console_script_exists() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "powerbank" in pyproject["project"]["scripts"]


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".git"} <= ignored
    assert "pyproject.toml" not in ignored
