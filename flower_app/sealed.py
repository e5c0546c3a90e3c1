"""Sealed gossip messages: a model only the gossip partner can read (issue 28's crypto core).

Under `gossip-relay=sealed` the ServerApp still relays every gossip exchange (Flower nodes
cannot reach each other), but what it relays is sealed for one partner: X25519 key agreement
between the two nodes' per-run key pairs, HKDF-SHA256 to a pairwise key, ChaCha20-Poly1305
over the serialised model with the message's `Route` (run, round, step, sender, receiver) as
associated data. Everything comes from the `cryptography` package; nothing is hand-written.
Pure: no flwr, no torch.

Threat model
------------
- **Honest-but-curious server** (the SuperLink and the ServerApp, which route): it follows
  the protocol but reads everything it relays. It cannot read a sealed model, change one
  undetected, replay it into another run, round or step, redirect it to another receiver, or
  present it as another sender's: the route is authenticated, and the pairwise key needs one
  of the two X25519 private keys, which never leave their nodes.
- **Public keys are NOT pinned in this module.** They travel through the server, so an
  *active* server that hands each node its own public key in place of the partner's (a
  man in the middle) can open, read and re-seal every exchange
  (`tests/test_sealed.py::test_unpinned_keys_let_a_key_substituting_server_read`). What
  would pin them: each node signs (run id, node id, X25519 public key) with a long-term key
  whose public half its peers got from their operators, not from the server; the natural one
  is the SuperNode's authentication key (ECDSA P-384, `flower-supernode
  --auth-supernode-private-key`). flwr 1.42 does not expose it to the ClientApp (checked in
  its source): the SuperNode loads it in `supernode/cli/flower_supernode.py`
  (`_try_setup_client_authentication`) and hands it only to the Fleet connection
  (`supernode/fleet_http_connection.py` -> `NodeAuthHttpInterceptor`), which signs nothing
  but each request's timestamp; a ClientApp receives only the Message, a Context (run id,
  node id, node config, state, run config, series id), the Run and the FAB
  (`supernode/runtime/run_clientapp.py`: `pull_task_input`), and no call that signs. The
  ServerApp can read each node's authentication public key (`Grid.get_nodes()` ->
  `NodeInfo.public_key`), but that is the server's word, which is what pinning must not
  rely on. Pinning therefore needs something outside Flower's API: an operator-provided
  signing key and a list of the peers' verifying keys in node config, as
  `--trusted-entities` does for FABs.
- **What the server still learns**: who talks to whom and when (it draws the schedule), the
  exact size of every message (for a given architecture always the same: the model's bytes
  plus a fixed overhead, so sizes tell nothing about values), timing, the nodes' public
  keys, which exchanges a node refuses if nodes report that, and all it learns today outside
  gossip (dataset sizes, σ, ε, ...).
- **What a neighbour learns**: each model a partner seals for it: the partner's current
  model, which carries the DP noise of every release it mixes (so the DP guarantee holds
  against it by post-processing), and which after a few gossip steps mixes models of nodes
  farther away in the graph. It learns its partners' node ids and public keys. It cannot
  read exchanges between other pairs, nor seal a model in another node's name to a third
  node (each pair has its own key). Both ends of a pair share one key per run, so a sender
  can open what it sealed (it holds that model anyway); the route tells directions apart.
- **Replay under the same route**: an AEAD cannot tell a second delivery of the same blob
  for the same route from the first. A node takes at most one model per (round, step,
  sender), so the caller refuses a route it has already opened.
- A leaked private key exposes that node's exchanges of one run only: keys are fresh per run.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

VERSION = 1  # first byte of every blob; also inside the associated data and the HKDF info
PUBLIC_KEY_BYTES = 32  # an X25519 public key (RFC 7748)
NONCE_BYTES = 12  # ChaCha20-Poly1305's 96-bit nonce (RFC 8439)
TAG_BYTES = 16  # Poly1305's tag
# Domain-separation labels: a key or a tag made for this purpose is useless for any other.
_KDF_LABEL = b"flower-dp-gossip/sealed/v1/pairwise-key"
_AAD_LABEL = b"flower-dp-gossip/sealed/v1/route"
_U64_MAX = 2**64 - 1
_BLOB_HEADER = 1 + NONCE_BYTES  # version byte, nonce
BLOB_OVERHEAD = _BLOB_HEADER + TAG_BYTES  # around the sealed plaintext
# The serialised model: u32 array count, then per array: u8 dtype length, dtype (numpy's
# `dtype.str`, e.g. "<f4"), u8 ndim, ndim x u64 shape, raw C-order bytes. Only these dtypes
# are sealed, so nothing needs pickle and a parsed header can only name plain numbers.
_DTYPES = frozenset(
    np.dtype(f"{order}{code}").str
    for order in "<>"
    for code in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
) | {np.dtype(bool).str}
_MAX_NDIM = 32


class SealError(ValueError):
    """A model could not be sealed or opened: one line saying what failed, no secrets."""


@dataclass(frozen=True)
class Route:
    """The context a sealed model is bound to: which run, round, step, sender and receiver.

    Ids are non-negative ints below 2^64: Flower's run and node ids are unsigned 64-bit.
    `sender`/`receiver` are node ids (`Context.node_id`), or partition ids if both sides
    use those; `step` counts the gossip steps within a round.
    """

    run_id: int
    server_round: int
    step: int
    sender: int
    receiver: int

    def __post_init__(self) -> None:
        """Refuse ids that the fixed-width associated data could not encode."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                raise SealError(f"route {f.name} must be an int, got {value!r}")
            try:
                value = operator.index(value)
            except TypeError:
                raise SealError(f"route {f.name} must be an int, got {value!r}") from None
            if not 0 <= value <= _U64_MAX:
                raise SealError(f"route {f.name} must be in [0, 2^64 - 1], got {value}")
            object.__setattr__(self, f.name, value)
        if self.sender == self.receiver:
            raise SealError(f"route sender and receiver are the same node ({self.sender})")

    def associated_data(self) -> bytes:
        """Fixed-width big-endian encoding under a versioned label: unambiguous."""
        return (
            struct.pack(">H", len(_AAD_LABEL))
            + _AAD_LABEL
            + struct.pack(
                ">BQQQQQ",
                VERSION,
                self.run_id,
                self.server_round,
                self.step,
                self.sender,
                self.receiver,
            )
        )

    def describe(self) -> str:
        """The route in words, for error lines (nothing in it is secret)."""
        return (
            f"node {self.sender} -> node {self.receiver} "
            f"(run {self.run_id}, round {self.server_round}, step {self.step})"
        )


