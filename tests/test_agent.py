"""The guest agent's loop: port hang-up, reconnects, busy ports, second agents.

A pseudo-terminal stands in for the virtio-serial port here: like a port
whose host client has gone, its slave side reports hang-up and fails reads
once the master side is closed.  The real port is exercised with QEMU guests.
"""

import errno
import json
import logging
import os
import re
import select
import signal
import time
import tty

import pytest

import negotiator
from helpers import (HANG, Agent, GuestProcess, RawClient, Workdir,
                     make_command, process_state, remove_quietly, run_cli,
                     wait_for)


class PtyPort(object):
    """A pty whose slave path the agent opens as its device.

    The agent's lock file is named after the pty, and pty numbers are
    shared with every other test run on the machine: the file is removed
    while this pty still holds its number, never after.
    """

    def __init__(self):
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self.slave = slave
        PORTS.append(self)

    def release_slave(self):
        os.close(self.slave)
        self.slave = None

    def send(self, message):
        os.write(self.master, json.dumps(message).encode('ascii') + b'\n')

    def read_line(self, timeout=HANG):
        data = b''
        deadline = time.time() + timeout
        while not data.endswith(b'\n'):
            ready, _, _ = select.select([self.master], [], [],
                                        max(0, deadline - time.time()))
            if not ready:
                raise AssertionError('no reply on the pty: {0!r}'.format(data))
            data += os.read(self.master, 1)
        return data[:-1]

    def call(self, message):
        self.send(message)
        return json.loads(self.read_line().decode('ascii'))

    def hang_up(self):
        """Close the host's side; the agent may go on holding the lock."""
        if self.master is not None:
            remove_quietly(negotiator.lock_path_for(self.path))
            os.close(self.master)
            self.master = None

    def close(self):
        self.hang_up()
        if self.slave is not None:
            self.release_slave()


class PortAgent(GuestProcess):
    """``negotiator.py guest --device PATH`` in the background."""

    def __init__(self, workdir, device, name='agent'):
        GuestProcess.__init__(self, workdir, ['-v', '--device', device], name)
        STARTED.append(self.process)


def serve_pty(workdir):
    """A pty port and an agent serving it, the agent's side released."""
    port = PtyPort()
    agent = PortAgent(workdir, port.path)
    agent.wait_log('serving port')
    port.release_slave()
    return port, agent


#: Agents started by the current test, killed if the test left them running.
STARTED = []
#: The test's ptys, closed after it.
PORTS = []


@pytest.fixture
def workdir():
    workdir = Workdir()
    yield workdir
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()
    while PORTS:
        PORTS.pop().close()
    workdir.cleanup()



def test_port_served_then_idle_without_spinning_after_hang_up(workdir):
    port, agent = serve_pty(workdir)
    assert port.call({'execute': 'guest-ping', 'id': 1}) == {
        'return': {}, 'id': 1}
    port.hang_up()
    agent.wait_log('disconnected')
    before = agent.cpu_seconds()
    time.sleep(3)
    used = agent.cpu_seconds() - before
    assert used < 0.3, 'agent used {0} s of CPU in 3 s while idle'.format(used)
    assert agent.process.poll() is None
    agent.stop()


def test_second_agent_on_the_same_port_exits_clearly(workdir):
    port = PtyPort()
    first = PortAgent(workdir, port.path, 'first')
    first.wait_log('serving port')
    status, out, err = run_cli(['guest', '--device', port.path,
                                '--commands-dir', workdir.commands])
    assert status == 1
    assert out == b''
    lines = err.decode('utf-8').splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        'negotiator: another negotiator agent (pid {0}) already serves this '
        'port'.format(first.process.pid))
    port.release_slave()
    assert port.call({'execute': 'guest-ping'}) == {'return': {}}
    first.stop()


def test_agent_waits_for_a_port_that_appears_later(workdir):
    port = PtyPort()
    link = workdir.join('vport')
    link_lock = negotiator.lock_path_for(link)
    agent = PortAgent(workdir, link)
    agent.wait_log('does not exist yet; waiting for it')
    try:
        os.symlink(port.path, link)
        agent.wait_log('serving port')
        port.release_slave()
        assert port.call({'execute': 'guest-ping'}) == {'return': {}}
        agent.stop()
    finally:
        # Locked before the link existed: named after the link.
        remove_quietly(link_lock)


