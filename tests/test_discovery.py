# -*- coding: utf-8 -*-
"""How the host finds guests: virsh's list and dumpxml, libvirt's channel
directory, and the host CLI's GUEST names and --list-guests.

virsh runs against its test driver (``test:///ABS/node.xml``), which needs
no daemon and shows every domain of the node XML as running.  The node XML
is written at test time; its channels point to real UNIX sockets: one
agent (``guest --listen``) serves the module, the other sockets are bound
and closed again, so the file is a socket that refuses connections (a
guest whose agent is not running).

Tests that need virsh are skipped only when /usr/bin/virsh is missing.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from xml.sax.saxutils import escape

import pytest

import negotiator
from helpers import (HANG, GuestProcess, Workdir, b, cli, connectable,
                     fill_backlog, make_command, wait_for)

VIRSH = '/usr/bin/virsh'
needs_virsh = pytest.mark.skipif(
    not os.path.exists(VIRSH),
    reason='virsh not installed (Debian: apt-get install libvirt-clients)')

HTG = 'negotiator-host-to-guest.0'
GTH = 'negotiator-guest-to-host.0'
LEGACY = 'negotiator-channel.0'
QGA = 'org.qemu.guest_agent.0'
DEFAULT_CHANNEL_DIR = '/var/lib/libvirt/qemu/channel/target'

WEIRD = 'we"ird\\name'
GREET = (
    "#!/bin/sh\n"
    "printf 'hello %s\\n' \"$1\"\n"
    "printf 'warn %s\\n' \"$NEGOTIATOR_COMMAND\" >&2\n"
    "exit 7\n")
#: Python 3.6 and 3.7 put the program into strerror; others do not.
VIRSH_MISSING = ('cannot run virsh: No such file or directory',
                 "cannot run virsh: No such file or directory: 'virsh'")
REFUSED = ('cannot connect to {0}: connection refused: nothing serves this '
           'socket (the guest is stopped?)')


# ---------------------------------------------------------------------------
# Helpers: sockets, node XML, virsh
# ---------------------------------------------------------------------------

def dead_socket(path):
    """A UNIX socket file nothing listens on (connecting is refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    finally:
        sock.close()
    assert negotiator.is_socket(path)
    return path


def regular_file(path):
    with open(path, 'w') as handle:
        handle.write('not a socket\n')
    return path


def channel(path, name, kind='unix', mode='bind'):
    """A <channel> element: ``kind`` 'pty' has no source."""
    source = ''
    if kind == 'unix':
        source = "<source mode='{0}' path='{1}'/>".format(
            mode, escape(path, {"'": '&apos;'}))
    return ("<channel type='{0}'>{1}<target type='virtio' name='{2}'/>"
            "</channel>".format(kind, source, name))


def domain(name, channels=(), extra=''):
    return (u"  <domain type='test'>\n"
            "    <name>{0}</name>\n"
            "    <memory>65536</memory>\n"
            "    <os><type>hvm</type></os>\n{1}"
            "    <devices>{2}</devices>\n"
            "  </domain>\n".format(escape(name), extra, ''.join(channels)))


def write_node(path, domains):
    """Write a test driver node XML; returns virsh's URI for it."""
    with open(path, 'wb') as handle:
        handle.write(b('<node>\n' + ''.join(domains) + '</node>\n'))
    return 'test://' + path


def virsh(uri, command):
    """Run /usr/bin/virsh as Discovery does: ``(status, out, err)``."""
    env = dict(os.environ)
    env['LC_ALL'] = 'C'
    with open(os.devnull, 'rb') as devnull:
        child = subprocess.Popen([VIRSH, '--connect', uri, command], env=env,
                                 stdin=devnull, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, close_fds=True)
        out, err = child.communicate()
    return (child.returncode, out.decode('utf-8', 'replace'),
            err.decode('utf-8', 'replace'))


def env_without_virsh(directory):
    """The environment with PATH holding only an empty directory."""
    empty = os.path.join(directory, 'empty-path')
    if not os.path.isdir(empty):
        os.mkdir(empty)
    env = dict(os.environ)
    env['PATH'] = empty
    return env


def negotiator_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == 'negotiator' and
            record.levelno == logging.WARNING]


class PathAgent(GuestProcess):
    """``guest --listen PATH`` at a path of the test's choosing."""

    def __init__(self, workdir, path):
        self.socket = path
        GuestProcess.__init__(self, workdir, ['--listen', path, '-v'])
        wait_for(lambda: self.process.poll() is not None or
                 connectable(path))
        if self.process.poll() is not None:
            raise AssertionError('agent did not start:\n' + self.log())


