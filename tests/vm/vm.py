"""A QEMU VM with a real Linux Bluetooth stack whose "air" is a bumble LocalLink.

Why: the container kernel has no Bluetooth, but Debian's packaged kernel has ``hci_vhci``.
Booted under QEMU (TCG, no KVM), with ``dbus-daemon`` and ``bluetoothd`` inside, a bumble
``Controller`` on ``/dev/vhci`` becomes a real BlueZ adapter, so bleak's own BlueZ backend
and Pigeon's D-Bus peripheral run exactly as on a laptop (see shared/NOTES.md).

Two steps, so nothing is installed at test time:

* ``prepare()`` (``python -m tests.vm.vm prepare``) downloads the kernel package with
  ``apt-get download``, keeps only ``vmlinuz`` and the few modules the VM loads (virtio,
  9p, overlay, Bluetooth), and builds a busybox initramfs; all of it in ``.cache/ble-vm/``.
* ``run_vm(module)`` boots the VM with the host's ``/`` read-only over virtio-9p under a
  tmpfs overlay (the guest runs this checkout's venv), runs ``python -m module`` inside
  (tests/vm/guest_init.sh) and returns its exit status and logs from a writable 9p share.
  The VM has no network device; a hard timeout kills QEMU by PID; temp files are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = Path(os.environ.get("PIGEON_VM_CACHE", str(ROOT / ".cache" / "ble-vm")))
INITRAMFS_INIT = HERE / "initramfs_init.sh"
GUEST_INIT = HERE / "guest_init.sh"

#: Loaded by the initramfs (dependencies resolved at prepare time) to reach the host root.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Kept for the guest, whose /lib/modules/<version> is the cached tree (so the kernel's own
#: module autoloading works too): the Bluetooth stack, and the AF_ALG crypto sockets
#: bluetoothd needs to generate an IRK for LE privacy ("Failed to open crypto" without).
GUEST_MODULES = ("hci_vhci", "algif_hash", "algif_skcipher", "ecb", "cmac", "ccm")
#: Host commands a run needs (the guest reuses the host's binaries through 9p).
RUN_TOOLS = ("qemu-system-x86_64", "dbus-daemon", "modprobe")
#: Host commands ``prepare`` needs.
PREPARE_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "cpio", "busybox")
BLUETOOTHD = ("/usr/libexec/bluetooth/bluetoothd", "/usr/lib/bluetooth/bluetoothd")

DEFAULT_VM_TIMEOUT = 360.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initramfs: Path
    modules: Path  # a tree with lib/modules/<version>/ (GUEST_MODULES and their dependencies)
    version: str


@dataclass(frozen=True)
class VmResult:
    rc: int | None  # the scenario's exit status; None if the guest never wrote one
    timed_out: bool
    seconds: float
    scenario_log: str
    guest_log: str
    bluetoothd_log: str
    dbus_log: str
    console: str

    def report(self, tail: int = 120) -> str:
        """Everything worth reading when a run failed, each log cut to its last lines."""
        parts = [f"rc={self.rc} timed_out={self.timed_out} after {self.seconds:.0f} s"]
        for name, text in (("scenario", self.scenario_log), ("guest", self.guest_log),
                           ("bluetoothd", self.bluetoothd_log), ("dbus", self.dbus_log),
                           ("console", self.console)):
            lines = text.splitlines()
            parts.append(f"---- {name} log (last {min(tail, len(lines))} of {len(lines)} lines)")
            parts.extend(lines[-tail:])
        return "\n".join(parts)


# ---- what is missing -----------------------------------------------------------------------


def _bluetoothd() -> str | None:
    for path in BLUETOOTHD:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("bluetoothd")


def missing_for_run() -> list[str]:
    """Host tools a VM run needs that are absent (empty when a run can start)."""
    missing = [tool for tool in RUN_TOOLS if shutil.which(tool) is None]
    if _bluetoothd() is None:
        missing.append("bluetoothd")
    return missing


def _init_digest() -> str:
    """Changes whenever the prepared assets would: the init script or the module lists."""
    digest = hashlib.sha256(INITRAMFS_INIT.read_bytes())
    digest.update(repr((BOOT_MODULES, GUEST_MODULES)).encode())
    return digest.hexdigest()[:16]


def find_assets(cache: Path = CACHE) -> Assets | None:
    """The prepared kernel, modules and initramfs, or None if absent or stale."""
    try:
        stamp = json.loads((cache / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    assets = Assets(kernel=cache / "vmlinuz", initramfs=cache / "initramfs.cpio.gz",
                    modules=cache / "modules", version=str(stamp.get("version", "")))
    if stamp.get("init") != _init_digest():
        return None  # the initramfs init script changed: rebuild
    if not (assets.kernel.is_file() and assets.initramfs.is_file()
            and (assets.modules / "lib" / "modules" / assets.version / "modules.dep").is_file()):
        return None
    return assets


def unavailable_reason() -> str | None:
    """Why a VM test cannot run here, or None if it can."""
    missing = missing_for_run()
    if missing:
        return (f"the BLE VM tier needs {', '.join(missing)} (Debian: apt-get install "
                "qemu-system-x86 bluez kmod dbus)")
    if find_assets() is None:
        return f"VM assets not prepared in {CACHE} (run: make test-ble-vm, or python -m tests.vm.vm prepare)"
    return None


# ---- prepare ---------------------------------------------------------------------------------


def _run(cmd: list[str], **kw: object) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600,
                         **kw)  # type: ignore[call-overload]
    return str(out.stdout)


def kernel_package() -> str:
    """The Debian kernel image package to boot: what ``linux-image-amd64`` depends on, else
    the newest ``linux-image-6.1.0-N-amd64`` apt knows."""
    with contextlib.suppress(subprocess.CalledProcessError):
        for line in _run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
    names = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
    found = sorted((line.split()[0] for line in names.splitlines() if line.strip()),
                   key=lambda n: int(n.split("-")[4]))
    if not found:
        raise RuntimeError("apt offers no linux-image-6.1.0-*-amd64 package (needs Debian 12 sources)")
    return found[-1]


def _is_static_elf(path: Path) -> bool:
    """True if the ELF file has no program interpreter (the initramfs has no libc)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off:off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def _module_closure(tree: Path, version: str, names: tuple[str, ...]) -> list[Path]:
    """Module files for ``names`` with their dependencies, each dependency first."""
    ordered: list[Path] = []
    for name in names:
        out = _run(["modprobe", "-d", str(tree), "-S", version, "--show-depends", name])
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in ordered:
                    ordered.append(path)
    return ordered


