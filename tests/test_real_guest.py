"""End to end through a real virtio-serial port: QEMU guests boot with the
agent inside, on the guest's Python 3 and on its Python 2.7.

scripts/test runs this module once, on one host interpreter, after the
matrix; it needs qemu-system-x86_64 and the guest image (scripts/guest/build,
which scripts/test runs first).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import negotiator
from helpers import ROOT, Workdir, make_command

sys.path.insert(0, os.path.join(ROOT, 'scripts', 'guest'))
from qemu import Guest  # noqa: E402

#: Guest commands, POSIX sh run by the guest's busybox.
COMMANDS = {
    'echo-args': '#!/bin/sh\nprintf "%s\\0" "$@"\nexec cat\n',
    'exit-with': '#!/bin/sh\nexit "$1"\n',
    'kill-self': '#!/bin/sh\nkill -9 $$\n',
    'bytes': ('#!/bin/sh\nexec python -c "import sys; '
              'getattr(sys.stdout, \'buffer\', sys.stdout).write('
              'bytes(bytearray(range(256))) * int(sys.argv[1]))" "$1"\n'),
    'stream': '#!/bin/sh\necho first\nsleep 3\necho second\n',
    'pid-sleep': '#!/bin/sh\necho $$\nexec sleep 60\n',
    'alive': ('#!/bin/sh\n[ -r /proc/$1/stat ] || exit 1\n'
              'set -- $(cat /proc/$1/stat)\n[ "$3" != Z ]\n'),
    'touch-marker': '#!/bin/sh\ntouch /tmp/marker\n',
    'exists': '#!/bin/sh\n[ -e "$1" ]\n',
    'agent-cpu': ('#!/bin/sh\nset -- $(cat /proc/$PPID/stat)\n'
                  'echo $(( ${14} + ${15} ))\n'),
    'agent-pid': '#!/bin/sh\necho $PPID\n',
    'second-agent': ('#!/bin/sh\nexec "$NEGOTIATOR_PYTHON" '
                     '/usr/lib/negotiator/negotiator.py guest 2>&1\n'),
    'leave-behind': '#!/bin/sh\nsleep 1000 &\necho started\n',
    # The guest's /init starts the agent again after it exits.
    'restart-agent': ('#!/bin/sh\nsetsid sh -c "sleep $1; kill -TERM $PPID" '
                      '>/dev/null 2>&1 </dev/null &\n'),
    # Guest-to-host calls, from inside the guest.
    'call-host': ('#!/bin/sh\nexec "$NEGOTIATOR_PYTHON" '
                  '/usr/lib/negotiator/negotiator.py guest --call "$@"\n'),
    'call-host-together': (
        '#!/bin/sh\nfor i in 1 2 3 4 5; do\n'
        '  ( "$NEGOTIATOR_PYTHON" /usr/lib/negotiator/negotiator.py guest '
        '--call greet "$i" </dev/null; echo "status $?" ) >/tmp/call.$i 2>&1 &\n'
        'done\nwait\ncat /tmp/call.1 /tmp/call.2 /tmp/call.3 /tmp/call.4 '
        '/tmp/call.5\n'),
}

#: Host commands the guest calls through the host daemon.
HOST_COMMANDS = {
    'greet': ('#!/bin/sh\necho "hello $NEGOTIATOR_GUEST: $*"\n'
              'cat\nexit 3\n'),
}


@pytest.fixture(scope='module', params=['3', '2'], ids=['guest-py3',
                                                        'guest-py2.7'])
def guest(request):
    workdir = Workdir()
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    booted = Guest(python=request.param, commands=workdir.commands)
    booted.start()
    yield booted
    console = booted.console()
    booted.stop()
    workdir.cleanup()
    # The agent logs to the console: whatever happened, never a traceback.
    assert 'Traceback' not in console, console


def host(guest, *args, **kwargs):
    """Run the host client; returns (status, stdout, stderr)."""
    kwargs.setdefault('timeout', 120)
    options = ['-t', '60'] + list(kwargs.pop('options', []))
    if 'input' not in kwargs:
        options.append('-n')
    done = guest.host(*args, options=options, **kwargs)
    assert b'Traceback' not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def test_arguments_stdin_and_exit_status(guest):
    data = os.urandom(1024 * 1024)
    status, out, err = host(guest, 'echo-args', 'a b', '', '$HOME', '-n',
                            input=data)
    assert (status, err) == (0, b'')
    assert out == b'a b\0\0$HOME\0-n\0' + data
    assert host(guest, 'exit-with', '3')[0] == 3
    assert host(guest, 'kill-self')[0] == 128 + signal.SIGKILL
    status, out, err = host(guest, 'no-such-command')
    assert (status, out) == (127, b'')


def test_twenty_megabytes_of_every_byte_value(guest):
    status, out, err = host(guest, 'bytes', '81920')
    assert (status, err) == (0, b'')
    assert out == bytes(bytearray(range(256))) * 81920


def test_output_streams_while_the_command_runs(guest):
    process = subprocess.Popen(
        [sys.executable, negotiator.__file__, 'host', '-n', '-t', '60',
         guest.socket, 'stream'], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b'first\n'
    first_line = time.time()
    rest = process.stdout.read()
    process.wait()
    # The command sleeps 3 s between its lines: the first one arrived
    # while it ran, not at its end.
    assert (process.returncode, rest) == (0, b'second\n')
    assert time.time() - first_line > 1.5


def test_builtins_answer(guest):
    status, out, err = host(guest, 'hostname')
    assert (status, out, err) == (0, b'negotiator-guest\n', b'')


def test_idle_agent_does_not_spin_and_answers_a_new_client_promptly(guest):
    before = int(host(guest, 'agent-cpu')[1])
    time.sleep(5)
    used = (int(host(guest, 'agent-cpu')[1]) - before) / 100.0
    assert used < 1.0, 'agent used {0} s of CPU in 5 s idle'.format(used)
    # Without SIGIO the agent would notice a new client only at its next
    # once-a-second check: some of these connections would wait ~0.5 s.
    waits = []
    for _ in range(5):
        time.sleep(0.3)
        started = time.time()
        sock, client = negotiator.open_client(guest.socket, 30)
        waits.append(time.time() - started)
        sock.close()
    assert max(waits) < 0.6, waits


def command_pid_of_killed_client(guest):
    """Start pid-sleep, read its pid, then kill the host client."""
    process = subprocess.Popen(
        [sys.executable, negotiator.__file__, 'host', '-n', '-t', '60',
         guest.socket, 'pid-sleep'], stdout=subprocess.PIPE)
    pid = process.stdout.readline().strip().decode('ascii')
    process.kill()
    process.wait()
    return pid


def test_killed_client_kills_its_command(guest):
    pid = command_pid_of_killed_client(guest)
    assert pid.isdigit()
    assert host(guest, 'alive', pid) == (1, b'', b'')
    assert host(guest, 'alive', '1') == (0, b'', b'')


def raw_sync(sock):
    """Resynchronise by hand, as a client that will then misbehave."""
    sock.sendall(b'\xff{"execute":"guest-sync-delimited",'
                 b'"arguments":{"id":4242}}\n')
    received = b''
    while b'\xff{"return":4242}\n' not in received:
        data = sock.recv(65536)
        assert data, 'the port closed'
        received += data


def test_request_waiting_behind_a_command_dies_with_its_client(guest):
    host(guest, 'exit-with', '0')
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(guest.socket)
    raw_sync(sock)
    for request_id, command in ((1, 'pid-sleep'), (2, 'touch-marker')):
        sock.sendall(json.dumps({
            'execute': 'negotiator-execute', 'id': request_id,
            'arguments': {'command': command}}).encode('ascii') + b'\n')
    received = b''
    while b'\n' not in received:  # the first command's pid: it runs
        received += sock.recv(65536)
    sock.close()
    assert host(guest, 'exists', '/tmp/marker') == (1, b'', b'')
    assert host(guest, 'exit-with', '5')[0] == 5


def test_clients_started_together_each_get_their_own_answer(guest):
    processes = [subprocess.Popen(
        [sys.executable, negotiator.__file__, 'host', '-n', '-t', '60',
         guest.socket, 'echo-args', 'client-{0}'.format(n)],
        stdout=subprocess.PIPE) for n in range(3)]
    outputs = [process.communicate()[0] for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert outputs == [b'client-0\0', b'client-1\0', b'client-2\0']


def test_timeout_kills_the_command_in_the_guest(guest):
    status, out, err = host(guest, 'pid-sleep', options=['-t', '3'])
    assert status == 124
    pid = out.strip().decode('ascii')
    assert pid.isdigit()
    assert host(guest, 'alive', pid) == (1, b'', b'')


def test_second_agent_on_the_port_is_refused_and_the_first_serves_on(guest):
    agent = host(guest, 'agent-pid')[1].strip()
    status, out, err = host(guest, 'second-agent')
    assert status == 1
    lines = out.decode('utf-8').splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        'negotiator: another negotiator agent (pid {0}) already serves this '
        'port'.format(agent.decode('ascii'))), lines
    assert host(guest, 'agent-pid')[1].strip() == agent


def wait_for_new_agent(guest, old):
    """The pid of the agent that replaced ``old`` (via the port)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        status, out, err = host(guest, 'agent-pid', options=['-t', '5'])
        if status == 0 and out.strip() != old:
            return out.strip()
        time.sleep(0.5)
    raise AssertionError('the agent was not restarted')


