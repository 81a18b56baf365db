# -*- coding: utf-8 -*-
"""The host daemon: ``negotiator.py host --daemon`` serving guests' calls.

QEMU listens on one UNIX socket per guest (the guest-to-host port) and the
daemon connects to each as a client.  Here a listening UNIX socket stands
in for each guest's QEMU: the test accepts the daemon's connection and
speaks through it as a guest's caller would.  Commands are small POSIX sh
scripts; a FIFO ("gate") holds commands running until the test releases
them, so that "while a command runs" never depends on timing.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import base64
import fcntl
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest

import negotiator
from helpers import (HANG, NEGOTIATOR, ROOT, RawClient, Workdir,
                     assert_no_traceback, b, make_command, process_state,
                     run_cli, running, wait_for)

PORT = negotiator.GUEST_TO_HOST_PORT
MAX_LINE = negotiator.MAX_LINE
VERSION = negotiator.__version__

#: The commands every daemon here offers: name -> POSIX sh script.
SCRIPTS = {
    # The guest's name, then each argument on a line of its own.
    'whoami': (
        "#!/bin/sh\n"
        "printf '%s' \"$NEGOTIATOR_GUEST\"\n"
        "for a in \"$@\"; do printf '\\n%s' \"$a\"; done\n"),
    'env': (
        "#!/bin/sh\n"
        "printf '%s|%s|%s' \"$NEGOTIATOR_GUEST\" \"$NEGOTIATOR_COMMAND\" "
        "\"$NEGOTIATOR_VERSION\"\n"),
    # gated GATE PIDFILE [ARG...]: opens the gate FIFO, writes its pid,
    # waits until the gate is released, then prints like whoami.
    'gated': (
        "#!/bin/sh\n"
        "exec 3<\"$1\"\n"
        "printf '%s\\n' $$ > \"$2\"\n"
        "read -r line <&3\n"
        "shift 2\n"
        "printf '%s' \"$NEGOTIATOR_GUEST\"\n"
        "for a in \"$@\"; do printf '\\n%s' \"$a\"; done\n"),
    # sleeper PIDFILE: a shell and a background sleep 60 in its group.
    'sleeper': (
        "#!/bin/sh\n"
        "sleep 60 &\n"
        "printf '%s %s\\n' $$ $! > \"$1\"\n"
        "wait\n"
        "echo survived\n"),
    'out-err': (
        "#!/bin/sh\n"
        "printf 'to stdout'\n"
        "printf 'to stderr' >&2\n"
        "exit 3\n"),
}
COMMAND_NAMES = sorted(SCRIPTS)

#: What a guest may ask the daemon, in the order guest-info lists it.
DAEMON_REQUESTS = ['guest-sync-delimited', 'guest-sync', 'guest-ping',
                   'guest-info', 'negotiator-list-commands',
                   'negotiator-execute']

#: The guests of the shared channel-directory daemon: 200 for the
#: everyone-at-once test, and one of its own for each other test.
FARM = ['g{0:03d}'.format(i) for i in range(200)]
SPECIAL = ['slow', 'quick', 'ff', 'single', 'garbage', 'huge', 'flood',
           'caller', 'leaving']

#: The usual default limit of open files: the daemon must serve 200 guests
#: (a socket each, two pipes per running command) within it.
FILE_LIMIT = 1024


# ---------------------------------------------------------------------------
# Stand-in guests, the daemon, helpers
# ---------------------------------------------------------------------------

class Call(object):
    """One negotiator-execute (or other request) seen from the guest's side."""

    def __init__(self, request_id):
        self.request_id = request_id
        self.out = b''
        self.err = b''
        self.reply = None

    def take(self, message):
        if 'event' in message:
            assert message['event'] == 'negotiator-output', message
            data = message['data']
            assert data['id'] == self.request_id, message
            if 'out-data' in data:
                self.out += base64.b64decode(data['out-data'])
            else:
                self.err += base64.b64decode(data['err-data'])
        else:
            assert self.reply is None, message
            self.reply = message


class GuestEnd(RawClient):
    """The connection the daemon made to a stand-in, driven as the guest."""

    def __init__(self, sock):
        RawClient.__init__(self, sock=sock)

    def read_exact(self, size, timeout=HANG):
        self.sock.settimeout(timeout)
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            assert data, 'connection closed after {0!r}'.format(self.buffer)
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_call(self, request_id):
        """Output events up to the reply: a Call."""
        call = Call(request_id)
        while call.reply is None:
            call.take(self.read_message())
        return call

    def start(self, command, args=(), request_id=1, **arguments):
        """Send a negotiator-execute request (its answer is not read)."""
        arguments.update({'command': command, 'args': list(args)})
        self.request({'execute': 'negotiator-execute',
                      'arguments': arguments, 'id': request_id})

    def execute(self, command, args=(), request_id=1, **arguments):
        self.start(command, args, request_id, **arguments)
        return self.read_call(request_id)

    def unread(self):
        """Bytes sent that the daemon has not read yet (0: it read all)."""
        return struct.unpack('i', fcntl.ioctl(
            self.sock.fileno(), termios.TIOCOUTQ, b'\0\0\0\0'))[0]

    def read_to_eof(self, timeout=HANG):
        """Everything that arrives before end of file, which must come."""
        deadline = time.time() + timeout
        data, self.buffer = self.buffer, b''
        while True:
            self.sock.settimeout(max(0.01, deadline - time.time()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError('no end of file within {0} s; got '
                                     '{1!r}'.format(timeout, data[:300]))
            if not chunk:
                return data
            data += chunk


class StandIn(object):
    """A listening UNIX socket where a guest's QEMU would listen.

    It appears at ``path`` at once (bound under another name, then renamed),
    so the daemon never finds it before it listens; a stale socket file
    left at ``path`` is replaced.
    """

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = path + '.new'
        self.sock.bind(temporary)
        self.sock.listen(16)
        os.rename(temporary, path)

    def waiting(self, timeout=0):
        """Whether the daemon connected (and was not accepted yet)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def accept(self, timeout=HANG):
        if not self.waiting(timeout):
            raise AssertionError('no connection to {0} within {1} s'.format(
                self.path, timeout))
        return GuestEnd(self.sock.accept()[0])

    def close(self):
        """Stop listening; the socket file stays (connecting is refused)."""
        self.sock.close()

    def remove(self):
        self.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def accept_all(stand_ins, timeout=HANG):
    """Accept the daemon's connection to every stand-in: {name: GuestEnd}."""
    by_fd = dict((s.sock.fileno(), name) for name, s in stand_ins.items())
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    ends = {}
    deadline = time.time() + timeout
    while by_fd:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError('never connected: {0}'.format(
                sorted(by_fd.values())))
        for fd, _ in poller.poll(int(left * 1000) + 1):
            name = by_fd.pop(fd)
            poller.unregister(fd)
            ends[name] = stand_ins[name].accept(0)
    return ends


def gather(calls, timeout=HANG):
    """Read the replies of many guests at once, in one poll loop.

    :param calls: {name: (GuestEnd, request id)}.
    :returns: {name: Call}.
    """
    results = {}
    by_fd = {}
    poller = select.poll()
    for name, (end, request_id) in calls.items():
        results[name] = Call(request_id)
        by_fd[end.sock.fileno()] = (name, end)
        poller.register(end.sock.fileno(), select.POLLIN)
    deadline = time.time() + timeout
    while by_fd:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError('no reply from {0}'.format(
                sorted(name for name, _ in by_fd.values())))
        for fd, _ in poller.poll(int(left * 1000) + 1):
            name, end = by_fd[fd]
            data = end.sock.recv(65536)
            assert data, 'guest {0}: connection closed'.format(name)
            end.buffer += data
            call = results[name]
            while b'\n' in end.buffer and call.reply is None:
                line, end.buffer = end.buffer.split(b'\n', 1)
                call.take(json.loads(line.decode('ascii')))
            if call.reply is not None:
                poller.unregister(fd)
                del by_fd[fd]
    return results


class Gate(object):
    """A FIFO that ``gated`` commands wait on until release() (or the end
    of a ``with`` block).

    The test holds it open for reading and writing, so a command's open()
    never blocks and its read() ends (end of file) once the test closes it.
    """

    def __init__(self, path):
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR)

    def hold(self, end, pid_file, args=(), request_id='run'):
        """Start ``gated`` for guest ``end``: its pid, once it waits here."""
        end.start('gated', [self.path, pid_file] + list(args), request_id)
        return wait_pids(pid_file)[0]

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def limit_open_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > FILE_LIMIT:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, hard))


