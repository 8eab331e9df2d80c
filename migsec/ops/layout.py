"""Put migsec's host files in place: ``plan(layout) -> [Item]``, ``apply(items)``.

Each item is a directory or a file with its wanted mode and content; ``Item.state()`` says
whether it is already as wanted, so a second install changes nothing. The operator's own
files are never replaced: the sample configuration is written only when no configuration
exists. Everything is written below ``Layout.root`` (a DESTDIR), with the final paths
(without the root) inside the files, so a package build or a test can install anywhere.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from migsec.config import DEFAULT_CONFIG_PATH, load_config
from migsec.errors import ConfigError
from migsec.fsutil import atomic_write

DEFAULT_CONFIG_DIR = DEFAULT_CONFIG_PATH.parent
HOOK_NAME = "50-migsec"
_DEFAULT_HOOK_CONFIG = "CONFIG = None"


@dataclass(frozen=True)
class Layout:
    """Where things go on the host (final paths) and the DESTDIR they are written under."""

    prefix: Path
    config_dir: Path = DEFAULT_CONFIG_DIR
    root: Path = Path("/")
    source: Path | None = None
    python: str | None = None
    hooks_dir: Path = Path("/etc/libvirt/hooks")
    unit_dir: Path = Path("/etc/systemd/system")
    tmpfiles_dir: Path = Path("/etc/tmpfiles.d")
    doc_dir: Path = Path("/usr/share/doc/migsec")
    man_dir: Path = Path("/usr/share/man/man1")
    run_dir: Path = Path("/run/migsec")

    @property
    def config(self) -> Path:
        return self.config_dir / "migsecd.toml"

    @property
    def hook(self) -> Path:
        return self.hooks_dir / "qemu.d" / HOOK_NAME

    @property
    def unit(self) -> Path:
        return self.unit_dir / "migsecd.service"

    def under_root(self, path: Path) -> Path:
        return self.root / path.relative_to("/")


@dataclass(frozen=True)
class Item:
    """A directory (``content is None``) or a file the host should have."""

    path: Path  # the final path on the host
    target: Path  # where it is written (below the root)
    mode: int
    content: bytes | None = None
    keep_existing: bool = False  # the operator's file: create if absent, never replace
    what: str = ""

    def state(self) -> str:
        """``ok``, ``create``, ``update`` (content) or ``chmod``; ``kept`` for an operator's file."""
        try:
            st = self.target.lstat()
        except FileNotFoundError:
            return "create"
        if self.keep_existing:
            return "kept"
        is_dir = os.path.isdir(self.target) and not os.path.islink(self.target)
        if (self.content is None) != is_dir:
            raise ConfigError(f"{self.target} exists but is not a "
                              f"{'directory' if self.content is None else 'regular file'}; move it aside")
        if self.content is not None and self.target.read_bytes() != self.content:
            return "update"
        return "ok" if st.st_mode & 0o7777 == self.mode else "chmod"

    def apply(self) -> None:
        if self.content is None:
            self.target.mkdir(parents=True, exist_ok=True)
            os.chmod(self.target, self.mode)
            return
        self.target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.target, self.content, mode=self.mode, umask=False)


@dataclass
class Report:
    changed: list[tuple[str, Item]] = field(default_factory=list)
    unchanged: list[Item] = field(default_factory=list)

    def lines(self, dry_run: bool) -> list[str]:
        verb = {"create": "create", "update": "update", "chmod": "fix mode of"}
        out = [f"{'would ' if dry_run else ''}{verb[s]} {i.path}"
               + (f" ({i.what})" if i.what else "") for s, i in self.changed]
        kept = [i for i in self.unchanged if i.keep_existing]
        out += [f"kept {i.path} (exists; never overwritten)" for i in kept]
        if not self.changed:
            out.append(f"nothing to change: all {len(self.unchanged)} items already in place")
        else:
            out.append(f"{len(self.changed)} {'to change' if dry_run else 'changed'}, "
                       f"{len(self.unchanged)} already in place")
        return out


# what `migsec install` reads: name -> (path in a checkout, name in the package's data/);
# setup.py copies them into migsec/data/ when it builds a wheel (keep both maps in step)
HOST_FILES: dict[str, tuple[str, str]] = {
    "unit": ("systemd/migsecd.service", "migsecd.service"),
    "tmpfiles": ("systemd/migsec.conf", "migsec.conf"),
    "hook": ("hooks/qemu", "qemu-hook"),
    "config": ("examples/migsecd.toml", "migsecd.toml"),
    "operators": ("docs/operators.md", "operators.md"),
    "manpage": ("docs/migsec.1", "migsec.1"),
}
_OPTIONAL = ("operators", "manpage")
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"