class World(object):
    """The module's agent, sockets, flat channel directory and node XML."""

    def __init__(self, wd):
        self.wd = wd
        make_command(wd.commands, 'greet', GREET)
        self.flat = wd.join('flat')
        self.socks = wd.join('s')
        os.mkdir(self.flat)
        os.mkdir(self.socks)
        # The flat channel directory of older libvirt: NAME.PORT.
        self.agent_path = os.path.join(self.flat, 'web1.' + HTG)
        self.web1_gth = dead_socket(os.path.join(self.flat, 'web1.' + GTH))
        self.dead = dead_socket(os.path.join(self.flat, 'dead.' + HTG))
        self.old = dead_socket(os.path.join(self.flat, 'old.' + LEGACY))
        dead_socket(os.path.join(self.flat, 'web1.' + QGA))
        regular_file(os.path.join(self.flat, 'plain.' + HTG))
        # Sockets the node XML's other guests name.
        self.togo = dead_socket(os.path.join(self.socks, 'togo'))
        self.legacy = dead_socket(os.path.join(self.socks, 'legacy'))
        self.weird = dead_socket(os.path.join(self.socks, 'weird'))
        self.other = dead_socket(os.path.join(self.socks, 'other'))
        self.uri = write_node(wd.join('node.xml'), [
            # id 1: both our ports, and qemu-ga's (ignored).
            domain('web1', [channel(self.agent_path, HTG),
                            channel(self.web1_gth, GTH),
                            channel(self.other, QGA)]),
            # id 2: no channels at all.
            domain('bare guest'),
            # id 3: a guest whose agent is not running.
            domain('dead', [channel(self.dead, HTG)]),
            # id 4: only the guest-to-host port.
            domain('togo', [channel(self.togo, GTH)]),
            # id 5: the legacy port name.
            domain('legacy', [channel(self.legacy, LEGACY)]),
            # id 6: only other ports.
            domain('others', [channel(self.other, QGA),
                              channel(self.other, 'org.example.other.0')]),
            # id 7: QEMU connects to the socket rather than serving it.
            domain('connecting', [channel(self.other, HTG, mode='connect')]),
            # id 8: not a UNIX socket.
            domain('pty', [channel(None, HTG, kind='pty')]),
            # id 9: quotes and a backslash in the name.
            domain(WEIRD, [channel(self.weird, HTG)]),
        ])
        # Last: nothing after it can fail and leave it running.
        self.agent = PathAgent(wd, self.agent_path)

    def stop(self):
        try:
            self.agent.stop()   # exit status 0, no traceback
        finally:
            self.wd.cleanup()


@pytest.fixture(scope='module')
def world():
    wd = Workdir()
    try:
        the_world = World(wd)
    except Exception:
        wd.cleanup()
        raise
    yield the_world
    the_world.stop()


def expected_guests(world):
    """What find_guests() must say of the module's node XML."""
    return [
        ('web1', 'running', {HTG: world.agent_path, GTH: world.web1_gth}),
        ('dead', 'running', {HTG: world.dead}),
        ('togo', 'running', {GTH: world.togo}),
        ('legacy', 'running', {LEGACY: world.legacy}),
        (WEIRD, 'running', {HTG: world.weird}),
    ]


# ---------------------------------------------------------------------------
# virsh command lines
# ---------------------------------------------------------------------------

def test_virsh_argv():
    assert negotiator.virsh_argv(None, 'list') == ['virsh', 'list']
    assert negotiator.virsh_argv('', 'list') == ['virsh', 'list']
    assert negotiator.virsh_argv('test:///default', 'dumpxml --domain "a"') \
        == ['virsh', '--connect', 'test:///default', 'dumpxml --domain "a"']


@pytest.mark.parametrize('name, quoted', [
    ('web1', '"web1"'),
    ('bare guest', '"bare guest"'),
    (WEIRD, '"we\\"ird\\\\name"'),
    ('trail\\', '"trail\\\\"'),
    ('"quoted"', '"\\"quoted\\""'),
    ("x;y #z 'q' $HOME", '"x;y #z \'q\' $HOME"'),
], ids=['plain', 'space', 'quote-backslash', 'trailing-backslash',
        'quoted', 'separators'])
def test_virsh_quote(name, quoted):
    assert negotiator.virsh_quote(name) == quoted


def test_dumpxml_command():
    assert negotiator.dumpxml_command(['a']) == (
        'dumpxml --domain "a"; echo "<<negotiator>>";')
    assert negotiator.dumpxml_command(['a', 'bare guest', WEIRD]) == (
        'dumpxml --domain "a"; echo "<<negotiator>>"; '
        'dumpxml --domain "bare guest"; echo "<<negotiator>>"; '
        'dumpxml --domain "we\\"ird\\\\name"; echo "<<negotiator>>";')


# ---------------------------------------------------------------------------
# parse_virsh_list
# ---------------------------------------------------------------------------

#: virsh 9's table (the name column is as wide as the longest name).
LIST_V9 = (' Id   Name          State\n'
           '-----------------------------\n'
           ' 1    web1          running\n'
           ' 2    bare guest    running\n'
           ' 13   we"ird\\name   paused\n'
           '\n')
#: Older virsh's fixed-width table.
LIST_OLD = (' Id    Name                           State\n'
            '----------------------------------------------------\n'
            ' 1     web1                           running\n'
            ' 7     bare guest                     in shutdown\n'
            '\n')