def test_agent_restarts_although_a_command_left_a_process_behind(guest):
    """Had the background process inherited the port, the new agent would
    find it busy (EBUSY) for as long as that process lives."""
    assert host(guest, 'leave-behind') == (0, b'started\n', b'')
    old = host(guest, 'agent-pid')[1].strip()
    assert host(guest, 'restart-agent', '0.2')[0] == 0
    wait_for_new_agent(guest, old)
    assert 'busy' not in guest.console()


def test_client_waiting_while_the_agent_restarts_gets_a_clear_error(guest):
    old = host(guest, 'agent-pid')[1].strip()
    assert host(guest, 'restart-agent', '2')[0] == 0
    started = time.time()
    status, out, err = host(guest, 'pid-sleep', options=['-t', '8'])
    waited = time.time() - started
    assert status == 124
    assert len(err.decode('utf-8').splitlines()) == 1, err
    assert err.startswith(b'negotiator: '), err
    assert waited < 8 + 10
    wait_for_new_agent(guest, old)
    assert host(guest, 'exit-with', '4')[0] == 4


def test_a_hundred_megabytes_arrive_intact(guest):
    status, out, err = host(guest, 'bytes', '409600', timeout=600,
                            options=['-t', '500'])
    assert (status, err) == (0, b'')
    assert len(out) == 100 * 1024 * 1024
    assert out == bytes(bytearray(range(256))) * 409600


