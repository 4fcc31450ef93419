"""Power and firmware control of nodes through their BMCs.

Owns: `driver_for(node_view, config)`, the one place that turns a node's ``bmc_*`` fields plus the site
config into a `PowerDriver` (driver names: ``redfish``, ``fake``). Everything else in bootsvc talks to
BMCs only through the returned driver. Interface and errors: `bootsvc.power.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from bootsvc.power.base import (
    BmcError,
    BootTarget,
    FatalBmcError,
    PowerDriver,
    PowerSettings,
    PowerState,
    RetryableBmcError,
)

__all__ = [
    "BmcError",
    "BootTarget",
    "FatalBmcError",
    "NodeBmc",
    "PowerDriver",
    "PowerSettings",
    "PowerState",
    "RetryableBmcError",
    "driver_for",
    "settings_from_config",
]

if TYPE_CHECKING:  # the Redfish modules load the redfish library: only when a Redfish BMC is used
    from bootsvc.power.redfish_session import SessionPool

DRIVERS = ("redfish", "fake")


class NodeBmc(Protocol):
    """The node fields a driver needs (`bootsvc.inventory.NodeView` and `models.Node` both fit)."""

    @property
    def name(self) -> str: ...
    @property
    def bmc_address(self) -> str | None: ...
    @property
    def bmc_driver(self) -> str: ...
    @property
    def bmc_credential_ref(self) -> str | None: ...
    @property
    def bmc_verify_tls(self) -> bool: ...


def settings_from_config(config: Any) -> PowerSettings:
    """PowerSettings from a `bootsvc.config.Config` (its optional ``power`` section and the
    ``bmc_credentials`` name -> ref mapping); defaults for anything missing."""
    if config is None:
        return PowerSettings()
    if isinstance(config, PowerSettings):
        return config
    power = getattr(config, "power", None)
    kw: dict[str, Any] = {}
    if power is not None:
        for f in ("connect_timeout", "read_timeout", "ca_file", "max_sessions_per_bmc", "slot_wait",
                  "poll_interval", "power_timeout", "graceful_timeout", "drop_grace", "bfb_uri_scheme_firmware",
                  "update_wait", "rshim_wait", "install_timeout", "proxy"):
            v = getattr(power, f, None)
            if v is not None:
                kw[f] = str(v) if f == "ca_file" else tuple(v) if f == "bfb_uri_scheme_firmware" else v
    creds = getattr(config, "bmc_credentials", None) or {}
    kw["credentials"] = {name: getattr(c, "ref", c) for name, c in creds.items()}
    return PowerSettings(**kw)


def driver_for(node: NodeBmc, config: Any = None, *,
               quirk_overrides: dict[str, Any] | None = None, pool: SessionPool | None = None) -> PowerDriver:
    """The driver for ``node``'s BMC. Raises FatalBmcError naming the node if its BMC fields are unusable.
    ``pool``: Redfish sessions kept between calls (the conductor's); None = one login per call."""
    kind = (node.bmc_driver or "redfish").lower()
    if not node.bmc_address:
        raise FatalBmcError(f"node {node.name} has no bmc_address", hint="set it in the inventory")
    if kind == "fake":
        from bootsvc.power.fake import fake_for

        return fake_for(node.bmc_address)
    if kind == "redfish":
        from bootsvc.power.credentials import check_destination
        from bootsvc.power.redfish import RedfishDriver

        # before any connection: a credential name goes only to the BMC networks the config binds it to
        check_destination(node.name, node.bmc_credential_ref, node.bmc_address,
                          getattr(config, "bmc_credentials", None))
        return RedfishDriver(node.bmc_address, node.bmc_credential_ref, verify_tls=node.bmc_verify_tls,
                             settings=settings_from_config(config), quirk_overrides=quirk_overrides, pool=pool)
    raise FatalBmcError(f"node {node.name}: unknown bmc_driver {node.bmc_driver!r} (known: {', '.join(DRIVERS)})",
                        hint="fix the node's bmc_driver")
