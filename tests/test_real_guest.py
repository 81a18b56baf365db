"""End to end through a real virtio-serial port: QEMU guests boot with the
agent inside, on the guest's Python 3 and on its Python 2.7.

scripts/test runs this module once, on one host interpreter, after the
matrix; it needs qemu-system-x86_64 and the guest image (scripts/guest/build,
which scripts/test runs first).

The faults at the end (QEMU killed and started again, the guest rebooted,
the agent or the host daemon killed, a long soak) print their counts and
measures through the ``figures`` fixture, at the end of the session.
QEMU's restarts and the guest's reboots, whose subject is the port, QEMU,
the guest's kernel and the host daemon rather than the guest's Python and
which take a boot each, run on one guest Python each: QEMU restarts on
Python 3, reboots on Python 2.7 (between them the first calls after a
boot run on both).  The rest run on both: the agent's death mid-output and
its memory and descriptors over a soak are the agent's own, and the guest
callers' side of the host daemon's death costs little.
"""

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

import negotiator
from helpers import (ROOT, Workdir, assert_no_traceback, communicate,
                     make_command, wait_for)

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
    'stream': '#!/bin/sh\necho first\nexec sleep 600\n',
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
    # A second agent, on the guest-to-host port, whose look for a new host
    # client without SIGIO is an hour away.
    'sigio-agent': (
        '#!/bin/sh\nsetsid "$NEGOTIATOR_PYTHON" -c \'\n'
        'import sys\n'
        'sys.path.insert(0, "/usr/lib/negotiator")\n'
        'import negotiator\n'
        'negotiator.RECONNECT_CHECK = 3600.0\n'
        'port = negotiator.find_port((negotiator.GUEST_TO_HOST_PORT,),\n'
        '                           fallback=None)\n'
        'sys.exit(negotiator.main(["guest", "--device", port]))\n'
        '\' </dev/null >/dev/console 2>&1 &\n'
        'echo $! >/tmp/sigio-agent.pid\n'),
    'stop-sigio-agent': (  # (the process may go between two looks)
        '#!/bin/sh\npid=$(cat /tmp/sigio-agent.pid)\nkill $pid\n'
        'while stat=$(cat /proc/$pid/stat 2>/dev/null); do\n'
        '  set -- $stat\n  [ "$3" = Z ] && break\n'
        '  sleep 0.05\ndone\n'),
    'reboot-now': '#!/bin/sh\nexec reboot -f\n',
    # The agent's resident memory (kB) and open descriptors.
    'agent-stats': ('#!/bin/sh\nset -- $(grep VmRSS /proc/$PPID/status)\n'
                    'echo $2 $(ls /proc/$PPID/fd | wc -l)\n'),
    # 50 MiB of a 100 MiB output, then SIGKILL to the agent, then the rest.
    'kill-agent-mid-output': (
        '#!/bin/sh\nexec python -c "\n'
        'import os, sys\n'
        'out = getattr(sys.stdout, \'buffer\', sys.stdout)\n'
        'chunk = bytes(bytearray(range(256))) * 4096\n'
        'try:\n'
        '    for _ in range(50):\n'
        '        out.write(chunk)\n'
        '    out.flush()\n'
        '    os.kill(os.getppid(), 9)\n'
        '    for _ in range(50):\n'
        '        out.write(chunk)\n'
        '    out.flush()\n'
        'except (IOError, OSError):\n'
        '    pass\n'
        '"\n'),
    # call-many STEPS...: one caller per argument, all at once, each making
    # the calls its argument lists (host commands, comma-separated) one
    # after another; prints each call's result as JSON.
    'call-many': (
        '#!/usr/bin/python\n'
        'import json, subprocess, sys, threading\n'
        'results = []\n'
        'def caller(n, steps):\n'
        '    for k, step in enumerate(steps.split(",")):\n'
        '        label = "%d.%d" % (n, k)\n'
        '        p = subprocess.Popen(\n'
        '            [sys.executable, "/usr/lib/negotiator/negotiator.py",\n'
        '             "guest", "--call", "-n", "-t", "60", step, label],\n'
        '            stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n'
        '        out, err = p.communicate()\n'
        '        results.append({"label": label, "step": step,\n'
        '                        "status": p.returncode,\n'
        '                        "out": out.decode("latin-1"),\n'
        '                        "err": err.decode("latin-1")})\n'
        'threads = [threading.Thread(target=caller, args=(n, steps))\n'
        '           for n, steps in enumerate(sys.argv[1:])]\n'
        'for t in threads:\n'
        '    t.start()\n'
        'for t in threads:\n'
        '    t.join()\n'
        'results.sort(key=lambda r: r["label"])\n'
        'print(json.dumps(results))\n'),
    'call-host-together': (
        '#!/bin/sh\nfor i in 1 2 3 4 5; do\n'
        '  ( "$NEGOTIATOR_PYTHON" /usr/lib/negotiator/negotiator.py guest '
        '--call greet "$i" </dev/null; echo "status $?" ) >/tmp/call.$i 2>&1 &\n'
        'done\nwait\ncat /tmp/call.1 /tmp/call.2 /tmp/call.3 /tmp/call.4 '
        '/tmp/call.5\n'),
}

