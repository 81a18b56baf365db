# -*- coding: utf-8 -*-
"""Differential tests: the real qemu-ga and negotiator get the same requests.

One real ``qemu-ga`` (Debian package qemu-guest-agent) and one
``negotiator.py guest`` serve the whole module.  Each request goes to both,
each time on a fresh connection, and the parsed replies are compared.

What qemu-ga (7.2, bookworm's) answers, which these tests rely on:

- Replies are one JSON object per line, with the request's "id" (any JSON
  value, null too) copied; without an "id", none.  guest-ping returns {};
  guest-sync returns its "id" argument, an integer only;
  guest-sync-delimited sends a 0xFF byte first: 0xFF{"return": 42}.
- Errors are {"error": {"class": ..., "desc": ...}}: CommandNotFound
  ("The command guest-nosuch has not been found") or GenericError for
  everything else ("Parameter 'id' is missing", "Invalid parameter type
  for 'id', expected: integer" (also for 1.5 and 2**63), "QMP input lacks
  member 'execute'", "QMP input member 'bogus' is unexpected", "QMP input
  must be a JSON object", "Parameter 'x' is unexpected", ...).
- Its JSON parser is a stream parser whose state belongs to the process,
  not to the connection: "{bad" followed by a newline gets no reply, and
  the object stays open for whoever connects next, until a "}" closes it;
  a syntax error's desc is its lexer's ("JSON parse error, invalid keyword
  'bad'").  So every request here is a whole value.
- A 0xFF byte is not a reset for it: it answers with an error line
  ("JSON parse error, stray '\\uFFFD'") and goes on with what follows.
- guest-exec {path, arg?, env?, input-data?, capture-output?} answers
  {"pid": N} at once (a program that cannot start: "Guest agent command
  failed, error was 'Failed to execute child process \u201cPATH\u201d
  (No such file or directory)'"; input-data with a character outside
  base64: "Base64 data contains invalid characters"); guest-exec-status
  {pid} answers {"exited": false} while it runs, then once {"exited":
  true, "exitcode" or "signal", and for each stream that wrote something
  "out-data"/"err-data" (base64) with "out-truncated"/"err-truncated"};
  after that, or for a pid it never started, "Invalid parameter 'pid'".
  A list argument's bad item is named "'arg[1]', expected: string".
- guest-file-open {path, mode?} answers a handle, 1000 for the first (its
  count survives restarts in its state directory); guest-file-read
  {handle, count?} {"count", "buf-b64", "eof"} (4096 bytes by default,
  48 MiB at most); guest-file-write {handle, buf-b64, count?} {"count",
  "eof"}; guest-file-seek {handle, offset, whence: 0-2 or
  "set"/"cur"/"end"} {"position", "eof"}; guest-file-flush and
  guest-file-close {}.  Errors: "handle '5' has not been found", "failed
  to open file 'PATH' (mode: 'r'): No such file or directory", "failed to
  read file: Bad file descriptor", "invalid whence code 3", ...  Its files
  are non-blocking: a FIFO without data fails at once ("Resource
  temporarily unavailable").
- guest-info: {"version": "7.2.22", "supported_commands": [{"name",
  "enabled", "success-response"}, ...]}.  guest-network-get-interfaces
  leaves "ip-addresses" and "statistics" out for an interface without
  addresses.

The host client is also run against the real qemu-ga: it opens every
connection with a 0xFF byte, which qemu-ga answers with an error line that
the client must skip.

qemu-ga missing is a FAILURE, not a skip: scripts/test installs it.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import base64
import contextlib
import errno
import json
import os
import re
import signal
import stat
import struct
import subprocess
import time

import pytest

import negotiator
from helpers import (Agent, RawClient, Workdir, agent_running, connectable,
                     make_command, run_cli, wait_for)

INSTALL_HINT = ('qemu-ga not found on PATH (nor in /usr/sbin, /sbin): '
                'install it (Debian/Ubuntu: apt-get install '
                'qemu-guest-agent) to run the differential tests')

try:
    INTEGERS = (int, long)  # noqa: F821 (Python 2)
except NameError:
    INTEGERS = (int,)


def find_qemu_ga():
    """qemu-ga's path; Debian puts it in /usr/sbin, often not on PATH."""
    directories = os.environ.get('PATH', '').split(os.pathsep)
    for directory in directories + ['/usr/sbin', '/sbin']:
        path = os.path.join(directory or '.', 'qemu-ga')
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def stop_process(process):
    """SIGTERM, then SIGKILL if it lingers; always reaps."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if process.poll() is None:
            process.kill()
    process.wait()


@pytest.fixture(scope='module')
def qemu_ga_path():
    path = find_qemu_ga()
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


@pytest.fixture(scope='module')
def qga(qemu_ga_path):
    """The real qemu-ga on a UNIX socket; yields the socket path."""
    with serving_qga(qemu_ga_path) as sock:
        yield sock


@contextlib.contextmanager
def serving_qga(qemu_ga_path, env=None, args=(), wrapper=()):
    """The real qemu-ga on a UNIX socket, in ``env``, with ``args``: its
    socket's path.

    :param wrapper: a command line that runs qemu-ga's as its last
        arguments (e.g. in a mount namespace of its own).
    """
    workdir = Workdir()
    state = workdir.join('state')
    os.mkdir(state)                     # qemu-ga exits if it is missing
    sock = workdir.join('qga.sock')
    log_path = workdir.join('qga.log')
    log_file = open(log_path, 'wb')
    process = subprocess.Popen(
        list(wrapper) + [qemu_ga_path, '-m', 'unix-listen', '-p', sock,
                         '-t', state] + list(args),
        stdin=open(os.devnull), stdout=log_file, stderr=subprocess.STDOUT,
        close_fds=True, env=env)
    try:
        wait_for(lambda: process.poll() is not None or connectable(sock))
        if process.poll() is not None:
            with open(log_path, 'rb') as handle:
                raise AssertionError('qemu-ga did not start (status {0}):\n'
                                     '{1}'.format(process.returncode,
                                                  handle.read()))
        yield sock
    finally:
        stop_process(process)
        log_file.close()
        workdir.cleanup()


@pytest.fixture(scope='module')
def agent():
    """negotiator, given a stand-in hwclock that fails: guest-set-time
    looks for it first, as qemu-ga does for /sbin/hwclock.  Send it only
    times that both refuse: a valid one would set this machine's clock."""
    workdir = Workdir()
    tools = workdir.join('tools')
    os.mkdir(tools)
    make_command(tools, 'hwclock', '#!/bin/sh\nexit 1\n')
    # Refusing nothing, as Debian's qemu-ga (test_default_refusals).
    running = Agent(workdir, ['--block-rpcs', ''],
                    env=dict(os.environ, NEGOTIATOR_TOOL_PATH=tools))
    try:
        yield running
    finally:
        try:
            running.stop()
        finally:
            workdir.cleanup()


@pytest.fixture(scope='module')
def qga_version(qemu_ga_path):
    """The version qemu-ga prints, e.g. '7.2.22'."""
    output = subprocess.Popen([qemu_ga_path, '--version'],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT).communicate()[0]
    match = re.search(r'(\d+(?:\.\d+)+)', output.decode('utf-8', 'replace'))
    assert match, output
    return match.group(1)


