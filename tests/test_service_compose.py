"""docker-compose.yml and Dockerfile: every service's build context and command exist (no Docker engine needed),
`docker compose config` accepts the file, no secret is written in it, the API is published on loopback only, images
are pinned, and every path a named volume is mounted on exists in the image and belongs to the containers' user."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"POSTGRES_PASSWORD": "pg-secret-1", "REDIS_PASSWORD": "redis-secret-2", "MINIO_ROOT_PASSWORD": "root-secret-3",
           "MINIO_APP_PASSWORD": "app-secret-4"}


def _interpolate(value, env: dict):
    """Compose's variable substitution (${X}, ${X:-default}, ${X:?error}, $$), enough for this file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        got = env.get(name, "")
        if op == ":-":
            return got or arg
        if op == ":?" and not got:
            raise KeyError(f"{name}: {arg}")
        return got

    out = re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value)
    return out.replace("$$", "$")


def _compose(env: dict | None = None) -> dict:
    return _interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), SECRETS if env is None else env)


def _cmd(svc: dict) -> list[str]:
    c = svc.get("command")
    return shlex.split(c) if isinstance(c, str) else list(c or [])


def _dockerfile_cmd(path: Path) -> list[str]:
    import json

    line = [ln for ln in path.read_text().splitlines() if ln.startswith("CMD ")][-1]
    return json.loads(line[4:])


def test_compose_services_builds_and_commands_exist():
    import typer.main

    from cli import app as cli_app

    compose = _compose()
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "minio"} <= set(services)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    click_app = typer.main.get_command(cli_app)
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (REPO / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for src in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile.read_text(), flags=re.M):
                for item in src.split():
                    assert (context / item).exists(), f"{name}: Dockerfile copies {item}, which does not exist"
            cmd = _cmd(svc) or _dockerfile_cmd(dockerfile)
            assert cmd, f"{name}: no command"
            if cmd[0] == "faceadapt":
                assert "faceadapt" in scripts
                sub = click_app.commands.get(cmd[1])
                assert sub is not None, f"{name}: `faceadapt {cmd[1]}` is not a command"
                opts = {o for p in sub.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
                for token in cmd[2:]:
                    if token.startswith("--"):
                        assert token in opts, f"{name}: `faceadapt {cmd[1]}` has no option {token}"
            elif cmd[0] == "celery":
                module = cmd[cmd.index("-A") + 1]
                assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: celery app {module} missing"
                queues = set(cmd[cmd.index("-Q") + 1].split(","))
                from service.settings import ServiceSettings

                s = ServiceSettings(_env_file=None)
                assert {s.queue_default, s.queue_gpu} <= queues, f"{name}: worker does not consume {queues}"
            else:
                raise AssertionError(f"{name}: unexpected command {cmd}")
        else:
            assert svc.get("image"), f"{name}: neither build nor image"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name}: depends on unknown service {dep}"


