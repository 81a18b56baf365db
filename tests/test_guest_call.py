# -*- coding: utf-8 -*-
"""Calling the host from inside a guest: ``negotiator.py guest --call``.

The guest side of the guest-to-host port is a character device; here a
pseudo-terminal in raw mode stands in for it.  A bridge thread plays QEMU:
it listens on a UNIX socket, accepts the host daemon's connection and
copies bytes both ways between that connection and the pty's master.  The
real host daemon (``host --daemon --guest g1=SOCKET``) answers.  One bridge
and one daemon serve the whole module; callers open the pty's slave path
with ``--device``.

Like a real port, the pty keeps what the host sent until some caller reads
it (the bridge holds a slave descriptor of its own, never read, so that the
pty lives between callers): bytes meant for a caller that has gone wait for
the next one.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import base64
import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import tty

import pytest

import negotiator
from helpers import (HANG, NEGOTIATOR, ROOT, Workdir, assert_no_traceback,
                     b, communicate, make_command, remove_quietly, run_cli,
                     wait_for)

GUEST_NAME = 'g1'

#: name -> script, in the host daemon's commands directory.
SCRIPTS = {
    # Its guest, name, arguments and standard input, then exit 3.
    'hello': (
        "#!/bin/sh\n"
        "printf 'guest %s, command %s\\n' \"$NEGOTIATOR_GUEST\" "
        "\"$NEGOTIATOR_COMMAND\"\n"
        "for a in \"$@\"; do printf '[%s]\\n' \"$a\"; done\n"
        "printf 'stdin: '\n"
        "cat\n"
        "printf 'hello on stderr\\n' >&2\n"
        "exit 3\n"),
    # Writes its pid to $1, sleeps an hour (longer than any wait here), then
    # would print.
    'slow': (
        "#!/bin/sh\n"
        "echo $$ > \"$1\"\n"
        "sleep 3600\n"
        "echo late\n"),
    # Prints at once, then again (and exits 0) once the file $1 exists.
    'early-late': (
        "#!/bin/sh\n"
        "echo early\n"
        "i=0\n"
        "while [ ! -e \"$1\" ] && [ $i -lt 3000 ]; do\n"
        "    sleep 0.1; i=$((i + 1))\n"
        "done\n"
        "echo late\n"),
}
USER_COMMANDS = sorted(SCRIPTS)


def hello_output(args, stdin=b''):
    """What ``hello ARGS`` prints on stdout, given its standard input."""
    out = b('guest {0}, command hello\n'.format(GUEST_NAME))
    for arg in args:
        if not isinstance(arg, bytes):
            arg = arg.encode('utf-8')
        out += b'[' + arg + b']\n'
    return out + b'stdin: ' + stdin


HELLO_ERR = b'hello on stderr\n'


# ---------------------------------------------------------------------------
# The stand-in port: a pty, bridged to a UNIX socket as QEMU does
# ---------------------------------------------------------------------------

class Bridge(object):
    """Plays QEMU for one guest-to-host port.

    ``device`` is the guest's side (a raw pty slave); ``socket_path`` the
    host's (one client at a time, as QEMU's chardev socket).  Everything the
    host sent is kept in ``from_host``, everything the guest sent in
    ``from_guest``.  hold_after() makes what the host sends wait in the
    bridge, as a slow host would, until release().
    """

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.device = os.ttyname(self.slave)
        flags = fcntl.fcntl(self.master, fcntl.F_GETFL)
        fcntl.fcntl(self.master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(1)
        self.conn = None
        self.from_host = b''
        self.from_guest = b''
        self._for_guest = b''
        self._for_host = b''
        self._held = b''
        self._holding = False
        self._hold_marker = None
        self._lock = threading.Lock()
        self._control_read, self._control_write = os.pipe()
        self.failure = None
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True
        self.thread.start()

    def transcript(self):
        """``(from_host, from_guest)`` so far."""
        with self._lock:
            return self.from_host, self.from_guest

    def waiting_in_port(self):
        """Bytes the host sent that no caller has read yet."""
        value = fcntl.ioctl(self.slave, termios.FIONREAD, struct.pack('i', 0))
        return struct.unpack('i', value)[0]

    def hold_after(self, marker):
        """Hold what the host sends once the guest has sent ``marker``."""
        with self._lock:
            self._hold_marker = (marker, len(self.from_guest))

    def held(self):
        with self._lock:
            return self._held

    def release(self):
        """Pass on what was held, and stop holding."""
        os.write(self._control_write, b'r')

    def _run(self):
        try:
            while self._turn():
                pass
        except Exception as e:  # reported by stop()
            self.failure = repr(e)

    def _turn(self):
        readers = [self._control_read, self.listener]
        writers = []
        if self.conn is not None:
            # With no host connected, what the guest writes waits in the pty.
            readers += [self.conn, self.master]
            if self._for_host:
                writers.append(self.conn)
        if self._for_guest:
            writers.append(self.master)
        readable, writable, _ = select.select(readers, writers, [])
        if self._control_read in readable:
            for command in bytearray(os.read(self._control_read, 64)):
                if command == ord('x'):
                    return False
                with self._lock:
                    self._for_guest += self._held
                    self._held = b''
                    self._holding = False
                    self._hold_marker = None
        if self.listener in readable:
            conn, _ = self.listener.accept()
            if self.conn is None:
                conn.setblocking(False)
                self.conn = conn
            else:
                conn.close()
        if self.conn is not None and self.conn in readable:
            data = self.conn.recv(65536)
            if data:
                with self._lock:
                    self.from_host += data
                    if self._holding:
                        self._held += data
                    else:
                        self._for_guest += data
            else:
                self.conn.close()
                self.conn = None
                self._for_host = b''
        if self.master in readable:
            data = read_some(self.master)
            with self._lock:
                self.from_guest += data
                if self._hold_marker is not None:
                    marker, offset = self._hold_marker
                    if marker in self.from_guest[offset:]:
                        self._holding = True
                        self._hold_marker = None
            self._for_host += data
        if self.master in writable:
            self._for_guest = self._for_guest[write_some(
                self.master, self._for_guest):]
        if self.conn is not None and self.conn in writable:
            try:
                sent = self.conn.send(self._for_host)
            except socket.error as e:
                if e.args[0] not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                sent = 0
            self._for_host = self._for_host[sent:]
        return True

    def stop(self):
        os.write(self._control_write, b'x')
        self.thread.join(HANG)
        assert not self.thread.is_alive(), 'the bridge thread hangs'
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        for fd in (self._control_read, self._control_write, self.slave,
                   self.master):
            os.close(fd)
        assert self.failure is None, self.failure


def read_some(fd):
    try:
        return os.read(fd, 65536)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return b''
        raise


def write_some(fd, data):
    try:
        return os.write(fd, data)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise


class Port(object):
    """The bridged port and the host daemon that serves it."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.commands = workdir.commands
        self.bridge = Bridge(workdir.join('g2h.sock'))
        self.device = self.bridge.device
        self.lock_path = negotiator.lock_path_for(self.device)
        self.log_path = workdir.join('daemon.log')
        self.log_file = open(self.log_path, 'wb')
        try:
            with open(os.devnull, 'rb') as devnull:
                self.daemon = subprocess.Popen(
                    [sys.executable, NEGOTIATOR, 'host', '--daemon', '-v',
                     '--commands-dir', self.commands, '--guest',
                     GUEST_NAME + '=' + self.bridge.socket_path],
                    stdin=devnull, stdout=self.log_file,
                    stderr=subprocess.STDOUT, close_fds=True)
        except Exception:
            self.log_file.close()
            self.bridge.stop()
            raise
        wait_for(lambda: self.daemon.poll() is not None or
                 'guest {0}: connected to'.format(GUEST_NAME) in self.log())
        if self.daemon.poll() is not None:
            self.stop()
            raise AssertionError('host daemon did not start:\n' + self.log())

    def log(self):
        with open(self.log_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')

    def stop(self):
        """SIGTERM the daemon (must exit 0, no traceback), stop the bridge."""
        try:
            if self.daemon.poll() is None:
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    wait_for(lambda: self.daemon.poll() is not None)
                except AssertionError:
                    self.daemon.kill()
                    self.daemon.wait()
                    raise
            self.log_file.close()
            text = self.log()
            assert_no_traceback(text)
            assert 'internal error' not in text, text
            assert self.daemon.returncode == 0, (self.daemon.returncode, text)
        finally:
            # While the pty is open no other test run can have its number,
            # so the lock file named after it is ours to remove.
            remove_quietly(self.lock_path)
            self.bridge.stop()


@pytest.fixture(scope='module')
def port():
    wd = Workdir()
    for name, script in SCRIPTS.items():
        make_command(wd.commands, name, script)
    make_command(wd.commands, 'not-executable', '#!/bin/sh\nexit 0\n',
                 mode=0o644)
    try:
        the_port = Port(wd)
    except Exception:
        wd.cleanup()
        raise
    try:
        yield the_port
    finally:
        try:
            the_port.stop()
        finally:
            wd.cleanup()


#: Callers a test started in the background, killed if it left them running.
STARTED = []


@pytest.fixture(autouse=True)
def kill_leftover_callers():
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def guest_argv(port, args, options=()):
    """``guest --device PORT OPTIONS --call ARGS`` (``--call`` only when
    ARGS are given)."""
    argv = ['guest', '--device', port.device] + list(options)
    if args:
        argv += ['--call'] + list(args)
    return argv


def call(port, args, options=(), stdin=b''):
    """Run a caller to the end; checks that no traceback reached stderr."""
    status, out, err = run_cli(guest_argv(port, args, options), stdin=stdin)
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    return status, out, err


def start(port, args, options=(), stdin=subprocess.PIPE):
    """A caller in the background."""
    return spawn(guest_argv(port, args, options), stdin)


#: Runs Python with SIGINT at its default, even when the tests run as a
#: background job (which a shell starts with SIGINT ignored, and an ignored
#: signal stays ignored across exec).
SIGINT_DEFAULT = (
    'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
    'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')


def spawn(argv, stdin=subprocess.PIPE):
    """``negotiator.py ARGV`` in the background."""
    process = subprocess.Popen(
        [sys.executable, '-c', SIGINT_DEFAULT, NEGOTIATOR] + list(argv),
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        close_fds=True)
    STARTED.append(process)
    return process


def finish(process, stdin=b''):
    """Wait for a background caller; ``(status, out, err)``."""
    if process.stdin is None:
        stdin = None
    out, err = communicate(process, stdin, time.time() + HANG)
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    return process.returncode, out, err


def read_text(path):
    """The file's text, '' while it does not exist."""
    try:
        with open(path) as handle:
            return handle.read()
    except (IOError, OSError):
        return ''


def read_pid(path):
    """The pid a command wrote to ``path`` (waits for it)."""
    wait_for(lambda: read_text(path).endswith('\n'))
    return int(read_text(path))


def gone(pid):
    """Whether ``pid`` has exited (reaped, or a zombie)."""
    try:
        with open('/proc/{0}/stat'.format(pid)) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except (IOError, OSError):
        return True


def holds_open(pid, path):
    """Whether process ``pid`` has ``path`` open."""
    fd_dir = '/proc/{0}/fd'.format(pid)
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)) == path:
                return True
        except OSError:
            pass
    return False