def exchange(path, data):
    """Send raw bytes on a fresh connection; returns the first reply line."""
    client = RawClient(path)
    try:
        client.send(data)
        line = client.read_line()
    finally:
        client.close()
    assert line, 'no reply to {0!r}'.format(data)
    return line


def parse(line):
    return json.loads(line.decode('utf-8'))


def encode(message):
    return json.dumps(message).encode('ascii') + b'\n'


def both(qga, agent, message):
    """The parsed replies of (qemu-ga, negotiator) to one request."""
    data = encode(message)
    return parse(exchange(qga, data)), parse(exchange(agent.socket, data))


def ping(request_id):
    return {'execute': 'guest-ping', 'id': request_id}


def sync(arguments, name='guest-sync'):
    return {'execute': name, 'arguments': arguments}


def vcpus(value):
    """A guest-set-vcpus request.  The differential tests send only those
    that change nothing on this machine: refused arguments, processors
    that do not exist, and (test_set_vcpus_as_they_are) each processor's
    own state, which neither agent writes back."""
    return {'execute': 'guest-set-vcpus', 'arguments': {'vcpus': value}}


def exec_request(path, capture=None, input_data=None, **arguments):
    """A guest-exec request."""
    arguments['path'] = path
    if capture is not None:
        arguments['capture-output'] = capture
    if input_data is not None:
        arguments['input-data'] = input_data
    return {'execute': 'guest-exec', 'arguments': arguments}


def file_request(name, **arguments):
    """A guest-file-NAME request."""
    return {'execute': 'guest-file-' + name, 'arguments': arguments}


def exec_status(pid):
    return {'execute': 'guest-exec-status', 'arguments': {'pid': pid}}


#: A user that neither agent finds.
NO_USER = 'negotiator-no-such-user'


def ssh_request(verb, **arguments):
    """A guest-ssh-VERB-authorized-keys request."""
    return {'execute': 'guest-ssh-{0}-authorized-keys'.format(verb),
            'arguments': arguments}


# ---------------------------------------------------------------------------
# Replies that must be equal once parsed.