def test_background_process_of_a_command_neither_delays_nor_holds_the_port(
        workdir):
    pid_file = workdir.join('bg.pid')
    make_command(workdir.commands, 'leave-behind',
                 '#!/bin/sh\nsleep 60 &\necho $! > "$1"\necho started\n')
    port, agent = serve_pty(workdir)
    port.send({'execute': 'negotiator-execute', 'id': 1,
               'arguments': {'command': 'leave-behind', 'args': [pid_file]}})
    messages = []
    while not messages or 'event' in messages[-1]:
        messages.append(json.loads(port.read_line().decode('ascii')))
    assert messages[-1] == {'return': {'exitcode': 0}, 'id': 1}
    background = int(open(pid_file).read())
    try:
        # Until sleep is exec'd, the forked shell still has its script open,
        # and after exec the dynamic loader opens and closes its libraries:
        # only a sleep that sleeps (state S) holds its last descriptors.
        wait_for(lambda: open('/proc/{0}/cmdline'.format(background), 'rb')
                 .read().startswith(b'sleep\0') and
                 process_state(background) == 'S')
        fds = sorted(os.listdir('/proc/{0}/fd'.format(background)))
        assert fds == ['0', '1', '2']
        held = [os.readlink('/proc/{0}/fd/{1}'.format(background, fd))
                for fd in fds]
        assert port.path not in held
        assert all(not target.startswith('/dev/pts/') for target in held), held
    finally:
        os.kill(background, signal.SIGKILL)
    agent.stop()


def test_each_command_is_logged_once_with_its_outcome(workdir):
    make_command(workdir.commands, 'fail', '#!/bin/sh\nexit 3\n')
    make_command(workdir.commands, 'slow', '#!/bin/sh\nexec sleep 60\n')
    port, agent = serve_pty(workdir)
    calls = [('fail', ['a', 'b'], 0, {'exitcode': 3}),
             ('slow', [], 0.2, {'signal': 9, 'timed-out': True})]
    for request_id, (name, args, timeout, result) in enumerate(calls):
        assert port.call({'execute': 'negotiator-execute', 'id': request_id,
                          'arguments': {'command': name, 'args': args,
                                        'timeout': timeout}}) == {
            'return': result, 'id': request_id}
    agent.wait_log('timed out, killed')
    lines = [line for line in agent.stop().splitlines()
             if 'argument(s), pid' in line]
    assert len(lines) == 2, lines
    start = re.escape('negotiator: {0}: {1}/'.format(
        port.path, workdir.commands))
    assert re.match(start + r'fail with 2 argument\(s\), pid \d+, exit '
                    r'status 3 after \d+\.\d ms$', lines[0]), lines
    assert re.match(start + r'slow with 0 argument\(s\), pid \d+, timed '
                    r'out, killed by signal 9 after \d+\.\d ms$',
                    lines[1]), lines


def test_sigterm_kills_the_running_command_and_exits_zero(workdir):
    pid_file = workdir.join('cmd.pid')
    make_command(workdir.commands, 'sleeper',
                 '#!/bin/sh\necho $$ > "$1"\nexec sleep 60\n')
    port, agent = serve_pty(workdir)
    port.send({'execute': 'negotiator-execute', 'id': 1,
               'arguments': {'command': 'sleeper', 'args': [pid_file]}})
    wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read())
    pid = int(open(pid_file).read())
    agent.stop()
    wait_for(lambda: not os.path.exists('/proc/{0}'.format(pid)) or
             open('/proc/{0}/stat'.format(pid)).read().rsplit(')', 1)[1]
             .split()[0] == 'Z')


def test_busy_port_is_retried_with_one_log_line(workdir, monkeypatch, caplog):
    """EBUSY (another process holds the port) is retried, not fatal."""
    port = PtyPort()
    real_open = os.open
    attempts = []

    def busy_twice(path, flags, *mode):
        if path == port.path:
            attempts.append(path)
            if len(attempts) <= 2:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, 'open', busy_twice)
    monkeypatch.setattr(negotiator, 'OPEN_RETRY', 0.05)
    caplog.set_level(logging.INFO, logger='negotiator')
    loop = negotiator.Loop()
    commands = negotiator.CommandSet(workdir.commands, {})
    children = negotiator.Children()
    service = negotiator.PortService(
        loop, port.path, lambda fd, name, on_disconnect: negotiator.Server(
            loop, fd, name, commands, children, on_disconnect=on_disconnect))
    try:
        service.start()
        deadline = time.time() + HANG
        while service.server is None and time.time() < deadline:
            loop.run_once()
        assert len(attempts) == 3
        busy = [r.getMessage() for r in caplog.records if 'busy' in
                r.getMessage()]
        assert busy == ['port {0} is busy: another process has it open (find '
                        'it with: fuser -v {0}); retrying'.format(port.path)]
    finally:
        service.stop()
        loop.close()


