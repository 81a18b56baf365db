# -*- coding: utf-8 -*-
"""Nothing a peer sends stops negotiator: each input that once stopped,
stalled or fooled the agent, the host daemon or the host client, and the
bounds that keep a peer from making them hold or spend without end.

Fault injection: a small program (FAULTY, below) runs the real command
line with one callback of the loop made to raise, to check that only that
conversation ends.

Runs on Python 2.7 and 3.6+ (no f-strings).
"""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import negotiator
from helpers import (HANG, NEGOTIATOR, Agent, RawClient,
                     assert_no_traceback, make_command, process_state,
                     run_cli, scripted_agent, wait_for)

COMMANDS = {
    'echo-args': '#!/bin/sh\nprintf "%s\\n" "$@"\n',
    'sigign': '#!/bin/sh\ngrep SigIgn /proc/$$/status\n',
    'yes-head': '#!/bin/sh\nyes | head -n 1\n',
    'sleeper': '#!/bin/sh\nexec sleep 60\n',
    'big': ('#!/bin/sh\necho $$ > "$1.new"\nmv "$1.new" "$1"\n'
            'exec head -c 4000000 /dev/zero\n'),
    'cat': '#!/bin/sh\nexec cat\n',
    'yes': '#!/bin/sh\nexec yes\n',
}


@pytest.fixture
def agent(workdir):
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    agent = Agent(workdir, verbose=False)
    yield agent
    agent.stop()


def ask(agent, line, request_id=None):
    """Send one raw line; the reply, as a dict."""
    client = agent.client()
    try:
        client.send(line)
        return client.read_message()
    finally:
        client.close()


def error(desc, error_class='GenericError', **extra):
    reply = {'error': {'class': error_class, 'desc': desc}}
    reply.update(extra)
    return reply


def rss_kib(pid):
    with open('/proc/{0}/status'.format(pid)) as handle:
        for line in handle:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])


# ---------------------------------------------------------------------------
# Ids: echoed exactly, or refused at the request, never a reply that fails
# ---------------------------------------------------------------------------

def nested(depth):
    return b'[' * depth + b'1' + b']' * depth


def test_messages_nested_up_to_64_levels_are_taken_deeper_ones_refused(
        agent):
    """Nesting is counted before decoding, outside strings: an id (which
    every reply repeats) nests 63 levels at most inside its request."""
    assert ask(agent, b'{"execute":"guest-ping","id":' + nested(63) +
               b'}\n') == {'return': {}, 'id': json.loads(nested(63))}
    assert ask(agent, b'{"execute":"guest-ping","id":"' + b'[' * 100 +
               b'"}\n') == {'return': {}, 'id': '[' * 100}
    refused = error('A message may nest 64 levels deep at most')
    for line in (b'{"execute":"guest-ping","id":' + nested(64) + b'}\n',
                 b'{"execute":"guest-ping","id":' + nested(980) + b'}\n',
                 b'[' * 100000 + b'\n'):
        assert ask(agent, line) == refused


def test_messages_of_up_to_65536_values_are_taken_more_refused(agent):
    """Values are counted before decoding (commas and containers, outside
    strings): each may cost a Python object of some 300 bytes."""
    def ping(values):  # its commas, and 3 containers
        return (b'{"execute":"guest-ping","arguments":{"x":[' +
                b','.join([b'1'] * (values - 3)) + b']}}\n')
    assert ask(agent, ping(65536)) == error("Parameter 'x' is unexpected")
    for values in (65537, 4 << 20):
        assert ask(agent, ping(values)) == error(
            'A message may hold 65536 values at most')
    assert ask(agent, b'{"execute":"guest-ping","arguments":{"x":"' +
               b',' * 100000 + b'"}}\n') == error("Parameter 'x' is unexpected")