@pytest.mark.parametrize('text, domains', [
    (LIST_V9, [('1', 'web1', 'running'), ('2', 'bare guest', 'running'),
               ('13', WEIRD, 'paused')]),
    (LIST_OLD, [('1', 'web1', 'running'),
                ('7', 'bare guest', 'in shutdown')]),
    (' Id   Name   State\n--------------------\n\n', []),
    ('', []),
    ('error: no header here\n 1 web1 running\n', []),
], ids=['virsh-9', 'old-virsh', 'empty-table', 'no-output', 'no-header'])
def test_parse_virsh_list_text(text, domains):
    assert negotiator.parse_virsh_list(text) == domains


@needs_virsh
def test_parse_virsh_list_real_output(world):
    status, out, err = virsh(world.uri, 'list')
    assert (status, err) == (0, '')
    assert negotiator.parse_virsh_list(out) == [
        ('1', 'web1', 'running'), ('2', 'bare guest', 'running'),
        ('3', 'dead', 'running'), ('4', 'togo', 'running'),
        ('5', 'legacy', 'running'), ('6', 'others', 'running'),
        ('7', 'connecting', 'running'), ('8', 'pty', 'running'),
        ('9', WEIRD, 'running')]


@needs_virsh
def test_parse_virsh_list_real_empty(workdir):
    uri = write_node(workdir.join('node.xml'), [])
    status, out, err = virsh(uri, 'list')
    assert (status, err) == (0, '')
    assert 'Name' in out
    assert negotiator.parse_virsh_list(out) == []


# ---------------------------------------------------------------------------
# parse_domains_xml
# ---------------------------------------------------------------------------

ALL_NAMES = ['web1', 'bare guest', 'dead', 'togo', 'legacy', 'others',
             'connecting', 'pty', WEIRD]


def expected_domains(world):
    return {
        'web1': ('1', {HTG: world.agent_path, GTH: world.web1_gth}),
        'bare guest': ('2', {}),
        'dead': ('3', {HTG: world.dead}),
        'togo': ('4', {GTH: world.togo}),
        'legacy': ('5', {LEGACY: world.legacy}),
        'others': ('6', {}),
        'connecting': ('7', {}),
        'pty': ('8', {}),
        WEIRD: ('9', {HTG: world.weird}),
    }


@needs_virsh
def test_parse_domains_xml_real_output_one_call(world, caplog):
    # All domains from one virsh call, as find_guests() asks.
    caplog.set_level(logging.WARNING, logger='negotiator')
    status, out, err = virsh(world.uri,
                             negotiator.dumpxml_command(ALL_NAMES))
    assert (status, err) == (0, '')
    assert out.count('</domain>') == len(ALL_NAMES)
    assert negotiator.parse_domains_xml(out) == expected_domains(world)
    assert negotiator_warnings(caplog) == []


@needs_virsh
def test_parse_domains_xml_real_output_each(world):
    expected = expected_domains(world)
    for name in ALL_NAMES:
        status, out, err = virsh(world.uri,
                                 negotiator.dumpxml_command([name]))
        assert (status, err) == (0, '')
        assert negotiator.parse_domains_xml(out) == {name: expected[name]}


GOOD = "<domain type='kvm' id='2'><name>b</name></domain>\n"
NO_PATH = ("<domain id='4'><name>np</name><devices><channel type='unix'>"
           "<source mode='bind'/><target type='virtio' name='{0}'/>"
           "</channel></devices></domain>".format(HTG))
NOT_VIRTIO = ("<domain id='5'><name>nv</name><devices><channel type='unix'>"
              "<source mode='bind' path='/x'/><target type='guestfwd' "
              "name='{0}'/></channel></devices></domain>".format(HTG))


#: What virsh echoes after each domain's XML (dumpxml_command).
SEP = '<<negotiator>>\n'


@pytest.mark.parametrize('text, domains, warnings', [
    ('', {}, 0),
    ('not xml at all\n' + SEP, {}, 1),
    ("<domain id='1'><name>a</nam></domain>\n" + SEP, {}, 1),
    ("<domain id='1'><name>a</nam></domain>\n" + SEP + GOOD + SEP,
     {'b': ('2', {})}, 1),
    (GOOD + SEP + "<domain id='3'><name>c</name><devices>\n" + SEP,
     {'b': ('2', {})}, 1),
    (SEP + GOOD + SEP, {'b': ('2', {})}, 0),
    (NO_PATH, {'np': ('4', {})}, 0),
    (NOT_VIRTIO, {'nv': ('5', {})}, 0),
], ids=['empty', 'not-xml', 'mismatched-tag', 'bad-then-good', 'truncated',
        'vanished-domain', 'no-path', 'not-virtio'])
def test_parse_domains_xml_odd_input(caplog, text, domains, warnings):
    caplog.set_level(logging.WARNING, logger='negotiator')
    assert negotiator.parse_domains_xml(text) == domains
    messages = negotiator_warnings(caplog)
    assert len(messages) == warnings, messages
    for message in messages:
        assert message.startswith("cannot parse a domain's XML from virsh: ")
        assert '\n' not in message