# ---------------------------------------------------------------------------
# 1. Calls: output, exit status, standard input, errors, --json, --list, --ping
# ---------------------------------------------------------------------------

def test_call_runs_the_host_command_with_its_arguments_and_stdin(port):
    stdin = b'some input \xff\x00 with 0xFF and NUL\n'
    args = ['hello', 'a', 'b c', '', '-t', '5', b'\xff\xfe\xc3\xa9']
    status, out, err = call(port, args, stdin=stdin)
    assert (status, out, err) == (3, hello_output(args[1:], stdin), HELLO_ERR)


def test_empty_stdin_is_forwarded_as_nothing(port):
    assert call(port, ['hello']) == (3, hello_output([]), HELLO_ERR)


def test_no_stdin_option_forwards_nothing(port):
    status, out, err = call(port, ['hello', 'x'], options=['-n'],
                            stdin=b'must not arrive')
    assert (status, out, err) == (3, hello_output(['x']), HELLO_ERR)


def test_stdin_from_a_terminal_only_with_the_stdin_option(port):
    for options, expected in (([], b''), (['--stdin'], b'typed\n')):
        master, slave = os.openpty()
        try:
            # A line, then end of file (Ctrl-D), as typed in cooked mode.
            os.write(master, b'typed\n\x04')
            process = start(port, ['hello'], options, stdin=slave)
            os.close(slave)
            slave = None
            status, out, err = finish(process)
        finally:
            if slave is not None:
                os.close(slave)
            os.close(master)
        assert (status, out, err) == (3, hello_output([], expected),
                                      HELLO_ERR), options