EXACT = [
    ('ping-id-string', ping('x')),
    ('ping-id-int', ping(7)),
    ('ping-id-object', ping({'a': [1]})),
    ('ping-id-null', ping(None)),
    ('ping-no-id', {'execute': 'guest-ping'}),
    ('ping-empty-arguments', {'execute': 'guest-ping', 'arguments': {}}),
    ('sync-123', sync({'id': 123})),
    ('sync-negative', sync({'id': -5})),
    ('sync-int64-max', sync({'id': 2 ** 63 - 1})),
    ('sync-with-request-id', dict(sync({'id': 42}), id='req')),
    ('unknown-command', {'execute': 'guest-nosuch'}),
    ('unknown-command-with-id', {'execute': 'guest-nosuch', 'id': 3}),
    ('sync-id-missing', sync({})),
    ('sync-no-arguments', {'execute': 'guest-sync'}),
    ('sync-id-string', sync({'id': 'x'})),
    ('sync-id-float', sync({'id': 1.5})),
    ('sync-id-2**63', sync({'id': 2 ** 63})),
    ('sync-id-bool', sync({'id': True})),
    ('delimited-id-string', sync({'id': 'x'}, 'guest-sync-delimited')),
    ('ping-arguments-list', {'execute': 'guest-ping', 'arguments': []}),
    ('execute-not-string', {'execute': 5}),
    ('lacks-execute', {}),
    ('unexpected-member', {'execute': 'guest-ping', 'bogus': 1}),
    ('ping-unexpected-argument', {'execute': 'guest-ping',
                                  'arguments': {'x': 1}}),
    ('sync-unexpected-argument', sync({'id': 1, 'x': 2})),
    ('host-name', {'execute': 'guest-get-host-name'}),
    ('timezone', {'execute': 'guest-get-timezone'}),
    ('timezone-unexpected-argument', {'execute': 'guest-get-timezone',
                                      'arguments': {'x': 1}}),
    ('time-unexpected-argument', {'execute': 'guest-get-time',
                                  'arguments': {'x': 1}}),
    ('users', {'execute': 'guest-get-users'}),
    ('users-unexpected-argument', {'execute': 'guest-get-users',
                                   'arguments': {'x': 1}}),
    ('vcpus', {'execute': 'guest-get-vcpus'}),
    ('disks', {'execute': 'guest-get-disks'}),
    ('disks-unexpected-argument', {'execute': 'guest-get-disks',
                                   'arguments': {'x': 1}}),
    ('fsinfo-unexpected-argument', {'execute': 'guest-get-fsinfo',
                                    'arguments': {'x': 1}}),
    # guest-set-vcpus: only requests that change nothing (see below).
    ('set-vcpus-none', vcpus([])),
    ('set-vcpus-no-such-processor', vcpus([{'logical-id': 99999,
                                            'online': True}])),
    ('set-vcpus-negative-id', vcpus([{'logical-id': -1, 'online': False}])),
    ('set-vcpus-missing', {'execute': 'guest-set-vcpus'}),
    ('set-vcpus-not-a-list', vcpus({})),
    ('set-vcpus-not-objects', vcpus([5])),
    ('set-vcpus-id-missing', vcpus([{'online': True}])),
    ('set-vcpus-online-missing', vcpus([{'logical-id': 1}])),
    ('set-vcpus-id-string', vcpus([{'logical-id': 'x', 'online': True}])),
    ('set-vcpus-online-int', vcpus([{'logical-id': 1, 'online': 1}])),
    ('set-vcpus-can-offline-int', vcpus([{'logical-id': 1, 'online': True,
                                          'can-offline': 5}])),
    ('set-vcpus-member-unexpected', vcpus([{'logical-id': 1, 'online': True,
                                            'x': 5}])),
    ('set-vcpus-second-not-object', vcpus([{'logical-id': 1,
                                            'online': True}, 7])),
    ('set-vcpus-unexpected', {'execute': 'guest-set-vcpus', 'arguments': {
        'vcpus': [{'logical-id': 1, 'online': True}], 'z': 1}}),
] + [
    # Requests that run a tool, refused before they reach it (past these
    # checks both agents would run this machine's real one).
    ('password-' + name, {'execute': 'guest-set-user-password',
                          'arguments': arguments})
    for name, arguments in [
        ('no-arguments', {}),
        ('no-password', {'username': 'a'}),
        ('no-crypted', {'username': 'a', 'password': 'YQ=='}),
        ('username-int', {'username': 5, 'password': 'YQ==',
                          'crypted': False}),
        ('crypted-int', {'username': 'a', 'password': 'YQ==', 'crypted': 1}),
        ('unexpected', {'username': 'a', 'password': 'YQ==',
                        'crypted': False, 'z': 1}),
        ('bad-base64', {'username': 'a', 'password': 'Y!Q==',
                        'crypted': False}),
        ('newline-in-password', {'username': 'a', 'password': 'YQp4',
                                 'crypted': True}),
        ('colon-in-username', {'username': 'a:b', 'password': 'YQ==',
                               'crypted': False}),
        ('newline-in-username', {'username': 'a\nb', 'password': 'YQ==',
                                 'crypted': False}),
        ('both-bad', {'username': 'a:b', 'password': 'YQp4',
                      'crypted': False}),
    ]
] + [
    ('shutdown-' + name, {'execute': 'guest-shutdown',
                          'arguments': arguments})
    for name, arguments in [
        ('bad-mode', {'mode': 'off'}), ('empty-mode', {'mode': ''}),
        ('mode-int', {'mode': 5}), ('mode-null', {'mode': None}),
        ('unexpected', {'mode': 'halt', 'x': 1}),
    ]
] + [
    ('set-time-' + name, {'execute': 'guest-set-time',
                          'arguments': arguments})
    for name, arguments in [
        ('1938', {'time': -10 ** 18}), ('2096', {'time': 4 * 10 ** 18}),
        ('int64-max', {'time': 2 ** 63 - 1}), ('string', {'time': '1'}),
        ('float', {'time': 1.5e18}), ('null', {'time': None}),
        ('unexpected', {'time': -10 ** 18, 'x': 1}),
    ]
] + [
    ('fstrim-' + name, {'execute': 'guest-fstrim', 'arguments': arguments})
    for name, arguments in [
        ('string', {'minimum': '1'}), ('2**63', {'minimum': 2 ** 63}),
        ('null', {'minimum': None}), ('unexpected', {'x': 1}),
    ]
] + [
    ('exec-path-missing', {'execute': 'guest-exec', 'arguments': {}}),
    ('exec-arg-not-list', exec_request('/bin/echo', arg='x')),
    ('exec-arg-item', exec_request('/bin/echo', arg=['a', 1])),
    ('exec-env-item', exec_request('/bin/echo', env=[1])),
    ('exec-capture-not-bool', exec_request('/bin/echo', capture=1)),
    ('exec-input-not-base64', exec_request('/bin/cat', input_data='YQ!')),
    ('exec-unexpected-argument', exec_request('/bin/echo', x=1)),
    ('exec-not-found', exec_request('/nonexistent/program')),
    ('exec-not-in-path', exec_request('negotiator-no-such-program')),
    ('exec-empty-path', exec_request('')),
    ('exec-not-executable', exec_request('/etc/passwd')),
    ('exec-directory', exec_request('/')),
    ('exec-status-unknown-pid', exec_status(0)),
    ('exec-status-pid-missing', {'execute': 'guest-exec-status'}),
    ('exec-status-pid-string', {'execute': 'guest-exec-status',
                                'arguments': {'pid': '1'}}),
    ('file-open-missing', file_request('open', path='/nonexistent/file')),
    ('file-open-directory-w', file_request('open', path='/', mode='w')),
    ('file-open-bad-mode', file_request('open', path='/', mode='rw')),
    ('file-open-mode-not-string', file_request('open', path='/', mode=1)),
    ('file-open-path-missing', file_request('open')),
    ('file-read-unknown', file_request('read', handle=5)),
    ('file-read-count-first', file_request('read', handle=5, count=-1)),
    ('file-write-unknown', file_request('write', handle=5, **{
        'buf-b64': '!'})),
    ('file-write-buf-missing', file_request('write', handle=5)),
    ('file-seek-unknown', file_request('seek', handle=5, offset=0,
                                       whence=3)),
    ('file-seek-whence-missing', file_request('seek', handle=5, offset=0)),
    ('file-seek-whence-name', file_request('seek', handle=5, offset=0,
                                           whence='SET')),
    ('file-seek-whence-bool', file_request('seek', handle=5, offset=0,
                                           whence=True)),
    ('file-seek-whence-null', file_request('seek', handle=5, offset=0,
                                           whence=None)),
    ('file-seek-whence-float', file_request('seek', handle=5, offset=0,
                                            whence=1.5)),
    ('file-seek-whence-2**63', file_request('seek', handle=5, offset=0,
                                            whence=2 ** 63)),
    ('file-seek-offset-string', file_request('seek', handle=5, offset='0',
                                             whence=0)),
    ('file-flush-unknown', file_request('flush', handle=5)),
    ('file-close-unknown', file_request('close', handle=5)),
    ('file-close-handle-string', file_request('close', handle='5')),
] + [
    # Refused before they reach a home: a user that does not exist (the
    # real homes are never touched; test_ssh_keys sends the others).
    ('ssh-' + name, ssh_request(verb, **arguments))
    for name, verb, arguments in [
        ('get-no-username', 'get', {}),
        ('get-username-int', 'get', {'username': 5}),
        ('get-unknown-user', 'get', {'username': NO_USER}),
        ('get-unexpected', 'get', {'username': NO_USER, 'keys': []}),
        ('add-no-keys', 'add', {'username': NO_USER}),
        ('add-keys-not-list', 'add', {'username': NO_USER, 'keys': 'k'}),
        ('add-key-int', 'add', {'username': NO_USER, 'keys': ['k', 1]}),
        ('add-reset-int', 'add', {'username': NO_USER, 'keys': [],
                                  'reset': 1}),
        ('add-comment', 'add', {'username': NO_USER, 'keys': ['#k']}),
        ('add-newline', 'add', {'username': NO_USER,
                                'keys': ['k', 'a\nb', '#c']}),
        ('add-unknown-user', 'add', {'username': NO_USER,
                                     'keys': ['', ' #k'], 'reset': True}),
        ('add-unexpected', 'add', {'username': NO_USER, 'keys': [],
                                   'x': 1}),
        ('remove-reset', 'remove', {'username': NO_USER, 'keys': [],
                                    'reset': True}),
        ('remove-newline', 'remove', {'username': NO_USER,
                                      'keys': ['k\n']}),
        ('remove-unknown-user', 'remove', {'username': '', 'keys': ['k']}),
    ]
]


@pytest.mark.parametrize('message', [case[1] for case in EXACT],
                         ids=[case[0] for case in EXACT])
def test_same_reply(qga, agent, message):
    expected, actual = both(qga, agent, message)
    assert actual == expected


def test_sync_delimited(qga, agent):
    data = encode(sync({'id': 42}, 'guest-sync-delimited'))
    expected = exchange(qga, data)
    actual = exchange(agent.socket, data)
    assert expected[:1] == b'\xff'          # as the docstring says
    assert actual[:1] == expected[:1]
    assert parse(actual[1:]) == parse(expected[1:]) == {'return': 42}


# ---------------------------------------------------------------------------
# JSON syntax errors: same class; descs differ (qemu-ga's own lexer messages).
# qemu-ga is a stream parser: "{bad" keeps it inside the object (no reply),
# so it gets the closing "}" that ends the value; negotiator reads lines.

SYNTAX = [
    ('open-brace', b'{bad\n', b'{bad\n}\n'),
    ('bad-keyword', b'{bad}\n', b'{bad}\n'),
    ('array', b'[1,2]\n', b'[1,2]\n'),
    ('string', b'"x"\n', b'"x"\n'),
]


@pytest.mark.parametrize('ours,theirs', [case[1:] for case in SYNTAX],
                         ids=[case[0] for case in SYNTAX])
