"""docker-compose.yml and Dockerfile: every service's build context and command exist (no Docker engine needed)."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


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
