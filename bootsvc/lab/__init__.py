"""QEMU + network-namespace lab for end-to-end tests (owned by the lab helper; test infrastructure only,
never imported by the bootsvc runtime). See images/lab/README.md.

netns.py (topologies, cleanup, sweep), qemu.py (VMs, power backend), artifacts.py (kernels, initrds,
iPXE, GRUB, lab DOCA image, agent wheel; ``bootsvc lab build``), capture.py (dumpcap/tshark DHCP),
refservices.py (dnsmasq config + in-netns HTTP server for the lab's self-tests). bfbmc.py belongs to the
power helper.
"""
