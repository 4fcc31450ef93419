"""bootsvc: bare-metal provisioning for GPU clusters whose nodes sit behind BlueField-3 DPUs."""

__version__ = "0.1.0"
