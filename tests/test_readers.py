# -*- coding: utf-8 -*-
"""The read-only qemu-ga requests at their bounds, over fixture files.

tests/test_qemu_ga.py compares the replies with the real qemu-ga's; here
the files they read are made to order: utmp records, a /sys tree.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import os
import shutil
import struct
import tempfile

import pytest

import negotiator

#: glibc's utmp record on x86_64 and i386 (see tests/test_qemu_ga.py).
UTMP = struct.Struct('=h2xi32s4s32s256shhiii16s20x')


def utmp_record(kind, user, seconds, microseconds=0):
    return UTMP.pack(kind, 1, b'pts/0', b'ts/0', user, b'', 0, 0, 0,
                     seconds, microseconds, b'')


@pytest.fixture
def scratch():
    path = tempfile.mkdtemp(prefix='negr', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write(path, data):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


def users_of(scratch, monkeypatch, data):
    monkeypatch.setattr(negotiator, 'UTMP_PATH',
                        write(os.path.join(scratch, 'utmp'), data))
    return negotiator.logged_in_users()


def test_utmp_missing_means_nobody(scratch, monkeypatch):
    monkeypatch.setattr(negotiator, 'UTMP_PATH', os.path.join(scratch, 'no'))
    assert negotiator.logged_in_users() == []


@pytest.mark.parametrize('size', [0, 1, 383])
def test_utmp_shorter_than_a_record_means_nobody(scratch, monkeypatch, size):
    data = utmp_record(7, b'alice', 1700000000)[:size]
    assert users_of(scratch, monkeypatch, data) == []


def test_utmp_user_names_are_wire_text(scratch, monkeypatch):
    """A name's bytes that are not UTF-8 arrive as U+DC80..U+DCFF; a name
    filling all 32 bytes (no NUL) ends there; the records' login times
    keep their microseconds and their sign (32-bit seconds)."""
    users = users_of(scratch, monkeypatch, b''.join([
        utmp_record(7, b'caf\xc3\xa9\xff', 1700000000, 1),
        utmp_record(7, b'x' * 32, -5, 500000),
        utmp_record(7, b'caf\xc3\xa9\xff', 1600000000, 2)]))
    assert users == [
        {'user': u'caf\u00e9\udcff', 'login-time': 1600000000.000002},
        {'user': u'x' * 32, 'login-time': -4.5}]
    assert negotiator.wire_bytes(users[0]['user']) == b'caf\xc3\xa9\xff'
