"""Credential references: env:/file: parsing, config names, and never showing a password."""

from __future__ import annotations

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


def test_env_ref_missing_variable_names_it() -> None:
    with pytest.raises(CredentialError, match=r"\['BMC_P'\] not set"):
        resolve("env:BMC_U:BMC_P", env={"BMC_U": "admin"})


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


def test_world_readable_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "bmc.cred"
    f.write_text("root:pw\n")
    f.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        resolve(f"file:{f}")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="No such file"):
        resolve(f"file:{tmp_path}/nope")
    f = tmp_path / "bad"
    f.write_text("a\nb\nc\n")
    f.chmod(0o600)
    with pytest.raises(CredentialError, match="expected"):
        resolve(f"file:{f}")


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