def raise_own_file_limit(wanted=4096):
    """The test itself holds two descriptors per stand-in guest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard == resource.RLIM_INFINITY or hard >= wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


#: ``python -c PATCHED ROOT JSON ARG...`` runs negotiator's main(ARGS)
#: with the module's constants in the JSON object changed.
PATCHED = ('import json, sys; sys.path.insert(0, sys.argv[1]); '
           'import negotiator; '
           'negotiator.__dict__.update(json.loads(sys.argv[2])); '
           'sys.exit(negotiator.main(sys.argv[3:]))')


class Daemon(object):
    """``negotiator.py host --daemon -v ARGS`` in the background.

    Its log (stderr) goes to a file; it runs with at most FILE_LIMIT open
    files.  Waits until the daemon says it started (initial guests are
    connected to by then).  ``constants`` ({name: value}) changes some of
    negotiator's constants in the daemon.
    """

    def __init__(self, workdir, args, name='daemon', constants=None):
        self.log_path = workdir.join(name + '.log')
        self.log_file = open(self.log_path, 'wb')
        devnull = open(os.devnull, 'rb')
        program = [sys.executable, NEGOTIATOR]
        if constants:
            program = [sys.executable, '-c', PATCHED, ROOT,
                       json.dumps(constants)]
        try:
            self.process = subprocess.Popen(
                program + ['host', '--daemon', '-v',
                           '--commands-dir', workdir.commands] + list(args),
                stdin=devnull, stdout=self.log_file,
                stderr=subprocess.STDOUT, close_fds=True,
                preexec_fn=limit_open_files)
        finally:
            devnull.close()
        try:
            self.wait_log('host daemon started')
        except BaseException:
            self.kill()
            raise

    def log(self):
        with open(self.log_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')

    def lines(self):
        return self.log().splitlines()

    def wait_log(self, text, timeout=HANG):
        def seen():
            if text in self.log():
                return True
            if self.process.poll() is not None:
                raise AssertionError('daemon exited with {0} before logging '
                                     '{1!r}:\n{2}'.format(
                                         self.process.returncode, text,
                                         self.log()))
            return False
        wait_for(seen, timeout)

    def send_signal(self, signum):
        self.process.send_signal(signum)

    def stop(self, signum=signal.SIGTERM, bound=HANG):
        """Signal it: it must exit 0 within ``bound`` s, with no traceback."""
        self.process.send_signal(signum)
        started = time.time()
        wait_for(lambda: self.process.poll() is not None, bound)
        took = time.time() - started
        self.log_file.close()
        text = self.log()
        assert_no_traceback(text)
        assert 'internal error' not in text, text
        assert self.process.returncode == 0, (self.process.returncode, text)
        return took

    def kill(self):
        """Failure paths: make sure it is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


def write_commands(directory):
    for name, script in SCRIPTS.items():
        make_command(directory, name, script)



def wait_pids(path):
    """The pids a command wrote to ``path`` (a line ending in a newline)."""
    def complete():
        try:
            with open(path) as handle:
                return handle.read().endswith('\n')
        except IOError:
            return False
    wait_for(complete)
    with open(path) as handle:
        return [int(word) for word in handle.read().split()]


def channel_path(directory, name):
    return os.path.join(directory, name + '.' + PORT)


def ping(end, request_id):
    return end.call({'execute': 'guest-ping', 'id': request_id})


def assert_served(end, name, request_id=99):
    """The guest's calls still get their own, correct answers."""
    call = end.execute('whoami', ['still', 'served'], request_id)
    assert call.out == name.encode('utf-8') + b'\nstill\nserved'
    assert call.err == b''
    assert call.reply == {'return': {'exitcode': 0}, 'id': request_id}


def assert_cut_off(farm, end, name, reason):
    """Guest ``name``'s connection ``end`` ends: the daemon has cut the
    guest off, saying ``reason``."""
    assert end.read_to_eof() == b''
    farm.daemon.wait_log('guest {0}: cut off'.format(name))
    assert 'negotiator: guest {0}: cut off for 30 s: {1}'.format(
        name, reason) in farm.daemon.lines()