#: Host commands the guest calls through the host daemon.  {workdir} is
#: the host daemon's working directory.
HOST_COMMANDS = {
    'greet': ('#!/bin/sh\necho "hello $NEGOTIATOR_GUEST: $*"\n'
              'cat\nexit 3\n'),
    # Says it started, then waits (at most a minute) for the file "gate".
    'hold': ('#!/bin/sh\necho "$1" >>{workdir}/held\ni=0\n'
             'while [ ! -e {workdir}/gate ] && [ $i -lt 600 ]; do\n'
             '  sleep 0.1; i=$((i + 1))\ndone\necho "released $1"\n'),
}

MIB = 1024 * 1024


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
    assert_no_traceback(console)


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
    """The command prints a line, then sleeps 10 minutes: the line arrives
    while it runs (the call has no timeout; the test ends it)."""
    process = subprocess.Popen(
        [sys.executable, negotiator.__file__, 'host', '-n', '-t', '0',
         guest.socket, 'stream'], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, 'no output within 60 s'
        assert process.stdout.readline() == b'first\n'
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_builtins_answer(guest):
    status, out, err = host(guest, 'hostname')
    assert (status, out, err) == (0, b'negotiator-guest\n', b'')


def test_idle_agent_does_not_spin(guest):
    before = int(host(guest, 'agent-cpu')[1])
    time.sleep(5)
    used = (int(host(guest, 'agent-cpu')[1]) - before) / 100.0
    assert used < 1.0, 'agent used {0} s of CPU in 5 s idle'.format(used)


def test_idle_agent_notices_a_new_client_by_sigio(guest):
    """A second agent serves the guest-to-host port (no host daemon runs
    here) with its periodic look for a host an hour away: each new client
    is answered only because SIGIO woke it."""
    assert host(guest, 'sigio-agent') == (0, b'', b'')
    try:
        guest.wait_console('serving port /dev/vport0p2')
        for n in range(5):
            sock, client = negotiator.open_client(
                guest.guest_to_host_socket, 30)
            try:
                assert client.call('guest-ping') == {}
            finally:
                sock.close()
    finally:
        assert host(guest, 'stop-sigio-agent') == (0, b'', b'')


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


class HostDaemon(object):
    """``host --daemon --guest vm1=SOCKET``, the guest's
    negotiator-guest-to-host.0, with HOST_COMMANDS; its log in a file.

    start() may follow kill(): the log goes on in the same file.
    """

    def __init__(self, guest):
        self.guest = guest
        self.workdir = Workdir()
        for name, script in HOST_COMMANDS.items():
            make_command(self.workdir.commands, name,
                         script.format(workdir=self.workdir.path))
        self.log_path = self.workdir.join('daemon.log')
        self.process = None
        self.starts = 0

    def log(self):
        with open(self.log_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')

    def start(self):
        """Start it; returns once it is connected to the guest's socket."""
        with open(self.log_path, 'ab') as log_file:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, 'negotiator.py'), 'host',
                 '--daemon', '-v', '--commands-dir', self.workdir.commands,
                 '--guest', 'vm1=' + self.guest.guest_to_host_socket],
                stdout=log_file, stderr=subprocess.STDOUT, close_fds=True)
        self.starts += 1
        self.wait_connected(self.starts)
        return self

    def wait_connected(self, count):
        """Wait until the log says "connected" ``count`` times in all."""
        def connected():
            assert self.process.poll() is None, self.log()
            return self.log().count('guest vm1: connected') >= count
        wait_for(connected, 60)

    def kill(self):
        self.process.kill()
        self.process.wait()

    def stop(self):
        """SIGTERM: it must exit 0, having logged no traceback."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
            assert self.process.wait(30) == 0, self.log()
            assert_no_traceback(self.log())
        finally:
            # "hold" commands left running by a killed daemon end too.
            open(self.workdir.join('gate'), 'w').close()
            time.sleep(0.3)
            self.workdir.cleanup()


@pytest.fixture
def host_daemon(guest):
    """``host --daemon`` serving the guest's negotiator-guest-to-host.0."""
    daemon = HostDaemon(guest).start()
    try:
        yield daemon
    finally:
        daemon.stop()


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


