"""migsec: secure inter-cloud migration of libvirt/KVM virtual machines."""

__version__ = "0.1.0"