def test_ids_up_to_1_kib_of_json_are_echoed_longer_ones_refused(agent):
    at_bound = 'x' * 1022  # and its two quotes
    assert ask(agent, json.dumps({'execute': 'guest-ping', 'id': at_bound})
               .encode('ascii') + b'\n') == {'return': {}, 'id': at_bound}
    for too_long in ('x' * 1023, u'\u00e9' * 200, ['x'] * 300):
        line = json.dumps({'execute': 'guest-ping', 'id': too_long})
        assert ask(agent, line.encode('ascii') + b'\n') == error(
            "The member 'id' is longer than 1024 bytes as JSON")


def test_numbers_up_to_100_characters_are_taken_longer_ones_refused(agent):
    assert ask(agent, b'{"execute":"guest-ping","id":' + b'9' * 100 +
               b'}\n') == {'return': {}, 'id': int('9' * 100)}
    refused = error('Invalid JSON syntax: a number longer than 100 characters')
    for number in (b'9' * 101, b'9' * 1000000, b'0.' + b'1' * 99):
        assert ask(agent, b'{"execute":"guest-ping","id":' + number +
                   b'}\n') == refused


@pytest.mark.parametrize('number, desc', [
    (b'1e309', 'a number out of range'), (b'-1e309', 'a number out of range'),
    (b'NaN', 'NaN is not JSON'), (b'Infinity', 'Infinity is not JSON'),
    (b'-Infinity', '-Infinity is not JSON'),
])
def test_numbers_json_cannot_carry_are_refused(agent, number, desc):
    """Python's json takes these and would echo NaN or Infinity: not JSON,
    and a strict peer (libvirt, qemu-ga's parser) chokes on it."""
    assert ask(agent, b'{"execute":"guest-ping","id":' + number + b'}\n') == \
        error('Invalid JSON syntax: ' + desc)


# ---------------------------------------------------------------------------
# Text: one rule on every Python, and never "Internal error"
# ---------------------------------------------------------------------------

def test_escaped_byte_in_a_command_name_is_not_found_by_that_name(agent):
    """It once killed the agent and the daemon on Python 2 (its error reply
    could not be encoded)."""
    reply = ask(agent, b'{"execute":"negotiator-execute","arguments":'
                b'{"command":"\\udcff"},"id":1}\n')
    assert reply['id'] == 1
    assert reply['error']['class'] == 'NegotiatorCommandNotFound'
    assert reply['error']['desc'].startswith(u"Command '\udcff' not found in ")


@pytest.mark.parametrize('line, reply', [
    (b'{"execute":"caf\xc3\xa9","id":3}\n',
     error(u'The command caf\u00e9 has not been found', 'CommandNotFound',
           id=3)),
    (b'{"execute":"guest-ping","caf\xc3\xa9":1,"id":3}\n',
     error(u"QMP input member 'caf\u00e9' is unexpected", id=3)),
    (b'{"execute":"guest-ping","arguments":{"caf\xc3\xa9":1},"id":3}\n',
     error(u"Parameter 'caf\u00e9' is unexpected", id=3)),
    (b'{"execute":"negotiator-execute","arguments":{"command":"caf\xc3\xa9/x"}'
     b',"id":3}\n',
     error(u"Invalid command name 'caf\u00e9/x': a name is a file directly "
           u"inside the commands directory", id=3)),
], ids=['execute', 'member', 'parameter', 'command'])
def test_non_ascii_names_get_the_usual_errors(agent, line, reply):
    assert ask(agent, line) == reply


def test_bytes_of_a_surrogate_are_not_utf8_on_any_python(agent):
    """ED B3 BF is U+DCFF encoded: invalid UTF-8, which Python 2's decoder
    would take (and pass on as the byte 0xFF)."""
    assert ask(agent, b'{"execute":"negotiator-execute","arguments":'
               b'{"command":"echo-args","args":["\xed\xb3\xbf"]},"id":4}\n'
               ) == error('Invalid JSON syntax: the line is not valid UTF-8')


@pytest.mark.parametrize('arguments, member', [
    (b'{"command":"echo-args","args":["a\\u0000b"]}', 'args'),
    (b'{"command":"echo-args","args":["ok","\\u0000"]}', 'args'),
])
def test_nul_in_an_argument_is_refused_by_name(agent, arguments, member):
    assert ask(agent, b'{"execute":"negotiator-execute","arguments":' +
               arguments + b',"id":2}\n') == error(
        "Parameter '{0}' holds a NUL character, which a command line cannot "
        "carry".format(member), id=2)


