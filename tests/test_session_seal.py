"""The cluster key: AEAD-sealed values with key ids, rotation, tamper = miss."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from ftpcluster.cluster.session_seal import HEADER, SealError, derive, generate_key_file, load_sealer, parse_key_file

from .support_server import cli


def test_seal_open_and_tamper(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    sealer = load_sealer(key)
    box = sealer.seal(b"master secret", aad=b"sid")
    assert sealer.open(box, aad=b"sid") == b"master secret"
    assert sealer.open(box, aad=b"other") is None
    for i in (0, 5, 20, len(box) - 1):
        bad = bytearray(box)
        bad[i] ^= 1
        assert sealer.open(bytes(bad), aad=b"sid") is None
    assert sealer.open(box[:-1], aad=b"sid") is None
    assert sealer.open(b"", aad=b"sid") is None


def test_rotation_old_values_still_open(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    old = load_sealer(key)
    box = old.seal(b"v")
    generate_key_file(key)  # rotate: new current key, the old one kept
    new = load_sealer(key)
    assert new.current.key_id != old.current.key_id
    assert new.open(box) == b"v"
    assert old.open(new.seal(b"w")) is None  # a host without the new key: a miss
    for _ in range(3):
        generate_key_file(key)
    assert load_sealer(key).open(box) is None  # dropped after keep_old rotations


def test_other_cluster_cannot_open(tmp_path):
    generate_key_file(tmp_path / "a")
    generate_key_file(tmp_path / "b")
    assert load_sealer(tmp_path / "b").open(load_sealer(tmp_path / "a").seal(b"x")) is None


def test_derive_is_deterministic_and_separated():
    s = b"s" * 32
    assert derive(s, "tickets", 7, 80) == derive(s, "tickets", 7, 80)
    assert derive(s, "tickets", 7, 80) != derive(s, "tickets", 8, 80)
    assert derive(s, "tickets", 7, 32) != derive(s, "seal", 7, 32)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "1 abcd\n", "x " + "00" * 32, "1 " + "zz" * 32, "1 " + "00" * 32 + " extra"])
def test_malformed_key_files(text):
    with pytest.raises(SealError):
        parse_key_file(text)


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(SealError, match="cannot read"):
        load_sealer(tmp_path / "nope")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_forged_blobs_never_open(blob):
    """Random bytes (with our magic and key id in front, or not) are never a value:
    open() answers None, never raises and never returns plaintext."""
    sealer = load_sealer_fixture()
    assert sealer.open(blob) is None
    head = sealer.seal(b"")[:HEADER.size]
    assert sealer.open(head + blob) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=20), st.data())
def test_any_flipped_bit_is_a_miss(plain, aad, data):
    sealer = load_sealer_fixture()
    box = sealer.seal(plain, aad=aad)
    assert sealer.open(box, aad=aad) == plain
    i = data.draw(st.integers(0, len(box) - 1))
    bad = bytearray(box)
    bad[i] ^= 1 << data.draw(st.integers(0, 7))
    assert sealer.open(bytes(bad), aad=aad) is None


_SEALER = None


def load_sealer_fixture():
    global _SEALER
    if _SEALER is None:
        from ftpcluster.cluster.session_seal import Secret, Sealer

        _SEALER = Sealer([Secret(1, os.urandom(32))])
    return _SEALER


def test_key_generate_command(tmp_path):
    out = tmp_path / "session.key"
    r = cli("key", "generate", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(parse_key_file(out.read_text())) == 1