def prepare(cache: Path = CACHE, log: Callable[[str], None] = print) -> Assets:
    """Download and unpack the kernel, keep what the VM needs, build the initramfs."""
    missing = [tool for tool in PREPARE_TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"prepare needs {', '.join(missing)} (Debian: apt-get install "
                           "busybox-static kmod cpio)")
    busybox = Path(shutil.which("busybox") or "")
    if not _is_static_elf(busybox.resolve()):
        raise RuntimeError(f"{busybox} is dynamically linked; install busybox-static")
    package = kernel_package()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prepare-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        log(f"downloading {package}")
        _run(["apt-get", "download", "-q", package], cwd=tmp)
        deb = next(tmp.glob("*.deb"))
        unpacked = tmp / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        deb.unlink()
        versions = [p.name for p in (unpacked / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise RuntimeError(f"expected one kernel in {package}, found {versions}")
        version = versions[0]
        _run(["depmod", "-b", str(unpacked), version])
        src_modules = unpacked / "lib" / "modules" / version

        # Only the modules the VM loads, under the same relative paths, re-indexed.
        kept = cache / "modules.new"
        shutil.rmtree(kept, ignore_errors=True)
        dst_modules = kept / "lib" / "modules" / version
        boot = _module_closure(unpacked, version, BOOT_MODULES)
        guest = _module_closure(unpacked, version, GUEST_MODULES)
        for path in dict.fromkeys(boot + guest):
            target = dst_modules / path.relative_to(src_modules)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (src_modules / name).exists():
                shutil.copy2(src_modules / name, dst_modules / name)
        _run(["depmod", "-b", str(kept), version])

        staging = tmp / "initramfs"
        for sub in ("bin", "dev", "proc", "sys", "modules"):
            (staging / sub).mkdir(parents=True)
        shutil.copy2(busybox.resolve(), staging / "bin" / "busybox")
        shutil.copy2(INITRAMFS_INIT, staging / "init")
        (staging / "init").chmod(0o755)
        for path in boot:
            shutil.copy2(path, staging / "modules" / path.name)
        (staging / "modules.order").write_text("".join(f"{p.name}\n" for p in boot))
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=staging,
                                 input=("\n".join(files) + "\n").encode(),
                                 capture_output=True, check=True, timeout=120)
        (cache / "initramfs.cpio.gz.new").write_bytes(gzip.compress(archive.stdout, 6))

        shutil.copy2(unpacked / "boot" / f"vmlinuz-{version}", cache / "vmlinuz.new")
        shutil.rmtree(cache / "modules", ignore_errors=True)
        kept.rename(cache / "modules")
        (cache / "vmlinuz.new").rename(cache / "vmlinuz")
        (cache / "initramfs.cpio.gz.new").rename(cache / "initramfs.cpio.gz")
        (cache / "stamp.json").write_text(json.dumps(
            {"package": package, "version": version, "init": _init_digest()}) + "\n")
    assets = find_assets(cache)
    if assets is None:
        raise RuntimeError("prepare finished but the assets are incomplete")
    log(f"VM assets ready in {cache}: kernel {version}, {len(boot)} boot modules, "
        f"{len(guest)} guest modules (Bluetooth, crypto)")
    return assets


# ---- run -------------------------------------------------------------------------------------


def qemu_command(assets: Assets, results: Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "3072", "-smp", "2",
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initramfs),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 pigeon.init={GUEST_INIT}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
    ]


