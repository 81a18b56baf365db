# -*- coding: utf-8 -*-
"""The qemu-ga requests that act on the guest through its own tools.

Nothing here changes this machine: the agent runs with
NEGOTIATOR_TOOL_PATH naming a directory of stand-in tools (shell scripts
that record their arguments and standard input in files, write a chosen
message to stderr and exit with a chosen status), and its set_clock() is
replaced by one that records its arguments (the agent is started through
a few lines of Python that replace it, and shorten TOOL_TIMEOUT so that a
hung tool is killed within a second).  The tests assert what each tool
got and the exact replies; tests/test_qemu_ga.py compares the argument
checks with the real qemu-ga.

Runs on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""
import base64
import os
import signal
import stat
import time

import pytest

import negotiator
from helpers import HANG, ROOT, Agent, Workdir, serving_here

#: The agent, with set_clock() recording its arguments instead of setting
#: this machine's clock, and a short TOOL_TIMEOUT.
AGENT_PROGRAM = '''
import sys
sys.path.insert(0, {root!r})
import negotiator
negotiator.TOOL_TIMEOUT = 1.0

def set_clock(seconds, microseconds):
    with open({clock!r}, 'a') as handle:
        handle.write('{{0}} {{1}}\\n'.format(seconds, microseconds))
negotiator.set_clock = set_clock
sys.exit(negotiator.main(sys.argv[1:]))
'''

#: A stand-in tool: records its arguments (one a line) and stdin, then
#: writes a message to stderr and exits with a status, or hangs.
TOOL_SCRIPT = '''#!/bin/sh
printf '%s\\n' "$@" > {record}.argv
/bin/cat > {record}.stdin
{action}
'''


class Tools(object):
    """The stand-in tools' directory."""

    def __init__(self, path):
        self.path = path

    def add(self, name, status=0, message='', hang=False):
        record = os.path.join(self.path, 'record-' + name)
        with open(record + '.message', 'w') as handle:
            handle.write(message)
        action = 'exec /bin/sleep 3600' if hang else (
            '/bin/cat {0}.message >&2; exit {1}'.format(record, status))
        path = os.path.join(self.path, name)
        with open(path, 'w') as handle:
            handle.write(TOOL_SCRIPT.format(record=record, action=action))
        os.chmod(path, 0o755)

    def remove(self, name):
        os.remove(os.path.join(self.path, name))

    def called(self, name):
        """(arguments, stdin) of the last call of ``name``, then forgotten;
        None when it was not called."""
        record = os.path.join(self.path, 'record-' + name)
        if not os.path.exists(record + '.argv'):
            return None
        with open(record + '.argv') as handle:
            argv = handle.read().splitlines()
        with open(record + '.stdin', 'rb') as handle:
            stdin = handle.read()
        os.remove(record + '.argv')
        os.remove(record + '.stdin')
        return argv, stdin


@pytest.fixture(scope='module')
def setup():
    workdir = Workdir()
    tools = Tools(workdir.join('tools'))
    os.mkdir(tools.path)
    clock = workdir.join('clock')
    program = ('-c', AGENT_PROGRAM.format(root=ROOT, clock=clock))
    env = dict(os.environ, NEGOTIATOR_TOOL_PATH=tools.path)
    agent = Agent(workdir, program=program, env=env)
    try:
        yield agent, tools, clock
    finally:
        try:
            agent.stop()
        finally:
            workdir.cleanup()


@pytest.fixture
def agent(setup):
    return setup[0]


@pytest.fixture
def tools(setup):
    """The stand-in tools, none at the start of each test."""
    tools = setup[1]
    for name in os.listdir(tools.path):
        os.remove(os.path.join(tools.path, name))
    return tools


def call(agent, name, arguments=None):
    """The agent's reply to one request (with id 1), on a new connection."""
    client = agent.client()
    try:
        request = {'execute': name, 'id': 1}
        if arguments is not None:
            request['arguments'] = arguments
        return client.call(request)
    finally:
        client.close()


def error(desc):
    return {'error': {'class': 'GenericError', 'desc': desc}, 'id': 1}


def b64(data):
    return base64.b64encode(data).decode('ascii')


def missing(names, tools):
    return error("cannot find {0} program in PATH ({1})".format(
        ' or '.join("'{0}'".format(name) for name in names), tools.path))