def test_names_in_error_replies_are_cut_short(agent):
    """A reply never outgrows its request (qemu-ga repeats a name whole,
    which a name of non-BMP characters makes three times as long)."""
    name = u'\U0001f600' * 100000
    line = json.dumps({'execute': name, 'id': 1}).encode('ascii') + b'\n'
    assert ask(agent, line) == error(
        u'The command {0}... has not been found'.format(name[:100]),
        'CommandNotFound', id=1)


@pytest.mark.parametrize('locale', ['C', 'C.UTF-8'])
def test_command_names_are_bytes_whatever_the_locale(workdir, locale):
    """A UTF-8 name and a name that is not UTF-8 are listed and run, by the
    agent in the C locale too (Python 3.6 decodes file names as ASCII
    there)."""
    for name in (b'caf\xc3\xa9', b'caf\xe9'):
        make_command(workdir.commands, getattr(os, 'fsdecode', str)(name),
                     '#!/bin/sh\necho "$NEGOTIATOR_COMMAND $1"\n')
    env = dict(os.environ, LC_ALL=locale, LANG=locale)
    env.pop('PYTHONIOENCODING', None)
    agent = Agent(workdir, verbose=False, env=env)
    try:
        status, out, err = agent.host(options=['-n', '--list'])
        assert (status, err) == (0, b'')
        assert out.split(b'\n')[:2] == [b'caf\xc3\xa9', b'caf\xe9']
        for name in (b'caf\xc3\xa9', b'caf\xe9'):
            client = agent.client()
            try:
                reply = client.call({'execute': 'negotiator-execute', 'id': 1,
                                     'arguments': {
                                         'command': negotiator.wire_text(name),
                                         'args': [u'\u00e9']}})
                assert reply['data']['out-data'] == negotiator.encode_bytes(
                    name + b' \xc3\xa9\n')
                assert client.read_message() == {'return': {'exitcode': 0},
                                                 'id': 1}
            finally:
                client.close()
    finally:
        agent.stop()


# ---------------------------------------------------------------------------
# Bounds: what one peer can make the agent hold
# ---------------------------------------------------------------------------

def test_a_client_that_never_reads_is_not_read_either(agent):
    """Half a megabyte of "x\\n" is a quarter of a million error replies:
    the agent stops reading a client that does not read them, so it holds
    a bounded amount, and answers every line once the client reads."""
    lines = 256 * 1024
    before = rss_kib(agent.process.pid)
    client = agent.client()
    sender = threading.Thread(target=client.send, args=(b'x\n' * lines,))
    sender.daemon = True
    sender.start()
    sender.join(5)  # long enough to read it all, had it kept reading
    grown = rss_kib(agent.process.pid) - before
    assert grown < 16 * 1024, 'the agent grew by {0} KiB'.format(grown)
    reply = json.dumps(error('Invalid JSON syntax: Expecting value: line 1 '
                             'column 1 (char 0)' if sys.version_info[0] >= 3
                             else 'Invalid JSON syntax: No JSON object could '
                             'be decoded'), separators=(',', ':'))
    for _ in range(lines):
        assert client.read_line() == reply.encode('ascii')
    sender.join(HANG)
    client.close()
    assert ask(agent, b'{"execute":"guest-ping","id":"after"}\n') == {
        'return': {}, 'id': 'after'}