def _env_name(name: str) -> str:
    if not name.startswith("PIGEON_") or not name.replace("_", "").isalnum():
        raise ValueError(f"guest variables are PIGEON_[A-Z0-9_]+, not {name!r}")
    return name


def _env_value(value: str) -> str:
    if "'" in value or "\n" in value:
        raise ValueError(f"guest variable values cannot hold quotes or newlines: {value!r}")
    return value


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run_vm(scenario: str, *, timeout: float = DEFAULT_VM_TIMEOUT,
           assets: Assets | None = None, env: dict[str, str] | None = None) -> VmResult:
    """Boot the VM, run ``python -m scenario`` inside, power off; never outlives ``timeout``.

    With ``PIGEON_VM_LOGS=DIR`` in the environment, every log is also copied into DIR.
    ``env`` adds ``PIGEON_*`` variables for the guest (``PIGEON_BLUEZ_PRIVACY=device``
    starts bluetoothd with LE privacy; others reach the scenario's environment).

    The scenario itself gets ``timeout - 60`` seconds inside the guest (boot takes ~30 s
    under TCG), so a stuck scenario still leaves its logs behind.
    """
    assets = assets or find_assets()
    if assets is None:
        raise RuntimeError(f"VM assets missing in {CACHE}: run python -m tests.vm.vm prepare")
    started = time.monotonic()
    results = Path(tempfile.mkdtemp(prefix="pigeon-vm-"))
    try:
        (results / "job.env").write_text(
            f"PIGEON_ROOT='{ROOT}'\nPIGEON_PYTHON='{sys.executable}'\n"
            f"PIGEON_MODULES='{assets.modules}'\nPIGEON_SCENARIO='{scenario}'\n"
            f"PIGEON_TIMEOUT={max(30, int(timeout - 60))}\n"
            + "".join(f"export {_env_name(k)}='{_env_value(v)}'\n" for k, v in (env or {}).items()))
        console_path = results / "console.log"
        timed_out = False
        with console_path.open("wb") as console:
            proc = subprocess.Popen(qemu_command(assets, results), stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # also on KeyboardInterrupt or a pytest-timeout exception
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        keep = os.environ.get("PIGEON_VM_LOGS")
        if keep:  # for a look at the whole logs (the report shows only their tails)
            target = Path(keep) / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.copytree(results, target, ignore=shutil.ignore_patterns("job.env"))
        rc_text = _read(results / "rc").strip()
        return VmResult(
            rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None, timed_out=timed_out,
            seconds=time.monotonic() - started,
            scenario_log=_read(results / "scenario.log"), guest_log=_read(results / "guest.log"),
            bluetoothd_log=_read(results / "bluetoothd.log"), dbus_log=_read(results / "dbus.log"),
            console=_read(console_path))
    finally:
        shutil.rmtree(results, ignore_errors=True)


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.vm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download the kernel and build the initramfs if needed")
    prep.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    run = sub.add_parser("run", help="boot the VM and run one scenario module")
    run.add_argument("scenario", help="e.g. tests.vm.scenario_bleak_bluez")
    run.add_argument("--timeout", type=float, default=DEFAULT_VM_TIMEOUT)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if find_assets() is not None and not args.force:
            print(f"VM assets already prepared in {CACHE}")
            return 0
        try:
            prepare()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or ""
            print(f"cannot prepare the VM assets: {exc} {detail}".strip(), file=sys.stderr)
            if in_ci():
                return 1
            print("(not CI: the VM tests will be skipped)", file=sys.stderr)
        return 0
    result = run_vm(args.scenario, timeout=args.timeout)
    print(result.report())
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