def test_a_hung_tool_is_killed_and_the_requests_behind_it_are_answered(
        agent, tools):
    tools.add('chpasswd', hang=True)
    client = agent.client()
    try:
        client.request({'execute': 'guest-set-user-password', 'id': 1,
                        'arguments': {'username': 'a', 'password': 'YQ==',
                                      'crypted': False}})
        client.request({'execute': 'guest-ping', 'id': 2})
        assert client.read_message() == error(
            'child process has terminated abnormally: killed after 1 '
            'seconds')
        assert client.read_message() == {'return': {}, 'id': 2}
    finally:
        client.close()
    assert tools.called('chpasswd') == ([''], b'a:a\n')


def test_no_child_starts_while_sixteen_killed_ones_have_not_ended(
        workdir, monkeypatch):
    """A child stuck in the kernel (a read of a hung NFS server) outlives
    its SIGKILL, and each request on that filesystem would add one.  The
    stand-in: hung tools whose SIGKILL is held back (an in-process agent's
    Process._kill_group replaced), sent at the end."""
    tools = Tools(workdir.join('tools'))
    os.mkdir(tools.path)
    tools.add('chpasswd', hang=True)
    monkeypatch.setattr(negotiator, 'TOOL_PATH', tools.path)
    monkeypatch.setattr(negotiator, 'TOOL_TIMEOUT', 0.05)
    held = []
    monkeypatch.setattr(negotiator.Process, '_kill_group',
                        lambda process: held.append(process.pid))
    request = {'execute': 'guest-set-user-password', 'id': 1, 'arguments': {
        'username': 'a', 'password': 'YQ==', 'crypted': False}}
    killed = error('child process has terminated abnormally: killed after '
                   '0.05 seconds')
    stuck = error('16 killed child processes have not ended (stuck in the '
                  'kernel?): none is started until one ends')
    with serving_here() as ask:
        try:
            for _ in range(negotiator.MAX_STUCK):
                assert ask(request) == killed
            assert len(held) == 16
            assert ask(request) == stuck
            assert ask(dict(request, execute='guest-exec', arguments={
                'path': '/bin/true'})) == stuck
            os.kill(held.pop(0), signal.SIGKILL)
            deadline = time.time() + HANG
            reply = ask(request)
            while reply == stuck:  # until SIGCHLD has had it reaped
                assert time.time() < deadline
                ask.wait(0.01)
                reply = ask(request)
            assert reply == killed and len(held) == 16
        finally:
            for pid in held:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


# ---------------------------------------------------------------------------
# guest-set-user-password

def set_password(agent, username, password, crypted=False):
    return call(agent, 'guest-set-user-password', {
        'username': username, 'password': password, 'crypted': crypted})


@pytest.mark.parametrize('crypted,argv', [(False, ['']), (True, ['-e'])])
def test_set_user_password(agent, tools, crypted, argv):
    """chpasswd gets USER:PASSWORD and a newline on stdin, ``-e`` when
    the password is crypted (printf prints one empty line for none)."""
    tools.add('chpasswd')
    password = u'pa ss:wörd$1'.encode('utf-8')
    assert set_password(agent, u'élise', b64(password), crypted) == {
        'return': {}, 'id': 1}
    assert tools.called('chpasswd') == (
        argv, u'élise:'.encode('utf-8') + password + b'\n')


def test_set_user_password_tool_fails(agent, tools):
    tools.add('chpasswd', 1, "chpasswd: line 1: user 'nobody2' does not "
              'exist')
    assert set_password(agent, 'nobody2', 'YQ==') == error(
        "child process has failed to set user password: chpasswd: line 1: "
        "user 'nobody2' does not exist")
    tools.add('chpasswd', 3)
    assert set_password(agent, 'nobody2', 'YQ==') == error(
        'child process has failed to set user password')


def test_a_tools_message_is_kept_up_to_the_bound(agent, tools):
    """TOOL_OUTPUT bytes of what a failing tool writes reach the reply."""
    tools.add('chpasswd', 1, 'x' * (negotiator.TOOL_OUTPUT + 1))
    assert set_password(agent, 'nobody2', 'YQ==') == error(
        'child process has failed to set user password: ' +
        'x' * negotiator.TOOL_OUTPUT)


def test_set_user_password_tool_missing(agent, tools):
    assert set_password(agent, 'root', 'YQ==') == missing(['chpasswd'],
                                                          tools)


@pytest.mark.parametrize('username,password,desc', [
    ('root', 'YQ!=', 'Base64 data contains invalid characters'),
    ('root', b64(b'a\nb'), 'forbidden characters in raw password'),
    ('root', b64(b'a\0b'), 'forbidden characters in raw password'),
    ('ro:ot', 'YQ==', 'forbidden characters in username'),
    ('ro\not', 'YQ==', 'forbidden characters in username'),
    ('ro\0ot', 'YQ==', "Parameter 'username' holds a NUL character, which "
                       'a command line cannot carry'),
])
def test_set_user_password_refused(agent, tools, username, password, desc):
    tools.add('chpasswd')
    assert set_password(agent, username, password) == error(desc)
    assert tools.called('chpasswd') is None