def test_clients_beyond_the_open_file_limit_wait_and_are_served_later(
        workdir):
    agent = Agent(workdir, verbose=False, preexec_fn=lambda: (
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))))
    idle = []
    starved = ('cannot accept clients (Too many open files); trying again '
               'every 1 s, serving the ')
    deadline = time.time() + HANG
    try:
        while starved not in agent.log():  # until the agent runs out
            assert time.time() < deadline, agent.log()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(agent.socket)
                idle.append(sock)
            except socket.error:  # the queue is full for now
                sock.close()
                time.sleep(0.02)
        assert agent.process.poll() is None
        assert len(idle) > 30
        for sock in idle[:30]:
            sock.close()
        while True:  # until there is room in the queue
            try:
                client = agent.client()
                break
            except socket.error:
                assert time.time() < deadline
                time.sleep(0.05)
        try:
            assert client.call({'execute': 'guest-ping', 'id': 'late'}) == {
                'return': {}, 'id': 'late'}
        finally:
            client.close()
    finally:
        for sock in idle:
            sock.close()
        log = agent.stop()
    assert log.count('cannot accept clients') == 1, log


# ---------------------------------------------------------------------------
# Commands: default signals; --listen over a file that is not a socket
# ---------------------------------------------------------------------------

def test_commands_start_with_sigpipe_and_sigxfsz_not_ignored(agent):
    """Python ignores both, and exec keeps what is ignored; Python 3's
    Popen puts them back, Python 2's does not."""
    status, out, err = agent.host('sigign')
    assert (status, err) == (0, b'')
    assert out.startswith(b'SigIgn:\t')
    ignored = int(out.split()[1], 16)
    assert [signum for signum in (signal.SIGPIPE, signal.SIGXFSZ)
            if ignored & 1 << (signum - 1)] == []
    # A pipeline's writer dies of SIGPIPE quietly, as from a shell.
    assert agent.host('yes-head') == (0, b'y\n', b'')


@pytest.mark.parametrize('kind', ['file', 'directory'])
def test_listen_refuses_to_replace_what_is_not_a_socket(workdir, kind):
    path = workdir.join('not-a-socket')
    if kind == 'file':
        with open(path, 'w') as handle:
            handle.write('precious\n')
    else:
        os.mkdir(path)
    status, out, err = run_cli(['guest', '--listen', path, '--commands-dir',
                                workdir.commands])
    assert (status, out, err) == (2, b'', (
        'negotiator: {0} exists and is not a socket; not replacing it '
        '(listen on another path)\n'.format(path)).encode('utf-8'))
    if kind == 'file':
        with open(path) as handle:
            assert handle.read() == 'precious\n'
    else:
        assert os.path.isdir(path)


# ---------------------------------------------------------------------------
# The host client: malformed replies
# ---------------------------------------------------------------------------

def test_json_holds_a_bounded_output_and_says_so(agent):
    """--json keeps the output to print it at the end: an endless one
    ends the call at the bound (and the agent kills the command)."""
    status, out, err = agent.host('yes', options=['-n', '-t', '0', '--json'])
    desc = ('the output is larger than {0} bytes, which --json holds in '
            'memory: run the command without --json'.format(
                negotiator.MAX_STDIN))
    assert (status, err) == (253, ('negotiator: ' + desc + '\n').encode(
        'ascii'))
    assert json.loads(out.decode('ascii')) == {
        'error': {'class': 'OutputError', 'desc': desc}, 'status': 253}
    agent.wait_log('killing command pid')


def stand_in_agent(workdir, script):
    """A socket where scripted_agent() plays the agent, one client."""
    path = workdir.join('stand-in.sock')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        server.close()
        scripted_agent(conn, script)
    thread = threading.Thread(target=serve)
    thread.daemon = True
    thread.start()
    return path


@pytest.mark.parametrize('reply', [
    b'{"error":{"class":[1],"desc":"x"},"id":%d}\n',
    b'{"error":{"class":"GenericError","desc":{}},"id":%d}\n',
    b'{"error":"x","id":%d}\n',
    b'{"return":5,"id":%d}\n',
    b'{"return":{"exitcode":"0"},"id":%d}\n',
    b'{"return":{"exitcode":256},"id":%d}\n',
    b'{"return":{"signal":[9]},"id":%d}\n',
    b'{"return":{},"id":%d}\n',
], ids=['class', 'desc', 'error', 'return', 'string', 'big', 'signal',
        'empty'])
