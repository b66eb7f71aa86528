"""The SDK's own SCALE codec (bittensor_core.Runtime, which the SDK's transport decodes with)
over the chain types whose decoded shape is a risk for the fake substrate: a value given here is
encoded to SCALE bytes and decoded back, so that the fake answers with what the transport would
hand the SDK, not with a shape written by hand.

No chain metadata is at hand offline, so the type registry is built here after the subtensor
runtime's definitions: pallet_commitments::types::{Registration, CommitmentInfo, Data} (Data's
TypeInfo lists Raw0..Raw128 as byte arrays of that length at indices 1..129, and
TimelockEncrypted at 135), RevealedCommitments' (bytes, reveal block) pairs, and the
SubtensorModule values that setting weights reads."""

import bittensor_core


def compact(n):
    if n < 2**6:
        return bytes([n << 2])
    if n < 2**14:
        return ((n << 2) | 1).to_bytes(2, "little")
    return ((n << 2) | 2).to_bytes(4, "little")


def vec(items):
    return compact(len(items)) + b"".join(items)


def text(s):
    return vec([bytes([b]) for b in s.encode()])


def option(encoded):
    return b"\x00" if encoded is None else b"\x01" + encoded


class Registry:
    """A scale-info PortableRegistry, and the V14 metadata that carries it."""

    PRIMITIVES = {"bool": 0, "u8": 3, "u16": 4, "u32": 5, "u64": 6}

    def __init__(self):
        self.types = []

    def add(self, type_def, path=(), params=()):
        self.types.append(vec([text(p) for p in path])
                          + vec([text(name) + option(ty if ty is None else compact(ty))
                                 for name, ty in params])
                          + type_def + vec([]))
        return len(self.types) - 1

    def primitive(self, name):
        return self.add(b"\x05" + bytes([self.PRIMITIVES[name]]))

    def array(self, length, ty):
        return self.add(b"\x03" + length.to_bytes(4, "little") + compact(ty))

    def sequence(self, ty):
        return self.add(b"\x02" + compact(ty))

    def tuple(self, *types):
        return self.add(b"\x04" + vec([compact(t) for t in types]))

    @staticmethod
    def fields(fields):
        return vec([option(name and text(name)) + compact(ty) + option(None) + vec([])
                    for name, ty in fields])

    def composite(self, fields, path):
        return self.add(b"\x00" + self.fields(fields), path)

    def variant(self, variants, path, params=()):
        return self.add(b"\x01" + vec([text(name) + self.fields(fields) + bytes([index])
                                       + vec([]) for name, fields, index in variants]),
                        path, params)

    def metadata(self):
        """MetadataVersioned V14: these types, no pallets, a placeholder extrinsic type."""
        types = vec([compact(i) + t for i, t in enumerate(self.types)])
        return b"meta" + bytes([14]) + types + vec([]) + compact(0) + bytes([4]) + vec([]) \
            + compact(0)


def _registry():
    r = Registry()
    u8, u16, u64, boolean = (r.primitive(n) for n in ("u8", "u16", "u64", "bool"))
    raw_bytes = r.sequence(u8)
    data = r.variant(
        [("None", [], 0)]
        + [(f"Raw{n}", [(None, r.array(n, u8))], n + 1) for n in range(129)]
        + [("TimelockEncrypted", [("encrypted", raw_bytes), ("reveal_round", u64)], 135)],
        ["pallet_commitments", "types", "Data"])
    fields = r.composite([(None, r.sequence(data))],
                         ["bounded_collections", "bounded_vec", "BoundedVec"])
    info = r.composite([("fields", fields)], ["pallet_commitments", "types", "CommitmentInfo"])
    types = {
        "Registration": r.composite([("deposit", u64), ("block", u64), ("info", info)],
                                    ["pallet_commitments", "types", "Registration"]),
        "RevealedCommitments": r.composite(
            [(None, r.sequence(r.tuple(raw_bytes, u64)))],
            ["bounded_collections", "bounded_vec", "BoundedVec"]),
        "Vec<u64>": r.sequence(u64),
        "Option<u16>": r.variant([("None", [], 0), ("Some", [(None, u16)], 1)], ["Option"],
                                 [("T", u16)]),
        "bool": boolean, "u16": u16, "u64": u64,
    }
    return bittensor_core.Runtime(r.metadata(), 1, 1, 42), types


RUNTIME, TYPES = _registry()


def decoded(type_name, value):
    """`value` as the SDK's transport decodes it after a node sent it as `type_name`."""
    type_string = f"scale_info::{TYPES[type_name]}"
    return RUNTIME.decode(type_string, RUNTIME.encode(type_string, value), True)
