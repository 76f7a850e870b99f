"""A long differential fuzz of consumer.decode._avrofast, optionally under AddressSanitizer and
UndefinedBehaviorSanitizer. Not collected by pytest; run by hand:

    .venv/bin/python -m tests.fuzz decoder --seconds 300 --asan

With --asan the extension is rebuilt with -fsanitize=address,undefined (any finding
aborts), each message and program is copied into an allocation of its exact size (so a
one-byte over-read is caught too), and the run continues in a child process with libasan
preloaded and Python's allocator switched to malloc.

Inputs: random writer schemas (extra fields of every skippable type, optional fields left
out, any field order), their records encoded by fastavro, hand-made encodings fastavro never
writes (negative map blocks, repeated keys, padded varints, raw UTF-8 bytes), byte-level
mutations of all of these, random bytes and headers, and random or mutated programs. Every
fast row must equal the reference decoder's event and every row the reference refuses must
be slow; a program the C side accepts must never crash it, whatever it says.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.fuzz.model import zz

_SO_ENV = "AVROFAST_FUZZ_SO"
ROOT = Path(__file__).resolve().parents[2]


def _build_sanitized(out_dir: Path) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_avrofast{suffix}"
    cmd = [
        "gcc",
        "-std=c99",
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-DAVROFAST_EXACT_COPIES",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fPIC",
        "-shared",
        f"-I{sysconfig.get_paths()['include']}",
        str(ROOT / "consumer" / "decode" / "_avrofast.c"),
        "-o",
        str(target),
    ]
    subprocess.run(cmd, check=True)
    return target


def _relaunch_sanitized(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        so = _build_sanitized(Path(tmp))
        libasan = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
        ).stdout.strip()
        env = {
            **os.environ,
            _SO_ENV: str(so),
            "LD_PRELOAD": libasan,
            "PYTHONMALLOC": "malloc",
            # Python frees little at exit; leaks are checked by RSS in the unit tests.
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        }
        child = [sys.executable, "-m", "tests.fuzz.avrofast", *argv]
        return subprocess.run(child, env=env, cwd=ROOT).returncode


def _load_extension() -> None:
    """Before consumer.decode.fast is imported: the sanitized build when the parent made one."""
    path = os.environ.get(_SO_ENV)
    if not path:
        return
    spec = importlib.util.spec_from_file_location("consumer.decode._avrofast", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["consumer.decode._avrofast"] = module
    spec.loader.exec_module(module)


# --- generation ----------------------------------------------------------------------------

PRIMITIVES = ["null", "boolean", "int", "long", "float", "double", "string", "bytes"]
LIMIT = 10**38


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        self.names = 0

    def text(self, short: bool = True) -> str:
        r = self.r
        n = r.choice([0, 1, 2, 5, 12, 30]) if short else r.choice([0, 1, 40, 199, 200, 201, 260])
        pools = [
            "abc-_:.0123456789",
            " \t\n\x00\x7f",
            "\u00e9\u00a0\u2028\u3000\ufeff\uffff",
            "\U0001f600\U0010ffff\U00010000",
        ]
        pool = "".join(r.sample(pools, r.randint(1, len(pools))))
        return "".join(r.choice(pool) for _ in range(n))

    def an_id(self) -> str:
        if self.r.random() < 0.9:
            return f"evt-{self.r.randrange(10**9)}"
        return self.text(short=self.r.random() < 0.5)

    def unscaled(self) -> int:
        r, x = self.r, self.r.random()
        if x < 0.5:
            return r.randint(-(10**12), 10**12)
        if x < 0.85:
            return r.randint(-LIMIT + 1, LIMIT - 1)
        if x < 0.95:
            return r.choice([0, 1, -1, LIMIT - 1, -LIMIT + 1, LIMIT, -LIMIT, 2**127 - 1, -(2**127)])
        return r.randint(-(2**140), 2**140)

    def long(self) -> int:
        r = self.r
        return r.choice([r.randint(-(2**63), 2**63 - 1), r.randint(-1000, 1000), 2**63 - 1])

    def skip_type(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.choice(PRIMITIVES + ["fixed", "enum"] + (["array", "map"] if depth < 3 else []))
        self.names += 1
        if kind == "fixed":
            return {"type": "fixed", "name": f"F{self.names}", "size": r.randint(0, 9)}
        if kind == "enum":
            symbols = [f"S{i}" for i in range(r.randint(1, 5))]
            return {"type": "enum", "name": f"E{self.names}", "symbols": symbols}
        if kind == "array":
            return {"type": "array", "items": self.skip_type(depth + 1)}
        if kind == "map":
            return {"type": "map", "values": self.skip_type(depth + 1)}
        return {"type": kind} if r.random() < 0.3 else kind

    def value_of(self, t: Any) -> Any:
        r = self.r
        kind = t["type"] if isinstance(t, dict) else t
        simple: dict[str, Callable[[], Any]] = {
            "null": lambda: None,
            "boolean": lambda: r.random() < 0.5,
            "int": lambda: r.randint(-(2**31), 2**31 - 1),
            "long": self.long,
            "float": lambda: r.choice([0.0, 1.5, -2.25e30, float("inf")]),
            "double": lambda: r.choice([0.0, r.random(), float("nan"), -1e300]),
            "string": self.text,
            "bytes": lambda: r.randbytes(r.randint(0, 9)),
        }
        if kind in simple:
            return simple[kind]()
        if kind == "fixed":
            return r.randbytes(t["size"])
        if kind == "enum":
            return r.choice(t["symbols"])
        if kind == "array":
            return [self.value_of(t["items"]) for _ in range(r.randint(0, 3))]
        return {self.text(): self.value_of(t["values"]) for _ in range(r.randint(0, 3))}

    def writer(self) -> Any:
        r = self.r
        precision = r.choice([9, 20, 38, 38])
        fields: list[dict[str, Any]] = [
            {"name": "event_id", "type": "string"},
            {"name": "event_name", "type": "string"},
            {"name": "customer_id", "type": "string"},
            {
                "name": "value",
                "type": {
                    "type": "bytes",
                    "logicalType": "decimal",
                    "precision": precision,
                    "scale": 9,
                },
            },
            {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ]
        if r.random() < 0.7:
            fields.append(
                {"name": "properties", "type": {"type": "map", "values": "string"}, "default": {}}
            )
        for name in ("source", "cancels"):
            if r.random() < 0.5:
                fields.append({"name": name, "type": "string", "default": ""})
        for k in range(r.choice([0, 0, 1, 2, 4])):
            fields.append({"name": f"x{k}", "type": self.skip_type()})
        r.shuffle(fields)
        return {
            "type": "record",
            "name": "UsageEvent",
            "namespace": "io.usageconsumer",
            "fields": fields,
        }

    def record(self, stripped: Any) -> dict[str, Any]:
        r = self.r
        n = self.unscaled()
        size = max(1, (n.bit_length() + 8) // 8) + r.choice([0, 0, 0, 1, 5])
        known: dict[str, Callable[[], Any]] = {
            "event_id": self.an_id,
            "event_name": lambda: r.choice(["api_call", "tokens", self.text()]),
            "customer_id": self.an_id,
            "value": lambda: n.to_bytes(size, "big", signed=True) if n or r.random() < 0.5 else b"",
            "timestamp": self.long,
            "properties": lambda: {self.text(): self.text() for _ in range(r.choice([0, 1, 3]))},
            "source": self.text,
            "cancels": lambda: "" if r.random() < 0.6 else self.an_id(),
        }
        return {
            f["name"]: known[f["name"]]() if f["name"] in known else self.value_of(f["type"])
            for f in stripped["fields"]
        }


# --- hand-made encodings -------------------------------------------------------------------


def odd_varint(rng: random.Random, n: int) -> bytes:
    z = bytearray(zz(n))
    kind = rng.random()
    if kind < 0.5:
        return bytes(z)
    if kind < 0.7:  # padded
        z[-1] |= 0x80
        return bytes(z) + b"\x80" * rng.randint(0, 3) + b"\x00"
    if kind < 0.85:  # long
        return b"\xff" * rng.randint(9, 11) + bytes([rng.randint(0, 3)])
    return bytes(z[:-1])  # truncated


def utf8ish(rng: random.Random) -> bytes:
    parts = [
        b"a",
        b"\xc3\xa9",
        b"\xe2\x80\xa8",
        b"\xf0\x9f\x98\x80",
        b"\xf4\x8f\xbf\xbf",
        b"\xed\xa0\x80",  # surrogate
        b"\xc0\xaf",  # overlong
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xe0\x80\x80",
        b"\xff",
        b"\x80",
        b"\xc3",
    ]
    return b"".join(
        rng.choice(parts[:5] if rng.random() < 0.7 else parts) for _ in range(rng.randint(0, 4))
    )


def hand_v4(rng: random.Random, schema_id: int) -> bytes:
    """The v4 layout with oddities: negative blocks, repeated keys, raw UTF-8, odd varints."""

    def s(b: bytes) -> bytes:
        return (odd_varint(rng, len(b)) if rng.random() < 0.03 else zz(len(b))) + b

    props = b""
    keys = [utf8ish(rng) for _ in range(rng.randint(0, 4))]
    if keys and rng.random() < 0.3:
        keys.append(rng.choice(keys))
    i = 0
    while i < len(keys):
        block = keys[i : i + rng.randint(1, 3)]
        body = b"".join(s(k) + s(utf8ish(rng)) for k in block)
        if rng.random() < 0.4:
            size = len(body) + (0 if rng.random() < 0.8 else rng.choice([-1, 1]))
            props += zz(-len(block)) + zz(size) + body
        else:
            props += zz(len(block)) + body
        i += len(block)
    props += b"\x00"
    value = rng.randint(-(2**130), 2**130)
    vbytes = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    body = (
        s(b"evt-" + utf8ish(rng))
        + s(utf8ish(rng))
        + s(b"cus_" + utf8ish(rng))
        + s(vbytes)
        + odd_varint(rng, rng.randint(-(2**63), 2**63 - 1))
        + props
        + s(utf8ish(rng))
        + s(b"" if rng.random() < 0.5 else b"evt-" + utf8ish(rng))
    )
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, max(0, len(b) - 1))
        kind = rng.randrange(9)
        if kind == 0:
            del b[at:]
        elif kind == 1 and b:
            b[at] ^= 1 << rng.randrange(8)
        elif kind == 2 and b:
            b[at] = rng.choice([0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xFF, 0xC0, 0xED, 0xF4])
        elif kind == 3:
            b += rng.randbytes(rng.randint(1, 4))
        elif kind == 4:
            b[at:at] = rng.randbytes(rng.randint(1, 4))
        elif kind == 5:
            del b[at : at + rng.randint(1, 6)]
        elif kind == 6:
            b[at:at] = zz(rng.choice([-1, -(2**63), 2**62, 1000, 64, 65]))
        elif kind == 7 and others:
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            b = b[:at] + bytearray(other[cut:])
        elif kind == 8 and len(b) > 2:
            end = rng.randint(at, len(b))
            b[end:end] = b[at:end]
    return bytes(b)


# --- the run -------------------------------------------------------------------------------


def _odd(s: str) -> bool:
    b = s.encode()
    return not b or len(b) > 200 or not 0x21 <= b[0] <= 0x7E


def ordinary(decoder: Any, value: bytes | None) -> bool:
    """A row the fast path must take: the reference reads it and nothing about it is odd."""
    try:
        e = decoder.decode(value)
    except Exception:
        stats_refused[0] += 1
        return False
    odd = _odd(e.event_id) or _odd(e.customer_id) or (e.cancels and _odd(e.cancels))
    return not odd and len(e.properties) <= 64


stats_refused = [0]


def run(seconds: float, seed: int) -> int:
    _load_extension()
    import fastavro

    from consumer.decode import _avrofast
    from consumer.decode import fast as avrofast
    from consumer.decode.event import DecodedEvent
    from consumer.decode.reference import Decoder, plain_reader
    from consumer.decode.schemas import SCHEMAS_DIR, UnknownSchemaId, load_schema, reader_schema
    from consumer.decode.wire import frame_confluent

    print(f"extension: {_avrofast.__file__}", flush=True)
    reader = reader_schema()
    fixed_writers = {
        1: load_schema(SCHEMAS_DIR / "usage_event.v1.avsc"),
        2: load_schema(SCHEMAS_DIR / "usage_event.v2.avsc"),
        3: load_schema(SCHEMAS_DIR / "usage_event.v3.avsc"),
        4: reader,
    }

    class Source:
        def __init__(self, schemas: dict[int, Any]) -> None:
            self.schemas = schemas

        def writer_schema(self, schema_id: int) -> Any:
            if schema_id not in self.schemas:
                raise UnknownSchemaId(str(schema_id))
            return self.schemas[schema_id]

    rng = random.Random(seed)
    gen = Gen(rng)
    stats = {"batches": 0, "rows": 0, "fast": 0, "slow": 0}
    stats.update(programs=0, programs_run=0, programs_refused=0)
    deadline = time.monotonic() + seconds

    while time.monotonic() < deadline:
        stats["batches"] += 1
        schemas: dict[int, Any] = dict(fixed_writers)
        for sid in range(100, 100 + rng.randint(0, 3)):
            schemas[sid] = fastavro.parse_schema(gen.writer())
        programs = {}
        for sid, w in schemas.items():
            p = avrofast.compile_program(w, reader, plain_reader)
            if p is None:
                print(f"compile_program refused a generated schema: {w}", flush=True)
                return 1
            programs[sid] = p
        good: list[bytes] = []
        canonical: set[int] = set()  # indexes into `good` of fastavro's own encodings
        for _ in range(rng.randint(1, 60)):
            sid = rng.choice(sorted(schemas))
            if rng.random() < 0.3:
                good.append(hand_v4(rng, 4))
                continue
            stripped: Any = fastavro.parse_schema(avrofast.without_logical(schemas[sid]))
            out = io.BytesIO()
            fastavro.schemaless_writer(out, stripped, gen.record(stripped))
            canonical.add(len(good))
            good.append(frame_confluent(sid, out.getvalue()))
        values: list[bytes | None] = []
        intact: set[int] = set()  # rows holding a canonical encoding, unchanged
        for k, g in enumerate(good):
            x = rng.random()
            if x < 0.45:
                if k in canonical:
                    intact.add(len(values))
                values.append(g)
            elif x < 0.9:
                values.append(mutate(rng, g, good))
            elif x < 0.93:
                values.append(None)
            elif x < 0.96:
                values.append(rng.randbytes(rng.randint(0, 12)))
            else:
                values.append(frame_confluent(rng.choice([0, 5, 2**32 - 1]), rng.randbytes(20)))
        if stats["batches"] % 100 == 0:
            # Large enough to decode without the GIL, in two threads at once.
            reps = 4096 // len(values) + 1
            intact = {i + k * len(values) for i in intact for k in range(reps)}
            values = values * reps
            with ThreadPoolExecutor(2) as pool:
                one, two = pool.map(avrofast.decode_batch, [values] * 2, [programs] * 2)
            if one.slow.tolist() != two.slow.tolist() or one.event_id != two.event_id:
                print("threads disagree", flush=True)
                return 1
        batch = avrofast.decode_batch(values, programs)
        decoder = Decoder(mode="confluent", source=Source(schemas), reader=reader)
        cols = {
            name: getattr(batch, name).to_pylist()
            for name in ("event_id", "event_name", "customer_id", "cancels", "value", "properties")
        }
        for i, v in enumerate(values):
            stats["rows"] += 1
            if batch.slow[i]:
                stats["slow"] += 1
                # A slow row satisfies the contract whatever the reference says. The reference
                # runs only where it cannot hang: fastavro loops over any count of zero-byte
                # array items (array<null>), however large, without reading input.
                if i in intact and ordinary(decoder, v):
                    print(f"SLOW but ordinary: {v!r}", flush=True)
                    return 1
                continue
            stats["fast"] += 1
            want: DecodedEvent | None
            try:
                want = decoder.decode(v)
            except Exception:
                want = None
            got = DecodedEvent(
                cols["event_id"][i],
                cols["event_name"][i],
                cols["customer_id"][i],
                cols["value"][i],
                int(batch.timestamp[i]),
                dict(cols["properties"][i]),
                int(batch.schema_id[i]),
                cols["cancels"][i],
            )
            same_hash = int(batch.id_hash[i]) == avrofast.id_hash_bytes(got.event_id.encode())
            if want is None or got != want or not same_hash:
                print(f"MISMATCH on {v!r}:\n  fast {got}\n  reference {want}", flush=True)
                return 1
        if avrofast.schema_ids(values) != decoder.named_schema_ids(values):
            print(f"schema_ids differ on {values!r}", flush=True)
            return 1
        strings = [gen.text(short=False) for _ in range(8)]
        if avrofast.hash_strings(strings).tolist() != [
            avrofast.id_hash_bytes(t.encode()) for t in strings
        ]:
            print(f"hash_strings differs on {strings!r}", flush=True)
            return 1
        # Programs the C side accepts must be safe to run, whatever they mean.
        for _ in range(4):
            stats["programs"] += 1
            base = rng.choice(list(programs.values()))
            prog = (
                mutate(rng, base, []) if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 20))
            )
            try:
                avrofast.decode_batch(values, {sid: prog for sid in schemas})
                stats["programs_run"] += 1
            except ValueError:
                stats["programs_refused"] += 1
        if stats["batches"] % 500 == 0:
            print(stats, flush=True)
    print("clean:", stats, "intact rows the reference refused:", stats_refused[0], flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--asan", action="store_true", help="rebuild with sanitizers first")
    args = parser.parse_args(argv)
    print(f"seed {args.seed}", flush=True)
    if args.asan and _SO_ENV not in os.environ:
        return _relaunch_sanitized(["--seconds", str(args.seconds), "--seed", str(args.seed)])
    return run(args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
