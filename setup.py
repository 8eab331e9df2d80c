"""Build hook: the host files (systemd unit, tmpfiles entry, libvirt hook, sample
configuration, operator guide, man page) are copied into the package as ``migsec/data/`` so
that ``migsec install`` works from a plain ``pip install`` (no checkout needed).

They stay where operators and the tests look for them in a checkout (``systemd/``,
``hooks/``, ``examples/``, ``docs/``); keep this map in step with
``migsec.ops.layout.HOST_FILES``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
HOST_FILES = {
    "systemd/migsecd.service": "migsecd.service",
    "systemd/migsec.conf": "migsec.conf",
    "hooks/qemu": "qemu-hook",
    "examples/migsecd.toml": "migsecd.toml",
    "docs/operators.md": "operators.md",
    "docs/migsec.1": "migsec.1",
}


class BuildWithHostFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        target = Path(self.build_lib) / "migsec" / "data"
        target.mkdir(parents=True, exist_ok=True)
        for src, name in HOST_FILES.items():
            self.copy_file(str(HERE / src), str(target / name), preserve_mode=True)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = Path(self.build_lib) / "migsec" / "data"
        return outputs + [str(target / name) for name in HOST_FILES.values()]


setup(cmdclass={"build_py": BuildWithHostFiles})