def test_syntax_error_class(qga, agent, ours, theirs):
    expected = parse(exchange(qga, theirs))
    actual = parse(exchange(agent.socket, ours))
    assert list(expected) == ['error']
    assert expected['error']['class'] == 'GenericError'
    assert list(actual) == ['error'], actual
    assert actual['error']['class'] == expected['error']['class']
    assert sorted(actual['error']) == sorted(expected['error'])


# ---------------------------------------------------------------------------
# Replies that describe the machine both agents run on.

def test_osinfo(qga, agent):
    expected, actual = both(qga, agent, {'execute': 'guest-get-osinfo'})
    assert actual == expected


def interfaces(qga, agent):
    expected, actual = both(qga, agent,
                            {'execute': 'guest-network-get-interfaces'})
    return expected['return'], actual['return']


def addresses(interface):
    return set((a['ip-address-type'], a['ip-address'], a['prefix'])
               for a in interface.get('ip-addresses', []))


def test_network_interfaces(qga, agent):
    expected, actual = interfaces(qga, agent)
    assert [i['name'] for i in actual] == [i['name'] for i in expected]
    for theirs, ours in zip(expected, actual):
        name = theirs['name']
        assert (ours.get('hardware-address') ==
                theirs.get('hardware-address')), name
        assert addresses(ours) == addresses(theirs), name
        if 'statistics' in theirs and 'statistics' in ours:
            assert sorted(ours['statistics']) == sorted(theirs['statistics'])
            for value in ours['statistics'].values():
                assert (isinstance(value, INTEGERS) and
                        not isinstance(value, bool)), (name, value)


def test_network_interface_members(qga, agent):
    """Same members per interface (qemu-ga leaves ip-addresses and
    statistics out for an interface without addresses)."""
    expected, actual = interfaces(qga, agent)
    assert [sorted(i) for i in actual] == [sorted(i) for i in expected]


def test_time(qga, agent):
    """Nanoseconds since the epoch, to the microsecond, on both."""
    before = int(time.time()) * 10 ** 9
    expected, actual = both(qga, agent, {'execute': 'guest-get-time'})
    after = int(time.time() + 1) * 10 ** 9
    for reply in (expected, actual):
        assert sorted(reply) == ['return']
        assert isinstance(reply['return'], INTEGERS)
        assert before <= reply['return'] <= after
        assert reply['return'] % 1000 == 0


@pytest.mark.parametrize('arguments', [{}, {'minimum': 4096},
                                       {'minimum': -1}])
def test_fstrim(qga, agent, arguments):
    """FITRIM for real, by both (harmless: it only discards blocks that
    no file uses): the same mount points in the same order, with the same
    members, minimum and error; only the bytes trimmed differ from one
    trim to the next."""
    expected, actual = both(qga, agent, {'execute': 'guest-fstrim',
                                         'arguments': arguments})
    assert sorted(actual) == sorted(expected) == ['return']
    theirs, ours = expected['return']['paths'], actual['return']['paths']
    assert [sorted(path) for path in ours] == [sorted(path) for path in
                                               theirs]
    for path in ours + theirs:
        assert isinstance(path.pop('trimmed', 0), INTEGERS)
    assert ours == theirs
    assert theirs, 'no filesystem to trim on this machine'


@pytest.mark.parametrize('zone', ['UTC', 'Europe/Paris', 'America/New_York',
                                  'Asia/Kolkata', 'EST5EDT', 'XYZ+3'])
def test_timezone_in_other_zones(qemu_ga_path, zone):
    """guest-get-timezone as each sees TZ (libvirt: guestinfo
    --timezone)."""
    env = dict(os.environ, TZ=zone)
    with agent_running(env=env) as running:
        with serving_qga(qemu_ga_path, env) as qga:
            expected, actual = both(qga, running, {
                'execute': 'guest-get-timezone'})
    assert actual == expected
    assert sorted(actual['return']) == ['offset', 'zone']


def test_set_user_password_without_chpasswd(qemu_ga_path, agent):
    """A guest without chpasswd (busybox): qemu-ga 7.2 looks for it on its
    PATH (here a directory that does not exist) and names passwd, its only
    such message; negotiator names chpasswd and where it looked (its
    stand-in tools directory, which has none).  Neither runs anything, and
    the user does not exist."""
    request = {'execute': 'guest-set-user-password', 'arguments': {
        'username': NO_USER, 'password': 'YQ==', 'crypted': False}}
    env = dict(os.environ, PATH=agent.workdir.join('no-such'))
    with serving_qga(qemu_ga_path, env) as qga:
        theirs, ours = both(qga, agent, request)
    assert theirs == {'error': {'class': 'GenericError', 'desc':
                                "cannot find 'passwd' program in PATH"}}
    assert ours == {'error': {'class': 'GenericError', 'desc': (
        "cannot find 'chpasswd' program in PATH ({0})").format(
            agent.workdir.join('tools'))}}


def test_guest_info(qga, agent):
    expected, actual = both(qga, agent, {'execute': 'guest-info'})
    theirs, ours = expected['return'], actual['return']
    assert sorted(ours) == sorted(theirs)
    assert isinstance(ours['version'], type(u''))
    their_keys = set(frozenset(entry) for entry in
                     theirs['supported_commands'])
    assert len(their_keys) == 1, their_keys
    by_name = dict((entry['name'], entry)
                   for entry in theirs['supported_commands'])
    shared = []
    for entry in ours['supported_commands']:
        assert frozenset(entry) in their_keys, entry
        if entry['name'] in by_name:
            shared.append(entry['name'])
            assert entry == by_name[entry['name']]
    for name in ('guest-sync', 'guest-sync-delimited', 'guest-ping',
                 'guest-info', 'guest-get-host-name', 'guest-get-osinfo',
                 'guest-get-time', 'guest-get-timezone',
                 'guest-network-get-interfaces', 'guest-get-users',
                 'guest-get-vcpus', 'guest-set-vcpus', 'guest-get-fsinfo',
                 'guest-get-disks', 'guest-set-user-password',
                 'guest-shutdown', 'guest-set-time', 'guest-fstrim',
                 'guest-ssh-get-authorized-keys',
                 'guest-ssh-add-authorized-keys',
                 'guest-ssh-remove-authorized-keys'):
        assert name in shared


def test_blocked_requests(qemu_ga_path):
    """-b LIST: the same refusals, the same guest-info, and names neither
    serves are ignored."""
    options = ['-b', 'guest-ping,guest-get-time,guest-nosuch']
    workdir = Workdir()
    running = Agent(workdir, options)
    try:
        with serving_qga(qemu_ga_path, args=options) as qga:
            replies = [both(qga, running, message) for message in (
                ping(5), {'execute': 'guest-get-time'},
                {'execute': 'guest-get-host-name'}, {'execute': 'guest-info'})]
    finally:
        log = running.stop()
        workdir.cleanup()
    for expected, actual in replies[:3]:
        assert actual == expected
    assert replies[0][1] == {'id': 5, 'error': {
        'class': 'CommandNotFound', 'desc': 'Command guest-ping has been '
        'disabled'}}
    assert 'return' in replies[2][1]
    for supported in (replies[3][0], replies[3][1]):
        enabled = dict((entry['name'], entry['enabled'])
                       for entry in supported['return']['supported_commands'])
        assert (enabled['guest-ping'], enabled['guest-get-time'],
                enabled['guest-info']) == (False, False, True)
    assert ('negotiator: --block-rpcs: guest-nosuch is not a request '
            'negotiator serves; ignored\n') in log