@needs_virsh
def test_names_round_trip_through_virsh(workdir):
    # libvirt accepts all of these names; virsh_quote() must give virsh
    # each one back exactly, in one call, and the list must cut them out.
    names = ['bare guest', WEIRD, 'trail\\', '"quoted"', 'a  b',
             "x;y #z 'q' $HOME", '\\\\"\\', '  padded name  ']
    sock = dead_socket(workdir.join('sock'))
    uri = write_node(workdir.join('node.xml'),
                     [domain(name, [channel(sock, HTG)]) for name in names])
    status, out, err = virsh(uri, negotiator.LIST_COMMAND)
    assert (status, err) == (0, '')
    assert negotiator.parse_virsh_list(out) == [
        (str(number), name, 'running')
        for number, name in enumerate(names, 1)]
    status, out, err = virsh(uri, negotiator.dumpxml_command(names))
    assert (status, err) == (0, '')
    assert negotiator.parse_domains_xml(out) == dict(
        (name, (str(number), {HTG: sock}))
        for number, name in enumerate(names, 1))
    assert negotiator.find_guests(uri) == [
        (name, 'running', {HTG: sock}) for name in names]


# ---------------------------------------------------------------------------
# scan_channel_dir and is_socket
# ---------------------------------------------------------------------------

def test_is_socket(workdir):
    assert negotiator.is_socket(dead_socket(workdir.join('sock'))) is True
    assert negotiator.is_socket(regular_file(workdir.join('file'))) is False
    assert negotiator.is_socket(workdir.path) is False
    assert negotiator.is_socket(workdir.join('missing')) is False


def test_scan_channel_dir_flat(workdir):
    d = workdir.join('channels')
    os.mkdir(d)
    web1_htg = dead_socket(os.path.join(d, 'web1.' + HTG))
    web1_gth = dead_socket(os.path.join(d, 'web1.' + GTH))
    dotted = dead_socket(os.path.join(d, 'my.web.example.' + HTG))
    old = dead_socket(os.path.join(d, 'old.' + LEGACY))
    # Not ours: other ports, a regular file, a directory, no name at all.
    dead_socket(os.path.join(d, 'web1.' + QGA))
    dead_socket(os.path.join(d, 'web2.org.example.other.0'))
    regular_file(os.path.join(d, 'plain.' + HTG))
    os.mkdir(os.path.join(d, 'subdir.' + GTH))
    dead_socket(os.path.join(d, HTG))
    assert negotiator.scan_channel_dir(d) == {
        'web1': {HTG: web1_htg, GTH: web1_gth},
        'my.web.example': {HTG: dotted},
        'old': {LEGACY: old},
    }


def test_scan_channel_dir_per_domain(workdir):
    d = workdir.join('channels')
    os.mkdir(d)

    def sockets(directory, *ports):
        path = os.path.join(d, directory)
        if not os.path.isdir(path):
            os.mkdir(path)
        return [dead_socket(os.path.join(path, port)) for port in ports]

    web1 = sockets('domain-1-web1', HTG, GTH, QGA)
    dotted = sockets('domain-3-my.web.example', GTH)
    # Two starts of one guest: the higher ID wins, whole (its ports are not
    # mixed with the older directory's), whichever order they are listed in.
    sockets('domain-9-db', HTG, GTH)
    db = sockets('domain-10-db', HTG)
    sockets('domain-2-app', GTH)
    app = sockets('domain-3-app', HTG, GTH)
    # Not ours: only other ports; a regular file; not a domain-ID-NAME name.
    sockets('domain-4-others', QGA, 'org.example.other.0')
    os.mkdir(os.path.join(d, 'domain-5-plain'))
    regular_file(os.path.join(d, 'domain-5-plain', HTG))
    sockets('domain-x-bad', HTG)
    assert negotiator.scan_channel_dir(d) == {
        'web1': {HTG: web1[0], GTH: web1[1]},
        'my.web.example': {GTH: dotted[0]},
        'db': {HTG: db[0]},
        'app': {HTG: app[0], GTH: app[1]},
    }


def test_scan_channel_dir_missing_or_not_a_directory(workdir):
    assert negotiator.scan_channel_dir(workdir.join('missing')) == {}
    assert negotiator.scan_channel_dir(
        regular_file(workdir.join('file'))) == {}
    assert negotiator.scan_channel_dir(workdir.commands) == {}


# ---------------------------------------------------------------------------
# find_guests and resolve_guest, in this process
# ---------------------------------------------------------------------------

@needs_virsh
def test_find_guests_via_virsh(world, caplog):
    """... through virsh run in a loop of its own, which leaves no
    descriptor open and SIGCHLD as it was."""
    caplog.set_level(logging.WARNING, logger='negotiator')
    descriptors = sorted(os.listdir('/proc/self/fd'))
    assert negotiator.find_guests(world.uri) == expected_guests(world)
    assert negotiator_warnings(caplog) == []
    assert sorted(os.listdir('/proc/self/fd')) == descriptors
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