@pytest.mark.parametrize('text,data', [
    (u'YWJj', b'abc'), (u'YWI=', b'ab'), (u'YQ==', b'a'), (u'', b''),
    (u'YWJj\nZA==\n', b'abcd'),
])
def test_qemu_ga_base64(text, data):
    """As qemu-ga reads it, newlines (line-wrapped base64) skipped."""
    assert negotiator.decode_qga_bytes(text, 'x') == data


@pytest.mark.parametrize('text,desc', [
    (u'YQ!=', 'Base64 data contains invalid characters'),
    (u'YWJ', "Parameter 'x' is not valid base64"),
    (u'YW=j', "Parameter 'x' is not valid base64"),
    (u'YQ==YWI=', "Parameter 'x' is not valid base64"),
])
def test_qemu_ga_base64_refused(text, desc):
    """What glib would decode into bytes nobody meant is refused."""
    with pytest.raises(negotiator.RequestError) as caught:
        negotiator.decode_qga_bytes(text, 'x')
    assert caught.value.desc == desc


# ---------------------------------------------------------------------------
# guest-shutdown

def shut_down(agent, arguments):
    """Ask for a shutdown, then a ping: the first line back must be the
    ping's reply, or the shutdown's error (which has id 1)."""
    client = agent.client()
    try:
        request = {'execute': 'guest-shutdown', 'id': 1}
        if arguments is not None:
            request['arguments'] = arguments
        client.request(request)
        client.request({'execute': 'guest-ping', 'id': 2})
        reply = client.read_message()
        if reply.get('id') == 1:
            assert client.read_message() == {'return': {}, 'id': 2}
        return reply
    finally:
        client.close()


@pytest.mark.parametrize('arguments,option', [
    (None, '-P'), ({'mode': 'powerdown'}, '-P'), ({'mode': 'halt'}, '-H'),
    ({'mode': 'reboot'}, '-r')])
def test_shutdown(agent, tools, arguments, option):
    """No reply when shutdown succeeds, as qemu-ga."""
    tools.add('shutdown')
    tools.add('poweroff')
    assert shut_down(agent, arguments) == {'return': {}, 'id': 2}
    assert tools.called('shutdown') == (
        ['-h', option, '+0', 'hypervisor initiated shutdown'], b'')
    assert tools.called('poweroff') is None


@pytest.mark.parametrize('mode,tool', [
    ('powerdown', 'poweroff'), ('halt', 'halt'), ('reboot', 'reboot')])
def test_shutdown_without_shutdown(agent, tools, mode, tool):
    """A guest without shutdown (busybox) runs poweroff, halt or reboot."""
    for name in ('poweroff', 'halt', 'reboot'):
        tools.add(name)
    assert shut_down(agent, {'mode': mode}) == {'return': {}, 'id': 2}
    assert tools.called(tool) == ([''], b'')
    assert [tools.called(name) for name in ('poweroff', 'halt', 'reboot')
            ] == [None] * 3


def test_shutdown_tool_missing(agent, tools):
    tools.add('poweroff')
    assert shut_down(agent, {'mode': 'reboot'}) == missing(
        ['shutdown', 'reboot'], tools)


def test_shutdown_fails(agent, tools):
    tools.add('shutdown', 1, 'Failed to talk to init daemon.\n')
    assert shut_down(agent, None) == error(
        'child process has failed to shutdown: Failed to talk to init '
        'daemon.')


def test_shutdown_bad_mode(agent, tools):
    tools.add('shutdown')
    assert shut_down(agent, {'mode': 'off'}) == error(
        'mode is invalid (valid values are: halt|powerdown|reboot')
    assert tools.called('shutdown') is None



# ---------------------------------------------------------------------------
# guest-set-time

def clock_set(clock):
    """The set_clock() calls the agent made, then forgotten."""
    if not os.path.exists(clock):
        return []
    with open(clock) as handle:
        calls = handle.read().splitlines()
    os.remove(clock)
    return calls


@pytest.fixture
def clock(setup):
    clock_set(setup[2])
    return setup[2]


def test_set_time(agent, tools, clock):
    """The system clock first, then the hardware clock from it."""
    tools.add('hwclock')
    assert call(agent, 'guest-set-time', {'time': 1700000000123456789}) == {
        'return': {}, 'id': 1}
    assert clock_set(clock) == ['1700000000 123456']
    assert tools.called('hwclock') == (['-w'], b'')


