"""The ``pigeon`` command line.

Every command works whether or not a node runs on the profile: if the profile lock is
free the command opens the store itself (holding the lock, so no node starts meanwhile);
if a node holds it, the command asks that node over the control socket. Two processes
therefore never write one profile at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mesh import control
from mesh.chat import (
    add_contact,
    identity_info,
    list_contacts,
    list_inbox,
    list_outbox,
    queue_message,
    replace_contact_key,
    verify_contact,
)
from mesh.errors import UserError
from mesh.identity import Identity, is_encrypted
from mesh.node import Node, NodeConfig
from mesh.profile import Profile, ProfileLock
from mesh.store import Store
from mesh.transports.ble_service import BleService, start_ble
from mesh.transports.lan import start_lan
from mesh.transports.tcp import parse_hostport
from mesh.wipe import wipe_profile

DEFAULT_LISTEN = "0.0.0.0:7447"
#: Without --listen a relay listens on every IPv4 and IPv6 address, so LAN peers can dial
#: either (IPv6 link-local needs it).
DEFAULT_LISTEN_ADDR = ("", 7447)
WIPED = -1


def _passphrase(args: argparse.Namespace) -> bytes | None:
    var = args.passphrase_env
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise UserError(f"environment variable {var} is not set")
    if not value:
        raise UserError(f"environment variable {var} is empty")
    return value.encode()


def _load_identity(profile: Profile, args: argparse.Namespace) -> Identity:
    if not profile.exists():
        raise UserError(f"no identity in {profile.home}; run 'pigeon init --name NAME' first")
    passphrase = _passphrase(args)
    if passphrase is None and is_encrypted(profile.identity_path):
        raise UserError("the key file is encrypted; pass --passphrase-env VAR")
    return Identity.load(profile.identity_path, passphrase)


@contextlib.contextmanager
def _local_or_remote(profile: Profile) -> Iterator[Store | None]:
    """Yields an open Store while holding the profile lock, or None if a node runs."""
    if not profile.exists():
        raise UserError(f"no identity in {profile.home}; run 'pigeon init --name NAME' first")
    lock = ProfileLock(profile)
    try:
        held = control.claim_profile(lock, profile.control_path)
    except TimeoutError:
        raise UserError("the profile is locked by another process that does not answer") from None
    if not held:
        yield None
        return
    try:
        store = Store.open(profile.store_path)
        try:
            yield store
        finally:
            store.close()
    finally:
        lock.release()


def _print(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        text = human(data)
        if text:
            print(text)


# ---- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, profile: Profile) -> int:
    if profile.exists():
        raise UserError(f"an identity already exists in {profile.home}; refusing to overwrite it")
    profile.ensure()
    identity = Identity.generate(args.name)
    identity.save(profile.identity_path, _passphrase(args))
    Store.open(profile.store_path).close()
    info = identity_info(identity)
    _print(args, info, lambda d: (
        f"Created {d['name']} in {profile.home}\nfingerprint: {d['fingerprint']}\n"
        f"contact code (share it): {d['contact']}"))
    return 0


def cmd_id(args: argparse.Namespace, profile: Profile) -> int:
    if (profile.exists() and not is_encrypted(profile.identity_path)) or args.passphrase_env:
        info = identity_info(_load_identity(profile, args))
    elif control.reachable(profile.control_path):
        info = control.call(profile.control_path, "id")
    else:
        _load_identity(profile, args)  # raises the right message
        return 1
    _print(args, info, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def cmd_contacts(args: argparse.Namespace, profile: Profile) -> int:
    if args.contacts_cmd in ("replace", "verify"):
        with _local_or_remote(profile) as store:
            if args.contacts_cmd == "verify":
                if store is None:
                    control.call(profile.control_path, "contacts_verify", name=args.name)
                else:
                    verify_contact(store, args.name)
                print(f"{args.name} marked verified")
                return 0
            if store is None:
                info = control.call(profile.control_path, "contacts_replace", name=args.name,
                                    code=args.code)
            else:
                info = asdict(replace_contact_key(store, args.name, args.code))
        print(f"replaced the key of {info['name']}; new fingerprint {info['fingerprint']} "
              "(not verified)")
        return 0
    if args.contacts_cmd == "add":
        with _local_or_remote(profile) as store:
            if store is None:
                info = control.call(profile.control_path, "contacts_add", name=args.name,
                                    code=args.code)
            else:
                info = asdict(add_contact(store, args.name, args.code, now=time.time()))
        _print(args, info, lambda d: f"added {d['name']} (fingerprint {d['fingerprint']})")
        return 0
    with _local_or_remote(profile) as store:
        rows = (control.call(profile.control_path, "contacts") if store is None
                else [asdict(c) for c in list_contacts(store)])
    _print(args, rows, lambda rs: "\n".join(
        f"{r['name']:20} {r['fingerprint']}{'  verified' if r['verified'] else ''}" for r in rs))
    return 0


def cmd_send(args: argparse.Namespace, profile: Profile) -> int:
    with _local_or_remote(profile) as store:
        if store is None:
            msg_id = control.call(profile.control_path, "send", to=args.name, text=args.text)
        else:
            identity = _load_identity(profile, args)
            msg_id, _ = queue_message(store, identity, args.name, args.text, now=time.time())
    _print(args, {"id": msg_id}, lambda d: d["id"])
    return 0


def cmd_inbox(args: argparse.Namespace, profile: Profile) -> int:
    with _local_or_remote(profile) as store:
        rows = (control.call(profile.control_path, "inbox") if store is None
                else [asdict(m) for m in list_inbox(store)])
    data = [{"id": r["id"], "from": r["sender"], "text": r["text"], "sent_at": r["sent_at"],
             "received_at": r["received_at"], "conversation": r["conversation"]} for r in rows]
    _print(args, data, lambda rs: "\n".join(
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['sent_at']))}  "
        f"{r['from']}: {r['text']!r}" for r in rs))
    return 0


def cmd_outbox(args: argparse.Namespace, profile: Profile) -> int:
    with _local_or_remote(profile) as store:
        rows = (control.call(profile.control_path, "outbox") if store is None
                else [asdict(m) for m in list_outbox(store)])
    data = [{"id": r["id"], "to": r["to"], "text": r["text"], "state": r["state"]} for r in rows]
    _print(args, data, lambda rs: "\n".join(
        f"{r['state']:9}  to {r['to']}: {r['text']!r}" for r in rs))
    return 0


def cmd_status(args: argparse.Namespace, profile: Profile) -> int:
    with _local_or_remote(profile) as store:
        if store is None:
            data = control.call(profile.control_path, "status")
            data["running"] = True
        else:
            stats = store.stats()
            data = {"envelopes": stats.envelopes, "bytes": stats.bytes,
                    "receipts": stats.receipts, "peers": [], "running": False,
                    "carried_for_others": stats.envelopes - stats.local_envelopes}
    _print(args, data, lambda d: (
        f"node {'running' if d['running'] else 'not running'}; {d['envelopes']} envelopes "
        f"({d['bytes']} bytes), {len(d['peers'])} peers" + "".join(
            f"\n  {p['transport']:6} {p['address']:24} {p['state']}" for p in d["peers"])
        + "".join(f"\n{name}: {text}" for name, text in d.get("transports", {}).items())))
    return 0


def cmd_relay(args: argparse.Namespace, profile: Profile) -> int:
    identity = _load_identity(profile, args)
    lock = ProfileLock(profile)
    try:
        held = control.claim_profile(lock, profile.control_path)
    except TimeoutError:
        held = False
    if not held:
        raise UserError(f"a node already runs on {profile.home}")
    try:
        listen = [parse_hostport(x) for x in args.listen] if args.listen else [DEFAULT_LISTEN_ADDR]
        peers = [parse_hostport(x) for x in args.peer]
        config = NodeConfig(listen=listen, peers=peers)
        if args.quota_mb <= 0:
            raise UserError("--quota-mb must be positive")
        store = Store.open(profile.store_path, quota_bytes=int(args.quota_mb * 2**20))
        try:
            code = asyncio.run(_run_relay(identity, store, config, profile, args))
        finally:
            store.close()
    finally:
        lock.release()
    if code == WIPED:
        wipe_profile(profile)
        return 0
    return code


def cmd_wipe(args: argparse.Namespace, profile: Profile) -> int:
    if not profile.home.exists():
        raise UserError(f"nothing to wipe at {profile.home}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("refusing to wipe without --yes (no terminal to confirm on)")
        answer = input(f"Destroy the keys and all messages in {profile.home}? Type WIPE: ")
        if answer.strip() != "WIPE":
            print("not wiped")
            return 1
    lock = ProfileLock(profile)
    if not lock.try_acquire():
        if control.reachable(profile.control_path):
            control.call(profile.control_path, "wipe")
        deadline = time.monotonic() + 15
        while profile.home.exists() and not lock.try_acquire():
            if time.monotonic() > deadline:
                raise UserError("the running node did not stop; kill it and wipe again")
            time.sleep(0.1)
    lock.release()
    destroyed = wipe_profile(profile)  # the node wiped it already if it was running
    _print(args, {"wiped": str(profile.home), "files": destroyed},
           lambda d: f"wiped {d['wiped']} ({len(d['files'])} files destroyed)")
    return 0


async def _start_ble(node: Node, args: argparse.Namespace) -> BleService | None:
    """Bluetooth LE unless ``--no-ble``; without an adapter the node says so once and runs on."""
    if args.no_ble:
        node.set_transport_status("ble", "off (--no-ble)")
        return None
    return await start_ble(node)


async def _run_relay(identity: Identity, store: Store, config: NodeConfig, profile: Profile,
                     args: argparse.Namespace) -> int:
    node = Node(identity, store, config)
    log = logging.getLogger("pigeon.relay")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except OSError as exc:
        raise UserError(f"cannot listen: {exc}") from None
    lan = None if args.no_lan else await start_lan(node, args.interface)
    ble = await _start_ble(node, args)
    ops = control.node_ops(node)
    wipe_requested = asyncio.Event()

    async def op_wipe(_: dict[str, Any]) -> Any:
        log.warning("wipe requested: shutting down and destroying this profile")
        wipe_requested.set()
        stop.set()
        return "wiping"

    ops["wipe"] = op_wipe
    server = control.ControlServer(profile.control_path, ops, node.subscribe, node.unsubscribe)
    await server.start()
    log.info("relay %s running (node id %s)", identity.name, identity.public.node_id.hex()[:16])
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
        if ble is not None:
            await ble.stop()
        if lan is not None:
            await lan.stop()
        await node.stop()
    return WIPED if wipe_requested.is_set() else 0


def cmd_chat(args: argparse.Namespace, profile: Profile) -> int:
    """The chat window. Runs the node in this process with the relay's transport options
    (and serves the control socket, so other commands keep working), or attaches to the
    relay that already holds the profile and leaves it running on exit."""
    from mesh.host import ChatHost
    from tui.app import PigeonApp  # here, so only `pigeon chat` loads Textual

    # With LAN discovery on, the chat listens like a relay does, so two chat windows on one
    # Wi-Fi find each other; if the port is taken it takes any free one.
    listen = ([parse_hostport(x) for x in args.listen] if args.listen
              else [] if args.no_lan else [DEFAULT_LISTEN_ADDR])
    peers = [parse_hostport(x) for x in args.peer]
    interfaces = getattr(args, "interface", None)

    async def lan(node: Node) -> Any:
        return await start_lan(node, interfaces)

    async def ble(node: Node) -> Any:
        return await _start_ble(node, args)

    host = ChatHost(profile, NodeConfig(listen=listen, peers=peers,
                                        listen_any_port_if_busy=not args.listen),
                    passphrase=_passphrase(args), extras=([] if args.no_lan else [lan]) + [ble])
    host.claim()
    # The window owns the terminal: log lines on stderr would tear it, so they go to
    # --log FILE or nowhere (a log of peers met is itself sensitive on a seized device).
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:  # the console handler main() set up
            root.removeHandler(handler)
    log_handler: logging.Handler = logging.NullHandler()
    if args.log:
        log_handler = logging.FileHandler(args.log)
        os.chmod(args.log, 0o600)  # it names the peers met: owner-only, like the profile
        log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(log_handler)
    try:
        app = PigeonApp(host, bell=not args.no_bell)
        host.on_wipe = app.exit
        code = asyncio.run(_run_chat(app, host))
    finally:
        host.release()
        root.removeHandler(log_handler)
        log_handler.close()
    if host.wipe_requested:
        wipe_profile(profile)
        return 0
    return code


def cmd_sim(args: argparse.Namespace, profile: Profile) -> int:
    """Run the simulator; needs no profile (``mesh/sim/command.py`` does the work)."""
    from mesh.sim import command as sim_command
    from mesh.sim.report import format_summary

    _print(args, sim_command.run(args), format_summary)
    return 0


async def _run_chat(app: Any, host: Any) -> int:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, app.exit)
    try:
        await app.run_async()
    finally:
        await host.close()
    return int(app.return_code or 0)


# ---- argument parsing -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigeon", description="Offline mesh messenger.")
    parser.add_argument("--home", help="profile directory (default: the platform data dir)")
    parser.add_argument("--passphrase-env", metavar="VAR",
                        help="read the key file passphrase from this environment variable")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create this profile's identity")
    p.add_argument("--name", required=True, help="display name shown to your contacts")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("id", help="show node id, fingerprint and contact code")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("contacts", help="manage contacts")
    csub = p.add_subparsers(dest="contacts_cmd", required=True)
    c = csub.add_parser("add", help="add a contact from their contact code")
    c.add_argument("name")
    c.add_argument("code")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("verify", help="mark a contact verified after comparing fingerprints")
    c.add_argument("name")
    c = csub.add_parser("replace", help="accept a NEW key for a contact (after checking it)")
    c.add_argument("name")
    c.add_argument("code")
    c = csub.add_parser("list", help="list contacts")
    c.add_argument("--json", action="store_true")

    p = sub.add_parser("send", help="queue a message to a contact")
    p.add_argument("name")
    p.add_argument("text")
    p.add_argument("--json", action="store_true")

    for name, text in (("inbox", "messages received"), ("outbox", "messages sent and their state"),
                       ("status", "store and peer status")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("wipe", help="destroy this profile's keys and messages, now")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("chat", help="the chat window (runs a node, or attaches to the relay)")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="accept links here (default with LAN discovery on: every address, "
                        "port 7447, or a free port if it is taken; with --no-lan: none); "
                        "repeatable")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="keep a link to this peer; repeatable")
    p.add_argument("--no-lan", action="store_true", help="no mDNS discovery on the LAN")
    p.add_argument("--interface", action="append", metavar="NAME",
                   help="LAN discovery only on this interface (default: all non-loopback); "
                        "repeatable")
    p.add_argument("--no-ble", action="store_true", help="no Bluetooth LE")
    p.add_argument("--no-bell", action="store_true", help="no terminal bell on new messages")
    p.add_argument("--log", metavar="FILE", help="write the node's log here (default: no log)")

    p = sub.add_parser("relay", help="run a headless node")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="accept links here (default: every IPv4 and IPv6 address, port 7447); repeatable")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="keep a link to this peer; repeatable")
    p.add_argument("--no-lan", action="store_true", help="no mDNS discovery on the LAN")
    p.add_argument("--interface", action="append", metavar="NAME",
                   help="LAN discovery only on this interface (default: all non-loopback); repeatable")
    p.add_argument("--no-ble", action="store_true", help="no Bluetooth LE")
    p.add_argument("--quota-mb", type=float, default=256.0,
                   help="disk quota for messages carried for others (default 256 MB)")

    from mesh.sim.command import add_arguments as add_sim_arguments
    p = sub.add_parser("sim", help="simulate a mesh of nodes on a contact trace (no network)")
    add_sim_arguments(p)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Profile], int]] = {
    "init": cmd_init, "id": cmd_id, "contacts": cmd_contacts, "send": cmd_send,
    "inbox": cmd_inbox, "outbox": cmd_outbox, "status": cmd_status, "relay": cmd_relay,
    "wipe": cmd_wipe, "chat": cmd_chat, "sim": cmd_sim,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    profile = Profile.resolve(Path(args.home) if args.home else None)
    try:
        return COMMANDS[args.command](args, profile)
    except UserError as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