class Scene(object):
    """A workdir with the commands written, the stand-in guests made in it,
    the daemon's connections to them (their ends) and the daemon.

    close(), or the end of a ``with`` block, kills the daemon if it still
    runs, closes the ends, removes the stand-ins and the workdir.
    """

    def __init__(self):
        self.workdir = Workdir()
        write_commands(self.workdir.commands)
        self.stand_ins = {}
        self.ends = {}
        self.daemon = None

    def join(self, *names):
        return self.workdir.join(*names)

    def stand_in(self, name, path=None):
        """A new stand-in guest ``name``, at ``path`` or WORKDIR/NAME.sock."""
        self.stand_ins[name] = stand_in = StandIn(
            path or self.join(name + '.sock'))
        return stand_in

    def accept(self, name):
        """The daemon's connection to stand-in ``name``: its GuestEnd."""
        self.ends[name] = end = self.stand_ins[name].accept()
        return end

    def start(self, args, **options):
        """The daemon: ``Daemon(workdir, args, **options)``."""
        self.daemon = Daemon(self.workdir, args, **options)
        return self.daemon

    def close(self):
        if self.daemon is not None:
            self.daemon.kill()
        for end in self.ends.values():
            end.close()
        for stand_in in self.stand_ins.values():
            stand_in.remove()
        self.workdir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.fixture
def scene():
    """A Scene of the test's own, closed after it."""
    with Scene() as scene:
        yield scene


# ---------------------------------------------------------------------------
# The shared daemon: a channel directory of 209 guests, rescanned every 0.5 s
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def farm():
    raise_own_file_limit()
    with Scene() as farm:
        farm.channels = farm.join('channels')
        os.mkdir(farm.channels)
        for name in FARM + SPECIAL:
            farm.stand_in(name, channel_path(farm.channels, name))
        farm.start(['--channel-dir', farm.channels, '--rescan', '0.5'])
        farm.ends = accept_all(farm.stand_ins)
        yield farm
        farm.daemon.stop()


def new_guest(farm, name, path=None):
    """A guest that appears in the channel directory: (StandIn, GuestEnd)."""
    stand_in = farm.stand_in(name, path or channel_path(farm.channels, name))
    return stand_in, farm.accept(name)


def two_scans_later(farm, name):
    """Returns after two more scans of the channel directory, each of
    which found a new guest (NAME-1, then NAME-2).

    The second scan started at least a rescan period (0.5 s) after the
    first, which started after this call: a timer the daemon set before
    this call, to run within 0.5 s, has run by then, however slow the
    machine (the daemon's timers run in the order of their deadlines).
    """
    new_guest(farm, name + '-1')
    new_guest(farm, name + '-2')


# Many guests at once --------------------------------------------------------

def test_200_guests_are_served_at_once(farm):
    pid_dir = farm.join('pids-200')
    os.mkdir(pid_dir)
    calls = {}
    with Gate(farm.join('gate-200')) as gate:
        for number, name in enumerate(FARM):
            end = farm.ends[name]
            end.start('gated', [gate.path, os.path.join(pid_dir, name),
                                'argument of ' + name, ''], 1000 + number)
            calls[name] = (end, 1000 + number)
        # Every guest's command runs at the same time: each has written its
        # pid and now waits at the gate.
        wait_for(lambda: len(os.listdir(pid_dir)) == len(FARM))
        pids = [wait_pids(os.path.join(pid_dir, name))[0] for name in FARM]
        assert len(set(pids)) == len(FARM)
        assert [pid for pid in pids if not running(pid)] == []
    results = gather(calls)
    assert sorted(results) == FARM
    for number, name in enumerate(FARM):
        call = results[name]
        assert call.out == b(name) + b'\nargument of ' + b(name) + b'\n'
        assert call.err == b''
        assert call.reply == {'return': {'exitcode': 0}, 'id': 1000 + number}
    wait_for(lambda: not [pid for pid in pids if running(pid)])


# A long command delays no other guest ---------------------------------------

def test_running_command_does_not_delay_another_guests_ping(farm):
    slow, quick = farm.ends['slow'], farm.ends['quick']
    with Gate(farm.join('gate-slow')) as gate:
        pid = gate.hold(slow, farm.join('slow.pid'))
        # Answered while the command cannot end: it waits at the gate.
        assert ping(quick, 2) == {'return': {}, 'id': 2}
        assert running(pid)
        assert slow.nothing_within(0)
    call = slow.read_call('run')
    assert (call.out, call.err) == (b'slow', b'')
    assert call.reply == {'return': {'exitcode': 0}, 'id': 'run'}


# Garbage and floods cut a guest off; one bad line does not ------------------

def test_single_malformed_line_gets_an_error_reply_and_guest_stays(farm):
    end = farm.ends['single']
    end.send(b'this is not json\n')
    reply = end.read_message()
    assert sorted(reply) == ['error']
    assert reply['error']['class'] == 'GenericError'
    assert reply['error']['desc'].startswith('Invalid JSON syntax: ')
    end.send(b'[1, 2]\n')
    assert end.read_message() == {'error': {
        'class': 'GenericError', 'desc': 'QMP input must be a JSON object'}}
    end.send(b'{"execute": "guest-ping", "id": "\xc3\x28"}\n')
    assert end.read_message() == {'error': {
        'class': 'GenericError',
        'desc': 'Invalid JSON syntax: the line is not valid UTF-8'}}
    assert ping(end, 'after') == {'return': {}, 'id': 'after'}
    assert_served(end, 'single')
    assert not [line for line in farm.daemon.lines()
                if 'guest single: cut off' in line]


def test_sixteen_malformed_lines_in_a_row_cut_the_guest_off(farm):
    end = farm.ends['garbage']
    garbage = b'[1, 2]\n'
    not_object = {'error': {'class': 'GenericError',
                            'desc': 'QMP input must be a JSON object'}}
    # 15 in a row, a good request (the count starts again), 15 more.
    end.send(garbage * 15 + b'{"execute":"guest-ping","id":15}\n' +
             garbage * 15)
    replies = [end.read_message() for _ in range(31)]
    assert replies == [not_object] * 15 + [{'return': {}, 'id': 15}] + [
        not_object] * 15
    end.send(garbage)  # the 16th in a row
    assert_cut_off(farm, end, 'garbage', '16 failed requests in a row')
    assert_served(farm.ends['g000'], 'g000')
    # Cut off means no reconnection after the usual 0.5 s either.
    two_scans_later(farm, 'after-garbage')
    assert not farm.stand_ins['garbage'].waiting(0)


def test_line_longer_than_16_mib_cuts_the_guest_off(farm):
    end = farm.ends['huge']
    # Exactly the limit is still a line (a malformed one here).
    end.send(b'x' * MAX_LINE + b'\n')
    reply = end.read_message()
    assert reply['error']['class'] == 'GenericError'
    assert reply['error']['desc'].startswith('Invalid JSON syntax: ')
    assert ping(end, 1) == {'return': {}, 'id': 1}
    end.send(b'x' * (MAX_LINE + 1))
    assert_cut_off(farm, end, 'huge', 'a line longer than 16777216 bytes')
    assert_served(farm.ends['g001'], 'g001')