def find_source(source: Path | None = None) -> dict[str, Path]:
    """Where each host file is: ``--source`` (a checkout), else the installed package's
    ``migsec/data/`` (a wheel), else the checkout this package runs from (editable/in-tree)."""
    if source is None and all((PACKAGE_DATA / HOST_FILES[n][1]).is_file() for n in HOST_FILES
                              if n not in _OPTIONAL):
        return {n: PACKAGE_DATA / packaged for n, (_, packaged) in HOST_FILES.items()}
    candidate = Path(source) if source else Path(__file__).resolve().parents[2]
    missing = [rel for n, (rel, _) in HOST_FILES.items()
               if n not in _OPTIONAL and not (candidate / rel).is_file()]
    if missing:
        raise ConfigError(f"{candidate} is not a migsec checkout (missing {', '.join(missing)}) and this "
                          f"migsec package carries no host files in {PACKAGE_DATA}; pass --source with "
                          f"the directory migsec was built from")
    return {n: candidate / rel for n, (rel, _) in HOST_FILES.items()}


def _python_for(layout: Layout) -> str:
    if layout.python:
        return layout.python
    if Path(sys.prefix).resolve() == layout.prefix.resolve():
        return sys.executable
    return str(layout.prefix / "bin" / "python3")


def _write_dirs(layout: Layout) -> tuple[Path, list[Path]]:
    """State dir and image dirs from an existing configuration (defaults otherwise)."""
    state, images = Path("/var/lib/migsec"), [Path("/var/lib/libvirt/images")]
    cfg_file = layout.under_root(layout.config)
    if cfg_file.is_file():

        config = load_config(cfg_file, check_files=False)
        state = config.paths.state_dir
        images = [config.storage.image_dir, *(Path(v) for v in config.storage.map.values())]
    return state, sorted(set(images))


def render_unit(text: str, layout: Layout, state_dir: Path, image_dirs: list[Path]) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={layout.prefix}/bin/migsecd --config {layout.config}"
        elif line.startswith("ReadWritePaths=-"):
            # one line per image directory; "-": a missing one does not stop the service
            line = "\n".join(f"ReadWritePaths=-{d}" for d in image_dirs)
        elif line.startswith("ReadWritePaths="):
            line = f"ReadWritePaths={state_dir} {layout.run_dir} {layout.config_dir}"
        out.append(line)
    return "\n".join(out) + "\n"


def render_tmpfiles(text: str, layout: Layout, state_dir: Path) -> str:
    text = text.replace("/var/lib/migsec", str(state_dir)).replace("/run/migsec", str(layout.run_dir))
    return text.replace("/etc/migsec", str(layout.config_dir))


def render_hook(text: str, layout: Layout) -> str:
    lines = text.splitlines()
    lines[0] = f"#!{_python_for(layout)}"
    text = "\n".join(lines) + "\n"
    if layout.config != DEFAULT_CONFIG_PATH:
        text = text.replace(_DEFAULT_HOOK_CONFIG, f"CONFIG = {str(layout.config)!r}")
    return text


def render_config(text: str, layout: Layout) -> str:
    return text.replace(f"{DEFAULT_CONFIG_DIR}/", f"{layout.config_dir}/")


def plan(layout: Layout) -> list[Item]:
    """Everything ``migsec install`` puts on a host, in the order it is written."""
    src = find_source(layout.source)
    if not layout.config_dir.is_absolute() or not layout.prefix.is_absolute():
        raise ConfigError("--prefix and --config-dir must be absolute paths")
    state_dir, image_dirs = _write_dirs(layout)

    def d(path: Path, mode: int) -> Item:
        return Item(path, layout.under_root(path), mode)

    def f(path: Path, text: str, mode: int, what: str, keep: bool = False) -> Item:
        return Item(path, layout.under_root(path), mode, text.encode(), keep, what)

    cd = layout.config_dir
    return [
        d(cd, 0o755), d(cd / "pki", 0o700), d(cd / "policies", 0o755),
        d(state_dir, 0o700), d(state_dir / "journal", 0o700), d(state_dir / "staging", 0o700),
        d(layout.run_dir, 0o750),
        f(layout.config, render_config(src["config"].read_text(), layout),
          0o640, "sample configuration: edit it", keep=True),
        f(layout.unit, render_unit(src["unit"].read_text(), layout, state_dir, image_dirs),
          0o644, "systemd unit"),
        f(layout.tmpfiles_dir / "migsec.conf",
          render_tmpfiles(src["tmpfiles"].read_text(), layout, state_dir),
          0o644, "tmpfiles.d entry"),
        d(layout.hooks_dir / "qemu.d", 0o755),
        f(layout.hook, render_hook(src["hook"].read_text(), layout), 0o755,
          "libvirt hook: restart libvirtd once so that it sees it"),
        *([f(layout.doc_dir / "operators.md", src["operators"].read_text(), 0o644,
             "operator guide")] if src["operators"].is_file() else []),
        *([f(layout.man_dir / "migsec.1", src["manpage"].read_text(), 0o644, "man page (man migsec)")]
          if src["manpage"].is_file() else []),
    ]


def apply(items: list[Item], *, dry_run: bool = False) -> Report:
    """Bring every item to its wanted state (or, with ``dry_run``, only say what would change)."""
    report = Report()
    for item in items:
        state = item.state()
        if state in ("ok", "kept"):
            report.unchanged.append(item)
            continue
        if not dry_run:
            try:
                item.apply()
            except OSError as exc:
                raise ConfigError(f"cannot write {item.target}: {exc.strerror or exc}") from exc
        report.changed.append((state, item))
    return report