@needs_virsh
def test_find_guests_dumpxml_fails(world, monkeypatch, caplog):
    """virsh lists the domains but cannot describe them: its error is the
    answer, not an empty list."""
    caplog.set_level(logging.WARNING, logger='negotiator')
    bin_dir = world.wd.join('bin')
    os.mkdir(bin_dir)
    make_command(bin_dir, 'virsh', (
        "#!/bin/sh\n"
        "case \"$*\" in *dumpxml*) echo 'error: dumpxml refused' >&2; "
        "exit 1;; esac\n"
        "exec '{0}' \"$@\"\n").format(VIRSH))
    monkeypatch.setenv('PATH', bin_dir + os.pathsep + os.environ['PATH'])
    with pytest.raises(negotiator.ConnectError) as raised:
        negotiator.find_guests(world.uri)
    assert str(raised.value) == 'error: dumpxml refused'
    monkeypatch.setattr(negotiator, 'DEFAULT_CHANNEL_DIR', world.flat)
    monkeypatch.setenv('LIBVIRT_DEFAULT_URI', world.uri)
    assert [name for name, _, _ in negotiator.find_guests()] == [
        'dead', 'old', 'web1']
    assert negotiator_warnings(caplog) == [
        'error: dumpxml refused; looking in {0} instead'.format(world.flat)]


@needs_virsh
def test_find_guests_no_running_domains(workdir):
    uri = write_node(workdir.join('node.xml'), [])
    assert negotiator.find_guests(uri) == []


def test_find_guests_via_channel_dir_does_not_ask_virsh(world, monkeypatch):
    def no_virsh(connect, only=None):
        raise AssertionError('virsh asked')
    monkeypatch.setattr(negotiator, 'ask_libvirt', no_virsh)
    assert negotiator.find_guests(None, world.flat) == [
        ('dead', '-', {HTG: world.dead}),
        ('old', '-', {LEGACY: world.old}),
        ('web1', '-', {HTG: world.agent_path, GTH: world.web1_gth}),
    ]
    assert negotiator.find_guests('test:///ignored.xml', world.flat) == \
        negotiator.find_guests(None, world.flat)


@needs_virsh
def test_find_guests_virsh_fails_scans_default_dir(world, monkeypatch,
                                                   caplog):
    caplog.set_level(logging.WARNING, logger='negotiator')
    monkeypatch.setattr(negotiator, 'DEFAULT_CHANNEL_DIR', world.flat)
    uri = 'test://' + world.wd.join('nonexistent.xml')
    _, _, err = virsh(uri, 'list')
    first = negotiator.first_line(err)
    assert first
    # With a URI given, virsh's failure is the answer: no fallback.
    with pytest.raises(negotiator.ConnectError) as raised:
        negotiator.find_guests(uri)
    assert str(raised.value) == first
    assert negotiator_warnings(caplog) == []
    # Without one, virsh's first error line, then the channel directory.
    monkeypatch.setenv('LIBVIRT_DEFAULT_URI', uri)
    assert negotiator.find_guests() == [
        ('dead', '-', {HTG: world.dead}),
        ('old', '-', {LEGACY: world.old}),
        ('web1', '-', {HTG: world.agent_path, GTH: world.web1_gth}),
    ]
    assert negotiator_warnings(caplog) == [
        '{0}; looking in {1} instead'.format(first, world.flat)]


def test_find_guests_virsh_missing_scans_default_dir(world, monkeypatch,
                                                     caplog):
    caplog.set_level(logging.WARNING, logger='negotiator')
    monkeypatch.setattr(negotiator, 'DEFAULT_CHANNEL_DIR', world.flat)
    monkeypatch.setenv('PATH', env_without_virsh(world.wd.path)['PATH'])
    assert negotiator.find_guests() == [
        ('dead', '-', {HTG: world.dead}),
        ('old', '-', {LEGACY: world.old}),
        ('web1', '-', {HTG: world.agent_path, GTH: world.web1_gth}),
    ]
    assert negotiator_warnings(caplog) in [
        ['{0}; looking in {1} instead'.format(reason, world.flat)]
        for reason in VIRSH_MISSING]


@needs_virsh
def test_resolve_guest_by_name(world):
    assert negotiator.resolve_guest('web1', world.uri) == world.agent_path
    assert negotiator.resolve_guest('legacy', world.uri) == world.legacy
    assert negotiator.resolve_guest(WEIRD, world.uri) == world.weird
    assert negotiator.resolve_guest('web1', None, world.flat) == \
        world.agent_path
    assert negotiator.resolve_guest('old', None, world.flat) == world.old


def test_resolve_guest_paths_are_not_looked_up(world, monkeypatch):
    def no_lookup(connect=None, channel_dir=None):
        raise AssertionError('guests looked up')
    monkeypatch.setattr(negotiator, 'find_guests', no_lookup)
    for path in ('./web1', '/nonexistent/sock', world.agent_path):
        assert negotiator.resolve_guest(path, world.uri) == path
    # A name without a slash that exists as a file is a path too.
    monkeypatch.chdir(world.flat)
    assert negotiator.resolve_guest('web1.' + HTG, world.uri) == \
        'web1.' + HTG


