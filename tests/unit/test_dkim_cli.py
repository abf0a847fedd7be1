"""``hato dkim keygen`` and ``hato dkim list`` as an operator runs them."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from hato.dkim import load_signers

SRC = str(Path(__file__).resolve().parents[2] / "src")


def hato(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HATO_")}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hato: ") and fragment in lines[0], result.stderr


def test_keygen_writes_under_the_data_dir_and_prints_the_record(tmp_path: Path) -> None:
    result = hato(
        "dkim", "keygen", "--domain", "DBMX.net", "--selector", "hato1",
        env={"HATO_DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    key = tmp_path / "data" / "dkim" / "dbmx.net" / "hato1.rsa.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith('hato1._domainkey.dbmx.net. IN TXT ( "v=DKIM1; k=rsa; " "p=MIIB')
    assert all(line.startswith(";") for line in lines[:-1])
    assert "; name: hato1._domainkey.dbmx.net  type: TXT  value (one string):" in lines
    strings = re.findall(r'"([^"]*)"', lines[-1])
    assert all(len(s) <= 255 for s in strings)
    [record] = [k.record for k in load_signers(tmp_path / "data" / "dkim").keys]
    assert "".join(strings) == record.txt
    assert f"; {record.txt}" in lines


def test_keygen_ed25519_into_hato_dkim_dir(tmp_path: Path) -> None:
    result = hato(
        "dkim", "keygen", "--domain", "dbmx.net", "--selector", "ed1", "--algorithm", "ed25519",
        env={"HATO_DKIM_DIR": str(tmp_path / "keys")}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "keys" / "dbmx.net" / "ed1.ed25519.key").is_file()
    assert '"v=DKIM1; k=ed25519; " "p=' in result.stdout


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    args = ("dkim", "keygen", "--dkim-dir", str(tmp_path), "--domain", "a.example",
            "--selector", "s", "--bits", "1024")  # fmt: skip
    assert hato(*args, cwd=tmp_path).returncode == 0
    before = (tmp_path / "a.example" / "s.rsa.key").read_bytes()
    again = hato(*args, cwd=tmp_path)
    assert again.returncode == 2
    one_line_error(again, "exists; use --force to replace it")
    assert (tmp_path / "a.example" / "s.rsa.key").read_bytes() == before
    forced = hato(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "a.example" / "s.rsa.key").read_bytes() != before


def test_keygen_errors_are_one_line(tmp_path: Path) -> None:
    base = ("dkim", "keygen", "--dkim-dir", str(tmp_path), "--domain", "a.example")
    one_line_error(hato(*base, "--selector", "../x", cwd=tmp_path), "selector")
    one_line_error(
        hato(*base, "--selector", "s", "--algorithm", "ed25519", "--bits", "2048", cwd=tmp_path),
        "--bits applies to RSA keys only",
    )
    (tmp_path / "a.example").write_text("not a directory")
    one_line_error(hato(*base, "--selector", "s", cwd=tmp_path), "cannot write DKIM key")


def test_list_shows_every_key_and_checks_them(tmp_path: Path) -> None:
    for selector, algorithm in (("r", "rsa"), ("e", "ed25519")):
        assert (
            hato("dkim", "keygen", "--dkim-dir", str(tmp_path), "--domain", "a.example",
                 "--selector", selector, "--algorithm", algorithm, cwd=tmp_path).returncode
            == 0
        )  # fmt: skip
    listed = hato("dkim", "list", "--dkim-dir", str(tmp_path), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "r._domainkey.a.example. IN TXT" in listed.stdout
    assert "e._domainkey.a.example. IN TXT" in listed.stdout
    as_json = json.loads(
        hato("dkim", "list", "--json", "--dkim-dir", str(tmp_path), cwd=tmp_path).stdout
    )
    assert [(k["selector"], k["algorithm"]) for k in as_json] == [("r", "rsa"), ("e", "ed25519")]
    assert all("PRIVATE" not in json.dumps(k) for k in as_json)

    (tmp_path / "a.example" / "notes.txt").write_text("x")
    broken = hato("dkim", "list", "--dkim-dir", str(tmp_path), cwd=tmp_path)
    assert broken.returncode == 2
    one_line_error(broken, "unexpected file")


def test_list_without_keys(tmp_path: Path) -> None:
    result = hato("dkim", "list", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0
    assert "no DKIM keys" in result.stdout