def test_compose_environment_points_at_its_services():
    services = _compose()["services"]
    env = services["api"]["environment"]
    for key in ("FACEADAPT_DATABASE_URL", "FACEADAPT_BROKER_URL", "FACEADAPT_S3_ENDPOINT_URL"):
        host = urlparse(env[key]).hostname
        assert host in services, f"{key} points at {host}, not a compose service"
    assert env["FACEADAPT_REQUIRE_KEYS"] == "true"  # the API binds 0.0.0.0: keys are mandatory
    assert services["worker"]["environment"]["FACEADAPT_WORK_DIR"] == env["FACEADAPT_WORK_DIR"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    # every FACEADAPT_* variable is a setting
    from service.settings import ServiceSettings

    fields = {f"FACEADAPT_{n.upper()}" for n in ServiceSettings.model_fields}
    for svc in services.values():
        for k in (svc.get("environment") or {}):
            if k.startswith("FACEADAPT_"):
                assert k in fields, f"{k} is not a FaceAdapt setting"


def test_queue_depth_reads_the_broker():
    """faceadapt_queue_depth's source on a real Redis broker (own key prefix and queues; nothing consumes them)."""
    import os
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex[:8]
    env = dict(os.environ, FACEADAPT_BROKER_URL=os.environ.get("FACEADAPT_TEST_REDIS", "redis://127.0.0.1:6379/11"),
               FACEADAPT_BROKER_KEY_PREFIX=f"qd-{tag}:", FACEADAPT_QUEUE_GPU=f"qd-{tag}-gpu",
               FACEADAPT_QUEUE_DEFAULT=f"qd-{tag}")
    code = f"""
import redis
from service.queue import enqueue, queue_depths
from service.settings import get_settings
s = get_settings()
before = queue_depths()
enqueue("job", [("targets", 0), ("targets", 1), ("targets", 2)])
after = queue_depths()
r = redis.Redis.from_url(s.broker_url)
for k in r.scan_iter(match="qd-{tag}:*"):
    r.delete(k)
print(before[s.queue_gpu], after[s.queue_gpu], after[s.queue_default])
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "3", "0"]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker") or ("/usr/local/bin/docker" if Path("/usr/local/bin/docker").exists() else None)
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("the docker compose plugin (or docker-compose) is not installed: `docker compose config` cannot run")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    run = subprocess.run(cli + ["-f", str(REPO / "docker-compose.yml"), "--project-directory", str(tmp_path), "config",
                                "-q"], env={**env, **SECRETS}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # without the secrets compose refuses to start (nothing falls back to a default password)
    run = subprocess.run(cli + ["-f", str(REPO / "docker-compose.yml"), "--project-directory", str(tmp_path), "config",
                                "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "PASSWORD" in run.stderr, run.stderr


def test_compose_has_no_secret_and_needs_every_password():
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    text = (REPO / "docker-compose.yml").read_text()
    for value in SECRETS.values():
        assert value not in text
    # every password / secret value is a ${VARIABLE} that must be set (no default)
    for name, svc in list(raw["services"].items()) + [("x-faceadapt-env", {"environment": raw["x-faceadapt-env"]})]:
        for k, v in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", k) and k != "<<":
                assert isinstance(v, str) and re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", v), f"{name}.{k} = {v!r}"
    for k in SECRETS:  # missing from the environment: interpolation fails, as compose's does
        with pytest.raises(KeyError):
            _compose({n: v for n, v in SECRETS.items() if n != k})
    services = _compose()["services"]
    env = services["api"]["environment"]
    db = urlparse(env["FACEADAPT_DATABASE_URL"])
    assert db.password == SECRETS["POSTGRES_PASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    broker = urlparse(env["FACEADAPT_BROKER_URL"])
    assert broker.password == SECRETS["REDIS_PASSWORD"]
    assert "--requirepass" in " ".join(_cmd(services["redis"])) and "REDISCLI_AUTH" in str(services["redis"]["healthcheck"])
    # the app has its own MinIO user, not the root one
    assert env["FACEADAPT_S3_ACCESS_KEY_ID"] != services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert env["FACEADAPT_S3_SECRET_ACCESS_KEY"] == SECRETS["MINIO_APP_PASSWORD"]
    assert "admin user add" in str(services["minio-init"]["command"])


def test_compose_publishes_loopback_only_and_pins_images():
    services = _compose()["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        if "build" not in svc:
            image = svc["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            assert tag and tag != "latest", f"{name}: image {image} is not pinned to a release"


def _dockerfile_layout(path: Path) -> tuple[str, set[str], set[str]]:
    """(USER, folders made by `mkdir -p`, folders chowned to that user) of the Dockerfile's RUN lines."""
    text = path.read_text().replace("\\\n", " ")
    user = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")][-1]
    made, owned = set(), set()
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for cmd in re.split(r"&&|;", line[4:]):
            words = shlex.split(cmd)
            if words[:2] == ["mkdir", "-p"]:
                made.update(w.rstrip("/") for w in words[2:])
            elif words and words[0] == "chown":
                args = [w for w in words[1:] if not w.startswith("-")]
                recursive = "-R" in words
                if args and args[0].split(":")[0] == user:
                    owned.update((w.rstrip("/") + ("/**" if recursive else "")) for w in args[1:])
    return user, made, owned


def _owned_by(path: str, owned: set[str]) -> bool:
    return path in owned or any(o.endswith("/**") and (path == o[:-3] or path.startswith(o[:-3] + "/")) for o in owned)


def test_mounted_paths_exist_in_the_image_and_belong_to_its_user():
    compose = _compose()
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        user, made, owned = _dockerfile_layout(REPO / build["context"] / build.get("dockerfile", "Dockerfile"))
        assert user not in ("root", "0"), f"{name}: runs as root"
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith((".", "/")):
                continue  # a bind mount: the host's folder
            assert target in made, f"{name}: {target} (volume {source}) is not created in the image"
            if not vol.endswith(":ro"):
                assert _owned_by(target, owned), f"{name}: {target} (volume {source}) is not owned by {user}"