# ---------------------------------------------------------------------------
# Faults: QEMU killed, the guest rebooted, the agent or the host daemon
# killed, and a long soak
# ---------------------------------------------------------------------------

def only_on(guest, python, why):
    if guest.python != python:
        pytest.skip('runs on the guest\'s Python {0} only: {1}'.format(
            {'3': '3', '2': '2.7'}[python], why))


def first_calls_after_boot(guest, label):
    """The first host call of a boot, made as soon as /init starts the
    agent (the host client waits in QEMU's socket until the agent opens
    the port): a guest command whose first act is a call to the host.
    Returns a complaint, or None when both calls did as they should."""
    done = host(guest, 'call-host', 'greet', label)
    wanted = (3, 'hello vm1: {0}\n'.format(label).encode('ascii'), b'')
    if done != wanted:
        return '{0}: {1!r}'.format(label, done)
    return None


#: QEMU restarts whose guest stays down this long, as a host restarting a
#: guest may take: longer than the host daemon's former longest pause
#: between connection attempts (8 s), during which a guest booting fast
#: called before the daemon was back.
LONG_DOWNTIME = {10: 9.0, 20: 9.0}


def test_qemu_killed_and_started_again(guest, figures):
    only_on(guest, '3', 'the port, QEMU and the host daemon are the '
            'subject; reboots run on 2.7')
    daemon = HostDaemon(guest).start()
    try:
        started = time.time()
        failures = []
        cycles = 20
        for cycle in range(1, cycles + 1):
            guest.kill()
            time.sleep(LONG_DOWNTIME.get(cycle, 0))
            guest.restart(wait='console')
            failure = first_calls_after_boot(guest, 'start-{0}'.format(cycle))
            if failure:
                failures.append(failure)
        figures('restart cycles: {0}/{1} in {2:.0f} s'.format(
            cycles - len(failures), cycles, time.time() - started))
        assert failures == []
        assert daemon.log().count('guest vm1: connected') >= cycles + 1
    finally:
        daemon.stop()
    assert_no_traceback(guest.console())


