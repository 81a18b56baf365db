# -*- coding: utf-8 -*-
"""The read-only qemu-ga requests at their bounds, over fixture files.

tests/test_qemu_ga.py compares the replies with the real qemu-ga's; here
the files they read are made to order: utmp records, a /sys tree.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import time

import pytest

import negotiator
from helpers import HANG

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


# ---------------------------------------------------------------------------
# guest-get-vcpus and guest-set-vcpus over a fake /sys/devices/system/cpu,
# through an agent's Server in this process.

@contextlib.contextmanager
def serving():
    """A Server on one end of a socketpair; yields ask(message) -> reply."""
    loop = negotiator.Loop()
    children = negotiator.Children()
    loop.on_signal(signal.SIGCHLD, children.check)
    ours, theirs = socket.socketpair()
    negotiator.set_nonblocking(ours.fileno())
    server = negotiator.Server(loop, ours.fileno(), 'test',
                               negotiator.CommandSet('/nonexistent', {}),
                               children)
    received = []

    def ask(message):
        theirs.sendall(json.dumps(message).encode('ascii') + b'\n')
        deadline = time.time() + HANG
        while b'\n' not in b''.join(received):
            assert time.time() < deadline, 'no reply'
            loop.call_later(0.01, lambda: None)
            loop.run_once()
            try:
                received.append(theirs.recv(65536))
            except socket.error as e:
                assert e.errno == errno.EAGAIN
        line, rest = b''.join(received).split(b'\n', 1)
        received[:] = [rest]
        return json.loads(line.decode('ascii'))
    theirs.setblocking(False)
    try:
        yield ask
    finally:
        server.close()
        children.close()
        loop.close()
        ours.close()
        theirs.close()


@pytest.fixture
def cpus(scratch, monkeypatch):
    """cpu0 without an online file (it cannot go offline), cpu1 online,
    cpu2 offline, cpu3 with an empty online file; cpufreq and cpuidle are
    no processors."""
    root = os.path.join(scratch, 'cpu')
    for name in ('cpu0', 'cpufreq', 'cpuidle'):
        os.makedirs(os.path.join(root, name))
    write(os.path.join(root, 'cpu1', 'online'), b'1\n')
    write(os.path.join(root, 'cpu2', 'online'), b'0\n')
    write(os.path.join(root, 'cpu3', 'online'), b'')
    write(os.path.join(root, 'online'), b'0-1\n')
    monkeypatch.setattr(negotiator, 'SYS_CPU', root)
    return root


def online_file(root, number):
    with open(os.path.join(root, 'cpu{0}'.format(number), 'online'),
              'rb') as handle:
        return handle.read()


def set_vcpus(*vcpus):
    return {'execute': 'guest-set-vcpus', 'arguments': {'vcpus': [
        {'logical-id': number, 'online': online} for number, online in vcpus]}}


def test_get_vcpus_reads_online_files(cpus):
    os.remove(os.path.join(cpus, 'cpu3', 'online'))
    with serving() as ask:
        reply = ask({'execute': 'guest-get-vcpus'})
    assert sorted(reply['return'], key=lambda v: v['logical-id']) == [
        {'logical-id': 0, 'online': True, 'can-offline': False},
        {'logical-id': 1, 'online': True, 'can-offline': True},
        {'logical-id': 2, 'online': False, 'can-offline': True},
        {'logical-id': 3, 'online': True, 'can-offline': False}]
    assert [v['logical-id'] for v in reply['return']] == [
        int(name[3:]) for name in os.listdir(cpus)
        if name[3:].isdigit()]  # the directory's order, as qemu-ga's


def test_get_vcpus_errors(cpus):
    with serving() as ask:
        assert ask({'execute': 'guest-get-vcpus'}) == {'error': {
            'class': 'GenericError', 'desc': 'pread("{0}/cpu3//online"): '
            'unexpected EOF'.format(cpus)}}
        shutil.rmtree(cpus)
        assert ask({'execute': 'guest-get-vcpus'}) == {'error': {
            'class': 'GenericError', 'desc': 'failed to list entries: {0}: '
            'No such file or directory'.format(cpus)}}


def test_set_vcpus_writes_only_changes(cpus):
    with serving() as ask:
        assert ask(set_vcpus((1, False), (2, True), (0, True))) == {
            'return': 3}
        assert (online_file(cpus, 1), online_file(cpus, 2)) == (
            b'0\n', b'1\n')
        assert ask(set_vcpus((1, False))) == {'return': 1}
        assert online_file(cpus, 1) == b'0\n'


def test_set_vcpus_stops_at_the_first_failure(cpus):
    """Its error is the reply only when it is the first processor's."""
    with serving() as ask:
        assert ask(set_vcpus((1, False), (0, False), (2, True))) == {
            'return': 1}
        assert (online_file(cpus, 1), online_file(cpus, 2)) == (
            b'0\n', b'0\n')
        assert ask(set_vcpus((0, False), (1, True))) == {'error': {
            'class': 'GenericError',
            'desc': "logical processor #0 can't be offlined"}}
        assert ask(set_vcpus((-7, True))) == {'error': {
            'class': 'GenericError', 'desc': 'open("{0}/cpu-7/"): No such '
            'file or directory'.format(cpus)}}
        assert ask(set_vcpus((3, True))) == {'error': {
            'class': 'GenericError', 'desc': 'pread("{0}/cpu3//online"): '
            'unexpected EOF'.format(cpus)}}
        assert online_file(cpus, 1) == b'0\n'


def test_a_child_that_hangs_is_abandoned(cpus, monkeypatch):
    """set-vcpus runs in a child: an online file that blocks (a FIFO here,
    a hung device in life) holds up only the child, abandoned after
    CHILD_ANSWER_TIMEOUT with an error reply; the agent answers on."""
    monkeypatch.setattr(negotiator, 'CHILD_ANSWER_TIMEOUT', 0.3)
    os.remove(os.path.join(cpus, 'cpu1', 'online'))
    os.mkfifo(os.path.join(cpus, 'cpu1', 'online'))
    with serving() as ask:
        assert ask(set_vcpus((1, True))) == {'error': {
            'class': 'GenericError',
            'desc': 'No answer within 0.3 seconds: the work was abandoned'}}
        assert ask({'execute': 'guest-ping'}) == {'return': {}}
        assert ask(set_vcpus((2, True))) == {'return': 1}