def test_missing_command_is_127(port):
    status, out, err = call(port, ['no-such-command', 'x'])
    assert (status, out) == (127, b'')
    assert err == b(
        "negotiator: Command 'no-such-command' not found in the host's "
        "commands directory; available: {0}\n".format(
            ', '.join(USER_COMMANDS)))


def test_not_executable_command_is_126(port):
    status, out, err = call(port, ['not-executable'])
    assert (status, out) == (126, b'')
    assert err == b(
        "negotiator: Command 'not-executable' is not executable: "
        "not-executable in the host's commands directory is not a regular "
        "file with execute permission (chmod +x it)\n")


def test_json_result(port):
    stdin = b'in \xff'
    status, out, err = call(port, ['hello', 'a b'], options=['--json'],
                            stdin=stdin)
    stdout = hello_output(['a b'], stdin)
    expected = {
        'command': ['hello', 'a b'], 'exitcode': 3, 'signal': None,
        'timed-out': False, 'status': 3,
        'stdout': stdout.decode('utf-8', 'replace'),
        'stderr': HELLO_ERR.decode('utf-8'),
        'out-data': base64.b64encode(stdout).decode('ascii'),
        'err-data': base64.b64encode(HELLO_ERR).decode('ascii')}
    assert (status, err) == (3, b'')
    assert out == b(json.dumps(expected, sort_keys=True) + '\n')