def test_malformed_replies_exit_254_in_one_line(workdir, reply):
    def script(request):
        if request['execute'] == 'guest-sync-delimited':
            return b'\xff' + negotiator.encode_message(
                {'return': request['arguments']['id']})
        return reply % request['id']
    path = stand_in_agent(workdir, script)
    status, out, err = run_cli(['host', '-n', path, 'anything'])
    assert (status, out) == (254, b'')
    assert err.startswith(b'negotiator: the other side sent a malformed ')
    assert err.count(b'\n') == 1, err


@pytest.mark.parametrize('options, reply', [
    (['--ping'], b'{"return":[],"id":%d}\n'),
    (['--list'], b'{"return":[{"name":1}],"id":%d}\n'),
    (['--list'], b'{"return":{},"id":%d}\n'),
], ids=['info', 'list-entry', 'list'])
def test_malformed_listings_exit_254_in_one_line(workdir, options, reply):
    def script(request):
        if request['execute'] == 'guest-sync-delimited':
            return b'\xff' + negotiator.encode_message(
                {'return': request['arguments']['id']})
        if request['execute'] == 'guest-ping':
            return negotiator.encode_message({'return': {},
                                              'id': request['id']})
        return reply % request['id']
    path = stand_in_agent(workdir, script)
    status, out, err = run_cli(['host', '-n'] + options + [path])
    assert (status, out) == (254, b'')
    assert err.startswith(b'negotiator: the other side sent a malformed ')
    assert err.count(b'\n') == 1, err


# ---------------------------------------------------------------------------
# Containment: a fault in any callback ends only its conversation
# ---------------------------------------------------------------------------

FAULTY = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'faulty_negotiator.py')


def execute(client, command, request_id=1, **arguments):
    arguments['command'] = command
    client.request({'execute': 'negotiator-execute', 'id': request_id,
                    'arguments': arguments})


def assert_served(client, request_id):
    """A call on ``client`` gets its exact output and reply."""
    execute(client, 'echo-args', request_id, args=['still', 'served'])
    message = client.read_message()
    assert message['data'] == {'id': request_id, 'out-data':
                               negotiator.encode_bytes(b'still\nserved\n')}
    assert client.read_message() == {'return': {'exitcode': 0},
                                     'id': request_id}


def lines_to_eof(client):
    """The lines that arrive before the end of file (which must come)."""
    lines = []
    while True:
        line = client.read_line()
        if not line:
            return lines
        lines.append(json.loads(line.decode('ascii')))


#: The error reply to a request whose answering failed.
FAILED = 'negotiator failed while answering this request and ended the ' \
         'conversation (its log says why)'


def provoke(fault, victim, workdir):
    """Make ``fault`` hit the victim's conversation (request id 'boom');
    returns what the victim received before its conversation ended."""
    if fault == 'request':
        victim.request({'execute': 'guest-ping', 'id': 'boom'})
    elif fault == 'output':
        execute(victim, 'boom-out', 'boom')
    elif fault == 'stdin':
        execute(victim, 'cat', 'boom', **{
            'input-data': negotiator.encode_bytes(b'boom' * 100000)})
    elif fault == 'timeout':
        execute(victim, 'sleeper', 'boom', timeout=0.5)
    elif fault == 'exit':
        execute(victim, 'echo-args', 'boom', args=['exits'])
    elif fault == 'drained':
        # The victim reads once its output waits in the agent: head blocks
        # writing only when the agent stopped reading its pipe, which it
        # does only with over HIGH_WATER bytes waiting for the victim.
        pid_file = workdir.join('big.pid')
        execute(victim, 'big', 'boom', args=[pid_file])
        wait_for(lambda: os.path.exists(pid_file) and read_file(
            '/proc/{0}/cmdline'.format(read_file(pid_file).strip().decode(
                'ascii'))).startswith(b'head\0'))
        pid = int(read_file(pid_file))
        wait_for(lambda: process_state(pid) == 'S')
    return lines_to_eof(victim)


def read_file(path):
    with open(path, 'rb') as handle:
        return handle.read()