@needs_virsh
@pytest.mark.parametrize('name, message', [
    ('togo', 'guest togo has no negotiator-host-to-guest.0 channel: add it '
             'to its definition (libvirt: <channel type="unix"> with '
             '<target type="virtio" name="negotiator-host-to-guest.0"/>)'),
    ('nope', 'no running guest named nope has negotiator ports (a socket '
             'path must hold a slash: ./nope); see --list-guests'),
    ('bare guest', 'no running guest named bare guest has negotiator ports '
                   '(a socket path must hold a slash: ./bare guest); see '
                   '--list-guests'),
    ('connecting', 'no running guest named connecting has negotiator ports '
                   '(a socket path must hold a slash: ./connecting); see '
                   '--list-guests'),
], ids=['no-host-to-guest-port', 'unknown', 'no-channels', 'connect-mode'])
def test_resolve_guest_errors(world, name, message):
    with pytest.raises(negotiator.ConnectError) as caught:
        negotiator.resolve_guest(name, world.uri)
    assert str(caught.value) == message
    assert caught.value.status == 255


# ---------------------------------------------------------------------------
# The CLI: host GUEST COMMAND
# ---------------------------------------------------------------------------

@needs_virsh
def test_cli_runs_command_in_named_guest(world):
    status, out, err = cli(['host', '-n', '--connect', world.uri, 'web1',
                            'greet', 'big world'])
    assert (status, out, err) == (7, b'hello big world\n', b'warn greet\n')


@needs_virsh
def test_cli_runs_command_through_legacy_port(world):
    uri = write_node(world.wd.join('legacy-node.xml'), [
        domain('old guest', [channel(world.agent_path, LEGACY)])])
    status, out, err = cli(['host', '-n', '--connect', uri, 'old guest',
                            'greet', 'x'])
    assert (status, out, err) == (7, b'hello x\n', b'warn greet\n')


def test_cli_runs_command_in_guest_of_channel_dir(world):
    # With --channel-dir, virsh is never needed.
    status, out, err = cli(['host', '-n', '--channel-dir', world.flat,
                            'web1', 'greet', 'y'],
                           env=env_without_virsh(world.wd.path))
    assert (status, out, err) == (7, b'hello y\n', b'warn greet\n')


@needs_virsh
@pytest.mark.parametrize('name, message', [
    ('nope', 'no running guest named nope has negotiator ports (a socket '
             'path must hold a slash: ./nope); see --list-guests'),
    ('others', 'no running guest named others has negotiator ports (a '
               'socket path must hold a slash: ./others); see '
               '--list-guests'),
    ('togo', 'guest togo has no negotiator-host-to-guest.0 channel: add it '
             'to its definition (libvirt: <channel type="unix"> with '
             '<target type="virtio" name="negotiator-host-to-guest.0"/>)'),
], ids=['unknown', 'only-other-ports', 'no-host-to-guest-port'])
def test_cli_guest_errors(world, name, message):
    status, out, err = cli(['host', '-n', '--connect', world.uri, name,
                            'greet'])
    assert (status, out, err) == (255, b'', b('negotiator: ' + message +
                                               '\n'))


@needs_virsh
def test_cli_guest_without_agent(world):
    status, out, err = cli(['host', '-n', '--connect', world.uri, 'dead',
                            'greet'])
    assert (status, out, err) == (
        255, b'', b('negotiator: ' + REFUSED.format(world.dead) + '\n'))


@needs_virsh
def test_cli_guest_json_error(world):
    status, out, err = cli(['host', '-n', '--json', '--connect', world.uri,
                            'nope', 'greet'])
    message = ('no running guest named nope has negotiator ports (a socket '
               'path must hold a slash: ./nope); see --list-guests')
    assert (status, err) == (255, b('negotiator: ' + message + '\n'))
    assert json.loads(out.decode('utf-8')) == {
        'error': {'class': 'ConnectError', 'desc': message}, 'status': 255}


# ---------------------------------------------------------------------------
# The CLI: host --list-guests
# ---------------------------------------------------------------------------

HEADER_ONLY = b'NAME  STATE  PORTS  AGENT\n'


def agent_row(prefix, line):
    """The round trip in ``line``, a row ``prefix`` + 'VERSION (N ms)'."""
    version = re.escape(b(negotiator.__version__))
    match = re.match(re.escape(prefix) + version + br' \((\d+\.\d\d) ms\)$',
                     line)
    assert match, line
    return float(match.group(1))


@needs_virsh
def test_cli_list_guests_table(world):
    status, out, err = cli(['host', '--connect', world.uri, '--list-guests'])
    assert (status, err) == (0, b'')
    lines = out.split(b'\n')
    assert lines[0] == (b'NAME         STATE    PORTS' + b' ' * 50 +
                        b'AGENT')
    round_trip = agent_row(
        b'web1         running  '
        b'negotiator-guest-to-host.0,negotiator-host-to-guest.0  ',
        lines[1])
    assert 0 < round_trip < 30000
    assert lines[2:] == [
        b'dead         running  negotiator-host-to-guest.0' + b' ' * 29 +
        b'no answer',
        b'togo         running  negotiator-guest-to-host.0' + b' ' * 29 +
        b'-',
        b'legacy       running  negotiator-channel.0' + b' ' * 35 +
        b'no answer',
        b'we"ird\\name  running  negotiator-host-to-guest.0' + b' ' * 29 +
        b'no answer',
        b'']