def test_json_error(port):
    status, out, err = call(port, ['not-executable'], options=['--json'])
    desc = ("Command 'not-executable' is not executable: not-executable in "
            "the host's commands directory is not a regular file with execute "
            "permission (chmod +x it)")
    assert status == 126
    assert json.loads(out.decode('utf-8')) == {
        'error': {'class': 'NegotiatorCommandNotExecutable', 'desc': desc},
        'status': 126}
    assert out.count(b'\n') == 1 and out.endswith(b'\n')
    assert err == b('negotiator: ' + desc + '\n')


def test_list_shows_the_host_commands_without_builtins(port):
    status, out, err = call(port, [], options=['--list'])
    assert (status, err) == (0, b'')
    assert out == b(''.join(name + '\n' for name in USER_COMMANDS))


def test_list_json(port):
    status, out, err = call(port, [], options=['--list', '--json'])
    assert (status, err) == (0, b'')
    assert json.loads(out.decode('utf-8')) == {'commands': [
        {'name': name, 'kind': 'user'} for name in USER_COMMANDS]}


def test_ping(port):
    status, out, err = call(port, [], options=['--ping'])
    assert (status, err) == (0, b'')
    pattern = (re.escape(port.device) + r': agent ' +
               re.escape(negotiator.__version__) +
               r', round trip [0-9]+\.[0-9]{2} ms\n\Z')
    assert re.match(pattern, out.decode('ascii')), out
    assert negotiator.__version__ == '1.1.0'


def test_ping_json(port):
    status, out, err = call(port, [], options=['--ping', '--json'])
    assert (status, err) == (0, b'')
    result = json.loads(out.decode('utf-8'))
    assert sorted(result) == ['connect-ms', 'round-trip-ms', 'version']
    assert result['version'] == negotiator.__version__
    assert 0 <= result['round-trip-ms'] < HANG * 1000
    assert 0 <= result['connect-ms'] < HANG * 1000


# ---------------------------------------------------------------------------
# 2. Timeouts and stale data: what one caller left never reaches the next
# ---------------------------------------------------------------------------

def test_timeout_kills_the_host_command_and_the_next_caller_is_unaffected(
        port, workdir):
    pid_file = workdir.join('slow.pid')
    # The command would sleep an hour: the caller's end within HANG and
    # the command's are the timeout's.
    status, out, err = call(port, ['slow', pid_file], options=['-t', '1'])
    assert (status, out) == (124, b'')
    assert err == (b"negotiator: 'slow' timed out after 1 s and was killed "
                   b"on the host\n")
    pid = read_pid(pid_file)
    wait_for(lambda: gone(pid))
    status, out, err = call(port, ['hello', 'next'], stdin=b'mine')
    assert (status, out, err) == (3, hello_output(['next'], b'mine'),
                                  HELLO_ERR)
    assert port.bridge.waiting_in_port() == 0


def test_reply_left_in_the_port_by_a_killed_caller_is_skipped(port, workdir):
    go = workdir.join('go')
    with open(os.devnull, 'rb') as devnull:
        first = start(port, ['early-late', go], options=['-n', '-t', '60'],
                      stdin=devnull)
    assert read_line(first.stdout.fileno()) == b'early'
    first.kill()  # no chance to say it leaves: its command runs on
    first.wait()
    first.stdout.close()
    first.stderr.close()
    before, _ = port.bridge.transcript()
    open(go, 'w').close()
    reply = b'"return":{"exitcode":0}'
    wait_for(lambda: reply in port.bridge.transcript()[0][len(before):])
    stale = port.bridge.transcript()[0][len(before):]
    assert b'"out-bytes":5},' in stale and b'}}\nlate\n{"return"' in stale
    # The late output and the reply wait in the port for the next caller.
    wait_for(lambda: port.bridge.waiting_in_port() == len(stale))
    status, out, err = call(port, ['hello', 'second'], stdin=b'its own')
    assert (status, out, err) == (3, hello_output(['second'], b'its own'),
                                  HELLO_ERR)
    assert port.bridge.waiting_in_port() == 0