def test_set_vcpus_as_they_are(qga, agent):
    """Each processor set to the state guest-get-vcpus gives: both count
    them all and write nothing.  A processor that cannot go offline (no
    online file: cpu0 on x86) asked to: both refuse it, the same way."""
    states, _ = both(qga, agent, {'execute': 'guest-get-vcpus'})
    request = vcpus([{'logical-id': v['logical-id'], 'online': v['online']}
                     for v in states['return']])
    expected, actual = both(qga, agent, request)
    assert actual == expected == {'return': len(states['return'])}
    fixed = [v['logical-id'] for v in states['return']
             if not v['can-offline']]
    for logical_id in fixed:
        expected, actual = both(qga, agent, vcpus([
            {'logical-id': logical_id, 'online': False}]))
        assert actual == expected
        assert expected['error']['desc'] == (
            "logical processor #{0} can't be offlined".format(logical_id))


#: How far apart two looks at a filesystem's used bytes may be: others
#: write to this machine's disk meanwhile.
USED_SLACK = 256 * 1024 * 1024


def same_filesystems(ours, theirs):
    """guest-get-fsinfo replies equal but for the used bytes' drift."""
    assert len(ours) == len(theirs), (ours, theirs)
    for mine, other in zip(ours, theirs):
        assert sorted(mine) == sorted(other), (mine, other)
        assert abs(mine.pop('used-bytes', 0) -
                   other.pop('used-bytes', 0)) < USED_SLACK
        assert mine == other


def test_fsinfo(qga, agent):
    """This machine's block-device filesystems (libvirt: domfsinfo)."""
    expected, actual = both(qga, agent, {'execute': 'guest-get-fsinfo'})
    assert sorted(actual) == sorted(expected) == ['return']
    same_filesystems(actual['return'], expected['return'])


def test_fsinfo_of_odd_mount_points(qemu_ga_path, monkeypatch):
    """qemu-ga in a mount namespace of its own, where the root filesystem
    is also mounted on a directory whose name holds a space (\\040 in
    mountinfo) and a byte that is not UTF-8; negotiator reads the same
    mountinfo (qemu-ga's, through /proc).  Both list it first (the last
    mounted); the byte is U+DCFF in negotiator's reply, by its rule for
    bytes, and U+FFFD in qemu-ga's, whose JSON writer replaces it."""
    workdir = Workdir()
    try:
        odd = workdir.join('a b').encode('ascii') + b'\xff'
        os.mkdir(odd)
        wrapper = ['unshare', '-m', 'sh', '-c',
                   'mount --bind / "$0" && exec "$@"', odd]
        with serving_qga(qemu_ga_path, wrapper=wrapper) as qga:
            theirs = parse(exchange(qga, encode({
                'execute': 'guest-get-fsinfo'})))['return']
            monkeypatch.setattr(negotiator, 'MOUNTINFO_PATH',
                                '/proc/{0}/mountinfo'.format(pid_of(qga)))
            ours = json.loads(json.dumps(negotiator.filesystems()))
    finally:
        workdir.cleanup()
    assert ours[0]['mountpoint'] == workdir.join('a b') + u'\udcff'
    assert theirs[0]['mountpoint'] == workdir.join('a b') + u'\ufffd'
    ours[0]['mountpoint'] = theirs[0]['mountpoint']
    for reply in (ours[0], theirs[0]):  # negotiator's statvfs() is of the
        del reply['used-bytes'], reply['total-bytes']  # empty directory
    same_filesystems(ours, theirs)


def pid_of(sock):
    """The process whose command line names ``sock``."""
    for pid in os.listdir('/proc'):
        try:
            with open('/proc/{0}/cmdline'.format(pid), 'rb') as handle:
                if sock.encode('ascii') in handle.read().split(b'\0'):
                    return pid
        except (IOError, OSError):
            continue
    raise AssertionError('nothing serves ' + sock)


#: A utmp record as glibc writes it on x86_64 and i386: type, pid, line,
#: id, user, host, exit status, session, login seconds and microseconds,
#: address, padding (384 bytes).
UTMP = struct.Struct('=h2xi32s4s32s256shhiii16s20x')


def utmp_record(kind, user, seconds, microseconds):
    return UTMP.pack(kind, 1, b'pts/0', b'ts/0', user, b'host', 0, 0, 0,
                     seconds, microseconds, b'')


#: Logged in: alice three times (her earliest login is the middle one),
#: bob once; carol's record is a dead process's, the first a getty's; the
#: last record is cut short, as a crash while writing leaves it.
UTMP_FILE = b''.join([
    utmp_record(6, b'LOGIN', 1699999000, 0),
    utmp_record(7, b'alice', 1700000100, 500000),
    utmp_record(7, b'bob', 1700000050, 250),
    utmp_record(7, b'alice', 1700000000, 999999),
    utmp_record(8, b'carol', 1690000000, 0),
    utmp_record(7, b'alice', 1700000200, 0),
    utmp_record(7, b'dave', 1600000000, 0)[:100]])


def test_users_from_a_utmp_file(qemu_ga_path, monkeypatch):
    """guest-get-users over the same utmp file: qemu-ga reads glibc's
    /var/run/utmp, so it runs in a mount namespace of its own whose /run
    is a tmpfs holding the file (this machine's /run is untouched);
    negotiator reads the file its UTMP_PATH names."""
    workdir = Workdir()
    try:
        path = workdir.join('utmp')
        with open(path, 'wb') as handle:
            handle.write(UTMP_FILE)
        monkeypatch.setattr(negotiator, 'UTMP_PATH', path)
        ours = json.loads(json.dumps(negotiator.logged_in_users()))
        wrapper = ['unshare', '-m', 'sh', '-c',
                   'mount -t tmpfs tmpfs /run && cp "$0" /run/utmp && '
                   'exec "$@"', path]
        with serving_qga(qemu_ga_path, wrapper=wrapper) as qga:
            theirs = parse(exchange(qga, encode({
                'execute': 'guest-get-users'})))
    finally:
        workdir.cleanup()
    assert theirs == {'return': [
        {'user': 'alice', 'login-time': 1700000000.999999},
        {'user': 'bob', 'login-time': 1700000050.00025}]}
    assert ours == theirs['return']


# ---------------------------------------------------------------------------
# guest-ssh-*: a user of the tests' own, whose home is a temporary directory.

#: The tests' user, and its uid and gid; a user without a home.
SSH_USER, SSH_ID, NO_HOME = 'negotiator-ssh', 4321, 'negotiator-nohome'

#: An authorized_keys file: a comment, a blank line, spaces, a duplicate.
KEYS = b'algo key1 c\n# a comment\n\n  algo key2 c \t\nalgo key1 c\nalgo key3\n'