@pytest.mark.parametrize('fault', ['request', 'output', 'stdin', 'timeout',
                                   'exit', 'drained'])
def test_a_fault_in_a_callback_ends_only_its_conversation(workdir, fault):
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    make_command(workdir.commands, 'boom-out', '#!/bin/sh\necho boom\n')
    agent = Agent(workdir, verbose=False, program=(FAULTY, fault))
    bystander = agent.client()
    victim = agent.client()
    try:
        assert_served(bystander, 1)
        received = provoke(fault, victim, workdir)
        assert [message for message in received if 'event' not in message
                ] == [error(FAILED, id='boom')], received
        assert_served(bystander, 2)
        assert_served(agent.client(), 3)
    finally:
        bystander.close()
        victim.close()
        log = agent.stop()  # exits 0; no traceback
    faults = [line for line in log.splitlines() if 'internal error' in line]
    assert len(faults) == 1, log
    assert faults[0].endswith(': internal error, ending the conversation: '
                              'ZeroDivisionError: injected'), faults
    if fault in ('output', 'stdin', 'timeout', 'drained'):
        assert 'killing command pid' in log, log


def test_a_fault_in_accepting_a_client_is_logged_and_serving_goes_on(
        workdir):
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    agent = Agent(workdir, verbose=False, program=(FAULTY, 'accept'))
    client = agent.client()
    try:
        assert_served(client, 1)
    finally:
        client.close()
        log = agent.stop()
    assert [line for line in log.splitlines() if 'internal error' in line
            ] == ['negotiator: loop: internal error, carrying on: '
                  'ZeroDivisionError: injected'], log