def test_caller_that_gives_up_first_says_so_and_its_late_reply_is_skipped(
        port, workdir):
    pid_file = workdir.join('slow.pid')
    # A slow host: nothing it sends after the request reaches the caller.
    port.bridge.hold_after(b'"negotiator-execute"')
    try:
        status, out, err = call(port, ['slow', pid_file],
                                options=['-t', '0.5'])
        assert (status, out) == (124, b'')
        assert err == b"negotiator: 'slow' timed out after 0.5 s\n"
        # Its last word to the host: 0xFF, drop what you do for me.
        wait_for(lambda: port.bridge.transcript()[1].endswith(b'}\n\xff'))
        wait_for(lambda: gone(read_pid(pid_file)))
        held = port.bridge.held()
        assert b'"timed-out":true' in held
    finally:
        port.bridge.release()
    # The late reply waits in the port for the next caller.
    wait_for(lambda: port.bridge.waiting_in_port() == len(held))
    status, out, err = call(port, ['hello', 'next'], stdin=b'mine')
    assert (status, out, err) == (3, hello_output(['next'], b'mine'),
                                  HELLO_ERR)
    assert port.bridge.waiting_in_port() == 0


def test_partial_request_left_by_a_dead_caller_is_dropped(port, workdir):
    marks = workdir.join('ran')
    before, _ = port.bridge.transcript()
    waiting = port.bridge.waiting_in_port()
    fd = os.open(port.device, os.O_RDWR | os.O_NOCTTY)
    try:
        # A caller killed in the middle of writing its request.
        os.write(fd, b'\xff{"execute":"guest-sync-delimited","arguments":'
                 b'{"id":12345}}\n{"execute":"negotiator-execute",'
                 b'"arguments":{"command":"slow","args":["' + b(marks) +
                 b'"]')
    finally:
        os.close(fd)
    # The answer to its first request waits in the port.
    wait_for(lambda: port.bridge.transcript()[0][len(before):] ==
             b'\xff{"return":12345}\n')
    wait_for(lambda: port.bridge.waiting_in_port() == waiting + 18)
    status, out, err = call(port, ['hello', 'whole'], stdin=b'x')
    assert (status, out, err) == (3, hello_output(['whole'], b'x'),
                                  HELLO_ERR)
    assert not os.path.exists(marks)