def pings_from(first, count):
    return b''.join(b'{"execute":"guest-ping","id":' + b(str(i)) + b'}\n'
                    for i in range(first, first + count))


def test_requests_behind_a_running_command_are_read_up_to_64(farm):
    """Backpressure, not refusal: the daemon reads a guest's requests while
    fewer than 64 wait behind its command, then leaves the rest in the
    socket, and answers them all, in order, once the command is done."""
    end = farm.ends['flood']
    with Gate(farm.join('gate-flood')) as gate:
        pid = gate.hold(end, farm.join('flood.pid'))
        end.send(pings_from(1, 64))
        wait_for(lambda: end.unread() == 0)  # the daemon has them all
        more = pings_from(65, 200)
        end.send(more)
        # Another guest's whole call takes several turns of the daemon's
        # loop: had it watched this socket for reading, it would have read.
        assert_served(farm.ends['g002'], 'g002')
        assert end.unread() > 0  # (the kernel's count, not len(more))
        assert running(pid)
    call = end.read_call('run')
    assert (call.out, call.err) == (b'flood', b'')
    assert call.reply == {'return': {'exitcode': 0}, 'id': 'run'}
    assert [end.read_message() for _ in range(264)] == [
        {'return': {}, 'id': i} for i in range(1, 265)]
    assert_served(end, 'flood')
    assert 'guest flood: cut off' not in farm.daemon.log()


# Guests that come and go ----------------------------------------------------

def test_guest_appearing_in_the_channel_directory_is_served(farm):
    # Sockets of other ports, or of no port, are never connected to.
    others = {
        'h2g': farm.stand_in('other-h2g', os.path.join(
            farm.channels, 'h2g.negotiator-host-to-guest.0')),
        'plain': farm.stand_in('other-plain', os.path.join(
            farm.channels, 'plain.sock')),
    }
    stand_in, end = new_guest(farm, 'late')
    # The scan that found "late" saw them too.
    assert [name for name, s in others.items() if s.waiting(0)] == []
    call = end.execute('env', request_id=3)
    assert call.out == b'late|env|' + b(VERSION)
    assert call.reply == {'return': {'exitcode': 0}, 'id': 3}
    lines = farm.daemon.lines()
    assert 'negotiator: guest late: found ({0})'.format(
        stand_in.path) in lines
    assert 'negotiator: guest late: connected to {0}'.format(
        stand_in.path) in lines


def test_domain_directories_are_served_latest_start_first(farm):
    # Newer libvirt: domain-ID-NAME/PORT; the highest ID is the guest's
    # current run (compared as numbers: 10 after 9).
    os.mkdir(os.path.join(farm.channels, 'domain-9-web'))
    first, end = new_guest(farm, 'web-9', os.path.join(
        farm.channels, 'domain-9-web', PORT))
    assert_served(end, 'web')
    os.mkdir(os.path.join(farm.channels, 'domain-10-web'))
    second = farm.stand_in('web-10', os.path.join(
        farm.channels, 'domain-10-web', PORT))
    # The daemon leaves the old run's socket for the new one.
    assert end.read_to_eof() == b''
    new_end = farm.accept('web-10')
    assert_served(new_end, 'web')
    lines = farm.daemon.lines()
    assert 'negotiator: guest web: found ({0})'.format(first.path) in lines
    assert lines.index('negotiator: guest web: gone') > lines.index(
        'negotiator: guest web: found ({0})'.format(first.path))
    assert 'negotiator: guest web: found ({0})'.format(second.path) in lines
    assert not first.waiting(0)


def test_removed_socket_drops_the_guest_and_kills_its_command(farm):
    end = farm.ends['leaving']
    pid_file = farm.join('leaving.pid')
    end.start('sleeper', [pid_file])
    pids = wait_pids(pid_file)
    os.unlink(farm.stand_ins['leaving'].path)
    assert end.read_to_eof() == b''
    wait_for(lambda: not [pid for pid in pids if running(pid)])
    farm.daemon.wait_log('guest leaving: killing command')
    lines = farm.daemon.lines()
    assert 'negotiator: guest leaving: gone' in lines
    assert ('negotiator: guest leaving: killing command pid {0}: its client '
            'has gone'.format(pids[0])) in lines
    assert_served(farm.ends['g003'], 'g003')


# What a guest may call ------------------------------------------------------

def test_requests_a_guest_may_make(farm):
    end = farm.ends['caller']
    assert ping(end, 1) == {'return': {}, 'id': 1}
    assert end.call({'execute': 'guest-sync', 'arguments': {'id': 5},
                     'id': 2}) == {'return': 5, 'id': 2}
    end.request({'execute': 'guest-sync-delimited',
                 'arguments': {'id': 123456789}})
    assert end.read_exact(len(b'\xff{"return":123456789}\n')) == (
        b'\xff{"return":123456789}\n')
    assert end.call({'execute': 'guest-info', 'id': 3}) == {
        'id': 3, 'return': {
            'version': VERSION,
            'supported_commands': [
                {'name': name, 'enabled': True, 'success-response': True}
                for name in DAEMON_REQUESTS]}}
    # The commands directory only: none of the guest agent's built-ins.
    assert end.call({'execute': 'negotiator-list-commands', 'id': 4}) == {
        'id': 4, 'return': [{'name': name, 'kind': 'user'}
                            for name in COMMAND_NAMES]}
    # Output streams: the daemon never holds a guest's output whole.
    assert end.call({'execute': 'negotiator-execute', 'id': 5, 'arguments': {
        'command': COMMAND_NAMES[0], 'capture-output': True}}) == {
        'id': 5, 'error': {'class': 'GenericError',
                           'desc': "Parameter 'capture-output' is unexpected"}}
    assert end.nothing_within(0)


@pytest.mark.parametrize('request_name', [
    'guest-get-osinfo', 'guest-get-host-name', 'guest-network-get-interfaces',
    'guest-get-users', 'guest-get-vcpus', 'guest-set-vcpus',
    'guest-get-fsinfo', 'guest-get-disks', 'guest-exec', 'guest-shutdown',
    'guest-ssh-get-authorized-keys', 'guest-ssh-add-authorized-keys',
    'guest-ssh-remove-authorized-keys'])
def test_facts_about_the_host_are_not_offered(farm, request_name):
    assert farm.ends['caller'].call({'execute': request_name, 'id': 7}) == {
        'id': 7, 'error': {
            'class': 'CommandNotFound',
            'desc': 'The command {0} has not been found'.format(
                request_name)}}
    # A success clears the strikes: these cases stay under GARBAGE_LIMIT.
    assert farm.ends['caller'].call({'execute': 'guest-ping', 'id': 8}) == {
        'id': 8, 'return': {}}