@pytest.fixture(scope='module')
def ssh_pair(qemu_ga_path):
    """qemu-ga and negotiator, each in a mount namespace of its own whose
    /etc/passwd and /etc/group are copies that add SSH_USER, its home in a
    temporary directory (and NO_HOME, whose home is ""): neither agent
    can reach this machine's users' homes.  Yields (qemu-ga's socket, negotiator's Agent, the home)."""
    workdir = Workdir()
    os.chmod(workdir.path, 0o755)   # the user must reach its home
    home = workdir.join('home')
    for name, entry in (
            ('passwd', '{0}:x:{1}:{1}::{2}:/bin/sh\n{3}:x:{4}:{1}:::'
             '/bin/sh\n'.format(SSH_USER, SSH_ID, home, NO_HOME,
                                 SSH_ID + 1)),
            ('group', '{0}:x:{1}:\n'.format(SSH_USER, SSH_ID))):
        with open('/etc/' + name, 'rb') as handle:
            data = handle.read()
        with open(workdir.join(name), 'wb') as handle:
            handle.write(data + entry.encode('ascii'))
    wrapper = ['unshare', '-m', 'sh', '-c',
               'mount --bind "$0" /etc/passwd && '
               'mount --bind "$1" /etc/group && shift && exec "$@"',
               workdir.join('passwd'), workdir.join('group')]
    running = Agent(workdir, ['--block-rpcs', ''], wrapper=wrapper)
    try:
        with serving_qga(qemu_ga_path, wrapper=wrapper) as qga:
            yield qga, running, home
    finally:
        try:
            running.stop()
        finally:
            workdir.cleanup()


def make_home(home, entries):
    """The home afresh (0755, the user's), with ``entries``: (path, what)
    where what is None (a directory, 0700), bytes (a file, 0600), '->X'
    (a symlink to X), or (either of the first two, a mode); no home at
    all if ``entries`` is None."""
    if os.path.lexists(home):
        subprocess.check_call(['rm', '-rf', home])
    if entries is None:
        return
    os.mkdir(home, 0o755)
    os.chown(home, SSH_ID, SSH_ID)
    for name, what in entries:
        path = os.path.join(home, name)
        if isinstance(what, str) and what.startswith('->'):
            os.symlink(what[2:], path)
            os.lchown(path, SSH_ID, SSH_ID)
            continue
        what, mode = what if isinstance(what, tuple) else (
            what, 0o700 if what is None else 0o600)
        if what is None:
            os.mkdir(path)
        else:
            with open(path, 'wb') as handle:
                handle.write(what)
        os.chown(path, SSH_ID, SSH_ID)
        os.chmod(path, mode)


def tree(top):
    """Each path under ``top``: its mode, owner and group, and its bytes (a
    file's) or target (a symlink's)."""
    found = {}
    for directory, names, files in os.walk(top):
        for name in names + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content = None
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, 'rb') as handle:
                    content = handle.read()
            found[os.path.relpath(path, top)] = (
                oct(info.st_mode), info.st_uid, info.st_gid, content)
    return found


def ssh_both(ssh_pair, entries, message):
    """The replies and the homes after (qemu-ga's, negotiator's), each
    given a home made of ``entries``."""
    qga, agent, home = ssh_pair
    results = []
    for path in (qga, agent.socket):
        make_home(home, entries)
        results.append((parse(exchange(path, encode(message))), tree(home)))
    return results


SSH = ('.ssh', None)


def ssh_keys(data, mode=0o600):
    return ('.ssh/authorized_keys', (data, mode))


def add(keys, **arguments):
    return ssh_request('add', username=SSH_USER, keys=keys, **arguments)


def remove(keys):
    return ssh_request('remove', username=SSH_USER, keys=keys)


GET = ssh_request('get', username=SSH_USER)

SSH_CASES = [
    ('get', [SSH, ssh_keys(KEYS)], GET),
    ('get-empty-file', [SSH, ssh_keys(b'')], GET),
    ('get-no-newline', [SSH, ssh_keys(b'k1\r\nk2')], GET),
    ('get-not-utf8', [SSH, ssh_keys(b'k \xc3\xa9\n')], GET),
    ('get-odd-spaces', [SSH, ssh_keys(b'\x0bk1\x0b\n\x0ck2\x0c\r\n\x0b\n')],
     GET),
    ('get-no-file', [SSH], GET),
    ('get-no-ssh', [], GET),
    ('get-a-directory', [SSH, ('.ssh/authorized_keys', None)], GET),
    ('add-no-ssh', [], add(['k1 a', 'k2 b', 'k1 a'])),
    ('add-no-file', [SSH], add(['k1'])),
    ('add-to-file', [SSH, ssh_keys(KEYS)], add(['algo key1 c', 'new', ''])),
    ('add-no-newline', [SSH, ssh_keys(b'a\nb')], add(['c', 'a'])),
    ('add-reset', [SSH, ssh_keys(KEYS)], add(['k', 'k'], reset=True)),
    ('add-reset-nothing', [SSH, ssh_keys(KEYS)], add([], reset=True)),
    ('add-reset-no-ssh', [], add(['k'], reset=True)),
    ('add-reset-false', [SSH, ssh_keys(KEYS)], add(['k'], reset=False)),
    ('add-modes-fixed', [('.ssh', (None, 0o755)), ssh_keys(b'a\n', 0o644)],
     add(['b'])),
    ('add-no-home', None, add(['k'])),
    ('get-no-home', None, GET),
    ('add-replaces-a-symlink', [SSH, ('.ssh/real', b'a\n'),
                                ('.ssh/authorized_keys', '->real')],
     add(['k'])),
    ('get-ssh-a-symlink', [('dots', None), ('.ssh', '->dots'),
                           ssh_keys(KEYS)], GET),
    ('add-ssh-a-symlink', [('dots', None), ('.ssh', '->dots')], add(['k'])),
    ('remove', [SSH, ssh_keys(KEYS)], remove(['algo key1 c', 'nothing'])),
    ('remove-nothing', [SSH, ssh_keys(KEYS, 0o644)], remove([])),
    ('remove-spaces-differ', [SSH, ssh_keys(KEYS)], remove(['algo key2 c'])),
    ('remove-no-file', [SSH], remove(['k'])),
    ('remove-no-ssh', [], remove(['k'])),
    ('get-ssh-a-file', [('.ssh', b'x')], GET),
    ('add-ssh-a-file', [('.ssh', b'x')], add(['k'])),
    ('remove-ssh-a-file', [('.ssh', b'x')], remove(['k'])),
]


@pytest.mark.parametrize('entries,message', [case[1:] for case in SSH_CASES],
                         ids=[case[0] for case in SSH_CASES])
def test_ssh_keys(ssh_pair, entries, message):
    """The same reply, and the same home after it: files' bytes, modes,
    owners."""
    expected, actual = ssh_both(ssh_pair, entries, message)
    assert actual == expected


def test_ssh_keys_of_a_user_without_home(ssh_pair):
    """Refused by negotiator; qemu-ga (not asked: it would write there)
    would use .ssh/authorized_keys in its working directory."""
    for message in (ssh_request('get', username=NO_HOME),
                    ssh_request('add', username=NO_HOME, keys=['k']),
                    ssh_request('remove', username=NO_HOME, keys=['k'])):
        assert parse(exchange(ssh_pair[1].socket, encode(message))) == {
            'error': {'class': 'GenericError', 'desc': "user '{0}' has no "
                      'home directory'.format(NO_HOME)}}