def test_a_signal_that_arrives_during_a_turn_is_handled_in_that_turn():
    """Its callback runs before run_once() returns, and its byte in the
    wakeup pipe is read then too: no turn of its own comes after it."""
    loop = negotiator.Loop()
    seen = []
    read_end, write_end = os.pipe()

    def on_readable(hung_up):
        os.read(read_end, 1)
        seen.append('read')
        os.kill(os.getpid(), signal.SIGUSR1)
    try:
        loop.on_signal(signal.SIGUSR1, lambda: seen.append('signal'))
        loop.add_reader(read_end, on_readable)
        os.write(write_end, b'x')
        loop.run_once()
        assert seen == ['read', 'signal']
        # Nothing is left to wake the loop for a turn of the signal's own.
        assert select.select([loop._wake_read], [], [], 0)[0] == []
    finally:
        loop.close()
        os.close(read_end)
        os.close(write_end)


def test_find_port_by_name_then_fallback(workdir):
    sys_ports = workdir.join('sys')
    dev = workdir.join('dev')
    os.makedirs(os.path.join(dev, 'virtio-ports'))
    for entry, name in (('vport0p1', 'org.qemu.guest_agent.0'),
                        ('vport0p2', 'negotiator-channel.0'),
                        ('vport0p3', 'negotiator-host-to-guest.0')):
        os.makedirs(os.path.join(sys_ports, entry))
        with open(os.path.join(sys_ports, entry, 'name'), 'w') as handle:
            handle.write(name + '\n')
    assert negotiator.find_port(sys_ports=sys_ports, dev=dev) == os.path.join(
        dev, 'vport0p3')
    os.remove(os.path.join(sys_ports, 'vport0p3', 'name'))
    assert negotiator.find_port(sys_ports=sys_ports, dev=dev) == os.path.join(
        dev, 'vport0p2')
    empty = workdir.join('nothing')
    assert negotiator.find_port(sys_ports=empty, dev=dev) is None
    open(os.path.join(dev, 'vport0p1'), 'w').close()
    assert negotiator.find_port(sys_ports=empty, dev=dev) == os.path.join(
        dev, 'vport0p1')
    os.symlink(os.path.join(dev, 'vport0p1'),
               os.path.join(dev, 'virtio-ports', 'negotiator-host-to-guest.0'))
    assert negotiator.find_port(sys_ports=empty, dev=dev) == os.path.join(
        dev, 'virtio-ports', 'negotiator-host-to-guest.0')


def test_listen_socket_reconnects_and_refuses_a_second_agent(workdir):
    from helpers import Agent
    agent = Agent(workdir)
    before = agent.cpu_seconds()
    for _ in range(3):
        client = agent.client()
        assert client.call({'execute': 'guest-ping'}) == {'return': {}}
        client.close()
    status, out, err = run_cli(['guest', '--listen', agent.socket])
    assert status == 1
    assert err.decode('utf-8') == (
        'negotiator: another agent already listens on {0}; not starting a '
        'second one\n'.format(agent.socket))
    time.sleep(1)
    assert agent.cpu_seconds() - before < 0.3
    agent.stop()
    assert not os.path.exists(agent.socket)


def test_stale_socket_file_is_replaced(workdir):
    import socket
    from helpers import Agent
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(workdir.join('agent.sock'))
    stale.close()
    agent = Agent(workdir)
    client = agent.client()
    assert client.call({'execute': 'guest-ping'}) == {'return': {}}
    client.close()
    agent.stop()


def test_commands_inherit_no_descriptor_of_the_agent(workdir):
    """Not even one the agent inherited without close-on-exec (fd 7 here)."""
    import subprocess
    import sys
    from helpers import NEGOTIATOR, connectable, run_cli
    make_command(workdir.commands, 'list-fds',
                 '#!/bin/sh\nexec ls /proc/self/fd\n')
    sock = workdir.join('fds.sock')
    agent = subprocess.Popen(
        ['sh', '-c', 'exec 7</dev/null; exec "$0" "$@"', sys.executable,
         NEGOTIATOR, 'guest', '-q', '--listen', sock, '--commands-dir',
         workdir.commands], close_fds=True)
    STARTED.append(agent)
    wait_for(lambda: connectable(sock))
    assert os.path.exists('/proc/{0}/fd/7'.format(agent.pid))
    # ls holds its own listing of the directory open as descriptor 3.
    assert run_cli(['host', '-n', sock, 'list-fds']) == (
        0, b'0\n1\n2\n3\n', b'')
    agent.terminate()
    assert agent.wait() == 0