@pytest.mark.parametrize('name', ['hostname', 'os-info', 'uptime'])
def test_builtin_commands_are_not_offered(farm, name):
    call = farm.ends['caller'].execute(name, request_id=8)
    assert (call.out, call.err) == (b'', b'')
    assert call.reply == {'id': 8, 'error': {
        'class': 'NegotiatorCommandNotFound',
        'desc': "Command '{0}' not found in the host's commands directory; "
                "available: {1}".format(name, ', '.join(COMMAND_NAMES))}}


def test_command_output_status_and_environment(farm):
    end = farm.ends['caller']
    call = end.execute('out-err', request_id=9)
    assert (call.out, call.err) == (b'to stdout', b'to stderr')
    assert call.reply == {'return': {'exitcode': 3}, 'id': 9}
    call = end.execute('env', ['ignored'], request_id=10)
    assert call.out == b'caller|env|' + b(VERSION)
    assert call.reply == {'return': {'exitcode': 0}, 'id': 10}
    call = end.execute('whoami', [u'caf\u00e9', '', ' two words '],
                       request_id=11)
    assert call.out == b'caller\ncaf\xc3\xa9\n\n two words '
    assert call.reply == {'return': {'exitcode': 0}, 'id': 11}
    # A timeout kills the command's process group (a gated command would
    # wait at its gate for ever).
    with Gate(farm.join('gate-timed')) as gate:
        call = end.execute('gated', [gate.path, farm.join('timed.pid')],
                           request_id=12, timeout=0.3)
    assert (call.out, call.err) == (b'', b'')
    assert call.reply == {'return': {'signal': 9, 'timed-out': True},
                          'id': 12}
    assert end.execute('../whoami', request_id=13).reply == {
        'id': 13, 'error': {
            'class': 'GenericError',
            'desc': "Invalid command name '../whoami': a name is a file "
                    "directly inside the commands directory"}}


# 0xFF kills the running command ---------------------------------------------

def test_resync_byte_kills_the_running_command_and_drops_waiting_ones(farm):
    end = farm.ends['ff']
    pid_file = farm.join('ff.pid')
    end.start('sleeper', [pid_file])
    pids = wait_pids(pid_file)
    end.send(b'{"execute":"guest-ping","id":2}\n'
             b'{"execute":"guest-ping","id":3}\n')
    wait_for(lambda: end.unread() == 0)
    end.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":42}}\n')
    # Nothing for the command nor the pings: only the sync's answer.
    assert end.read_exact(len(b'\xff{"return":42}\n')) == (
        b'\xff{"return":42}\n')
    wait_for(lambda: not [pid for pid in pids if running(pid)])
    # Once the daemon has reaped the command (its child), whatever its end
    # or the pings would have made the daemon send has been sent: before
    # the answer to this ping.
    wait_for(lambda: process_state(pids[0]) is None)
    assert ping(end, 4) == {'return': {}, 'id': 4}
    assert ('negotiator: guest ff: 0xFF received: dropping 2 waiting '
            'request(s) and the running command') in farm.daemon.lines()
    assert_served(end, 'ff')


# ---------------------------------------------------------------------------
# --guest NAME=SOCKET: a guest that disconnects, and reconnection
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pairs():
    with Scene() as pairs:
        args = []
        for name in ('a', 'b', 'c'):
            args += ['--guest', name + '=' + pairs.stand_in(name).path]
        pairs.start(args)
        pairs.ends = accept_all(pairs.stand_ins)
        yield pairs
        pairs.daemon.stop()


def test_guest_gone_mid_call_kills_its_command_and_is_reconnected(pairs):
    a, other = pairs.ends['a'], pairs.ends['b']
    with Gate(pairs.join('gate-b')) as gate:
        other_pid = gate.hold(other, pairs.join('b.pid'), ['x'], 'b1')
        a.start('sleeper', [pairs.join('a.pid')])
        pids = wait_pids(pairs.join('a.pid'))
        closed = time.time()
        a.close()
        wait_for(lambda: not [pid for pid in pids if running(pid)])
        assert running(other_pid)
    call = other.read_call('b1')
    assert (call.out, call.err) == (b'b\nx', b'')
    assert call.reply == {'return': {'exitcode': 0}, 'id': 'b1'}
    # QEMU still listens: the daemon connects again after 0.5 s.
    a = pairs.accept('a')
    assert time.time() - closed >= 0.5 - 0.01
    assert_served(a, 'a')
    lines = pairs.daemon.lines()
    assert ('negotiator: guest a: killing command pid {0}: its client has '
            'gone'.format(pids[0])) in lines
    assert ('negotiator: guest a: connection closed (guest stopped?); '
            'reconnecting') in lines
    assert lines.count('negotiator: guest a: connected to {0}'.format(
        pairs.stand_ins['a'].path)) == 2


def test_refused_reconnection_is_retried_ever_later(pairs):
    path = pairs.stand_ins['c'].path
    closed = time.time()
    pairs.ends.pop('c').close()
    pairs.stand_ins['c'].close()  # the socket file stays: refused
    pairs.daemon.wait_log('guest c: cannot connect')
    assert ('negotiator: guest c: cannot connect to {0}: connection refused: '
            'nothing serves this socket (the guest is stopped?); '
            'retrying'.format(path)) in pairs.daemon.lines()
    # Listening again at the same path: the next try, 0.5 s after the
    # closed connection and 1 s after the refused one, gets through.
    pairs.stand_in('c', path)
    end = pairs.accept('c')
    assert time.time() - closed >= 0.5 + 1.0 - 0.01
    assert_served(end, 'c')
    assert_served(pairs.ends['b'], 'b')


class RecordingLoop(object):
    """Stands in for the daemon's loop: keeps the pauses asked for."""

    def __init__(self):
        self.delays = []

    def call(self, on_error, callback, *args):
        callback(*args)

    def call_later(self, delay, callback, on_error=None):
        self.delays.append(delay)
        return negotiator.Timer(negotiator.monotonic() + delay, callback,
                                on_error)


class LoopOnly(object):
    """All a GuestLink that never gets through uses of its daemon."""

    def __init__(self):
        self.loop = RecordingLoop()


def test_pauses_between_tries_stay_short_however_long_a_guest_is_down(
        workdir):
    """A restarted QEMU listens long before its guest is up, and the guest
    may call as soon as it is: whenever QEMU comes back, the daemon must
    be back within RECONNECT_MAX (1 s), not after a pause grown to 8 s."""
    path = workdir.join('refused.sock')
    refusing = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    refusing.bind(path)
    refusing.close()  # the socket file stays: connections are refused
    daemon = LoopOnly()
    link = negotiator.GuestLink(daemon, 'down', path)
    for _ in range(8):
        link.connect()  # as each timer would
    assert daemon.loop.delays == [0.5] + [1.0] * 7
    assert link.sock is None