class Daemon(object):
    """``host --daemon`` (or FAULTY's) serving stand-in guests whose sockets
    this test listens on: ``guests[name]`` is the connection the daemon
    made, driven as the guest."""

    def __init__(self, workdir, names, program=(NEGOTIATOR,)):
        self.log_path = workdir.join('daemon.log')
        argv = [sys.executable] + list(program) + [
            'host', '--daemon', '--commands-dir', workdir.commands]
        servers = {}
        for name in names:
            servers[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            servers[name].bind(workdir.join(name))
            servers[name].listen(1)
            servers[name].settimeout(HANG)
            argv += ['--guest', name + '=' + workdir.join(name)]
        with open(self.log_path, 'wb') as log_file:
            self.process = subprocess.Popen(argv, stdout=log_file,
                                            stderr=subprocess.STDOUT)
        self.guests = {}
        for name in names:
            self.guests[name] = RawClient(sock=servers[name].accept()[0])
            servers[name].close()

    def stop(self):
        """SIGTERM: it must exit 0, and have logged no traceback."""
        self.process.terminate()
        assert self.process.wait() == 0
        for end in self.guests.values():
            end.close()
        with open(self.log_path) as handle:
            log = handle.read()
        assert_no_traceback(log)
        return log


def test_a_fault_while_serving_a_guest_cuts_only_that_guest_off(workdir):
    make_command(workdir.commands, 'echo-args', COMMANDS['echo-args'])
    daemon = Daemon(workdir, ['vm1', 'vm2'], (FAULTY, 'request'))
    try:
        daemon.guests['vm1'].request({'execute': 'guest-ping', 'id': 'boom'})
        assert lines_to_eof(daemon.guests['vm1']) == [error(FAILED,
                                                            id='boom')]
        assert_served(daemon.guests['vm2'], 1)
    finally:
        log = daemon.stop()
    assert ('negotiator: guest vm1: cut off for 30 s: internal error: '
            'ZeroDivisionError: injected') in log.splitlines(), log


def test_a_fault_while_connecting_to_a_guest_is_tried_again(workdir):
    make_command(workdir.commands, 'echo-args', COMMANDS['echo-args'])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(workdir.join('vm1'))
    server.listen(2)
    server.settimeout(HANG)
    log_path = workdir.join('daemon.log')
    with open(log_path, 'wb') as log_file:
        process = subprocess.Popen(
            [sys.executable, FAULTY, 'connect', 'host', '--daemon',
             '--commands-dir', workdir.commands, '--guest',
             'vm1=' + workdir.join('vm1')],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        first = RawClient(sock=server.accept()[0])
        assert first.read_line() == b''  # let go of at once
        second = RawClient(sock=server.accept()[0])
        assert_served(second, 1)
    finally:
        process.terminate()
        assert process.wait() == 0
        server.close()
    with open(log_path) as handle:
        log = handle.read()
    assert ('negotiator: guest vm1: internal error, trying again later: '
            'ZeroDivisionError: injected') in log.splitlines(), log
    assert_no_traceback(log)


def test_the_daemon_answers_what_once_stopped_it(workdir):
    make_command(workdir.commands, 'echo-args', COMMANDS['echo-args'])
    daemon = Daemon(workdir, ['vm1', 'vm2'])
    guest = daemon.guests['vm1']
    try:
        guest.send(b'{"execute":"negotiator-execute","arguments":'
                   b'{"command":"\\udcff"},"id":1}\n')
        assert guest.read_message() == error(
            u"Command '\udcff' not found in the host's commands directory; "
            u"available: echo-args", 'NegotiatorCommandNotFound', id=1)
        guest.send(b'{"execute":"guest-ping","id":' + nested(980) + b'}\n')
        assert guest.read_message() == error(
            'A message may nest 64 levels deep at most')
        guest.send(b'{"execute":"guest-ping","id":' + b'9' * 1000000 + b'}\n')
        assert guest.read_message() == error(
            'Invalid JSON syntax: a number longer than 100 characters')
        assert_served(guest, 2)
        assert_served(daemon.guests['vm2'], 3)
    finally:
        daemon.stop()


def test_a_builtin_is_killed_at_its_timeout_however_soon(workdir):
    """A timeout that comes before the built-in's child has a process
    group of its own kills the child alone."""
    agent = Agent(workdir, verbose=False, program=(FAULTY, 'stuck-builtin'))
    client = agent.client()
    try:
        for request_id in range(5):
            execute(client, 'uptime', request_id, timeout=1e-9)
            assert client.read_message() == {
                'return': {'signal': 9, 'timed-out': True}, 'id': request_id}
    finally:
        client.close()
        agent.stop()


def test_a_builtin_that_blocks_holds_up_only_its_own_call(workdir):
    """Built-ins run in a child process: one stuck in a system call (a
    statvfs() on a dead network filesystem) is killed at its timeout, and
    meanwhile every other client is served."""
    agent = Agent(workdir, verbose=False, program=(FAULTY, 'stuck-builtin'))
    stuck, other = agent.client(), agent.client()
    try:
        execute(stuck, 'uptime', 'stuck', timeout=2)
        other.request({'execute': 'guest-ping', 'id': 'other'})
        assert other.read_message() == {'return': {}, 'id': 'other'}
        assert stuck.read_message() == {
            'return': {'signal': 9, 'timed-out': True}, 'id': 'stuck'}
    finally:
        stuck.close()
        other.close()
        agent.stop()


def test_paths_and_names_of_this_machine_are_shown_whatever_they_hold(
        workdir):
    """A socket path that is not ASCII, in --ping's line and in the agent's
    log (Python 2 mixes its bytes with the peer's text there)."""
    name = u'caf\u00e9'
    directory = os.path.join(workdir.path, name if bytes is not str else
                             name.encode('utf-8'))
    os.mkdir(directory)
    make_command(workdir.commands, 'echo-args', COMMANDS['echo-args'])
    agent = Agent(workdir, socket=os.path.join(directory, 'agent.sock'))
    try:
        status, out, err = agent.host(options=['-n', '--ping'])
        assert (status, err) == (0, b'')
        path = agent.socket
        assert out.startswith((path if isinstance(path, bytes) else
                               path.encode('utf-8')) + b': agent ')
        assert agent.host('echo-args', 'x') == (0, b'x\n', b'')
    finally:
        log = agent.stop()
    assert 'echo-args with 1 argument(s), pid ' in log, log
