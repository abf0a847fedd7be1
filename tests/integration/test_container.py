"""The container image, tested without Docker (this machine cannot pull base images).

* The root ``Dockerfile`` is read: non-root ``USER``, the data dir as the ``VOLUME``,
  exec-form ``ENTRYPOINT ["hato"]``/``CMD ["serve"]``, ``HEALTHCHECK`` with
  ``hato health``, and an ``ENV`` whose names are all settings Hato reads (the HTTP
  listener on 0.0.0.0 with its token from a secret file).
* The image's entrypoint is run as it runs there: ``hato serve`` as an unprivileged user
  (uid 65534; when the tests run as root, through ``setpriv`` keeping only the right to
  *read* any file, so the checkout's Python can be read) with the image's environment,
  a writable data dir and nothing else of its own; ``hato health`` (with the token from
  the secret file) says ready, and afterwards no file of that user exists outside the
  data dir in any place it could have written to (/tmp, /var/tmp, /dev/shm, the checkout).
  A read-only root filesystem itself cannot be mounted here; this is the closest check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pydantic import AliasChoices

from hato.config import Settings
from peers import missing
from peers.hato import SRC

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
NOBODY = 65534
KNOWN_NAMES = frozenset(
    name
    for field in Settings.model_fields.values()
    if isinstance(field.validation_alias, AliasChoices)
    for name in field.validation_alias.choices
    if isinstance(name, str)
)


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _final_stage():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_dockerfile_shape() -> None:
    stage = _final_stage()
    words = dict(stage)
    assert stage[0][1].startswith("python:") and "slim" in stage[0][1]
    assert words["USER"] not in ("root", "0")
    assert json.loads(words["ENTRYPOINT"]) == ["hato"]
    assert json.loads(words["CMD"]) == ["serve"]
    assert json.loads(words["VOLUME"]) == ["/var/lib/hato"]
    health = words["HEALTHCHECK"]
    assert json.loads(health[health.index("CMD") + 3 :].strip()) == ["hato", "health"]
    env = _image_env()
    assert env["HATO_DATA_DIR"] == "/var/lib/hato"
    assert env["HATO_HTTP_LISTEN"] == "0.0.0.0:8025"
    assert env["HATO_HTTP_TOKEN_FILE"].startswith("/run/secrets/")
    hato_names = {name for name in env if name.startswith("HATO_")}
    assert hato_names <= KNOWN_NAMES, hato_names - KNOWN_NAMES
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def _as_unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []  # already not root
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        missing("setpriv (util-linux)")
    return [
        str(setpriv),
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]


def _strays(since: float, data: Path) -> list[str]:
    """Files of the unprivileged user, changed since ``since``, outside ``data``."""
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    found = []
    for top in ("/tmp", "/var/tmp", "/dev/shm", str(REPO)):
        for root, dirs, files in os.walk(top):
            if Path(root) == data or data in Path(root).parents:
                dirs[:] = []
                continue
            for name in dirs + files:
                path = os.path.join(root, name)
                if Path(path) == data:
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_uid == uid and st.st_mtime >= since:
                    found.append(path)
    return found


def test_entrypoint_runs_unprivileged_with_only_the_data_dir_writable(tmp_path: Path) -> None:
    prefix = _as_unprivileged()
    data = tmp_path / "var-lib-hato"
    data.mkdir(mode=0o700)
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    token_file = secrets_dir / "hato_http_token"
    token_file.write_text("container-token-1234\n")
    token_file.chmod(0o400)  # root's, as a mounted secret; readable only by the right to read
    if prefix:
        os.chown(data, NOBODY, NOBODY)
    env = {key: os.environ[key] for key in ("PATH", "LANG", "TZ") if key in os.environ}
    env.update(_image_env())
    env.update(
        PYTHONPATH=str(SRC),
        HATO_DATA_DIR=str(data),
        HOME=str(data),
        HATO_HTTP_TOKEN_FILE=str(token_file),
        # Loopback here (the tests' network rule); the image binds 0.0.0.0.
        HATO_LISTEN="127.0.0.1:0",
        HATO_HTTP_LISTEN="127.0.0.1:0",
    )
    since = time.time() - 1
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "hato", "serve"],
        env=env,
        cwd=data,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("hato: ready"):
                break
        assert lines and lines[-1] == "hato: ready", "\n".join(lines)
        [where] = [m.group(1) for s in lines if (m := re.search(r"http on (\S+)$", s))]
        health = subprocess.run(
            [*prefix, sys.executable, "-m", "hato", "health", "--url", f"http://{where}"],
            env=env,
            cwd=data,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.startswith("ready")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    assert (data / "queue.db").exists()
    if prefix:
        assert (data / "queue.db").stat().st_uid == NOBODY
    assert _strays(since, data) == []


def test_image_env_without_the_secret_refuses_in_one_line(tmp_path: Path) -> None:
    env = {key: os.environ[key] for key in ("PATH", "LANG") if key in os.environ}
    env.update(_image_env())
    env.update(
        PYTHONPATH=str(SRC),
        HATO_DATA_DIR=str(tmp_path),
        HATO_HTTP_TOKEN_FILE=str(tmp_path / "no-such-secret"),
        HATO_LISTEN="127.0.0.1:0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hato", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HATO_HTTP_TOKEN" in lines[0] and "no-such-secret" in lines[0]