# ---------------------------------------------------------------------------
# SIGHUP: look now (with a rescan period far away)
# ---------------------------------------------------------------------------

def test_sighup_looks_for_guests_and_retries_waiting_connections(scene):
    channels = scene.join('channels')
    os.mkdir(channels)
    scene.stand_in('first', channel_path(channels, 'first'))
    # A guest is cut off for an hour here, not 30 s: its connection
    # within HANG can only come from SIGHUP.
    daemon = scene.start(['--channel-dir', channels, '--rescan', '3600'],
                         constants={'CUT_OFF_PAUSE': 3600.0})
    scene.accept('first')
    scene.stand_in('second', channel_path(channels, 'second'))
    assert not scene.stand_ins['second'].waiting(0.7)  # no rescan for an hour
    daemon.send_signal(signal.SIGHUP)
    second = scene.accept('second')
    assert_served(second, 'second')
    # A removed socket: the guest is dropped on SIGHUP.
    os.unlink(scene.stand_ins['first'].path)
    daemon.send_signal(signal.SIGHUP)
    assert scene.ends['first'].read_to_eof() == b''
    daemon.wait_log('guest first: gone')
    # A guest cut off is connected again at once on SIGHUP.
    second.send(b'[]\n' * 16)
    replies = second.read_to_eof().splitlines()
    assert [json.loads(line.decode('ascii')) for line in replies] == [
        {'error': {'class': 'GenericError',
                   'desc': 'QMP input must be a JSON object'}}] * 15
    daemon.wait_log('guest second: cut off for 3600 s')
    daemon.send_signal(signal.SIGHUP)
    second = scene.accept('second')
    assert_served(second, 'second')
    lines = daemon.lines()
    assert lines.count('negotiator: SIGHUP: looking for guests again') == 3
    assert 'negotiator: guest second: found ({0})'.format(
        scene.stand_ins['second'].path) in lines
    daemon.stop()


# ---------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT],
                         ids=['SIGTERM', 'SIGINT'])
def test_stop_signal_ends_the_daemon_and_its_commands(scene, signum):
    daemon = scene.start(['--guest', 'only=' + scene.stand_in('only').path])
    end = scene.accept('only')
    end.start('sleeper', [scene.join('only.pid')])
    pids = wait_pids(scene.join('only.pid'))
    # The command would sleep 60 s: the daemon waits for none of it.
    daemon.stop(signum)
    assert end.read_to_eof() == b''
    wait_for(lambda: not [pid for pid in pids if running(pid)])
    lines = daemon.lines()
    assert lines.index('negotiator: stopping') < lines.index(
        'negotiator: guest only: killing command pid {0}: its client '
        'has gone'.format(pids[0]))


# ---------------------------------------------------------------------------
# Usage errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('args, message', [
    (['--guest', 'foo'], "--guest takes NAME=SOCKET, not 'foo'"),
    (['--guest', '=/tmp/x.sock'],
     "--guest takes NAME=SOCKET, not '=/tmp/x.sock'"),
    (['--rescan', '0'], '--rescan must be a positive number of seconds'),
    (['--rescan', 'nan'], '--rescan must be a positive number of seconds'),
    (['--rescan', 'inf'], '--rescan must be a positive number of seconds'),
    (['extra', 'words'], 'unexpected arguments: extra words'),
], ids=['no-equals', 'no-name', 'rescan-0', 'rescan-nan', 'rescan-inf',
        'extra-args'])
def test_daemon_usage_errors(args, message):
    status, out, err = run_cli(['host', '--daemon'] + args, timeout=HANG)
    assert (status, out) == (2, b'')
    assert err.startswith(b'Usage: negotiator.py host [OPTIONS] GUEST|SOCKET')
    assert err.rstrip(b'\n').split(b'\n')[-1] == b(
        'negotiator.py: error: ' + message)
    assert err.count(b'error') == 1


# ---------------------------------------------------------------------------
# Discovery through virsh (libvirt's test driver)
# ---------------------------------------------------------------------------

