# -*- coding: utf-8 -*-
"""The read-only qemu-ga requests at their bounds, over fixture files.

tests/test_qemu_ga.py compares the replies with the real qemu-ga's; here
the files they read are made to order: utmp records, a /sys tree.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import errno
import os
import shutil
import struct
import tempfile

import pytest

import negotiator
from helpers import make_block_devices, serving_here, write

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
    with serving_here() as ask:
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
    with serving_here() as ask:
        assert ask({'execute': 'guest-get-vcpus'}) == {'error': {
            'class': 'GenericError', 'desc': 'pread("{0}/cpu3//online"): '
            'unexpected EOF'.format(cpus)}}
        shutil.rmtree(cpus)
        assert ask({'execute': 'guest-get-vcpus'}) == {'error': {
            'class': 'GenericError', 'desc': 'failed to list entries: {0}: '
            'No such file or directory'.format(cpus)}}


def test_set_vcpus_writes_only_changes(cpus):
    with serving_here() as ask:
        assert ask(set_vcpus((1, False), (2, True), (0, True))) == {
            'return': 3}
        assert (online_file(cpus, 1), online_file(cpus, 2)) == (
            b'0\n', b'1\n')
        assert ask(set_vcpus((1, False))) == {'return': 1}
        assert online_file(cpus, 1) == b'0\n'


def test_set_vcpus_stops_at_the_first_failure(cpus):
    """Its error is the reply only when it is the first processor's."""
    with serving_here() as ask:
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
    with serving_here() as ask:
        assert ask(set_vcpus((1, True))) == {'error': {
            'class': 'GenericError',
            'desc': 'child process has terminated abnormally: killed after 0.3 '
                    'seconds'}}
        assert ask({'execute': 'guest-ping'}) == {'return': {}}
        assert ask(set_vcpus((2, True))) == {'return': 1}


# ---------------------------------------------------------------------------
# guest-get-fsinfo and guest-get-disks over make_block_devices()'s /sys
# and udev database, and a mountinfo of their filesystems.

MOUNTINFO = b'''\
21 1 252:1 / ROOT rw,relatime - ext4 /dev/vda1 rw
22 21 8:16 / /mnt/ide rw shared:1 - ext4 /dev/sdb rw
23 21 8:0 / /mnt/sata rw - xfs /dev/sda rw
24 21 0:5 / /proc rw - proc proc rw
25 21 8:32 / /mnt/scsi rw - ext4 /dev/sdc rw
26 21 253:0 / /mnt/a\\040b\xff rw - ext4 /dev/mapper/vg-root rw
27 21 9:9 / /mnt/gone rw - ext4 /dev/nothing rw
'''


@pytest.fixture
def machine(scratch, monkeypatch):
    """make_block_devices()'s /sys and udev database, and a mountinfo:
    the root filesystem (on a partition of the virtio-blk disk) is mounted
    on a directory that exists."""
    sys, udev = make_block_devices(scratch)
    root = os.path.join(scratch, 'root')
    os.mkdir(root)
    mountinfo = write(os.path.join(scratch, 'mountinfo'),
                      MOUNTINFO.replace(b'ROOT', root.encode('ascii')))
    monkeypatch.setattr(negotiator, 'SYS', sys)
    monkeypatch.setattr(negotiator, 'UDEV_DATA', udev)
    monkeypatch.setattr(negotiator, 'MOUNTINFO_PATH', mountinfo)
    return root


def address(pci, bus_type, dev, **more):
    """A disk's address; ``pci``: its controller's domain, bus, slot and
    function; ``more``: other members than the defaults."""
    disk = {'pci-controller': dict(zip(('domain', 'bus', 'slot', 'function'),
                                       pci)),
            'bus-type': bus_type, 'bus': 0, 'target': 0, 'unit': 0,
            'dev': dev}
    disk.update(more)
    return disk


VDA1 = address((0, 1, 0, 0), 'virtio', '/dev/vda1', serial='SER0')