@needs_virsh
def test_cli_list_guests_json(world):
    status, out, err = cli(['host', '--connect', world.uri, '--list-guests',
                            '--json'])
    assert (status, err) == (0, b'')
    assert out.endswith(b'\n') and out.count(b'\n') == 1
    listing = json.loads(out.decode('utf-8'))
    round_trip = listing['guests'][0]['agent'].pop('round-trip-ms')
    assert isinstance(round_trip, float) and 0 < round_trip < 30000
    assert listing == {'guests': [
        {'name': 'web1', 'state': 'running',
         'ports': {HTG: world.agent_path, GTH: world.web1_gth},
         'agent': {'version': negotiator.__version__}, 'error': None},
        {'name': 'dead', 'state': 'running', 'ports': {HTG: world.dead},
         'agent': None, 'error': REFUSED.format(world.dead)},
        {'name': 'togo', 'state': 'running', 'ports': {GTH: world.togo},
         'agent': None, 'error': None},
        {'name': 'legacy', 'state': 'running',
         'ports': {LEGACY: world.legacy},
         'agent': None, 'error': REFUSED.format(world.legacy)},
        {'name': WEIRD, 'state': 'running', 'ports': {HTG: world.weird},
         'agent': None, 'error': REFUSED.format(world.weird)},
    ]}


def test_cli_list_guests_channel_dir_flat(world):
    status, out, err = cli(['host', '--channel-dir', world.flat,
                            '--list-guests'],
                           env=env_without_virsh(world.wd.path))
    assert (status, err) == (0, b'')
    lines = out.split(b'\n')
    assert lines[0] == b'NAME  STATE  PORTS' + b' ' * 50 + b'AGENT'
    assert lines[1] == (b'dead  -      negotiator-host-to-guest.0' +
                        b' ' * 29 + b'no answer')
    assert lines[2] == (b'old   -      negotiator-channel.0' + b' ' * 35 +
                        b'no answer')
    round_trip = agent_row(
        b'web1  -      '
        b'negotiator-guest-to-host.0,negotiator-host-to-guest.0  ',
        lines[3])
    assert 0 < round_trip < 30000
    assert lines[4:] == [b'']


def test_cli_list_guests_channel_dir_empty(workdir):
    status, out, err = cli(['host', '--channel-dir', workdir.join('none'),
                            '--list-guests', '--json'])
    assert (status, out, err) == (0, b'{"guests": []}\n', b'')


@needs_virsh
def test_cli_list_guests_no_running_domains(workdir):
    uri = write_node(workdir.join('node.xml'), [])
    status, out, err = cli(['host', '--connect', uri, '--list-guests'])
    assert (status, out, err) == (0, HEADER_ONLY, b'')


def channel_dir_in_use():
    """Whether libvirt's channel directory holds guests' sockets here,
    which the fallback to it would find.  Missing, or empty (libvirtd
    installed, for tests/test_libvirt.py, but running no guest), it finds
    nothing, as the tests using it expect."""
    try:
        return bool(os.listdir(DEFAULT_CHANNEL_DIR))
    except OSError:
        return False


def test_cli_virsh_missing(world):
    # virsh not on PATH: one warning, then libvirt's channel directory,
    # where no guest runs.
    if channel_dir_in_use():
        pytest.skip(DEFAULT_CHANNEL_DIR + ' holds guests on this machine')
    env = env_without_virsh(world.wd.path)
    warnings = [b('negotiator: {0}; looking in {1} instead\n'.format(
        reason, DEFAULT_CHANNEL_DIR)) for reason in VIRSH_MISSING]
    status, out, err = cli(['host', '--list-guests'], env=env)
    assert (status, out) == (0, HEADER_ONLY)
    assert err in warnings
    status, out, err = cli(['host', '--list-guests', '--json'], env=env)
    assert (status, out) == (0, b'{"guests": []}\n')
    assert err in warnings
    status, out, err = cli(['host', '-n', 'web1', 'greet'], env=env)
    assert (status, out) == (255, b'')
    assert err in [warning + b'negotiator: no running guest named web1 has '
                   b'negotiator ports (a socket path must hold a slash: '
                   b'./web1); see --list-guests\n' for warning in warnings]