class NodeKeys:
    """A node's X25519 key pair for one run, made inside the node; the private half stays."""

    __slots__ = ("_private", "_public")

    def __init__(self, private: X25519PrivateKey) -> None:
        """Wrap an existing private key (use `generate` or `from_private` instead)."""
        self._private = private
        self._public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> NodeKeys:
        """A fresh pair from the OS's randomness (OpenSSL's CSPRNG)."""
        return cls(X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The 32-byte public key, the only part that leaves the node."""
        return self._public

    def export_private(self) -> bytes:
        """The raw 32-byte private key, ONLY for the node's own `context.state`.

        Unavoidable where a ClientApp runs in a fresh process per message (flwr 1.42's
        `--isolation process`): `context.state` is the one place that outlives a round, and
        the SuperNode keeps it locally (it never reaches the SuperLink). Never put it in a
        message, a log or a results file.
        """
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def from_private(cls, raw: bytes) -> NodeKeys:
        """Restore what `export_private` wrote into the node's own state."""
        try:
            return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))
        except (TypeError, ValueError):
            raise SealError(f"a stored private key must be 32 bytes, got {len(raw)}") from None

    def pairwise_key(self, peer_public: bytes, run_id: int) -> bytes:
        """The 256-bit key this node shares with the holder of `peer_public` in one run.

        HKDF-SHA256 over the X25519 shared secret; its info holds a label, the run id and
        both public keys in sorted order, so both ends derive the same key and a key of one
        run or pair is unrelated to any other. Both directions of a pair share it: the
        route in the associated data tells them apart.
        """
        peer = _public_key(peer_public)
        try:
            secret = self._private.exchange(peer)
        except ValueError:
            # OpenSSL refuses an all-zero shared secret (a low-order public key).
            raise SealError("key agreement failed: the peer public key is degenerate") from None
        low, high = sorted((self._public, bytes(peer_public)))
        info = _KDF_LABEL + struct.pack(">BQ", VERSION, _check_run_id(run_id)) + low + high
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)

    def __repr__(self) -> str:
        """Show the public key only."""
        return f"NodeKeys(public={self._public.hex()[:16]}...)"

    def __reduce__(self) -> tuple:
        """Refuse pickling: a key pair moves only through `export_private`, on purpose."""
        raise TypeError("NodeKeys cannot be pickled; see NodeKeys.export_private")


def seal(
    model: Sequence[np.ndarray], route: Route, sender_keys: NodeKeys, receiver_public: bytes
) -> bytes:
    """Encrypt and authenticate `model` for the receiver only, bound to `route`.

    Blob: version byte, 96-bit nonce, ChaCha20-Poly1305 ciphertext and tag. The nonce is
    random (`os.urandom`) rather than derived from the route: a route sealed twice (a retried
    step, a re-run round) with a derived nonce would reuse a nonce under the same key, which
    for ChaCha20-Poly1305 leaks the XOR of the plaintexts and lets Poly1305 be forged. A
    pairwise key seals at most 2 x rounds x gossip steps messages (hundreds), so the chance
    that two random 96-bit nonces collide is below q^2 / 2^97, about 1e-25.
    """
    plaintext = serialise(model)
    key = sender_keys.pairwise_key(receiver_public, route.run_id)
    nonce = os.urandom(NONCE_BYTES)
    body = ChaCha20Poly1305(key).encrypt(nonce, plaintext, route.associated_data())
    return bytes([VERSION]) + nonce + body


