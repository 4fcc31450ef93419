"""Credential references: env:/file: parsing, config names, never showing a password, and why a secret
could not be read going to the log only (the error says where to look, not what the disk holds)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bootsvc.power.base import FatalBmcError
from bootsvc.power.credentials import CredentialError, resolve

ENV = {"BMC_U": "admin", "BMC_P": "hunter2:with:colons"}


def test_env_ref() -> None:
    c = resolve("env:BMC_U:BMC_P", env=ENV)
    assert (c.username, c.password) == ("admin", "hunter2:with:colons")
    for text in (repr(c), str(c), f"{c}"):
        assert "hunter2" not in text and "admin" in text


def _unusable(caplog: pytest.LogCaptureFixture, ref: str, **kw: object) -> str:
    """Resolve ``ref`` expecting the generic error; return the one log line with the real reason."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, "bootsvc.power.credentials"), \
            pytest.raises(CredentialError, match="the reason is in the bootsvc log") as e:
        resolve(ref, **kw)  # type: ignore[arg-type]
    for word in ("not set", "No such file", "(mode ", "expected 'user", "by others"):
        assert word not in str(e.value) and word not in e.value.hint
    lines = [r.getMessage() for r in caplog.records if "bmc credential unusable" in r.getMessage()]
    assert len(lines) == 1
    return lines[0]


def test_env_ref_missing_variable_is_named_in_the_log_only(caplog: pytest.LogCaptureFixture) -> None:
    assert "['BMC_P'] not set" in _unusable(caplog, "env:BMC_U:BMC_P", env={"BMC_U": "admin"})


@pytest.mark.parametrize("ref", ["env:ONLY_ONE", "env::P", "env:A:B:C"])
def test_env_ref_malformed(ref: str) -> None:
    with pytest.raises(CredentialError, match="env:USER_VAR:PASS_VAR"):
        resolve(ref, env=ENV)


@pytest.mark.parametrize("content", ["root:s3cr:et\n", "root\ns3cr:et\n", "\nroot\n\ns3cr:et\n\n"])
def test_file_ref_forms(tmp_path: Path, content: str) -> None:
    f = tmp_path / "bmc.cred"
    f.write_text(content)
    f.chmod(0o600)
    c = resolve(f"file:{f}")
    assert (c.username, c.password) == ("root", "s3cr:et")


def test_world_readable_file_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "bmc.cred"
    f.write_text("root:pw\n")
    f.chmod(0o644)
    line = _unusable(caplog, f"file:{f}")
    assert "chmod 600" in line and "mode 644" in line and "root:pw" not in line


def test_missing_and_malformed_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "No such file" in _unusable(caplog, f"file:{tmp_path}/nope")
    f = tmp_path / "bad"
    f.write_text("a\nb\nc\n")
    f.chmod(0o600)
    assert "expected" in _unusable(caplog, f"file:{f}")
    assert "credential=dpu-bmc" in _unusable(caplog, "dpu-bmc", names={"dpu-bmc": f"file:{f}"})


def test_names_from_config_and_errors() -> None:
    names = {"dpu-bmc": "env:BMC_U:BMC_P"}
    assert resolve("dpu-bmc", names=names, env=ENV).username == "admin"
    with pytest.raises(CredentialError, match="unknown credential name 'other'"):
        resolve("other", names=names, env=ENV)
    with pytest.raises(CredentialError, match="no BMC credential reference"):
        resolve(None)
    with pytest.raises(CredentialError, match="must start with"):
        resolve("vault-x", names={"vault-x": "vault:secret/x"})


def test_credential_errors_are_fatal() -> None:
    assert issubclass(CredentialError, FatalBmcError)
    assert not CredentialError("x").retryable


def test_node_key_created_once_under_a_race(tmp_path: Path) -> None:
    """Many processes starting at once on a fresh state dir all read the same, complete key (the key is
    linked into place whole; seen in the storm bench: half the agents refused with 'bad secret')."""
    import multiprocessing

    ref = f"file:{tmp_path / 'state' / 'node.key'}"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        keys = pool.map(_read_created, [ref] * 64, chunksize=1)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["node.key"]  # no temporary file left


def _read_created(ref: str) -> bytes:
    from bootsvc import auth_secrets

    return auth_secrets.read_ref(ref, create=True)