def test_fsinfo_of_each_kind_of_disk(machine):
    found = negotiator.filesystems()
    usage = os.statvfs(machine)
    root = found.pop()
    assert root.pop('total-bytes') == usage.f_frsize * (
        usage.f_blocks - usage.f_bfree + usage.f_bavail)
    assert root.pop('used-bytes') >= 0
    assert root == {'name': 'vda1', 'mountpoint': machine, 'type': 'ext4',
                    'disk': [VDA1]}
    assert found == [  # the last mounted first; no statvfs() of these
        {'name': '9:9', 'mountpoint': '/mnt/gone', 'type': 'ext4',
         'disk': []},
        {'name': 'dm-0', 'mountpoint': u'/mnt/a b\udcff', 'type': 'ext4',
         'disk': [VDA1]},
        {'name': 'sdc', 'mountpoint': '/mnt/scsi', 'type': 'ext4',
         'disk': [address((0, 0, 5, 0), 'scsi', '/dev/sdc', unit=4)]},
        {'name': 'sda', 'mountpoint': '/mnt/sata', 'type': 'xfs',
         'disk': [address((0, 0, 31, 2), 'sata', '/dev/sda', unit=1)]},
        {'name': 'sdb', 'mountpoint': '/mnt/ide', 'type': 'ext4',
         'disk': [address((0, 0, 1, 1), 'ide', '/dev/sdb', unit=1, bus=1)]}]


def test_fsinfo_is_answered_from_a_child(machine):
    with serving_here() as ask:
        reply = ask({'execute': 'guest-get-fsinfo', 'id': 5})
    assert reply['id'] == 5
    assert [fs['name'] for fs in reply['return']] == [
        '9:9', 'dm-0', 'sdc', 'sda', 'sdb', 'vda1']
    assert reply['return'][1]['mountpoint'] == u'/mnt/a b\udcff'


def test_disks_with_partitions_and_dependencies(machine):
    found = negotiator.disks()
    names = [disk['name'] for disk in found]
    assert names.index('/dev/vda1') == names.index('/dev/vda') - 1
    assert sorted(names) == ['/dev/dm-0', '/dev/sda', '/dev/sdb',
                             '/dev/sdc', '/dev/vda', '/dev/vda1']
    by_name = dict((disk['name'], disk) for disk in found)
    assert by_name['/dev/vda1'] == {'name': '/dev/vda1', 'partition': True,
                                    'dependencies': ['/dev/vda']}
    assert by_name['/dev/vda'] == {
        'name': '/dev/vda', 'partition': False, 'dependencies': [],
        'address': address((0, 1, 0, 0), 'virtio', '/dev/vda',
                           serial='SER0')}
    assert by_name['/dev/dm-0'] == {
        'name': '/dev/dm-0', 'partition': False, 'alias': 'vg-root',
        'dependencies': ['/dev/vda1']}
    assert by_name['/dev/sdb']['address'] == address(
        (0, 0, 1, 1), 'ide', '/dev/sdb', unit=1, bus=1)


def test_a_child_abandoned_by_its_client_stays_silent(cpus, monkeypatch):
    """A 0xFF drops the request whose child hangs (killing it); its
    timeout, when it comes, answers nothing: the next request's reply is
    its own."""
    monkeypatch.setattr(negotiator, 'CHILD_ANSWER_TIMEOUT', 0.3)
    os.remove(os.path.join(cpus, 'cpu1', 'online'))
    os.mkfifo(os.path.join(cpus, 'cpu1', 'online'))
    with serving_here() as ask:
        ask.send(set_vcpus((1, True)))
        ask.send(b'\xff')
        assert ask({'execute': 'guest-ping', 'id': 1}) == {
            'return': {}, 'id': 1}
        ask.wait(0.5)
        assert ask({'execute': 'guest-ping', 'id': 2}) == {
            'return': {}, 'id': 2}


def test_a_child_that_fails_gets_an_error_reply(machine, monkeypatch):
    """A fault of ours in the child (not a RequestError) is answered with
    an error that says what it was; the agent answers on."""
    def broken():
        raise ValueError('broken')
    monkeypatch.setattr(negotiator, 'filesystems', broken)
    with serving_here() as ask:
        assert ask({'execute': 'guest-get-fsinfo'}) == {'error': {
            'class': 'GenericError', 'desc': 'child process has failed to '
            'list filesystems: ValueError: broken'}}
        assert ask({'execute': 'guest-ping'}) == {'return': {}}


def test_no_child_to_answer_in(machine, monkeypatch):
    """Out of processes (or pipes): an error reply, and the agent answers
    on."""
    def no_fork():
        raise OSError(errno.EAGAIN, 'no process')
    monkeypatch.setattr(os, 'fork', no_fork)
    with serving_here() as ask:
        assert ask({'execute': 'guest-get-fsinfo'}) == {'error': {
            'class': 'GenericError', 'desc': 'failed to create child '
            'process: Resource temporarily unavailable'}}
        assert ask({'execute': 'guest-ping'}) == {'return': {}}