def open_sealed(
    blob: bytes, route: Route, receiver_keys: NodeKeys, sender_public: bytes
) -> list[np.ndarray]:
    """The model inside `blob`, if it was sealed by `sender_public`'s holder for this route."""
    blob = bytes(blob)
    if len(blob) < BLOB_OVERHEAD:
        raise SealError(
            f"sealed model {route.describe()} is truncated: {len(blob)} bytes, "
            f"at least {BLOB_OVERHEAD} expected"
        )
    if blob[0] != VERSION:
        raise SealError(
            f"sealed model {route.describe()} has format version {blob[0]}, expected {VERSION}"
        )
    key = receiver_keys.pairwise_key(sender_public, route.run_id)
    nonce, body = blob[1:_BLOB_HEADER], blob[_BLOB_HEADER:]
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, body, route.associated_data())
    except InvalidTag:
        raise SealError(
            f"sealed model {route.describe()} failed authentication: tampered, truncated, "
            "meant for another route, or sealed under another key"
        ) from None
    try:
        return parse(plaintext)
    except SealError as err:
        raise SealError(f"sealed model {route.describe()} opened but {err}") from None


def serialise(model: Sequence[np.ndarray]) -> bytes:
    """Arrays as dtype, shape and raw bytes (no pickle): the plaintext `seal` encrypts."""
    if isinstance(model, np.ndarray):
        raise SealError("model must be a list of numpy arrays, got one numpy array")
    parts = [struct.pack(">I", len(model))]
    for i, array in enumerate(model):
        if not isinstance(array, np.ndarray):
            raise SealError(f"model entry {i} is a {type(array).__name__}, not a numpy array")
        dtype = array.dtype.str
        if dtype not in _DTYPES:
            raise SealError(
                f"model entry {i} has dtype {array.dtype}: only plain numeric arrays are "
                "sealed (no pickle)"
            )
        if array.ndim > _MAX_NDIM:
            raise SealError(f"model entry {i} has {array.ndim} dimensions, at most {_MAX_NDIM}")
        name = dtype.encode("ascii")
        parts.append(struct.pack(">B", len(name)) + name + struct.pack(">B", array.ndim))
        parts.append(struct.pack(f">{array.ndim}Q", *array.shape))
        parts.append(array.tobytes(order="C"))
    return b"".join(parts)


def parse(plaintext: bytes) -> list[np.ndarray]:
    """Inverse of `serialise`; refuses any header it did not write. Arrays are writable."""
    data = bytearray(plaintext)  # one copy, so the arrays below are writable
    size, pos = len(data), 0

    def need(n: int, i: int, what: str) -> None:
        if n > size - pos:
            where = "the array count" if i < 0 else f"array {i}'s {what}"
            raise SealError(f"its payload is malformed: {where} runs past the end")

    need(4, -1, "")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    model = []
    for i in range(count):
        need(1, i, "dtype length")
        name_len = data[pos]
        need(1 + name_len + 1, i, "dtype")
        dtype = data[pos + 1 : pos + 1 + name_len].decode("ascii", errors="replace")
        if dtype not in _DTYPES:
            raise SealError(f"its payload is malformed: array {i} has dtype {dtype!r}")
        pos += 1 + name_len
        ndim = data[pos]
        if ndim > _MAX_NDIM:
            raise SealError(f"its payload is malformed: array {i} has {ndim} dimensions")
        pos += 1
        need(8 * ndim, i, "shape")
        shape = struct.unpack_from(f">{ndim}Q", data, pos)
        pos += 8 * ndim
        kind = np.dtype(dtype)
        count_items = 1
        for n in shape:
            count_items *= n  # Python ints: no overflow; `need` bounds it by what is there
        need(count_items * kind.itemsize, i, "data")
        try:  # numpy refuses a dimension beyond its index type, even beside a zero
            model.append(np.frombuffer(data, kind, count_items, pos).reshape(shape))
        except ValueError:
            raise SealError(f"its payload is malformed: array {i} has shape {shape}") from None
        pos += count_items * kind.itemsize
    if pos != size:
        raise SealError(f"its payload is malformed: {size - pos} trailing bytes")
    return model


def sealed_size(model: Sequence[np.ndarray]) -> int:
    """Bytes of `seal(model, ...)`: the model's bytes plus a fixed overhead per array."""
    header = 4 + sum(2 + len(a.dtype.str) + 8 * a.ndim for a in model)
    return BLOB_OVERHEAD + header + sum(a.nbytes for a in model)


def _check_run_id(run_id: int) -> int:
    """`run_id` checked like a Route field, for the key derivation."""
    try:
        value = operator.index(run_id)
    except TypeError:
        raise SealError(f"run id must be an int, got {run_id!r}") from None
    if isinstance(run_id, bool) or not 0 <= value <= _U64_MAX:
        raise SealError(f"run id must be in [0, 2^64 - 1], got {run_id!r}")
    return value


def _public_key(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from its 32 raw bytes, or a SealError."""
    if not isinstance(raw, bytes | bytearray) or len(raw) != PUBLIC_KEY_BYTES:
        size = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
        raise SealError(f"a public key must be {PUBLIC_KEY_BYTES} bytes, got {size}")
    return X25519PublicKey.from_public_bytes(bytes(raw))