def which(program):
    for directory in os.environ.get('PATH', os.defpath).split(os.pathsep):
        path = os.path.join(directory, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


needs_virsh = pytest.mark.skipif(
    which('virsh') is None,
    reason='virsh (libvirt-clients) is not installed')


def domain_xml(name, channels=()):
    """One test-driver domain; channels: (mode, socket path, port name)."""
    devices = ''.join(
        "<channel type='unix'><source mode='{0}' path='{1}'/>"
        "<target type='virtio' name='{2}'/></channel>".format(*channel)
        for channel in channels)
    return (u"<domain type='test'><name>{0}</name><memory>65536</memory>"
            u"<os><type>hvm</type></os><devices>{1}</devices>"
            u"</domain>".format(name, devices))


def write_node(path, domains):
    """The test driver's whole node, replaced at once (virsh reads it anew
    each time, and never sees it half written)."""
    with open(path + '.new', 'wb') as handle:
        handle.write((u'<node>' + u''.join(domains) +
                      u'</node>\n').encode('utf-8'))
    os.rename(path + '.new', path)


def guest_domain(name, stand_in):
    """A domain whose guest-to-host channel is ``stand_in``'s socket."""
    return domain_xml(name, [('bind', stand_in.path, PORT)])


@needs_virsh
def test_guests_found_through_virsh(scene):
    node = scene.join('node.xml')
    for name in ('g1', 'web', 'g3', 'h2g', 'connect'):
        scene.stand_in(name)
    stand_ins = scene.stand_ins
    ignored = [
        domain_xml('no-channel'),
        domain_xml('h2g-only', [('bind', stand_ins['h2g'].path,
                                 negotiator.HOST_TO_GUEST_PORT)]),
        domain_xml('connect-mode', [('connect', stand_ins['connect'].path,
                                     PORT)]),
    ]
    web_server = guest_domain('web server', stand_ins['web'])
    write_node(node, [guest_domain('g1', stand_ins['g1']), web_server] +
               ignored)
    daemon = scene.start(['--connect', 'test://' + node, '--rescan', '0.5'])
    g1 = scene.accept('g1')
    web = scene.accept('web')
    # Found by the same dumpxml: the others were ignored for good.
    assert not stand_ins['h2g'].waiting(0)
    assert not stand_ins['connect'].waiting(0)
    assert_served(g1, 'g1')
    assert_served(web, 'web server')
    lines = daemon.lines()
    for name in ('no-channel', 'h2g-only', 'connect-mode'):
        assert 'negotiator: guest {0} has no {1} channel'.format(
            name, PORT) in lines
    assert 'negotiator: guest web server: connected to {0}'.format(
        stand_ins['web'].path) in lines
    # g1 stops, g3 starts.
    write_node(node, [web_server, guest_domain('g3', stand_ins['g3'])] +
               ignored)
    assert_served(scene.accept('g3'), 'g3')
    assert g1.read_to_eof() == b''
    daemon.wait_log('guest g1: gone')
    assert_served(web, 'web server')
    assert not stand_ins['g1'].waiting(0)
    assert not stand_ins['h2g'].waiting(0)
    assert not stand_ins['connect'].waiting(0)
    assert 'until virsh works' not in daemon.log()
    daemon.stop()


@needs_virsh
def test_guest_with_non_ascii_name_found_through_virsh(scene):
    node = scene.join('node.xml')
    name = u'g\u00e4st'
    write_node(node, [guest_domain('g1', scene.stand_in('g1')),
                      guest_domain(name, scene.stand_in('other'))])
    daemon = scene.start(['--connect', 'test://' + node, '--rescan', '0.5'])

    def decided():
        text = daemon.log()
        return 'until virsh works' in text or (
            'guest g1: found' in text and
            u'guest {0}: found'.format(name) in text)
    wait_for(decided)
    # virsh's table escapes this name outside UTF-8 locales
    # (g\xff\xffst); a dumpxml of the escaped name would fail on every
    # rescan, and the guest would never be served.
    assert 'until virsh works' not in daemon.log(), daemon.log()
    assert_served(scene.accept('g1'), 'g1')
    call = scene.accept('other').execute('env', request_id=1)
    assert call.out == name.encode('utf-8') + b'|env|' + b(VERSION)
    assert call.reply == {'return': {'exitcode': 0}, 'id': 1}
    daemon.stop()


# ---------------------------------------------------------------------------
# Budgets and strikes of a guest
# ---------------------------------------------------------------------------

def padded_ping(request_id, size):
    """A guest-ping line of about ``size`` bytes (an unexpected member)."""
    return (b'{"execute": "guest-ping", "id": ' + b(str(request_id)) +
            b', "padding": "' + b'x' * size + b'"}\n')


def test_requests_behind_a_running_command_are_read_up_to_16_mib(farm):
    _, end = new_guest(farm, 'budget')
    unexpected = {'class': 'GenericError',
                  'desc': "QMP input member 'padding' is unexpected"}
    with Gate(farm.join('gate-budget')) as gate:
        pid = gate.hold(end, farm.join('budget.pid'))
        # Two lines of 9 MiB: the second one is read while less than
        # 16 MiB wait; after it, nothing is.
        end.send(padded_ping(1, 9 << 20) + padded_ping(2, 9 << 20))
        wait_for(lambda: end.unread() == 0)
        more = pings_from(3, 1)
        end.send(more)
        assert_served(farm.ends['g003'], 'g003')
        assert end.unread() > 0
        assert running(pid)
    call = end.read_call('run')
    assert (call.out, call.err) == (b'budget', b'')
    assert call.reply == {'return': {'exitcode': 0}, 'id': 'run'}
    assert [end.read_message() for _ in range(3)] == [
        {'error': unexpected, 'id': 1}, {'error': unexpected, 'id': 2},
        {'return': {}, 'id': 3}]
    assert 'guest budget: cut off' not in farm.daemon.log()


def test_sixteen_failed_requests_in_a_row_cut_the_guest_off(farm):
    # Unknown requests, and replies sent back as if ours were requests
    # (a peer answering replies with replies), are all strikes.
    _, end = new_guest(farm, 'echoer')
    unknown = b'{"execute": "guest-exec", "id": 7}\n'
    answer = b'{"return": {}}\n'
    not_found = {'id': 7, 'error': {
        'class': 'CommandNotFound',
        'desc': 'The command guest-exec has not been found'}}
    unexpected = {'error': {'class': 'GenericError',
                            'desc': "QMP input member 'return' is unexpected"}}
    # 15 in a row, a successful reply (the count starts again), 15 more.
    end.send(unknown * 8 + answer * 7 +
             b'{"execute": "guest-ping", "id": 15}\n' + answer * 15)
    replies = [end.read_message() for _ in range(31)]
    assert replies == ([not_found] * 8 + [unexpected] * 7 +
                       [{'return': {}, 'id': 15}] + [unexpected] * 15)
    end.send(answer)  # the 16th in a row
    assert_cut_off(farm, end, 'echoer', '16 failed requests in a row')
    assert_served(farm.ends['g004'], 'g004')
    two_scans_later(farm, 'after-echoer')
    assert not farm.stand_ins['echoer'].waiting(0)


# ---------------------------------------------------------------------------
# A socket path too long for AF_UNIX
# ---------------------------------------------------------------------------

def test_guest_socket_path_too_long_is_a_warning(scene):
    long_path = scene.join('x' * 120 + '.sock')
    daemon = scene.start(['--guest', 'g=' + long_path,
                          '--guest', 'ok=' + scene.stand_in('ok').path])
    end = scene.accept('ok')
    daemon.wait_log('guest g: cannot connect')
    # SIGHUP retries at once: still the one warning.
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_log('SIGHUP: looking for guests again')
    assert_served(end, 'ok')
    assert [line for line in daemon.lines() if 'guest g:' in line] == [
        'negotiator: guest g: found ({0})'.format(long_path),
        'negotiator: guest g: cannot connect to {0}: AF_UNIX path too '
        'long; retrying'.format(long_path)]
    daemon.stop()


# ---------------------------------------------------------------------------
# virsh failing after it worked: the guests known so far stay served
# ---------------------------------------------------------------------------

def virsh_first_in_path(scene, monkeypatch, script):
    """Puts WORKDIR/bin/virsh, the sh ``script``, first in PATH and makes
    libvirt's test driver on WORKDIR/node.xml the default URI; returns the
    node's path."""
    bin_dir = scene.join('bin')
    os.mkdir(bin_dir)
    make_command(bin_dir, 'virsh', script)
    monkeypatch.setenv('PATH', bin_dir + os.pathsep + os.environ['PATH'])
    node = scene.join('node.xml')
    monkeypatch.setenv('LIBVIRT_DEFAULT_URI', 'test://' + node)
    return node


def guest_g1_and_a_virsh_that_fails(scene, monkeypatch, commands, message):
    """libvirt's test driver with one guest, g1 (a stand-in of the scene),
    and a virsh first in PATH that fails with ``message`` for the
    ``commands`` (a shell pattern) while the file it returns exists."""
    flag = scene.join('virsh-fails')
    node = virsh_first_in_path(scene, monkeypatch, (
        "#!/bin/sh\n"
        "case \"$*\" in {0}) if [ -e '{1}' ]; then\n"
        "    echo '{2}' >&2\n"
        "    exit 1\n"
        "fi;; esac\n"
        "exec '{3}' \"$@\"\n").format(commands, flag, message,
                                        which('virsh')))
    write_node(node, [guest_domain('g1', scene.stand_in('g1'))])
    return flag


@needs_virsh
def test_dumpxml_failing_from_the_start_is_not_taken_for_virsh_missing(
        monkeypatch, scene):
    """virsh lists the domains but cannot describe them: the daemon says
    so, does not look in the channel directory, and serves the guest once
    dumpxml works."""
    flag = guest_g1_and_a_virsh_that_fails(
        scene, monkeypatch, '*dumpxml*', 'error: dumpxml refused')
    open(flag, 'w').close()
    daemon = scene.start(['--rescan', '3600'])
    daemon.wait_log('until virsh works')
    assert daemon.lines()[-1] == (
        'negotiator: error: dumpxml refused; serving the guests known '
        'so far until virsh works')
    os.unlink(flag)
    daemon.send_signal(signal.SIGHUP)
    assert_served(scene.accept('g1'), 'g1', 1)
    assert 'negotiator: virsh works again' in daemon.lines()
    daemon.stop()


@needs_virsh
def test_virsh_failing_after_it_worked_keeps_the_guests(monkeypatch, scene):
    flag = guest_g1_and_a_virsh_that_fails(
        scene, monkeypatch, '*', 'error: failed to connect to the hypervisor')
    # No rescans but on SIGHUP.
    daemon = scene.start(['--rescan', '3600'])
    end = scene.accept('g1')
    assert_served(end, 'g1', 1)
    open(flag, 'w').close()
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_log('until virsh works')
    assert ('negotiator: error: failed to connect to the hypervisor; '
            'serving the guests known so far until virsh works'
            ) in daemon.lines()
    assert_served(end, 'g1', 2)
    os.unlink(flag)
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_log('virsh works again')
    assert_served(end, 'g1', 3)
    lines = daemon.lines()
    assert 'negotiator: virsh works again' in lines
    assert [line for line in lines if 'gone' in line] == []
    assert [line for line in lines if 'guest g1: connected' in line] == [
        'negotiator: guest g1: connected to {0}'.format(
            scene.stand_ins['g1'].path)]
    assert not scene.stand_ins['g1'].waiting(0)
    daemon.stop()


# libvirt's lifecycle events: a guest that starts is served at once
# ---------------------------------------------------------------------------

def a_virsh_with_events(scene, monkeypatch, event_script):
    """A virsh first in PATH: ``event ...`` runs ``event_script`` (shell),
    anything else libvirt's test driver on the node returned, logging
    ``done ARGS`` to the file returned once it answered."""
    calls = scene.join('virsh-calls')
    node = virsh_first_in_path(scene, monkeypatch, (
        "#!/bin/sh\n"
        "case \"$*\" in event*) {0};; esac\n"
        "'{1}' \"$@\"; status=$?\n"
        "echo \"done $*\" >> '{2}'\n"
        "exit $status\n").format(event_script, which('virsh'), calls))
    write_node(node, [])
    return node, calls


def lines_of(path):
    try:
        with open(path) as handle:
            return handle.read().splitlines()
    except IOError:
        return []


@needs_virsh
def test_a_guest_that_starts_is_served_at_its_lifecycle_event(monkeypatch,
                                                              scene):
    """No rescan is due for an hour: only the event can make the daemon
    look again."""
    started = scene.join('started')
    node, calls = a_virsh_with_events(scene, monkeypatch, (
        "while [ ! -e '{0}' ]; do sleep 0.05; done\n"
        "echo \"event 'lifecycle' for domain 'g1': Started Booted\"\n"
        "exec sleep 3600").format(started))
    stand_in = scene.stand_in('g1')
    daemon = scene.start(['--rescan', '3600'])
    wait_for(lambda: any(line.startswith('done list')
                         for line in lines_of(calls)))
    write_node(node, [guest_domain('g1', stand_in)])
    assert not stand_in.waiting(0.2)
    open(started, 'w').close()
    assert_served(scene.accept('g1'), 'g1')
    assert [line.split(';')[0] for line in lines_of(calls)] == [
        'done list', 'done list', 'done dumpxml --domain "1"']
    daemon.stop()


@needs_virsh
def test_a_guest_whose_socket_closes_is_looked_for_again_at_once(
        monkeypatch, scene):
    """Its domain restarted: a new id, its socket at a new path."""
    node, calls = a_virsh_with_events(scene, monkeypatch, 'exec sleep 3600')
    old, new = scene.stand_in('old'), scene.stand_in('new')
    write_node(node, [guest_domain('g1', old)])
    daemon = scene.start(['--rescan', '3600'])
    assert_served(scene.accept('old'), 'g1')
    # Another domain started first: g1's id is 2 now.
    write_node(node, [domain_xml('other'), guest_domain('g1', new)])
    old.close()
    scene.ends.pop('old').close()
    assert_served(scene.accept('new'), 'g1')
    assert [line for line in daemon.lines() if re.match(
        'negotiator: guest g1: (gone|found|connected)', line)][-3:] == [
        'negotiator: guest g1: gone',
        'negotiator: guest g1: found ({0})'.format(new.path),
        'negotiator: guest g1: connected to {0}'.format(new.path)]
    daemon.stop()


@needs_virsh
def test_a_virsh_without_events_leaves_the_rescans(monkeypatch, scene):
    """virsh event fails (an old virsh): said once, tried again at every
    rescan, and the guests are still found by rescanning."""
    tries = scene.join('event-tries')
    node, calls = a_virsh_with_events(scene, monkeypatch, (
        "echo x >> '{0}'\n"
        "echo \"error: unknown command: 'event'\" >&2\n"
        "exit 1").format(tries))
    scene.stand_in('g1')
    daemon = scene.start(['--rescan', '0.2'])
    wait_for(lambda: len(lines_of(tries)) >= 3)
    write_node(node, [guest_domain('g1', scene.stand_ins['g1'])])
    assert_served(scene.accept('g1'), 'g1')
    assert [line for line in daemon.lines() if 'event' in line] == [
        "negotiator: virsh event ended: error: unknown command: 'event'; "
        "following guests by looking every 0.2 s"]
    daemon.stop()