def test_set_time_from_hardware_clock(agent, tools, clock):
    tools.add('hwclock')
    assert call(agent, 'guest-set-time') == {'return': {}, 'id': 1}
    assert clock_set(clock) == []
    assert tools.called('hwclock') == (['-s'], b'')


def test_set_time_hwclock_fails(agent, tools, clock):
    tools.add('hwclock', 1, 'hwclock: Cannot access the Hardware Clock via '
              'any known method.\n')
    assert call(agent, 'guest-set-time', {'time': 10 ** 18}) == error(
        'hwclock failed to set hardware clock to system time: hwclock: '
        'Cannot access the Hardware Clock via any known method.')
    assert clock_set(clock) == ['1000000000 0']


def test_set_time_without_hwclock_sets_nothing(agent, tools, clock):
    assert call(agent, 'guest-set-time', {'time': 10 ** 18}) == missing(
        ['hwclock'], tools)
    assert clock_set(clock) == []


@pytest.mark.parametrize('time_ns', [-10 ** 18, 4 * 10 ** 18, 2 ** 63 - 1])
def test_set_time_invalid(agent, tools, clock, time_ns):
    tools.add('hwclock')
    assert call(agent, 'guest-set-time', {'time': time_ns}) == error(
        'Invalid time')
    assert clock_set(clock) == []
    assert tools.called('hwclock') is None


@pytest.mark.parametrize('time_ns,expected', [
    (10 ** 18, (10 ** 9, 0)), (1700000000999999999, (1700000000, 999999))])
def test_clock_time(time_ns, expected):
    assert negotiator.clock_time(time_ns) == expected


def test_clock_time_cuts_toward_zero(monkeypatch):
    """As C's division: -1.5 us is -1 us (here in UTC, where 0 s is 1970)."""
    monkeypatch.setattr(negotiator.time, 'localtime', negotiator.time.gmtime)
    assert negotiator.clock_time(-1500) == (0, -1)
    assert negotiator.clock_time(-999) == (0, 0)


def test_set_clock_reports_the_system_error():
    """The real settimeofday(), refused by the kernel (microseconds out of
    range) before it changes anything: it would set the clock to now."""
    with pytest.raises(negotiator.RequestError) as caught:
        negotiator.set_clock(int(time.time()), -1)
    assert caught.value.desc == 'Failed to set time to guest: Invalid argument'


# ---------------------------------------------------------------------------
# guest-fstrim (tests/test_qemu_ga.py compares its replies with qemu-ga's)

def block_device():
    """A block device of this machine, or None."""
    for name in sorted(os.listdir('/dev')):
        path = os.path.join('/dev', name)
        if os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return path
    return None


def test_trimmed_mounts(workdir, monkeypatch):
    """Mounts of a block device, by their device number (btrfs: its
    device's), in mountinfo's order, escapes decoded."""
    device = block_device()
    if device is None:
        pytest.skip('no block device to stand for a btrfs device')
    mountinfo = workdir.join('mountinfo')
    with open(mountinfo, 'w') as handle:
        handle.write(
            '27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n'
            '22 27 0:21 / /proc rw,relatime - proc proc rw\n'
            '30 27 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw\n'
            '31 27 8:1 / /mnt/a\\040b rw shared:1 master:2 - xfs /dev/sda1 '
            'rw\n'
            '32 27 0:40 / /srv rw - btrfs {0} rw\n'
            '33 27 0:41 / /home rw - btrfs /nonexistent rw\n'
            '34 27 0:42 / /net rw - nfs4 server:/ rw\n'
            '35 27 8:2 /x /data rw - ext4 /dev/sda2 rw\n'
            'garbage\n'.format(device))
    monkeypatch.setattr(negotiator, 'MOUNTINFO_PATH', mountinfo)
    assert [mount[0] for mount in negotiator.block_mounts()] == [
        b'/', b'/mnt/a b', b'/srv', b'/data']


def test_the_host_daemon_serves_none_of_them():
    """They act on the machine the agent runs on: never a guest's call
    to the host."""
    served = [name for name, _, _ in negotiator.DaemonServer.REQUESTS]
    for name in ('guest-set-user-password', 'guest-shutdown',
                 'guest-set-time', 'guest-fstrim',
                 'guest-ssh-get-authorized-keys',
                 'guest-ssh-add-authorized-keys',
                 'guest-ssh-remove-authorized-keys'):
        assert name in [n for n, _, _ in negotiator.Server.REQUESTS]
        assert name not in served