@needs_virsh
def test_cli_virsh_fails(world):
    # A URI virsh cannot open: virsh's first error line as one warning.
    if channel_dir_in_use():
        pytest.skip(DEFAULT_CHANNEL_DIR + ' holds guests on this machine')
    uri = 'test://' + world.wd.join('nonexistent.xml')
    virsh_status, _, virsh_err = virsh(uri, 'list')
    first = negotiator.first_line(virsh_err)
    assert virsh_status != 0 and first
    # With --connect, virsh's error is the answer (exit 255).
    status, out, err = cli(['host', '--connect', uri, '--list-guests'])
    assert (status, out, err) == (255, b'', b('negotiator: ' + first + '\n'))
    status, out, err = cli(['host', '-n', '--connect', uri, 'web1', 'greet'])
    assert (status, out, err) == (255, b'', b('negotiator: ' + first + '\n'))
    # Without it (libvirt's default URI), a warning and the channel
    # directory instead.
    env = dict(os.environ, LIBVIRT_DEFAULT_URI=uri)
    warning = b('negotiator: {0}; looking in {1} instead\n'.format(
        first, DEFAULT_CHANNEL_DIR))
    status, out, err = cli(['host', '--list-guests'], env=env)
    assert (status, out, err) == (0, HEADER_ONLY, warning)
    status, out, err = cli(['host', '-n', 'web1', 'greet'], env=env)
    assert (status, out) == (255, b'')
    assert err == warning + (
        b'negotiator: no running guest named web1 has negotiator ports (a '
        b'socket path must hold a slash: ./web1); see --list-guests\n')


# ---------------------------------------------------------------------------
# Names and XML beyond ASCII and beyond the usual
# ---------------------------------------------------------------------------

@needs_virsh
def test_guest_with_non_ascii_name_is_found(workdir):
    # virsh's table escapes a non-ASCII name outside UTF-8 locales
    # ('caf\xff\xff' for 'café'); the name comes from `list --name`, exact,
    # as this Python's str (UTF-8 bytes on Python 2).
    name = u'caf\xe9'
    sock = dead_socket(workdir.join('sock'))
    uri = write_node(workdir.join('node.xml'),
                     [domain(name, [channel(sock, HTG)])])
    if sys.version_info[0] == 2:
        name = name.encode('utf-8')
    assert negotiator.find_guests(uri) == [(name, 'running', {HTG: sock})]


@needs_virsh
def test_domain_xml_with_non_ascii_text_is_parsed(workdir):
    # Python 2's ElementTree takes bytes: unicode text holding non-ASCII
    # (here the description) must not hide the domain.
    sock = dead_socket(workdir.join('sock'))
    uri = write_node(workdir.join('node.xml'), [
        domain('desc', [channel(sock, HTG)],
               extra=u'    <description>Serveur caf\xe9</description>\n')])
    status, out, err = virsh(uri, negotiator.dumpxml_command(['desc']))
    assert (status, err) == (0, '')
    assert u'caf\xe9' in out
    assert negotiator.parse_domains_xml(out) == {'desc': ('1', {HTG: sock})}


@needs_virsh
def test_domain_xml_with_nested_domain_element_is_parsed(workdir):
    # An application's metadata element named 'domain' (libvirt keeps
    # <metadata> children of any namespace) must not cut its domain in two.
    sock = dead_socket(workdir.join('sock'))
    uri = write_node(workdir.join('node.xml'), [
        domain('meta', [channel(sock, HTG)],
               extra="    <metadata><domain xmlns='http://example.org/app'>"
                     "x</domain></metadata>\n"),
        domain('after', [channel(sock, HTG)])])
    status, out, err = virsh(uri, negotiator.dumpxml_command(
        ['meta', 'after']))
    assert (status, err) == (0, '')
    assert '<domain xmlns="http://example.org/app">x</domain>' in out
    assert negotiator.parse_domains_xml(out) == {
        'meta': ('1', {HTG: sock}), 'after': ('2', {HTG: sock})}


def test_cli_list_guests_busy_socket_answers_within_the_probe_limit(workdir):
    # QEMU's queue of clients is full (listen(0) and a client never
    # accepted): the probe gives up after PROBE_TIMEOUT, not never.
    directory = workdir.join('channels')
    os.mkdir(directory)
    held = fill_backlog(os.path.join(directory, 'busy.' + HTG))
    try:
        env = env_without_virsh(workdir.path)
        table = cli(['host', '--channel-dir', directory, '--list-guests'],
                    env=env)
    finally:
        for sock in held:
            sock.close()
    assert table == (0, b'NAME  STATE  PORTS' + b' ' * 23 + b'AGENT\n' +
                     b'busy  -      ' + b(HTG) + b'  no answer\n', b'')


@needs_virsh
def test_discovery_answer_that_raises_is_neither_repeated_nor_blamed_on_virsh(
        world, caplog):
    loop = negotiator.Loop()
    children = negotiator.Children()
    answers = []

    def on_done(guests, error):
        answers.append((guests, error))
        raise RuntimeError('boom')
    try:
        loop.on_signal(signal.SIGCHLD, children.check)
        negotiator.Discovery(loop, children, world.uri).look(on_done)
        later = []
        loop.call_later(HANG, lambda: later.append(None))
        while not answers and not later:
            loop.run_once()
        loop.call_later(0.5, lambda: later.append(None))
        while not later:
            loop.run_once()
    finally:
        children.close()
        loop.close()
    assert answers == [(expected_guests(world), None)]
    assert [record.getMessage() for record in caplog.records
            if record.name == 'negotiator'] == [
        'guest discovery: internal error, carrying on: RuntimeError: boom']
