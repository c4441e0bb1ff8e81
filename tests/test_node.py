"""Real node runtimes (SQLite stores, asyncio, real sessions) joined by memory links."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh import api
from mesh.errors import UserError
from mesh.identity import Identity, encode_contact
from mesh.node import Node, NodeConfig
from mesh.store import Store
from mesh.transports.memory import memory_pipe

START = 1_790_000_000.0


class Clock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_node(tmp_path: Path, name: str, clock: Clock, **config: object) -> Node:
    identity = Identity.generate(name)
    store = Store.open(tmp_path / name / "store.sqlite")
    return Node(identity, store, NodeConfig(**config), clock=clock)  # type: ignore[arg-type]


def befriend(a: Node, b: Node) -> None:
    a.add_contact(b.identity.name, encode_contact(b.identity.public, b.identity.name))
    b.add_contact(a.identity.name, encode_contact(a.identity.public, a.identity.name))


async def wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Link:
    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b
        self.la, self.lb = memory_pipe(a.identity.name, b.identity.name)
        self.ta = a.add_link(self.la, initiator=True)
        self.tb = b.add_link(self.lb, initiator=False)

    def synced(self) -> bool:
        pa, pb = self.a.peers(), self.b.peers()
        return bool(pa) and bool(pb) and all(p.state == "live" for p in pa + pb)

    async def close(self) -> None:
        self.la.close()
        self.lb.close()
        for task in (self.ta, self.tb):
            if task is not None:
                await asyncio.wait_for(task, 5)


def inbox_texts(node: Node) -> list[str]:
    return [m.text for m in node.inbox()]


def outbox_state(node: Node, msg_id: str) -> str:
    return next(m.state for m in node.outbox() if m.id == msg_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_direct_neighbours_deliver_and_receipt_returns(tmp_path: Path, clock: Clock) -> None:
    a, b = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(a, b)
    msg_id = a.send("bob", "hello bob")
    assert outbox_state(a, msg_id) == api.STATE_QUEUED
    events = a.subscribe()
    link = Link(a, b)
    await wait_until(lambda: inbox_texts(b) == ["hello bob"])
    await wait_until(lambda: outbox_state(a, msg_id) == api.STATE_DELIVERED)
    states = []
    while not events.empty():
        ev = events.get_nowait()
        if isinstance(ev, api.MessageStateChanged):
            states.append(ev.state)
    assert states == [api.STATE_RELAYED, api.STATE_DELIVERED]
    assert b.inbox()[0].sender == "alice"
    await link.close()
    await a.stop()
    await b.stop()


async def test_chain_relay_cannot_read_and_receipt_purges(tmp_path: Path, clock: Clock) -> None:
    a, b, c = (make_node(tmp_path, n, clock) for n in ("alice", "relay", "carol"))
    befriend(a, c)  # a and c know each other but never meet
    secret_text = "meet at the bakery at nine"
    msg_id = a.send("carol", secret_text)
    ab = Link(a, b)
    await wait_until(lambda: outbox_state(a, msg_id) == api.STATE_RELAYED)
    await ab.close()
    assert b.inbox() == []
    assert b.store.stats().envelopes == 1
    bc = Link(b, c)
    await wait_until(lambda: inbox_texts(c) == [secret_text])
    await wait_until(lambda: b.store.stats().envelopes == 0)  # receipt purged the copy
    await bc.close()
    ab2 = Link(a, b)
    await wait_until(lambda: outbox_state(a, msg_id) == api.STATE_DELIVERED)
    await ab2.close()
    for n in (a, b, c):
        await n.stop()
    raw = (tmp_path / "relay" / "store.sqlite").read_bytes()
    wal = tmp_path / "relay" / "store.sqlite-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert secret_text.encode() not in raw


async def test_fifty_node_line_delivers_end_to_end(tmp_path: Path, clock: Clock) -> None:
    nodes = [make_node(tmp_path, f"n{i}", clock, hops=60) for i in range(50)]
    befriend(nodes[0], nodes[-1])
    msg_id = nodes[0].send("n49", "across fifty hops")
    links = [Link(nodes[i], nodes[i + 1]) for i in range(49)]
    await wait_until(lambda: inbox_texts(nodes[-1]) == ["across fifty hops"], timeout=60)
    await wait_until(lambda: outbox_state(nodes[0], msg_id) == api.STATE_DELIVERED, timeout=60)
    for link in links:
        await link.close()
    for n in nodes:
        await n.stop()


def epidemic_oracle(contacts: list[tuple[float, int, int]], messages: list[tuple[float, int, int]],
                    ) -> set[int]:
    """Which messages a time-respecting path can deliver (unlimited bandwidth)."""
    deliverable = set()
    for k, (t0, src, dst) in enumerate(messages):
        have = {src}
        for t, i, j in contacts:
            if t >= t0 and (i in have or j in have):
                have |= {i, j}
        if dst in have:
            deliverable.add(k)
    return deliverable


async def test_random_contact_schedule_over_30_nodes_delivers_everything(
        tmp_path: Path, clock: Clock) -> None:
    rng = random.Random(2024)
    n = 30
    nodes = [make_node(tmp_path, f"p{i}", clock, hops=30) for i in range(n)]
    hours = 3600.0
    contacts = sorted((rng.uniform(0, 12 * hours), *rng.sample(range(n), 2)) for _ in range(150))
    messages = sorted((rng.uniform(0, 4 * hours), *rng.sample(range(n), 2)) for _ in range(25))
    expected = epidemic_oracle(contacts, messages)
    assert len(expected) == len(messages), "schedule too sparse for this seed"
    for _, src, dst in messages:
        if nodes[src].store.contact_by_name(f"p{dst}") is None:
            befriend(nodes[src], nodes[dst])
    events = sorted([(t, 0, k) for k, (t, _, _) in enumerate(messages)]
                    + [(t, 1, k) for k, (t, _, _) in enumerate(contacts)])
    sent: dict[int, str] = {}
    for t, kind, k in events:
        clock.t = START + t
        if kind == 0:
            _, src, dst = messages[k]
            sent[k] = nodes[src].send(f"p{dst}", f"message {k}")
            continue
        _, i, j = contacts[k]
        link = Link(nodes[i], nodes[j])
        await wait_until(link.synced)
        await link.close()
    clock.t = START + 13 * hours
    for k, (_, _, dst) in enumerate(messages):
        assert f"message {k}" in inbox_texts(nodes[dst]), f"message {k} not delivered"
        assert inbox_texts(nodes[dst]).count(f"message {k}") == 1
    for node in nodes:
        await node.stop()


async def test_pipelined_sends_share_one_commit_and_answer_in_order(tmp_path: Path) -> None:
    """A burst of send calls on one control connection is stored with one COMMIT (one
    fsync), every call is answered with its own id in request order, and each message is
    on disk and queued when its answer arrives."""
    from mesh.client import RemoteClient
    from mesh.control import ControlServer, node_ops

    clock = Clock()
    a, b = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(a, b)
    commits: list[str] = []
    a.store._conn.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    sock = tmp_path / "control.sock"
    server = ControlServer(sock, node_ops(a), a.subscribe, a.unsubscribe)
    await server.start()
    client = RemoteClient(sock)
    try:
        texts = [f"message {i}" for i in range(50)]
        ids = await asyncio.gather(*(client.send("bob", t) for t in texts))
        assert len(commits) == 1
        assert len(set(ids)) == 50
        by_id = {m.id: m for m in a.outbox()}
        assert [by_id[i].text for i in ids] == texts  # each answer belongs to its request
        assert all(by_id[i].state == api.STATE_QUEUED for i in ids)
        with pytest.raises(Exception, match="no contact"):
            await client.send("nobody", "hi")
        assert await client.send("bob", "after an error") not in ids  # still in step
    finally:
        await client.close()
        await server.stop()
        a.store.close()
        b.store.close()


class _FailingCommit:
    """A store connection whose next COMMIT fails (as on a full disk), else the real one."""

    def __init__(self, conn: object) -> None:
        self._conn = conn
        self.fail_next_commit = False

    def execute(self, sql: str, *args: object) -> object:
        if self.fail_next_commit and sql.strip().upper() == "COMMIT":
            self.fail_next_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


async def _tcp_pair(tmp_path: Path, clock: Clock) -> tuple[Node, Node]:
    a = make_node(tmp_path, "alice", clock, listen=[("127.0.0.1", 0)])
    await a.start()
    host, port = a.listening[0].rsplit(":", 1)
    b = make_node(tmp_path, "bob", clock, peers=[(host, int(port))])
    befriend(a, b)
    await b.start()
    await wait_until(lambda: any(p.state == "live" for p in a.peers())
                     and any(p.state == "live" for p in b.peers()))
    return a, b


async def test_own_send_goes_out_before_its_commit_and_is_answered_after(
        tmp_path: Path, clock: Clock) -> None:
    """The sender hands a new message to a live TCP link before its own fsync (the
    neighbour's fsync overlaps ours), and answers the send call only once it is durable."""
    a, b = await _tcp_pair(tmp_path, clock)
    try:
        (runner,) = a._runners
        written: list[int] = []
        real_write = runner.link.write_nowait  # type: ignore[attr-defined]

        def counting_write(data: bytes) -> None:
            written.append(len(data))
            real_write(data)

        runner.link.write_nowait = counting_write  # type: ignore[attr-defined]
        at_commit: list[int] = []
        a.store._conn.set_trace_callback(
            lambda sql: at_commit.append(len(written)) if sql.strip().upper() == "COMMIT" else None)
        msg_id = await a.send_grouped("bob", "early bird")
        a.store._conn.set_trace_callback(None)
        assert at_commit and at_commit[0] >= 1, "nothing was written before the commit"
        assert outbox_state(a, msg_id) in (api.STATE_QUEUED, api.STATE_RELAYED,
                                           api.STATE_DELIVERED)
        await wait_until(lambda: inbox_texts(b) == ["early bird"])
        await wait_until(lambda: outbox_state(a, msg_id) == api.STATE_DELIVERED)
    finally:
        await a.stop()
        await b.stop()
        a.store.close()
        b.store.close()


async def test_failed_commit_of_a_send_says_it_may_still_be_delivered(
        tmp_path: Path, clock: Clock) -> None:
    """If the sender's commit fails after the envelope went out, the caller is told the
    truth (it may still arrive), nothing half-written stays in the store, and the store
    keeps working."""
    a, b = await _tcp_pair(tmp_path, clock)
    try:
        failing = _FailingCommit(a.store._conn)
        a.store._conn = failing  # type: ignore[assignment]
        failing.fail_next_commit = True
        with pytest.raises(UserError, match="may still be delivered"):
            await a.send_grouped("bob", "sent but not saved")
        assert a.outbox() == []
        assert not a.store._conn.in_transaction
        await wait_until(lambda: inbox_texts(b) == ["sent but not saved"])
        later = await a.send_grouped("bob", "the disk has room again")
        assert [m.id for m in a.outbox()] == [later]
        await wait_until(lambda: inbox_texts(b) == ["sent but not saved",
                                                    "the disk has room again"])
    finally:
        a.store._conn = getattr(a.store._conn, "_conn", a.store._conn)
        await a.stop()
        await b.stop()
        a.store.close()
        b.store.close()


async def test_sync_progress_events_are_paced(tmp_path: Path, clock: Clock) -> None:
    """Messages arriving one after another on a live link raise a few progress events a
    second, not one each; connects come at once and the last state is published."""
    a, b = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(a, b)
    events = b.subscribe()
    link = Link(a, b)
    try:
        await wait_until(link.synced)
        for i in range(40):
            a.send("bob", f"one by one {i}")
            await wait_until(lambda i=i: len(b.inbox()) == i + 1)
        await asyncio.sleep(0.6)  # any progress event still pending comes out
        seen: list[api.NodeEvent] = []
        while not events.empty():
            seen.append(events.get_nowait())
        peer_events = [e for e in seen if isinstance(e, api.PeerChanged)]
        assert len([e for e in seen if isinstance(e, api.MessageReceived)]) == 40
        assert peer_events and peer_events[0].connected
        assert len(peer_events) < 20, f"{len(peer_events)} peer events for 40 messages"
        assert peer_events[-1].peer["state"] == "live"
        assert peer_events[-1].peer["received"] >= 40
    finally:
        await link.close()
        a.store.close()
        b.store.close()