def test_ssh_keys_from_a_hung_file(ssh_pair):
    """A read that blocks (a FIFO here, as a hung NFS home) holds up only
    negotiator's child: another client is answered meanwhile, and the
    request when the read ends.  (qemu-ga, not asked, would hang.)"""
    qga, agent, home = ssh_pair
    make_home(home, [SSH])
    fifo = os.path.join(home, '.ssh', 'authorized_keys')
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, SSH_ID, SSH_ID)
    writer = []

    def opened():
        try:
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError as e:
            if e.errno != errno.ENXIO:   # no reader yet
                raise
            return False
    waiting = RawClient(agent.socket)
    try:
        waiting.send(encode(GET))
        wait_for(opened)
        assert parse(exchange(agent.socket, encode(ping(1)))) == {
            'id': 1, 'return': {}}
        os.write(writer[0], b'k1\nk2\n')
        os.close(writer[0])
        assert parse(waiting.read_line()) == {'return': {'keys': ['k2',
                                                                  'k1']}}
    finally:
        waiting.close()


@pytest.mark.parametrize('content,owner,reason', [
    (b'k1\n', 0, u'Failed to open file {0}: Permission denied'),
    (b'k' * (128 * 1024) + b'\n', SSH_ID,
     u'File {0} is longer than 131072 bytes'),
], ids=['root-only', 'too-long'])
def test_ssh_keys_not_read_are_kept(ssh_pair, content, owner, reason):
    """An authorized_keys that cannot be read (root's, 0600; or longer
    than negotiator reads) is an error for get, and for add: the file is
    left as it was (qemu-ga, as root, would read the first; it replaces a
    file it cannot read with the keys added)."""
    qga, agent, home = ssh_pair
    path = os.path.join(home, '.ssh', 'authorized_keys')
    error = {'error': {'class': 'GenericError', 'desc': (
        u"failed to read '{0}': ".format(path) +
        reason.format(u'\u201c' + path + u'\u201d'))}}
    for message in (GET, add(['k2']), add(['k2'], reset=False)):
        make_home(home, [SSH, ssh_keys(content)])
        os.chown(path, owner, owner)
        assert parse(exchange(agent.socket, encode(message))) == error
        assert tree(home)['.ssh/authorized_keys'] == (
            oct(0o100600), owner, owner, content)


def test_ssh_symlinks_reach_only_what_the_user_may(ssh_pair):
    """A difference: qemu-ga, as root, follows a ~/.ssh or authorized_keys
    symlink anywhere; negotiator acts as the user, so the kernel refuses
    what the user could not do.  Here ~/.ssh points at a directory of
    root's (0755, as /etc), authorized_keys at a file of root's (0600,
    as /etc/shadow)."""
    qga, agent, home = ssh_pair
    private = os.path.join(os.path.dirname(home), 'private')
    os.mkdir(private, 0o755)
    try:
        secret = os.path.join(private, 'secret')
        with open(secret, 'wb') as handle:
            handle.write(b'root:secret\n')
        os.chmod(secret, 0o600)
        link = [SSH, ('.ssh/authorized_keys', '->' + secret)]
        theirs, ours = ssh_both(ssh_pair, link, GET)
        assert theirs[0] == {'return': {'keys': ['root:secret']}}
        path = os.path.join(home, '.ssh', 'authorized_keys')
        assert ours[0] == {'error': {'class': 'GenericError', 'desc': (
            u"failed to read '{0}': Failed to open file \u201c{0}\u201d: "
            u'Permission denied').format(path)}}
        replies = []
        for socket_path in (qga, agent.socket):
            make_home(home, [('.ssh', '->' + private)])
            replies.append(parse(exchange(socket_path, encode(add(['k'])))))
            written = os.path.join(private, 'authorized_keys')
            replies.append(os.path.exists(written) and os.stat(written))
            if replies[-1]:
                os.unlink(written)
    finally:
        subprocess.check_call(['rm', '-rf', private])
    assert replies[0] == {'return': {}}
    assert (replies[1].st_uid, replies[1].st_mode) == (SSH_ID, 0o100600)
    assert re.match(
        u"failed to write to '{0}': Failed to create file \u201c{0}"
        u"\\.[0-9a-f]{{8}}\u201d: Permission denied$".format(
            re.escape(path)), replies[2]['error']['desc'])
    assert replies[3] is False


# ---------------------------------------------------------------------------
# guest-exec: the same program started by both; pids differ, the rest not.

def start_both(qga, agent, request):
    """Start a program on both: their pids, (qemu-ga's, negotiator's)."""
    replies = both(qga, agent, request)
    for reply in replies:
        assert sorted(reply) == ['return'], reply
        assert sorted(reply['return']) == ['pid']
        assert isinstance(reply['return']['pid'], INTEGERS)
    return [reply['return']['pid'] for reply in replies]


def status(path, pid):
    """guest-exec-status's reply."""
    return parse(exchange(path, encode(exec_status(pid))))


def ended(path, pid):
    """guest-exec-status's reply once the program has ended."""
    replies = []

    def fetch():
        replies.append(status(path, pid))
        return replies[-1] != {'return': {'exited': False}}
    wait_for(fetch)
    return replies[-1]


def b64(data):
    return base64.b64encode(data).decode('ascii')


EXEC = [
    ('echo-captured', exec_request('/bin/echo', arg=['hello', 'world'],
                                   capture=True)),
    ('echo-not-captured', exec_request('/bin/echo', arg=['x'])),
    ('echo-capture-false', exec_request('/bin/echo', arg=['x'],
                                        capture=False)),
    ('failing-with-stderr', exec_request(
        'sh', arg=['-c', 'echo out; echo err >&2; exit 3'], capture=True)),
    ('stderr-only', exec_request('sh', arg=['-c', 'echo err >&2'],
                                 capture=True)),
    ('silent', exec_request('/bin/true', capture=True)),
    ('input-data', exec_request('/bin/cat', capture=True,
                                input_data=b64(b'\x00\xffinput\n'))),
    ('empty-input-data', exec_request('/bin/cat', capture=True,
                                      input_data='')),
    ('env-replaces-environment', exec_request(
        '/usr/bin/env', env=['A=1', 'B=x=y'], capture=True)),
    ('killed-by-signal', exec_request('sh', arg=['-c', 'kill -9 $$'],
                                      capture=True)),
]


@pytest.mark.parametrize('request_', [case[1] for case in EXEC],
                         ids=[case[0] for case in EXEC])
def test_exec(qga, agent, request_):
    """The status, with the output, once each has ended; then the pid is
    unknown to both."""
    pids = start_both(qga, agent, request_)
    expected, actual = ended(qga, pids[0]), ended(agent.socket, pids[1])
    assert actual == expected
    assert status(qga, pids[0]) == status(agent.socket, pids[1]) == {
        'error': {'class': 'GenericError', 'desc': "Invalid parameter 'pid'"}}


def test_exec_running(qga, agent):
    """{"exited": false} while it runs; its end once killed (pids are
    those of this machine's processes)."""
    pids = start_both(qga, agent, exec_request('/bin/sleep', arg=['60'],
                                               capture=True))
    try:
        assert status(qga, pids[0]) == status(agent.socket, pids[1]) == {
            'return': {'exited': False}}
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert ended(qga, pids[0]) == ended(agent.socket, pids[1]) == {
        'return': {'exited': True, 'signal': signal.SIGKILL}}