def test_timeout_waiting_for_the_lock(port, workdir):
    lock = os.open(port.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = port.bridge.transcript()
        # Another name for the port: the same lock.
        link = workdir.join('port')
        os.symlink(port.device, link)
        status, out, err = run_cli(['guest', '--device', link, '-t', '0.5',
                                    '--call', 'hello'])
        assert (status, out) == (124, b'')
        assert err == b('negotiator: timed out waiting for other callers of '
                        'this port (lock {0})\n'.format(port.lock_path))
        # It never touched the port.
        assert port.bridge.transcript() == before
    finally:
        os.close(lock)


def test_caller_waits_for_the_lock_then_calls(port, workdir):
    lock = os.open(port.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = port.bridge.transcript()
        with open(workdir.join('stdin'), 'wb') as handle:
            handle.write(b'later')
        with open(workdir.join('stdin'), 'rb') as stdin:
            process = start(port, ['hello', 'queued'], options=['-t', '60'],
                            stdin=stdin)
        wait_for(lambda: holds_open(process.pid, port.lock_path))
        time.sleep(0.3)
        assert process.poll() is None
        assert port.bridge.transcript() == before
    finally:
        os.close(lock)
    assert finish(process) == (
        3, hello_output(['queued'], b'later'), HELLO_ERR)


def test_caller_slow_to_get_its_stdin_does_not_hold_up_others(port):
    # Standard input is read before the caller takes its turn on the port.
    slow = start(port, ['hello', 'slow'], options=['-t', '60'])
    time.sleep(0.3)
    assert not holds_open(slow.pid, port.lock_path)
    assert finish(start(port, ['hello', 'quick'], options=['-n'])) == (
        3, hello_output(['quick'], b''), HELLO_ERR)
    assert slow.poll() is None
    assert finish(slow, b'at last') == (
        3, hello_output(['slow'], b'at last'), HELLO_ERR)


# ---------------------------------------------------------------------------
# 3. Callers at once take turns
# ---------------------------------------------------------------------------

def test_callers_at_once_each_get_their_own_answer(port, workdir):
    # Each caller reads its standard input once its turn has come: all of
    # it is there from the start (a file), whichever turn that is.
    processes = []
    for i in range(8):
        path = workdir.join('stdin{0}'.format(i))
        with open(path, 'wb') as handle:
            handle.write(b('input of {0}'.format(i)))
        with open(path, 'rb') as stdin:
            processes.append(start(
                port, ['hello', 'caller {0}'.format(i), str(i)],
                options=['-t', '60'], stdin=stdin))
    results = [finish(process) for process in processes]
    assert results == [
        (3, hello_output(['caller {0}'.format(i), str(i)],
                         b('input of {0}'.format(i))), HELLO_ERR)
        for i in range(8)]
    assert port.bridge.waiting_in_port() == 0


# ---------------------------------------------------------------------------
# 4. No host daemon, no port
# ---------------------------------------------------------------------------

#: A caller whose port hangs up as soon as it is open, as a virtio-serial
#: port does when no host daemon is connected.  A pty cannot be opened once
#: its master is closed, so the master closes right after the open.
HUNG_UP_CALLER = r'''
import os, sys, tty
sys.path.insert(0, sys.argv[1])
import negotiator
master, slave = os.openpty()
tty.setraw(slave)
device = os.ttyname(slave)
os.close(slave)
with open(sys.argv[2], 'w') as handle:
    handle.write(device)
real_open_port = negotiator.open_port

def open_port(path, deadline):
    fd = real_open_port(path, deadline)
    # Still ours while the pty lives: remove the lock file it left.
    os.remove(negotiator.lock_path_for(path))
    os.close(master)
    return fd

negotiator.open_port = open_port
looks = []
real_port_hung_up = negotiator.port_hung_up

def port_hung_up(fd):
    looks.append(negotiator.monotonic())
    return real_port_hung_up(fd)

negotiator.port_hung_up = port_hung_up
status = negotiator.main(['guest', '--device', device, '-t', '1', '--call',
                          'hello', 'x'])
with open(sys.argv[3], 'w') as handle:
    handle.write('{0} {1}'.format(len(looks), looks[-1] - looks[0]))
sys.exit(status)
'''


def test_no_host_daemon_connected_fails_at_the_timeout(workdir):
    """The caller waits for a host daemon, looking every DAEMON_CHECK
    seconds, until its timeout (1 s here); then it says none came."""
    device_file = workdir.join('device')
    looks_file = workdir.join('looks')
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, '-c', HUNG_UP_CALLER, ROOT, device_file, looks_file],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True)
    STARTED.append(process)
    status, out, err = finish(process)
    elapsed = time.time() - started
    device = read_text(device_file)
    assert (status, out) == (255, b'')
    assert err == b('negotiator: no host daemon connected to {0} within 1 s: '
                    'is "negotiator.py host --daemon" running on the host?\n'
                    .format(device))
    assert elapsed >= 1
    # Sleeps of DAEMON_CHECK (the last one cut to the deadline), no spin.
    looks = int(read_text(looks_file).split()[0])
    assert 1 <= looks <= 1 / negotiator.DAEMON_CHECK + 2


#: A caller to whom the port seems hung up (no daemon connected) for its
#: first three looks: the daemon of the ``port`` fixture "connects late".
LATE_DAEMON_CALLER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import negotiator
looks = []
real_port_hung_up = negotiator.port_hung_up

def port_hung_up(fd):
    looks.append(negotiator.monotonic())
    return len(looks) <= 3 or real_port_hung_up(fd)

negotiator.port_hung_up = port_hung_up
status = negotiator.main(sys.argv[3:])
with open(sys.argv[2], 'w') as handle:
    handle.write('{0} {1}'.format(len(looks), looks[-1] - looks[0]))