def test_guest_rebooted_from_inside(guest, figures):
    only_on(guest, '2', 'the port, QEMU and the host daemon are the '
            'subject; QEMU restarts run on 3')
    workdir = Workdir()
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    rebooting = Guest(python=guest.python, commands=workdir.commands,
                      reboot=True)
    rebooting.start()
    daemon = None
    try:
        daemon = HostDaemon(rebooting).start()
        started = time.time()
        failures = []
        cycles = 10
        for cycle in range(1, cycles + 1):
            # reboot -f never lets the agent answer: the request is sent
            # and its client holds the port until the guest boots again.
            sock, client = negotiator.open_client(rebooting.socket, 60)
            try:
                client.send(json.dumps({
                    'execute': 'negotiator-execute', 'id': 1,
                    'arguments': {'command': 'reboot-now'}}).encode('ascii') +
                    b'\n')
                rebooting.wait_console('negotiator-guest: starting',
                                       count=cycle + 1)
            finally:
                sock.close()
            failure = first_calls_after_boot(rebooting,
                                             'boot-{0}'.format(cycle))
            if failure:
                failures.append(failure)
        figures('reboot cycles: {0}/{1} in {2:.0f} s'.format(
            cycles - len(failures), cycles, time.time() - started))
        assert failures == []
        # One QEMU all along: the daemon's connection outlived the reboots.
        assert daemon.log().count('guest vm1: connected') == 1
        console = rebooting.console()
        assert console.count('negotiator-guest: starting') == cycles + 1
        assert_no_traceback(console)
    finally:
        if daemon is not None:
            daemon.stop()
        rebooting.stop()
        workdir.cleanup()


def test_agent_killed_in_the_middle_of_a_hundred_megabytes(guest, figures):
    """The command writes 50 MiB, SIGKILLs the agent, then would write 50
    MiB more.  The host client cannot tell a dead agent from a slow one
    (QEMU keeps its connection): it ends at its timeout."""
    old = host(guest, 'agent-pid')[1].strip()
    restarts = guest.console().count('agent exit status 137; restarting')
    started = time.time()
    status, out, err = host(guest, 'kill-agent-mid-output', timeout=300,
                            options=['-t', '20'])
    took = time.time() - started
    figures('status {0} after {1:.1f} s (timeout 20 s), {2} of 100 MiB '
            'received, stderr {3!r}'.format(status, took, len(out), err))
    assert (status, err) == (
        124, b"negotiator: 'kill-agent-mid-output' timed out after 20 s\n")
    assert 40 * MIB <= len(out) <= 50 * MIB
    assert out == (bytes(bytearray(range(256))) * 204800)[:len(out)]
    assert guest.console().count(
        'agent exit status 137; restarting') == restarts + 1
    # The next call, with no retry, as the new agent comes up.
    assert host(guest, 'echo-args', 'next', input=b'call') == (
        0, b'next\0call', b'')
    assert host(guest, 'agent-pid')[1].strip() != old


