"""Sealed gossip messages (flower_app/sealed.py): only the partner opens, for that route only."""

import ast
import dataclasses
import os
import pickle

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flower_app import sealed
from flower_app.sealed import (
    BLOB_OVERHEAD,
    NodeKeys,
    Route,
    SealError,
    open_sealed,
    seal,
    sealed_size,
    serialise,
)

U64_MAX = 2**64 - 1
ROUTE = Route(run_id=2**63 + 5, server_round=3, step=1, sender=2**64 - 7, receiver=42)
SHAPES = [(), (0,), (1,), (10,), (8, 1, 3, 3), (16, 8, 3, 3), (32, 784), (7, 1, 5), (3, 0)]


def cnn_like(seed=0):
    """Arrays shaped like the default CNN's parameters (flower_app/model.py)."""
    rng = np.random.default_rng(seed)
    shapes = [(8, 1, 3, 3), (8,), (8,), (8,), (16, 8, 3, 3), (16,), (16,), (16,)]
    shapes += [(32, 784), (32,), (10, 32), (10,)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.fixture(scope="module")
def alice():
    return NodeKeys.generate()


@pytest.fixture(scope="module")
def bob():
    return NodeKeys.generate()


def same(a, b):
    """Bit-exact equality: dtype, shape and every byte (NaN payloads and -0.0 included)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_public_keys_are_32_bytes_and_fresh(alice, bob):
    assert len(alice.public_bytes()) == 32 == len(bob.public_bytes())
    assert alice.public_bytes() != bob.public_bytes()
    assert len({NodeKeys.generate().public_bytes() for _ in range(20)}) == 20


def test_round_trip_is_bit_exact_for_float32_of_several_shapes(alice, bob):
    rng = np.random.default_rng(1)
    model = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    special = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -3.4e38], dtype=np.float32
    )
    special_bits = special.view(np.uint32).copy()
    special_bits[0] = 0x7FC12345  # a NaN with a payload
    model.append(special_bits.view(np.float32))
    model.append(np.asfortranarray(rng.standard_normal((5, 4)).astype(np.float32)))
    model.append(rng.standard_normal((6, 6)).astype(np.float32)[::2, 1::2])  # a strided view
    blob = seal(model, ROUTE, alice, bob.public_bytes())
    out = open_sealed(blob, ROUTE, bob, alice.public_bytes())
    same(out, [a.copy(order="C") for a in model])
    assert all(a.flags.writeable and a.flags.c_contiguous for a in out)


def test_round_trip_keeps_other_numeric_dtypes(alice, bob):
    model = [
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.arange(4, dtype=">f4"),
        np.array([1, -2], dtype=np.int64),
        np.array([7], dtype=np.uint8),
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex64),
        np.array([1.5], dtype=np.float16),
        np.zeros((2, 0), np.float64),  # empty, at the very end of the payload
    ]
    out = open_sealed(
        seal(model, ROUTE, alice, bob.public_bytes()), ROUTE, bob, alice.public_bytes()
    )
    same(out, model)


def test_an_empty_model_round_trips(alice, bob):
    blob = seal([], ROUTE, alice, bob.public_bytes())
    assert open_sealed(blob, ROUTE, bob, alice.public_bytes()) == []


def test_both_directions_of_a_pair_work_and_share_one_key(alice, bob):
    back = Route(ROUTE.run_id, ROUTE.server_round, ROUTE.step, ROUTE.receiver, ROUTE.sender)
    model = cnn_like()
    same(
        open_sealed(seal(model, back, bob, alice.public_bytes()), back, alice, bob.public_bytes()),
        model,
    )
    assert alice.pairwise_key(bob.public_bytes(), 9) == bob.pairwise_key(alice.public_bytes(), 9)


def test_the_pairwise_key_differs_per_run_and_per_pair(alice, bob):
    carol = NodeKeys.generate()
    keys = {
        alice.pairwise_key(bob.public_bytes(), 1),
        alice.pairwise_key(bob.public_bytes(), 2),
        alice.pairwise_key(carol.public_bytes(), 1),
        bob.pairwise_key(carol.public_bytes(), 1),
    }
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)


def test_the_pairwise_key_is_hkdf_over_x25519_with_run_and_sorted_public_keys(alice, bob):
    """Against an independent derivation from the spec (RFC 7748 X25519, RFC 5869 HKDF)."""
    shared = X25519PrivateKey.from_private_bytes(alice.export_private()).exchange(
        X25519PublicKey.from_public_bytes(bob.public_bytes())
    )
    low, high = sorted((alice.public_bytes(), bob.public_bytes()))
    run_id = 2**64 - 2
    info = b"flower-dp-gossip/sealed/v1/pairwise-key" + b"\x01" + run_id.to_bytes(8, "big")
    want = HKDF(hashes.SHA256(), 32, salt=None, info=info + low + high).derive(shared)
    assert alice.pairwise_key(bob.public_bytes(), run_id) == want
    assert bob.pairwise_key(alice.public_bytes(), run_id) == want


def test_flipping_any_single_byte_fails(alice, bob):
    small = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, dtype=np.float32)]
    blob = seal(small, ROUTE, alice, bob.public_bytes())
    for pos in range(len(blob)):  # every byte of a small blob, each bit pattern once
        tampered = bytearray(blob)
        tampered[pos] ^= 1 << (pos % 8)
        with pytest.raises(SealError):
            open_sealed(bytes(tampered), ROUTE, bob, alice.public_bytes())
    big = seal(cnn_like(), ROUTE, alice, bob.public_bytes())
    rng = np.random.default_rng(2)
    picks = list(range(64)) + list(range(len(big) - 64, len(big)))
    picks += rng.integers(0, len(big), 300).tolist()
    for pos in picks:
        tampered = bytearray(big)
        tampered[pos] ^= int(rng.integers(1, 256))
        with pytest.raises(SealError):
            open_sealed(bytes(tampered), ROUTE, bob, alice.public_bytes())


def test_a_truncated_or_extended_blob_fails(alice, bob):
    blob = seal(cnn_like(), ROUTE, alice, bob.public_bytes())
    for n in [0, 1, 12, 13, BLOB_OVERHEAD - 1, BLOB_OVERHEAD, 100, len(blob) - 16, len(blob) - 1]:
        with pytest.raises(SealError):
            open_sealed(blob[:n], ROUTE, bob, alice.public_bytes())
    with pytest.raises(SealError):
        open_sealed(blob + b"\0", ROUTE, bob, alice.public_bytes())


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": ROUTE.run_id + 1},
        {"server_round": ROUTE.server_round + 1},
        {"server_round": ROUTE.server_round - 1},
        {"step": ROUTE.step + 1},
        {"step": 0},
        {"sender": 7},
        {"receiver": 43},
        {"sender": ROUTE.receiver, "receiver": ROUTE.sender},  # reflected back to the sender
        {"run_id": ROUTE.server_round, "server_round": ROUTE.run_id},  # fields swapped
    ],
    ids=repr,
)
def test_the_same_blob_opened_under_another_route_fails(alice, bob, change):
    blob = seal(cnn_like(), ROUTE, alice, bob.public_bytes())
    other = dataclasses.replace(ROUTE, **change)
    assert other != ROUTE
    with pytest.raises(SealError, match="failed authentication"):
        open_sealed(blob, other, bob, alice.public_bytes())
    # ... and the reflected blob does not open on the sender's side either
    with pytest.raises(SealError):
        open_sealed(blob, other, alice, bob.public_bytes())


def test_associated_data_is_fixed_width_and_distinct_for_distinct_routes():
    routes = [
        ROUTE,
        Route(1, 2, 3, 4, 5),
        Route(1, 2, 3, 5, 4),
        Route(1, 2, 4, 3, 5),
        Route(2, 1, 3, 4, 5),
        Route(0, 0, 0, 0, U64_MAX),
        Route(U64_MAX, U64_MAX, U64_MAX, U64_MAX, 0),
    ]
    data = [r.associated_data() for r in routes]
    assert len(set(data)) == len(routes)
    assert len({len(d) for d in data}) == 1
    label = b"flower-dp-gossip/sealed/v1/route"
    fields = (1, 2, 3, 4, 5)
    want = len(label).to_bytes(2, "big") + label + b"\x01"
    want += b"".join(v.to_bytes(8, "big") for v in fields)
    assert Route(*fields).associated_data() == want  # the spec, byte for byte


def test_a_third_party_cannot_open_even_knowing_both_public_keys(alice, bob):
    model = cnn_like()
    blob = seal(model, ROUTE, alice, bob.public_bytes())
    server = NodeKeys.generate()  # the server makes its own pair and knows both public ones
    carol = NodeKeys.generate()  # another node of the graph
    for keys in (server, carol):
        for claimed in (alice.public_bytes(), bob.public_bytes(), server.public_bytes()):
            with pytest.raises(SealError):
                open_sealed(blob, ROUTE, keys, claimed)
    # Bob himself refuses it when told the wrong sender key.
    with pytest.raises(SealError):
        open_sealed(blob, ROUTE, bob, carol.public_bytes())
    # Keys the server could build from public values alone do not decrypt either.
    nonce, body = blob[1:13], blob[13:]
    for guess in (
        alice.public_bytes(),
        bob.public_bytes(),
        bytes(a ^ b for a, b in zip(alice.public_bytes(), bob.public_bytes(), strict=True)),
        server.pairwise_key(alice.public_bytes(), ROUTE.run_id),
        server.pairwise_key(bob.public_bytes(), ROUTE.run_id),
    ):
        with pytest.raises(InvalidTag):
            ChaCha20Poly1305(guess).decrypt(nonce, body, ROUTE.associated_data())


def test_unpinned_keys_let_a_key_substituting_server_read(alice, bob):
    """The documented limit: public keys are not pinned, so an ACTIVE server reads."""
    mitm = NodeKeys.generate()
    model = cnn_like()
    # The server tells Alice that Bob's key is its own, opens, then re-seals for Bob.
    blob = seal(model, ROUTE, alice, mitm.public_bytes())
    stolen = open_sealed(blob, ROUTE, mitm, alice.public_bytes())
    same(stolen, model)
    forwarded = seal(stolen, ROUTE, mitm, bob.public_bytes())
    # Bob, told that Alice's key is the server's, accepts it: only pinning would catch this.
    same(open_sealed(forwarded, ROUTE, bob, mitm.public_bytes()), model)
    with pytest.raises(SealError):  # with Alice's real key he would refuse it
        open_sealed(forwarded, ROUTE, bob, alice.public_bytes())


def test_two_seals_of_the_same_model_differ(alice, bob):
    model = cnn_like()
    blobs = [seal(model, ROUTE, alice, bob.public_bytes()) for _ in range(8)]
    assert len(set(blobs)) == 8
    assert len({b[1:13] for b in blobs}) == 8  # a fresh nonce each time
    for b in blobs:
        same(open_sealed(b, ROUTE, bob, alice.public_bytes()), model)


def test_the_blob_is_the_model_bytes_plus_a_small_constant(alice, bob):
    for model in (cnn_like(), [np.zeros((32, 784), np.float32)], [np.ones((), np.float32)]):
        blob = seal(model, ROUTE, alice, bob.public_bytes())
        model_bytes = sum(a.nbytes for a in model)
        assert len(blob) == sealed_size(model)
        # version + nonce + tag + count, and per array at most 5 + 8 bytes per dimension
        bound = BLOB_OVERHEAD + 4 + sum(5 + 8 * a.ndim for a in model)
        assert model_bytes < len(blob) <= model_bytes + bound
    cnn = cnn_like()
    overhead = len(seal(cnn, ROUTE, alice, bob.public_bytes())) - sum(a.nbytes for a in cnn)
    assert overhead <= 400  # about 0.4% of the default CNN's 107 kB


def test_pickle_is_never_used(alice, bob, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, no_pickle)
    model = cnn_like()
    same(
        open_sealed(
            seal(model, ROUTE, alice, bob.public_bytes()), ROUTE, bob, alice.public_bytes()
        ),
        model,
    )
    for refused in (
        np.array([{"a": 1}, None], dtype=object),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f4")]),
        np.array(["text"]),
        np.array([b"raw"], dtype="V3"),
    ):
        with pytest.raises(SealError, match="no pickle"):
            seal([np.ones(2, np.float32), refused], ROUTE, alice, bob.public_bytes())
    with pytest.raises(SealError, match="not a numpy array"):
        seal([[1.0, 2.0]], ROUTE, alice, bob.public_bytes())


def authentic(alice, bob, plaintext):
    """A blob that authenticates (sealed with the real pairwise key) around any plaintext."""
    key = alice.pairwise_key(bob.public_bytes(), ROUTE.run_id)
    nonce = os.urandom(12)
    return (
        bytes([1])
        + nonce
        + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ROUTE.associated_data())
    )


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"\0\0\0\1",  # one array announced, none there
        b"\0\0\0\1\x02|O\x01" + b"\0" * 16,  # dtype object
        b"\0\0\0\1\x03<f4\x01" + (10).to_bytes(8, "big") + b"\0" * 39,  # 39 of 40 data bytes
        b"\0\0\0\1\x03<f4\x01" + (2**63).to_bytes(8, "big"),  # a shape far beyond the data
        b"\0\0\0\1\x03<f4\x41" + b"\0" * 8 * 65,  # 65 dimensions
        b"\0\0\0\1\x03<f4\x02" + b"\0" * 8 + (2**63).to_bytes(8, "big"),  # (0, 2^63): no data
        serialise([np.ones(3, np.float32)]) + b"\0",  # trailing bytes
    ],
    ids=repr,
)
def test_a_malformed_payload_after_decryption_is_refused(alice, bob, plaintext):
    blob = authentic(alice, bob, plaintext)
    with pytest.raises(SealError, match="opened but its payload is malformed"):
        open_sealed(blob, ROUTE, bob, alice.public_bytes())


def test_a_fuzzed_payload_parses_or_raises_only_seal_error():
    """What a buggy (authenticated) sender could send never escapes as another exception."""
    good = serialise([np.ones((2, 3), np.float32), np.zeros((), "<f8"), np.arange(4, dtype="u1")])
    rng = np.random.default_rng(3)
    for _ in range(3000):
        bad = bytearray(good[: int(rng.integers(0, len(good) + 1))])
        for _ in range(int(rng.integers(0, 4))):
            if bad:
                bad[int(rng.integers(0, len(bad)))] = int(rng.integers(0, 256))
        try:
            sealed.parse(bytes(bad))
        except SealError:
            pass


def test_the_authentic_helper_itself_opens(alice, bob):
    model = [np.ones(3, np.float32)]
    same(
        open_sealed(authentic(alice, bob, serialise(model)), ROUTE, bob, alice.public_bytes()),
        model,
    )


def test_every_failure_is_one_seal_error_line_without_secrets(alice, bob):
    blob = seal(cnn_like(), ROUTE, alice, bob.public_bytes())
    secrets = [
        alice.export_private().hex(),
        bob.export_private().hex(),
        alice.pairwise_key(bob.public_bytes(), ROUTE.run_id).hex(),
    ]
    failures = [
        lambda: open_sealed(blob[:5], ROUTE, bob, alice.public_bytes()),
        lambda: open_sealed(b"\x07" + blob[1:], ROUTE, bob, alice.public_bytes()),
        lambda: open_sealed(blob, dataclasses.replace(ROUTE, step=9), bob, alice.public_bytes()),
        lambda: open_sealed(blob, ROUTE, bob, b"short"),
        lambda: open_sealed(blob, ROUTE, bob, bytes(32)),  # a low-order point
        lambda: seal(cnn_like(), ROUTE, alice, "not bytes"),
        lambda: open_sealed(authentic(alice, bob, b"\0"), ROUTE, bob, alice.public_bytes()),
        lambda: NodeKeys.from_private(b"\1" * 31),
    ]
    for fail in failures:
        with pytest.raises(SealError) as caught:
            fail()
        line = str(caught.value)
        assert line and "\n" not in line
        assert not any(s in line for s in secrets)
        assert caught.value.__cause__ is None  # no chained traceback carrying internals
    with pytest.raises(SealError, match="format version 7, expected 1"):
        open_sealed(b"\x07" + blob[1:], ROUTE, bob, alice.public_bytes())


@pytest.mark.parametrize(
    "fields",
    [
        {"run_id": -1},
        {"server_round": 2**64},
        {"step": 1.0},
        {"sender": True},
        {"receiver": "5"},
        {"sender": 5, "receiver": 5},
    ],
    ids=repr,
)
def test_a_route_refuses_what_it_cannot_encode(fields):
    values = {"run_id": 1, "server_round": 1, "step": 0, "sender": 1, "receiver": 2} | fields
    with pytest.raises(SealError):
        Route(**values)


def test_a_route_takes_the_extremes_and_numpy_ints():
    r = Route(np.uint64(U64_MAX), 0, np.int64(3), 0, U64_MAX)
    assert r.run_id == U64_MAX and type(r.run_id) is int and type(r.step) is int


def test_keys_leave_the_node_only_through_export_private(alice, bob):
    restored = NodeKeys.from_private(alice.export_private())
    assert restored.public_bytes() == alice.public_bytes()
    blob = seal(cnn_like(), ROUTE, restored, bob.public_bytes())
    same(open_sealed(blob, ROUTE, bob, alice.public_bytes()), cnn_like())
    with pytest.raises(TypeError):
        pickle.dumps(alice)
    assert alice.export_private().hex() not in repr(alice)
    assert not hasattr(alice, "__dict__")


def test_the_module_imports_only_the_standard_library_numpy_and_cryptography():
    tree = ast.parse(open(sealed.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    tops = {m.split(".")[0] for m in imported}
    assert tops <= {
        "__future__",
        "operator",
        "os",
        "struct",
        "collections",
        "dataclasses",
        "numpy",
        "cryptography",
    }, tops
