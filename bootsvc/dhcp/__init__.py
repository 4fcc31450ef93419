"""bootsvc's own DHCPv4 server: codec (packet), pure decisions (decide), leases, server, CLI."""