sys.exit(status)
'''


def test_caller_waits_for_a_host_daemon_that_connects_late(port, workdir):
    looks_file = workdir.join('looks')
    process = subprocess.Popen(
        [sys.executable, '-c', LATE_DAEMON_CALLER, ROOT, looks_file] +
        guest_argv(port, ['hello', 'late'], ['-n', '-t', str(HANG)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True)
    STARTED.append(process)
    assert finish(process) == (3, hello_output(['late']), HELLO_ERR)
    looks, waited = read_text(looks_file).split()
    assert int(looks) == 4
    assert float(waited) >= 3 * negotiator.DAEMON_CHECK - 0.01


def test_nobody_answering_on_the_port(workdir):
    """The port is open but nothing answers (a daemon stopped dead)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    lock_path = negotiator.lock_path_for(device)
    try:
        status, out, err = run_cli(['guest', '--device', device, '-t', '0.5',
                                    '--call', 'hello'])
        sent = read_some_now(master)
    finally:
        remove_quietly(lock_path)
        os.close(slave)
        os.close(master)
    assert (status, out) == (255, b'')
    assert err == b('negotiator: the host daemon did not answer on {0} '
                    'within 0.5 s\n'.format(device))
    assert sent.startswith(b'\xff{"execute":"guest-sync-delimited",')
    assert sent.count(b'\n') == 1 and sent.endswith(b'\n')


def test_host_side_going_away_mid_call(workdir):
    """The host goes (QEMU stopped) while the caller waits for its answer."""
    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    try:
        # Its timeout is an hour: an end within HANG (finish) is the
        # host's going away.
        process = spawn(['guest', '--device', device, '-n', '-t', '3600',
                         '--call', 'hello', 'a'])
        line = read_line(master)
        assert line.startswith(b'\xff')
        sync = json.loads(line[1:].decode('ascii'))
        assert sorted(sync) == ['arguments', 'execute']
        assert sync['execute'] == 'guest-sync-delimited'
        os.write(master, b'\xff' + b(json.dumps(
            {'return': sync['arguments']['id']})) + b'\n')
        request = json.loads(read_line(master).decode('ascii'))
        assert (request['execute'], request['arguments']) == (
            'negotiator-execute', {'command': 'hello', 'args': ['a'],
                                   'raw-output': True,
                                   'timeout': request['arguments']['timeout']})
        assert 0 < request['arguments']['timeout'] <= 3600
    finally:
        remove_quietly(negotiator.lock_path_for(device))
        os.close(master)
        os.close(slave)
    assert finish(process) == (
        255, b'', b('negotiator: {0}: the connection closed before the other side '
                    'answered\n'.format(device)))


def read_line(fd):
    """One line from ``fd`` (a port, a pipe), without its newline."""
    data = b''
    while not data.endswith(b'\n'):
        ready, _, _ = select.select([fd], [], [], HANG)
        assert ready, 'nothing more on the port after {0!r}'.format(data)
        data += os.read(fd, 1)
    return data[:-1]


def read_some_now(fd):
    data = b''
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def test_missing_device(workdir):
    device = workdir.join('no-such-port')
    lock_path = negotiator.lock_path_for(device)
    try:
        status, out, err = run_cli(['guest', '--device', device, '--call',
                                    'hello'])
    finally:
        remove_quietly(lock_path)
    assert (status, out) == (255, b'')
    assert err == b('negotiator: cannot open port {0}: No such file or '
                    'directory\n'.format(device))


def test_no_port_found_without_device():
    if negotiator.find_port((negotiator.GUEST_TO_HOST_PORT,),
                            fallback=None) is not None:
        pytest.skip('this machine has a negotiator-guest-to-host.0 port')
    status, out, err = run_cli(['guest', '--call', 'hello'])
    assert (status, out) == (255, b'')
    assert err == (
        b"negotiator: no virtio-serial port named negotiator-guest-to-host.0 "
        b"found: add the channel to the guest's definition (and load "
        b"virtio_console), or give --device\n")


def test_busy_port_is_waited_for(workdir, monkeypatch):
    """A port another process holds open fails with EBUSY: wait it out."""
    device = workdir.join('port')
    open(device, 'w').close()
    real_open = os.open
    attempts = []

    def busy(path, flags, *mode, **kwargs):
        if path == device:
            attempts.append(path)
            if len(attempts) <= 2 or always_busy:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_open(path, flags, *mode, **kwargs)

    monkeypatch.setattr(os, 'open', busy)
    monkeypatch.setattr(negotiator, 'LOCK_RETRY', 0.01)
    always_busy = False
    fd = negotiator.open_port(device, negotiator.monotonic() + HANG)
    try:
        assert len(attempts) == 3
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
    always_busy = True
    with pytest.raises(negotiator.CallTimeout) as raised:
        negotiator.open_port(device, negotiator.monotonic() + 0.2)
    assert str(raised.value) == (
        'timed out: port {0} stayed busy (another process has it open: find '
        'it with fuser -v {0})'.format(device))
    assert raised.value.status == 124


# ---------------------------------------------------------------------------
# 5. Usage errors
# ---------------------------------------------------------------------------

GUEST_USAGE = (
    b'Usage: negotiator.py guest [OPTIONS]\n'
    b'       negotiator.py guest --call [OPTIONS] COMMAND [ARG...]\n'
    b'       negotiator.py guest --list | --ping\n\n')


@pytest.mark.parametrize('args, message', [
    (['--call'], 'COMMAND is missing after --call'),
    (['foo'], 'unexpected arguments: foo (to run a command on the host: '
              '--call COMMAND)'),
    (['--call', '-t', 'x', 'cmd'],
     "option -t: invalid floating-point value: 'x'"),
    (['--call', '-t', '-1', 'cmd'],
     '--timeout must be 0 (never) or a number of seconds'),
], ids=['no-command', 'no-call', 'bad-timeout',
        'negative-timeout'])
def test_usage_errors(args, message):
    status, out, err = run_cli(['guest'] + args)
    assert (status, out) == (2, b'')
    assert err == GUEST_USAGE + b('negotiator.py: error: ' + message + '\n')


# ---------------------------------------------------------------------------
# 6. SIGTERM
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT],
                         ids=['SIGTERM', 'SIGINT'])
def test_signal_kills_the_host_command(port, workdir, signum):
    pid_file = workdir.join('slow.pid')
    process = start(port, ['slow', pid_file], options=['-n', '-t', '0'])
    pid = read_pid(pid_file)
    _, sent_before = port.bridge.transcript()
    process.send_signal(signum)
    assert finish(process) == (130, b'', b'')
    # The caller said it left (0xFF), so the host killed its command.
    wait_for(lambda: port.bridge.transcript()[1][len(sent_before):] ==
             b'\xff')
    wait_for(lambda: gone(pid))
    wait_for(lambda: 'guest g1: 0xFF received: dropping 0 waiting '
             'request(s) and the running command' in port.log())
    status, out, err = call(port, ['hello', 'after'], stdin=b'x')
    assert (status, out, err) == (3, hello_output(['after'], b'x'),
                                  HELLO_ERR)


def test_sigterm_while_waiting_for_the_lock(port):
    lock = os.open(port.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = port.bridge.transcript()
        process = start(port, ['hello'], options=['-t', '60', '-n'])
        wait_for(lambda: holds_open(process.pid, port.lock_path))
        process.send_signal(signal.SIGTERM)
        assert finish(process) == (130, b'', b'')
        assert port.bridge.transcript() == before
    finally:
        os.close(lock)


# ---------------------------------------------------------------------------
# Lock files must belong to the user
# ---------------------------------------------------------------------------

def foreign_lock_file(path):
    """Make ``path`` a lock file that belongs to uid 65534."""
    remove_quietly(path)
    with open(path, 'w'):
        pass
    os.chown(path, 65534, -1)


def foreign_lock_message(path):
    return b('negotiator: the lock file {0} belongs to another user (uid '
             '65534); remove it\n'.format(path))


@pytest.mark.skipif(os.geteuid() != 0, reason='chown needs root')
def test_caller_refuses_a_lock_file_of_another_user(port):
    foreign_lock_file(port.lock_path)
    try:
        status, out, err = call(port, ['hello'])
    finally:
        remove_quietly(port.lock_path)
    assert (out, err) == (b'', foreign_lock_message(port.lock_path))
    # With the file gone, calls work again.
    assert call(port, ['hello'], stdin=b'x') == (3, hello_output([], b'x'),
                                                 HELLO_ERR)
    assert status == 255


@pytest.mark.skipif(os.geteuid() != 0, reason='chown needs root')
def test_agent_refuses_a_lock_file_of_another_user(workdir):
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        device = os.ttyname(slave)
        lock_path = negotiator.lock_path_for(device)
        foreign_lock_file(lock_path)
        try:
            status, out, err = run_cli(['guest', '--device', device,
                                        '--commands-dir', workdir.commands])
        finally:
            remove_quietly(lock_path)
    finally:
        os.close(master)
        os.close(slave)
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    assert (status, out, err) == (1, b'', foreign_lock_message(lock_path))


def test_a_caller_lets_go_of_the_lock_file_when_locking_fails(workdir,
                                                                monkeypatch):
    """flock() failing otherwise than "held" (ENOLCK on NFS) is an error,
    and the lock file is not left open."""
    def no_locks(fd, operation):
        raise IOError(errno.ENOLCK, 'No locks available')
    descriptors = sorted(os.listdir('/proc/self/fd'))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    with pytest.raises(IOError) as raised:
        negotiator.wait_for_lock(workdir.join('lock'), None)
    assert raised.value.args[0] == errno.ENOLCK
    assert sorted(os.listdir('/proc/self/fd')) == descriptors