# ---------------------------------------------------------------------------
# --allow-rpcs and --block-rpcs (the differential test with qemu-ga's -b is
# in test_qemu_ga.py)

REQUESTS = [request[0] for request in negotiator.Server.REQUESTS]


@pytest.mark.parametrize('allowed, blocked, refused', [
    (None, None, set(negotiator.DEFAULT_BLOCKED_RPCS)),
    (None, [], set()),
    (None, ['guest-ping'], {'guest-ping'}),
    (['guest-ping', 'guest-info'], None,
     set(REQUESTS) - {'guest-ping', 'guest-info'}),
    (['guest-ping', 'guest-info'], ['guest-info'], set(REQUESTS) - {
        'guest-ping'}),
    ([], None, set(REQUESTS)),
])
def test_refused_requests_follow_qemu_gas_rules(allowed, blocked, refused):
    assert negotiator.refused_requests(
        negotiator.Server.REQUESTS, allowed, blocked) == frozenset(
            refused & set(REQUESTS))


def test_an_agent_serves_only_the_allowed_requests(workdir):
    agent = Agent(workdir, ['-a', 'guest-ping', '--allow-rpcs',
                            'guest-info,,guest-fsfreeze-freeze'])
    try:
        client = RawClient(agent.socket)
        replies = []
        for message in ({'execute': 'guest-ping', 'id': 1},
                        {'execute': 'negotiator-list-commands', 'id': 2},
                        {'execute': 'guest-nosuch', 'id': 3},
                        {'execute': 'guest-info'}):
            client.request(message)
            replies.append(json.loads(client.read_line().decode('ascii')))
        client.close()
        info = replies.pop()
    finally:
        log = agent.stop()
    assert replies == [
        {'return': {}, 'id': 1},
        {'error': {'class': 'CommandNotFound', 'desc': 'Command '
                   'negotiator-list-commands has been disabled'}, 'id': 2},
        {'error': {'class': 'CommandNotFound', 'desc': 'The command '
                   'guest-nosuch has not been found'}, 'id': 3}]
    enabled = [entry['name'] for entry in info['return']['supported_commands']
               if entry['enabled']]
    assert enabled == ['guest-ping', 'guest-info']
    assert ('negotiator: --allow-rpcs: guest-fsfreeze-freeze is not a '
            'request negotiator serves; ignored\n') in log


@pytest.mark.parametrize('options', [['--allow-rpcs=help'],
                                     ['-b', 'guest-ping,help']])
def test_help_as_a_request_list_prints_the_requests(options):
    assert run_cli(['guest'] + options) == (
        0, ''.join(name + '\n' for name in REQUESTS).encode('ascii'), b'')


def test_the_request_list_ends_quietly_when_its_reader_has_gone():
    """`guest -b help | head -1`: 141, as if SIGPIPE had ended it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        assert run_cli(['guest', '-b', 'help'], stdout=write_end) == (
            141, None, b'')
    finally:
        os.close(write_end)


def test_request_lists_are_refused_when_calling_the_host():
    status, out, err = run_cli(['guest', '--call', '-b', 'guest-ping', 'x'])
    assert (status, out) == (2, b'')
    assert err.endswith(b'error: --allow-rpcs and --block-rpcs are options '
                        b'of the agent, not of --call, --list or --ping\n')


def test_serving_what_is_refused_by_default_is_warned_of(workdir):
    """A block list replaces the default one: the agent says what that
    lets the host do."""
    log = Agent(workdir, ['-b', 'guest-shutdown']).stop()
    assert ('negotiator: serving guest-exec, guest-exec-status, '
            'guest-file-open, guest-file-close, guest-file-read, '
            'guest-file-write, guest-file-seek, guest-file-flush: the host '
            "may run any program, and read and write any file, as this "
            "agent's user\n") in log
    assert 'serving guest-exec' not in Agent(workdir, socket=workdir.join(
        'b.sock')).stop()
