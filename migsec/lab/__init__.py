"""The test guest and the one-machine two-host lab (see docs/lab.md).

``Lab(dir, prefix)`` brings up N libvirt hosts in network + mount namespaces
(``up``/``down``/``status``/``host(name)``); ``migsec.lab.guest`` builds the busybox
test guest and parses what its workload prints on the serial console.
"""
from migsec.lab.guest import (
    Console, DiskReport, GuestImage, build_guest, expected_memory_sha256, last_counter,
    parse_console, verify_disk,
)
from migsec.lab.lab import Guest, Lab, LabHost, parse_size

__all__ = [
    "Console", "DiskReport", "Guest", "GuestImage", "Lab", "LabHost", "build_guest",
    "expected_memory_sha256", "last_counter", "parse_console", "parse_size", "verify_disk",
]