# ---------------------------------------------------------------------------
# guest-file-*: the same steps on a file of each's own; handles differ.

#: Steps on a file opened "r+" holding "hello world\n": (request name,
#: arguments but the handle).
FILE_STEPS = [
    ('read', {}), ('read', {}),
    ('seek', {'offset': 0, 'whence': 'set'}),
    ('read', {'count': 5}), ('read', {'count': 0}),
    ('read', {'count': -1}), ('read', {'count': 48 * 1024 * 1024 + 1}),
    ('seek', {'offset': -100, 'whence': 'cur'}),
    ('seek', {'offset': 2, 'whence': 'end'}),
    ('seek', {'offset': 0, 'whence': 3}),
    ('seek', {'offset': 1, 'whence': 0}),
    ('write', {'buf-b64': 'aGk='}),
    ('write', {'buf-b64': 'aGVsbG8=', 'count': 3}),
    ('write', {'buf-b64': 'aGVsbG8=', 'count': 9}),
    ('write', {'buf-b64': 'aGVsbG8=', 'count': -1}),
    ('write', {'buf-b64': '!!!!'}),
    ('flush', {}),
    ('seek', {'offset': 0, 'whence': 1}),
    ('read', {}),
    ('seek', {'offset': 0, 'whence': 'set'}),
    ('read', {'count': 100}),
    ('close', {}), ('close', {}), ('read', {}),
]


def file_steps(path, steps, name, mode, content=b'hello world\n'):
    """Open a file of ``content`` ``name`` in a new directory, take the
    steps: the replies (the handle shown as H), and the file's bytes."""
    workdir = Workdir()
    try:
        target = workdir.join(name)
        if content is not None:
            with open(target, 'wb') as handle:
                handle.write(content)
        opened = parse(exchange(path, encode(file_request(
            'open', path=target, mode=mode))))
        handle = opened['return']
        assert isinstance(handle, INTEGERS)
        replies = []
        for step, arguments in steps:
            reply = parse(exchange(path, encode(file_request(
                step, handle=handle, **arguments))))
            if 'error' in reply:
                reply['error']['desc'] = reply['error']['desc'].replace(
                    str(handle), 'H')
            replies.append(reply)
        with open(target, 'rb') as written:
            return replies, written.read(), os.stat(target).st_mode
    finally:
        workdir.cleanup()


@pytest.mark.parametrize('mode,steps,content', [
    ('r+', FILE_STEPS, b'hello world\n'),
    ('r', [('write', {'buf-b64': 'aGk='}), ('read', {}), ('close', {})],
     b'hello world\n'),
    ('a+', [('write', {'buf-b64': 'aGk='}), ('seek', {'offset': 0,
                                                      'whence': 0}),
            ('write', {'buf-b64': 'aGk='}), ('read', {}), ('close', {})],
     b'hello world\n'),
    ('w', [('read', {}), ('write', {'buf-b64': 'aGk='}), ('close', {})],
     b'hello world\n'),
    ('wb+', [('write', {'buf-b64': 'AP8='}), ('seek', {'offset': 0,
                                                       'whence': 'set'}),
             ('read', {}), ('close', {})], None),
], ids=['r+', 'r', 'a+', 'w', 'wb+-new-file'])
def test_file_steps(qga, agent, mode, steps, content):
    """Every reply, the file's bytes, and a new file's mode (0666 whatever
    the umask) are the same."""
    expected = file_steps(qga, steps, 'qga', mode, content)
    assert file_steps(agent.socket, steps, 'ours', mode, content) == expected


def test_file_fifo_never_blocks(qga, agent):
    """A FIFO's reads fail at once while a writer has written nothing, and
    end (count 0, eof) once no writer is left; writing to a FIFO that no
    one reads fails at open."""
    workdir = Workdir()
    try:
        fifo = workdir.join('fifo')
        os.mkfifo(fifo)
        replies = []
        for path in (qga, agent.socket):
            handle = parse(exchange(path, encode(file_request(
                'open', path=fifo))))['return']
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                replies.append([parse(exchange(path, encode(file_request(
                    'read', handle=handle))))])
            finally:
                os.close(writer)
            for request in (file_request('read', handle=handle),
                            file_request('seek', handle=handle, offset=0,
                                         whence=0),
                            file_request('close', handle=handle),
                            file_request('open', path=fifo, mode='w')):
                replies[-1].append(parse(exchange(path, encode(request))))
        assert replies[1] == replies[0]
        assert replies[0][:2] == [
            {'error': {'class': 'GenericError', 'desc': 'failed to read '
                       'file: Resource temporarily unavailable'}},
            {'return': {'count': 0, 'buf-b64': '', 'eof': True}}]
    finally:
        workdir.cleanup()


def test_default_refusals(qemu_ga_path):
    """Without -a or -b, negotiator refuses what qemu-ga as RHEL ships it
    (-b with its sysconfig list) refuses, the same way."""
    blocked = ','.join(negotiator.DEFAULT_BLOCKED_RPCS)
    with agent_running() as running:
        with serving_qga(qemu_ga_path, args=['-b', blocked]) as qga:
            replies = [both(qga, running, message) for message in [
                exec_request('/bin/true'), exec_status(1),
                file_request('open', path='/etc/hostname')] + [
                file_request(name, handle=1000)
                for name in ('read', 'write', 'seek', 'flush', 'close')]]
    for expected, actual in replies:
        assert actual == expected
    assert replies[0][1] == {'error': {'class': 'CommandNotFound',
                                       'desc': 'Command guest-exec has been '
                                       'disabled'}}


# ---------------------------------------------------------------------------
# The host client against the real qemu-ga.

def host(*args):
    status, out, err = run_cli(('host', '--timeout', '20') + args)
    return status, out.decode('utf-8'), err.decode('utf-8')


def test_version_agrees(qga, agent, qga_version):
    expected, _ = both(qga, agent, {'execute': 'guest-info'})
    assert expected['return']['version'] == qga_version


def test_host_ping(qga, qga_version):
    status, out, err = host('--ping', qga)
    assert (status, err) == (0, '')
    pattern = r'{0}: agent {1}, round trip [0-9]+\.[0-9]{{2}} ms\n\Z'.format(
        re.escape(qga), re.escape(qga_version))
    assert re.match(pattern, out), out


def test_host_ping_json(qga, qga_version):
    status, out, err = host('--json', '--ping', qga)
    assert (status, err) == (0, '')
    result = json.loads(out)
    assert isinstance(result, dict)
    assert result['version'] == qga_version
    assert result['round-trip-ms'] >= 0


def test_host_list_refused(qga):
    status, out, err = host('--list', qga)
    assert (status, out) == (254, '')
    assert err.count('\n') == 1 and err.endswith('\n'), err
    assert 'does not offer negotiator commands' in err


def test_qga_still_serves_after_host_client(qga):
    """The 0xFF the client sent left no parser state behind in qemu-ga."""
    assert parse(exchange(qga, encode(ping('after')))) == {
        'return': {}, 'id': 'after'}
