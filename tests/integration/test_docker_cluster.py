"""Cluster mode against a real cluster (testcontainers): two clickhouse/clickhouse-server
nodes as two replicas of one shard, and ClickHouse Keeper, on one Docker network, their
configuration written to a temporary directory. The migrations run ON CLUSTER through the
server backend from node 1; node 2 then holds every table, replicated, knows the schema is
up to date, and reads what node 1 wrote. The copy-and-swap migrations run on data written
on both nodes and keep all of it. Skipped, with the reason, where no Docker engine runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from consumer.store.backend import Backend, StoreError
from consumer.store.cluster import Cluster, on_cluster, sync_replicas
from consumer.store.durability import apply_fsync
from consumer.store.migrations import MIGRATIONS, migrate
from consumer.store.migrations.m12_ledger_keyed_time_first import LEDGER_ORDER
from consumer.store.server import ServerBackend
from tests.integration.conftest import (
    CLICKHOUSE_IMAGE,
    CLICKHOUSE_PASSWORD,
    CLICKHOUSE_USER,
    docker_missing,
)
from tests.integration.test_migrations import _upto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.skipif(docker_missing() is not None, reason=docker_missing() or ""),
]

CLUSTER = Cluster("usage_cluster")
NODES = ("node1", "node2")

KEEPER_XML = """<clickhouse>
  <listen_host>0.0.0.0</listen_host>
  <logger><level>information</level><console>1</console></logger>
  <keeper_server>
    <tcp_port>9181</tcp_port>
    <server_id>1</server_id>
    <log_storage_path>/var/lib/clickhouse/coordination/log</log_storage_path>
    <snapshot_storage_path>/var/lib/clickhouse/coordination/snapshots</snapshot_storage_path>
    <raft_configuration>
      <server><id>1</id><hostname>localhost</hostname><port>9234</port></server>
    </raft_configuration>
  </keeper_server>
</clickhouse>
"""

NODE_XML = """<clickhouse>
  <zookeeper><node><host>keeper</host><port>9181</port></node></zookeeper>
  <macros><shard>01</shard><replica>{name}</replica></macros>
  <interserver_http_host>{name}</interserver_http_host>
  <remote_servers>
    <usage_cluster>
      <shard>
        <internal_replication>true</internal_replication>
        {replicas}
      </shard>
    </usage_cluster>
  </remote_servers>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</clickhouse>
"""
REPLICA_XML = (
    "<replica><host>{host}</host><port>9000</port>"
    f"<user>{CLICKHOUSE_USER}</user><password>{CLICKHOUSE_PASSWORD}</password></replica>"
)

# Ledger rows numbered from {start}: each node writes its own before the copy migrations.
LEDGER_ROWS = """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value,
                                          properties, topic, partition, offset, record_time, ver)
    SELECT 'm', concat('cus_', toString(number % 7)), concat('e-', toString(number)),
           fromUnixTimestamp64Milli(toInt64(1700000000000 + number * 1000), 'UTC'),
           toDecimal128(number, 9), map('k', 'v'), 't', 0, number,
           fromUnixTimestamp64Milli(toInt64(1700000000000), 'UTC'), 1
    FROM numbers({start:UInt64}, 2500)"""
LEDGER = """SELECT event_id, toString(value), offset FROM usage_events FINAL ORDER BY event_id"""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, int]]]:
    """Keeper and two ClickHouse nodes on one network: each node's (host, HTTP port)."""
    from testcontainers.community.clickhouse import ClickHouseContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    conf = tmp_path_factory.mktemp("cluster")
    (conf / "keeper.xml").write_text(KEEPER_XML)
    replicas = "".join(REPLICA_XML.format(host=n) for n in NODES)
    for name in NODES:
        (conf / f"{name}.xml").write_text(NODE_XML.format(name=name, replicas=replicas))
    with Network() as network:
        keeper = (
            DockerContainer(CLICKHOUSE_IMAGE)
            .with_network(network)
            .with_network_aliases("keeper")
            .with_volume_mapping(str(conf / "keeper.xml"), "/etc/keeper.xml", "ro")
            .with_command(["clickhouse", "keeper", "--config-file=/etc/keeper.xml"])
        )
        servers = [
            ClickHouseContainer(
                CLICKHOUSE_IMAGE, username=CLICKHOUSE_USER, password=CLICKHOUSE_PASSWORD
            )
            .with_network(network)
            .with_network_aliases(name)
            .with_volume_mapping(
                str(conf / f"{name}.xml"), "/etc/clickhouse-server/config.d/cluster.xml", "ro"
            )
            for name in NODES
        ]
        with keeper, servers[0], servers[1]:
            yield [(s.get_container_host_ip(), int(s.get_exposed_port(8123))) for s in servers]


def connect(node: tuple[str, int]) -> Backend:
    host, port = node
    return ServerBackend(host, port, CLICKHOUSE_USER, CLICKHOUSE_PASSWORD, "usage")


def wait_for_keeper(store: Backend, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.query("SELECT count() FROM system.zookeeper WHERE path = '/'")
            return
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def upto(store: Backend, last: int) -> None:
    """The migrations up to `last` on the cluster, as an older release applied them."""
    _upto(on_cluster(store, CLUSTER), last)


def tables(store: Backend) -> dict[str, str]:
    rows = store.query(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    )
    return {str(name): str(engine) for name, engine in rows}


def test_migrations_run_on_every_node_and_rows_written_on_one_are_read_on_the_other(
    nodes: list[tuple[str, int]],
) -> None:
    one, two = connect(nodes[0]), connect(nodes[1])
    try:
        wait_for_keeper(one)
        upto(one, 11)
        one.command(LEDGER_ROWS, {"start": 0})
        two.command(LEDGER_ROWS, {"start": 2500})  # not yet on node 1 when the copy starts

        assert migrate(one, CLUSTER) == [v for v, _, _ in MIGRATIONS if v > 11]
        assert migrate(two, CLUSTER) == []  # schema_migrations is replicated too
        with pytest.raises(StoreError, match=r"set clickhouse\.cluster"):
            migrate(two)

        assert tables(one) == tables(two)
        engines = {n: e for n, e in tables(one).items() if e != "View"}
        assert "usage_events" in engines and "schema_migrations" in engines
        assert all(e.startswith("Replicated") for e in engines.values()), engines
        for store in (one, two):
            (key,) = store.query(
                "SELECT sorting_key FROM system.tables "
                "WHERE database = currentDatabase() AND name = 'usage_events'"
            )[0]
            assert key == LEDGER_ORDER

        # The copy on node 1 waited for node 2's rows: the rekeyed ledger holds all of them.
        two.command("SYSTEM SYNC REPLICA usage_events")
        ledger = two.query(LEDGER)
        assert len(ledger) == 5000 and one.query(LEDGER) == ledger

        # A window written on node 1 is read through node 2's views.
        one.command(
            """INSERT INTO usage_windows (meter, customer_id, window_start, sum_value,
                                          event_count, computed_at)
               VALUES ('m', 'cus_1', '2026-01-01 10:01:00', 5, 2, now64(9))"""
        )
        two.command("SYSTEM SYNC REPLICA usage_windows")
        assert two.query("SELECT toString(sum_value), event_count FROM usage_hourly") == [("5", 2)]

        assert set(sync_replicas(two, CLUSTER)) == set(engines)
        assert set(apply_fsync(one, True, CLUSTER)) == set(engines)
        assert apply_fsync(two, True, CLUSTER) == []  # set on node 2 as well
    finally:
        one.close()
        two.close()