def test_host_daemon_killed_and_started_again_while_guests_call(guest,
                                                                  figures):
    daemon = HostDaemon(guest).start()
    started = time.time()
    try:
        # Two callers: 0 holds the port in a host command ("hold", which
        # waits for a gate that never opens), 1 calls meanwhile; both go
        # on calling after the daemon is killed and started again.
        process = subprocess.Popen(
            [sys.executable, negotiator.__file__, 'host', '-n', '-t', '300',
             guest.socket, 'call-many', 'hold,greet,greet,greet',
             'greet,greet,greet,greet'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            held = daemon.workdir.join('held')
            wait_for(lambda: os.path.exists(held), 120)
            daemon.kill()
            time.sleep(2)  # callers find no daemon: they wait for one
            daemon.start()
            out, err = communicate(process, None, time.time() + 330)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert (process.returncode, err) == (0, b''), err
        results = json.loads(out.decode('ascii'))
        answered = errors = 0
        bad = []
        for result in results:
            label, step = result['label'], result['step']
            got = (result['status'], result['out'], result['err'])
            if step == 'hold':
                # In flight when the daemon died.
                if got != (255, '', 'negotiator: /dev/vport0p2: the '
                           'connection closed before the other side '
                           'answered\n'):
                    bad.append(result)
                errors += 1
            elif got == (3, 'hello vm1: {0}\n'.format(label), ''):
                answered += 1
            else:
                bad.append(result)
        figures('{0} calls in {1:.0f} s: {2} answered, {3} in flight got a '
                'clear error, {4} otherwise: {5!r}'.format(
                    len(results), time.time() - started, answered, errors,
                    len(bad), bad))
        assert (len(results), bad) == (8, [])
        assert errors == 1
        # After the restart, a call with no retry.
        assert first_calls_after_boot(guest, 'after-restart') is None
    finally:
        daemon.stop()


def stats(client):
    """The agent's resident memory (kB) and descriptors, through CLIENT."""
    result, out = execute(client, 'agent-stats')
    assert result == {'exitcode': 0}
    rss, fds = out.split()
    return int(rss), int(fds)


def execute(client, command, args=(), data=None):
    """negotiator-execute through an open client; (result, stdout)."""
    arguments = {'command': command, 'args': list(args), 'raw-output': True}
    if data is not None:
        arguments['input-data'] = base64.b64encode(data).decode('ascii')
    chunks = []

    def collect(stream, chunk):
        chunks.append(chunk if stream == 'out-data' else b'<stderr>' + chunk)
    client.deadline = negotiator.monotonic() + 60
    return client.call('negotiator-execute', arguments, collect), \
        b''.join(chunks)


def slope(points):
    """Least-squares slope of [(x, y), ...]."""
    n = float(len(points))
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    return (sum((x - mean_x) * (y - mean_y) for x, y in points) /
            sum((x - mean_x) ** 2 for x, _ in points))


#: Soak: calls in all, and every how many calls the agent is measured.
SOAK_CALLS = 10000
SOAK_SAMPLE = 1000


def soak_call(client, n):
    """Call number N of the soak's mix; a complaint, or None."""
    kind = n % 10
    if kind < 5:
        client.deadline = negotiator.monotonic() + 60
        got = client.call('guest-ping')
        wanted = {}
    elif kind < 8:
        got = execute(client, 'hostname')
        wanted = ({'exitcode': 0}, b'negotiator-guest\n')
    elif kind == 8:
        got = execute(client, 'echo-args', ['out', str(n)])
        wanted = ({'exitcode': 0}, 'out\0{0}\0'.format(n).encode('ascii'))
    else:
        data = 'stdin {0}\n'.format(n).encode('ascii') * 50
        got = execute(client, 'echo-args', ['in'], data)
        wanted = ({'exitcode': 0}, b'in\0' + data)
    if got != wanted:
        return 'call {0}: {1!r}'.format(n, got)
    return None


def test_soak_of_ten_thousand_calls_through_one_client(guest, figures):
    sock, client = negotiator.open_client(guest.socket, 60)
    try:
        for n in range(200):  # warm up: every kind of call, lazy imports
            assert soak_call(client, n) is None
        samples = [(0, stats(client))]
        failures = []
        started = time.time()
        for n in range(1, SOAK_CALLS + 1):
            failure = soak_call(client, n)
            if failure:
                failures.append(failure)
            if n % SOAK_SAMPLE == 0:
                samples.append((n, stats(client)))
        took = time.time() - started
    finally:
        sock.close()
    (_, (rss_first, fds_first)), (_, (rss_last, fds_last)) = \
        samples[0], samples[-1]
    rss_slope = slope([(n, rss) for n, (rss, _) in samples]) * SOAK_SAMPLE
    fd_slope = slope([(n, fds) for n, (_, fds) in samples]) * SOAK_SAMPLE
    figures('soak calls: {0}/{1} in {2:.0f} s; agent RSS {3} -> {4} kB '
            '({5:+.1f} kB per 1000 calls), descriptors {6} -> {7} ({8:+.2f} '
            'per 1000 calls); samples {9}'.format(
                SOAK_CALLS - len(failures), SOAK_CALLS, took, rss_first,
                rss_last, rss_slope, fds_first, fds_last, fd_slope,
                [s for _, s in samples]))
    assert failures == []
    # A descriptor kept per command run would add 300 per 1000 calls, and
    # 500 bytes kept per call (a request's line, say) 500 kB; the
    # allocator's arenas grow in steps of a few hundred kB at times.
    assert fds_last - fds_first <= 2
    assert fd_slope <= 0.5
    assert rss_slope <= 200
    assert rss_last - rss_first <= 2048