@pytest.fixture
def host_daemon(guest):
    """``host --daemon`` serving the guest's negotiator-guest-to-host.0."""
    workdir = Workdir()
    for name, script in HOST_COMMANDS.items():
        make_command(workdir.commands, name, script)
    log_path = workdir.join('daemon.log')
    with open(log_path, 'wb') as log_file:
        daemon = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'negotiator.py'), 'host',
             '--daemon', '-v', '--commands-dir', workdir.commands,
             '--guest', 'vm1=' + guest.guest_to_host_socket],
            stdout=log_file, stderr=subprocess.STDOUT, close_fds=True)
    try:
        deadline = time.time() + 30
        while b'vm1: connected' not in open(log_path, 'rb').read():
            assert time.time() < deadline, open(log_path, 'rb').read()
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
        log_text = open(log_path, 'rb').read()
        workdir.cleanup()
        assert b'Traceback' not in log_text, log_text


def test_guest_calls_a_host_command_through_the_real_port(guest, host_daemon):
    status, out, err = host(guest, 'call-host', 'greet', 'a b', '',
                            options=['--stdin'], input=b'from the guest\n')
    assert (status, out, err) == (
        3, b'hello vm1: a b \nfrom the guest\n', b'')


def test_guest_callers_started_together_take_turns(guest, host_daemon):
    status, out, err = host(guest, 'call-host-together')
    assert (status, err) == (0, b'')
    assert out == b''.join(
        'hello vm1: {0}\nstatus 3\n'.format(i).encode('ascii')
        for i in range(1, 6))


def test_guest_call_without_a_host_daemon_fails_clearly(guest):
    """It waits for a daemon within its timeout, then says none came."""
    status, out, err = host(guest, 'call-host', '-t', '3', 'greet')
    assert (status, out, err) == (
        255, b'', b'negotiator: no host daemon connected to /dev/vport0p2 '
        b'within 3 s: is "negotiator.py host --daemon" running on the '
        b'host?\n')
