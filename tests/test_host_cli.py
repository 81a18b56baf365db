# -*- coding: utf-8 -*-
"""The command-line interface: ``negotiator.py host`` end to end, and usage.

One agent (``guest --listen``) serves the whole module; its commands
directory holds small POSIX sh scripts.  Every call checks exact bytes,
exact exit statuses and exact one-line messages.

Must stay valid on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""

import base64
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

import negotiator
from helpers import (HANG, NEGOTIATOR, Agent, Workdir, b, cli, communicate,
                     fill_backlog, make_command, process_state, run_cli,
                     scripted_agent, wait_for)

BUILTINS = ('disk-usage', 'hostname', 'ip-addresses', 'os-info', 'uptime')

#: name -> script; {marks} is the directory scripts that must never run
#: leave a trace in.
SCRIPTS = {
    'exit-with': (
        "#!/bin/sh\n"
        "printf 'out %s' \"$1\"\n"
        "printf 'err %s' \"$1\" >&2\n"
        "exit \"$1\"\n"),
    'kill-self': (
        "#!/bin/sh\n"
        "printf before\n"
        "kill -9 $$\n"
        "printf after\n"),
    # Each argument followed by a NUL: the exact argv, recoverable.
    'args': (
        "#!/bin/sh\n"
        "for a in \"$@\"; do printf '%s\\000' \"$a\"; done\n"),
    'cat-files': (
        "#!/bin/sh\n"
        "cat \"$1\"\n"
        "cat \"$2\" >&2\n"),
    'cat-stdin': (
        "#!/bin/sh\n"
        "cat\n"
        "printf '<eof>'\n"),
    # Sleeps an hour (longer than any wait here) in the background.
    'sleeper': (
        "#!/bin/sh\n"
        "echo $$ > \"$1\"\n"
        "sleep 3600 &\n"
        "echo $! > \"$2\"\n"
        "wait\n"
        "echo survived\n"),
    'streamer': (
        "#!/bin/sh\n"
        "echo first\n"
        "i=0\n"
        "while [ ! -e \"$1\" ] && [ $i -lt 3000 ]; do\n"
        "    sleep 0.1; i=$((i + 1))\n"
        "done\n"
        "if [ -e \"$1\" ]; then echo second; else echo 'no marker'; fi\n"),
    'big-output': (
        "#!/bin/sh\n"
        "head -c 4000000 /dev/zero\n"),
    'endless': (
        "#!/bin/sh\n"
        "exec yes\n"),
    'silent': (
        "#!/bin/sh\n"
        "exit 0\n"),
    'bad-interpreter': (
        "#!/nonexistent/interpreter\n"),
    '.hidden': (
        "#!/bin/sh\n"
        "touch {marks}/hidden\n"),
}
USER_COMMANDS = sorted(n for n in SCRIPTS if not n.startswith('.'))
ALL_COMMANDS = sorted(USER_COMMANDS + list(BUILTINS))
TRAP = "#!/bin/sh\ntouch {marks}/{name}\n"


@pytest.fixture(scope='module')
def agent():
    wd = Workdir()
    marks = wd.join('marks')
    os.mkdir(marks)
    for name, script in SCRIPTS.items():
        make_command(wd.commands, name, script.format(marks=marks))
    # Things that exist but must never run.
    make_command(wd.commands, 'not-executable',
                 TRAP.format(marks=marks, name='not-executable'), mode=0o644)
    os.mkdir(os.path.join(wd.commands, 'a-directory'))
    os.mkdir(os.path.join(wd.commands, 'sub'))
    make_command(os.path.join(wd.commands, 'sub'), 'b',
                 TRAP.format(marks=marks, name='sub-b'))
    make_command(wd.path, 'escape', TRAP.format(marks=marks, name='escape'))
    the_agent = Agent(wd)
    the_agent.marks = marks
    yield the_agent
    try:
        text = the_agent.stop()
        assert 'internal error' not in text, text
    finally:
        wd.cleanup()


def host(agent, *args, **kwargs):
    """agent.host(), also checking that no traceback reached stderr."""
    status, out, err = agent.host(*args, **kwargs)
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    return status, out, err


def last_line(data):
    return data.rstrip(b'\n').split(b'\n')[-1]


def not_found_message(agent, name):
    return b("negotiator: Command '{0}' not found in {1}; available: {2}\n"
             .format(name, agent.workdir.commands, ', '.join(ALL_COMMANDS)))


def write_file(path, data):
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


def read_pid(path):
    with open(path) as handle:
        return int(handle.read().strip())


def shell_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------
# Usage: help, version, usage errors
# ---------------------------------------------------------------------------

def test_main_help():
    status, out, err = cli(['--help'])
    assert (status, err) == (0, b'')
    assert out.startswith(b'Usage: negotiator.py [--version] MODE [OPTIONS]')
    for word in (b'Modes:', b'guest ', b'host ', b'--version', b'--help'):
        assert word in out


def test_guest_help():
    status, out, err = cli(['guest', '--help'])
    assert (status, err) == (0, b'')
    assert out.startswith(b'Usage: negotiator.py guest [OPTIONS]')
    for word in (b'--listen=PATH', b'--commands-dir=DIR', b'--device=PATH',
                 b'--syslog', b'-v, --verbose', b'-q, --quiet',
                 b'/usr/lib/negotiator/commands'):
        assert word in out


def test_host_help():
    status, out, err = cli(['host', '--help'])
    assert (status, err) == (0, b'')
    assert out.startswith(
        b'Usage: negotiator.py host [OPTIONS] GUEST|SOCKET COMMAND [ARG...]')
    for word in (b'128+N when killed by signal N', b'124 timed out',
                 b'126 not executable', b'127 command not found',
                 b'141 the reader of the output went away',
                 b'253 the output cannot be written here',
                 b'254 protocol error',
                 b'255 cannot connect or no agent answering',
                 b'2 usage error', b'-t SECONDS, --timeout=SECONDS',
                 b'--stdin', b'-n, --no-stdin', b'--list', b'--ping',
                 b'--json', b'-v, --verbose', b'-q, --quiet'):
        assert word in out, word


def test_version():
    status, out, err = cli(['--version'])
    assert (status, err) == (0, b'')
    assert out == b('negotiator.py {0}\n'.format(negotiator.__version__))


@pytest.mark.parametrize('form, name', [
    (['-m', 'negotiator'], 'negotiator.py'),
    (['-c', 'import negotiator; negotiator.main_exit()'], 'negotiator')])
def test_the_module_forms_name_the_program(form, name):
    """README's forms for a start whose bytecode is cached (-m compiles
    the source every time on Python 2, the import form does not)."""
    process = subprocess.Popen(
        [sys.executable] + form + ['--version'], cwd=os.path.dirname(
            NEGOTIATOR), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = communicate(process, b'', time.time() + HANG)
    assert (process.returncode, out, err) == (
        0, b('{0} {1}\n'.format(name, negotiator.__version__)), b'')


def test_no_mode_is_usage_error():
    status, out, err = cli([])
    assert (status, out) == (2, b'')
    assert err.startswith(b'Usage: negotiator.py [--version] MODE')


def test_unknown_mode_is_usage_error():
    status, out, err = cli(['sideways'])
    assert (status, out) == (2, b'')
    assert last_line(err) == (b"negotiator.py: error: unknown mode "
                              b"'sideways': use guest or host")
    assert err.count(b'error:') == 1


@pytest.mark.parametrize('args, message', [
    ([], 'GUEST (or SOCKET) is missing'),
    (['/nonexistent/sock'], 'COMMAND is missing (or use --list or --ping)'),
    (['-t', '-1', '/nonexistent/sock', 'uptime'],
     '--timeout must be 0 (never) or a number of seconds'),
    (['-t', 'soon', '/nonexistent/sock', 'uptime'],
     "option -t: invalid floating-point value: 'soon'"),
], ids=['no-socket', 'no-command', 'negative-timeout', 'bad-timeout'])
def test_host_usage_errors(args, message):
    # Status 2, not 255: the socket (which does not exist) is never tried.
    status, out, err = cli(['host'] + args)
    assert (status, out) == (2, b'')
    assert err.startswith(b'Usage: negotiator.py host [OPTIONS] GUEST|SOCKET')
    assert last_line(err) == b('negotiator.py: error: ' + message)


# ---------------------------------------------------------------------------
# Parsing the command line without optparse, exactly as optparse does
# ---------------------------------------------------------------------------

PARSERS = {
    'main': lambda: negotiator.make_parser(negotiator.MAIN_USAGE,
                                           mode_options=False),
    'guest': negotiator.guest_parser,
    'host': negotiator.host_parser,
}

#: (mode, arguments, parsed without optparse)
COMMAND_LINES = [
    ('main', [], True),
    ('main', ['guest', '--call', 'x'], True),
    ('main', ['--', 'host'], True),
    ('main', ['-', 'guest'], True),
    ('main', ['--version'], False),
    ('main', ['--vers', 'guest'], False),
    ('main', ['--version=1'], False),
    ('main', ['-h'], False),
    ('main', ['--help', 'guest'], False),
    ('main', ['-x', 'guest'], False),
    ('guest', ['--call', '-t', '5', '-n', 'x', '-v'], True),
    ('guest', ['--call', '--timeout=0.5', '--no-stdin', 'x'], True),
    ('guest', ['-t5', '--stdin', '--call', 'x'], True),
    ('guest', ['-t', '-1', '--call', 'x'], True),
    ('guest', ['-t', '-inf', '--json', '--list'], True),
    ('guest', ['--timeout', '1e3', '--ping'], True),
    ('guest', ['-v'], True),
    ('guest', ['-q'], True),
    ('guest', ['-v', '-q', '--quiet', '--verbose'], True),
    ('guest', ['-a', 'x', '-a', 'y,z', '--allow-rpcs=w', '-bq'], True),
    ('guest', ['--block-rpcs', '', '--block-rpcs='], True),
    ('guest', ['--listen', '/s', '--commands-dir=/c', '--syslog'], True),
    ('guest', ['--device', '--listen'], True),
    ('guest', ['--device='], True),
    ('guest', ['--call', '--', '-t', '5'], True),
    ('guest', ['--', '--call'], True),
    ('guest', ['x', '--call'], True),
    ('guest', ['-', '--call'], True),
    ('guest', ['-nv', '--call', 'x'], False),
    ('guest', ['-vq'], False),
    ('guest', ['-n5'], False),
    ('guest', ['--cal', 'x'], False),
    ('guest', ['--c', 'x'], False),
    ('guest', ['--timeout'], False),
    ('guest', ['-t'], False),
    ('guest', ['-a'], False),
    ('guest', ['-t', 'soon'], False),
    ('guest', ['--timeout=', '--call'], False),
    ('guest', ['--timeout', '--call', 'x'], False),
    ('guest', ['-tq'], False),
    ('guest', ['--stdin=yes'], False),
    ('guest', ['--bogus'], False),
    ('guest', ['-z', 'x'], False),
    ('guest', ['--help'], False),
    ('guest', ['-h', '--call'], False),
    ('guest', ['--version'], False),
    ('host', ['g', 'uptime'], True),
    ('host', ['-t', '3', '-n', 'g', 'uptime', '-t', '4'], True),
    ('host', ['g', '-t', '3', 'uptime'], True),
    ('host', ['--all', '--parallel', '4', 'uptime'], True),
    ('host', ['--parallel=4', '--all', 'x'], True),
    ('host', ['--parallel', '-3'], True),
    ('host', ['--parallel', ' 7 '], True),
    ('host', ['--daemon', '--guest', 'a=/s', '--guest=b=/t', '--rescan',
              '2.5', '--syslog', '--commands-dir', '/c', '-v'], True),
    ('host', ['--connect', 'qemu:///system', '--channel-dir=/d',
              '--list-guests'], True),
    ('host', ['--list', '--ping', '--json', '--stdin', '--no-stdin', 'g'],
     True),
    ('host', ['--rescan=inf', '--daemon'], True),
    ('host', ['--parallel', '010'], False),
    ('host', ['--parallel', '0x1f'], False),
    ('host', ['--parallel', '0b11'], False),
    ('host', ['--parallel', '0'], False),
    ('host', ['--parallel', '1.5'], False),
    ('host', ['--parallel', 'x'], False),
    ('host', ['--parallel'], False),
    ('host', ['--list-g'], False),
    ('host', ['--li'], False),
    ('host', ['--all', '-nq', 'x'], False),
    ('host', ['--rescan'], False),
    ('host', ['--daemon=yes'], False),
    ('host', ['--guests', 'a=/s'], False),
    ('host', ['-h', 'g'], False),
    ('host', ['--version', 'g'], False),
]


def parse_or_exit(parser, args, values, capsys):
    """What ``parser`` makes of ``args``: ('parsed', its values' attributes,
    the rest), or ('exit', status, stdout, stderr)."""
    capsys.readouterr()
    try:
        values, rest = parser.parse_args(args, values)
    except SystemExit as e:
        out, err = capsys.readouterr()
        return ('exit', e.code, out, err)
    return ('parsed', dict(vars(values)), rest)


def refuse_optparse():
    raise AssertionError('optparse used')


@pytest.mark.parametrize('mode, args, quick', COMMAND_LINES, ids=[
    '{0} {1}'.format(mode, ' '.join(args)) for mode, args, _ in COMMAND_LINES])
def test_command_line_parses_as_optparse_parses_it(mode, args, quick, capsys):
    """The same values and arguments left, or the same help, version or
    usage error and exit status, as optparse's parser declared alike;
    optparse itself is used only where a command line needs it."""
    parser = PARSERS[mode]()
    if quick:
        parser.optparse_parser = refuse_optparse
    expected = parse_or_exit(PARSERS[mode]().optparse_parser(), args, None,
                             capsys)
    assert parse_or_exit(parser, args, None, capsys) == expected


def test_options_between_guest_and_command_parse_into_the_same_values(
        capsys):
    """As parse_host_mode parses them (appending to --guest's list), with
    the second part parsed here, then by optparse (abbreviated)."""
    first = ['--guest', 'a=/s', '-t', '2', 'g', '--guest', 'b=/t', '-q', 'c']
    for second_quick in (True, False):
        parser = negotiator.host_parser()
        real = negotiator.host_parser().optparse_parser()
        results = []
        for each in (parser, real):
            values, rest = each.parse_args(first)
            if not second_quick:
                rest = [arg.replace('--guest', '--gue') for arg in rest]
            results.append(parse_or_exit(each, rest[1:], values, capsys))
        assert results[0] == results[1]
        assert results[0][1]['guests'] == ['a=/s', 'b=/t']


def test_a_command_line_that_parses_imports_no_optparse():
    """optparse (with textwrap, gettext and locale) costs a guest call's
    start-up most on Python 2: only help and usage errors need it."""
    quick = [(mode, args) for mode, args, quick in COMMAND_LINES if quick]
    code = (
        'import sys\n'
        'sys.path.insert(0, {0!r})\n'
        'import negotiator\n'
        'parsers = {{"main": lambda: negotiator.make_parser(\n'
        '    negotiator.MAIN_USAGE, mode_options=False),\n'
        '    "guest": negotiator.guest_parser,\n'
        '    "host": negotiator.host_parser}}\n'
        'for mode, args in {1!r}:\n'
        '    parsers[mode]().parse_args(args)\n'
        'negotiator.parse_host_mode(["-n", "g", "-t", "3", "uptime"])\n'
        'print("optparse" in sys.modules)\n'
    ).format(os.path.dirname(NEGOTIATOR), quick)
    process = subprocess.Popen([sys.executable, '-c', code],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = communicate(process, b'', time.time() + HANG)
    assert (process.returncode, out, err) == (0, b'False\n', b'')


# ---------------------------------------------------------------------------
# Exit statuses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('code', [0, 3, 255])
def test_remote_exit_status_passes_through(agent, code):
    status, out, err = host(agent, 'exit-with', str(code))
    assert (status, out, err) == (code, b('out {0}'.format(code)),
                                  b('err {0}'.format(code)))


def test_killed_by_signal_is_128_plus_n(agent):
    assert host(agent, 'kill-self') == (137, b'before', b'')


def test_command_not_found(agent):
    status, out, err = host(agent, 'no-such-command')
    assert (status, out) == (127, b'')
    assert err == not_found_message(agent, 'no-such-command')


@pytest.mark.parametrize('name', ['not-executable', 'a-directory'])
def test_not_executable(agent, name):
    status, out, err = host(agent, name)
    assert (status, out) == (126, b'')
    assert err == b(
        "negotiator: Command '{0}' is not executable: {1} is not a regular "
        "file with execute permission (chmod +x it)\n".format(
            name, os.path.join(agent.workdir.commands, name)))
    assert os.listdir(agent.marks) == []


def test_unstartable_command_is_not_executable(agent):
    status, out, err = host(agent, 'bad-interpreter')
    assert (status, out) == (126, b'')
    # Python 3.6's subprocess puts the path into strerror; later ones not.
    path = os.path.join(agent.workdir.commands, 'bad-interpreter')
    assert err in (
        b"negotiator: Command 'bad-interpreter' could not start: "
        b"No such file or directory\n",
        b("negotiator: Command 'bad-interpreter' could not start: "
          "No such file or directory: '{0}'\n".format(path)))


@pytest.mark.parametrize('name', ['../escape', '.hidden', 'sub/b', '..', ''],
                         ids=['dotdot-path', 'hidden', 'slash', 'dotdot',
                              'empty'])
def test_command_name_tricks_are_refused(agent, name):
    # The agent refuses the name with a GenericError reply, which the host
    # maps to 254 (protocol error); nothing runs.
    status, out, err = host(agent, name)
    assert (status, out) == (254, b'')
    assert err == b(
        "negotiator: Invalid command name '{0}': a name is a file directly "
        "inside the commands directory\n".format(name))
    assert os.listdir(agent.marks) == []


@pytest.mark.parametrize('as_json', [False, True], ids=['plain', 'json'])
def test_timeout_kills_the_command(agent, workdir, as_json):
    pid_file, child_file = workdir.join('pid'), workdir.join('child')
    options = ['-n', '--json', '--timeout=1'] if as_json else ['-n', '-t', '1']
    # The command would sleep an hour: an end within HANG is the timeout's.
    status, out, err = host(agent, 'sleeper', pid_file, child_file,
                            options=options)
    assert status == 124
    if as_json:
        result = json.loads(out.decode('ascii'))
        assert sorted(result) == JSON_KEYS
        assert (result['exitcode'], result['signal'], result['timed-out'],
                result['status'], result['stdout'], result['out-data']) == (
                    None, 9, True, 124, '', '')
        assert err == b''
    else:
        assert out == b''
        assert err == (b"negotiator: 'sleeper' timed out after 1 s and was "
                       b"killed in the guest\n")
    pid, child = read_pid(pid_file), read_pid(child_file)
    # The script is reaped by the agent; its background child is killed
    # with the group (it may linger as a zombie of an init that does not
    # reap).
    wait_for(lambda: process_state(pid) is None)
    wait_for(lambda: process_state(child) in (None, 'Z'))


def test_stdin_never_closed_times_out(agent):
    # Standard input is a pipe nobody closes: the host gives up at its
    # deadline and says what to do.
    process = subprocess.Popen(
        [sys.executable, NEGOTIATOR, 'host', '-t', '1', agent.socket,
         'cat-stdin'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        process.stdin.write(b'partial')
        process.stdin.flush()
        wait_for(lambda: process.poll() is not None)
        out, err = process.stdout.read(), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
    assert (process.returncode, out) == (124, b'')
    assert err == (b'negotiator: timed out reading standard input (use -n or '
                   b'</dev/null when there is none)\n')


@pytest.fixture
def own_agent():
    """An agent of the test's own, for calls that might kill an agent."""
    wd = Workdir()
    # Runs long enough for the agent to wait on its timer meanwhile.
    make_command(wd.commands, 'pause', "#!/bin/sh\nsleep 0.3\nprintf done\n")
    the_agent = Agent(wd)
    yield the_agent
    try:
        if 'Traceback' in the_agent.log():
            # It crashed, which the test itself reports (its liveness check).
            wait_for(lambda: the_agent.process.poll() is not None)
            the_agent.log_file.close()
        else:
            the_agent.stop()   # asserts exit status 0 and no traceback
    finally:
        wd.cleanup()


@pytest.mark.parametrize('timeout', ['3e6', 'inf', 'nan'])
def test_huge_or_odd_timeout_is_handled(own_agent, timeout):
    # 3e6 s (35 days) is a plausible "no limit in practice"; inf and nan
    # are floats optparse accepts.  Either the call works or -t is refused
    # as a usage error, never a traceback, and the agent lives on.
    status, out, err = run_cli(['host', '-n', '-t', timeout, own_agent.socket,
                                'pause'])
    # Whatever the call sent has been served before the ping is.
    ping = own_agent.host(options=['--ping'])
    assert b'Traceback' not in err, err.decode('utf-8', 'replace')
    if status == 2:
        assert out == b''
        assert last_line(err).startswith(b'negotiator.py: error: ')
    else:
        assert (status, out, err) == (0, b'done', b'')
    assert ping[0] == 0, own_agent.log()


def test_agent_survives_a_huge_execute_timeout(own_agent):
    # What "host -t 3e6" sends when it gets that far: the agent must not
    # fall over on a timer beyond poll()'s range.
    client = own_agent.client()
    try:
        reply = client.call({'execute': 'negotiator-execute', 'id': 1,
                             'arguments': {'command': 'pause',
                                           'timeout': 3e6}})
        while 'event' in reply:
            reply = client.read_message()
    finally:
        client.close()
    assert reply == {'return': {'exitcode': 0}, 'id': 1}
    assert own_agent.process.poll() is None, own_agent.log()


# ---------------------------------------------------------------------------
# Output: stdout and stderr separate and byte-exact
# ---------------------------------------------------------------------------

ALL_BYTES = bytes(bytearray(range(256)))
PAYLOADS = {
    # Every byte value, NUL bytes, invalid UTF-8, no trailing newline.
    'binary': (ALL_BYTES + b'\x00\x00\xff\xfe\xc3(\xed\xa0\x80 no newline',
               ALL_BYTES[::-1] + b'\xc0\xaf\x00\n\x80'),
    'text-without-newline': (b'line 1\nline 2', b'warning'),
    'empty': (b'', b''),
    'random-1mb': (None, None),
}


@pytest.mark.parametrize('kind', sorted(PAYLOADS))
def test_output_is_byte_exact_and_separate(agent, workdir, kind):
    stdout, stderr = PAYLOADS[kind]
    if stdout is None:
        stdout, stderr = os.urandom(1 << 20), os.urandom(1 << 20)
    status, out, err = host(agent, 'cat-files',
                            write_file(workdir.join('out'), stdout),
                            write_file(workdir.join('err'), stderr))
    assert status == 0
    assert len(out) == len(stdout) and out == stdout
    assert len(err) == len(stderr) and err == stderr


# ---------------------------------------------------------------------------
# Standard input and arguments
# ---------------------------------------------------------------------------

def test_stdin_is_forwarded_byte_exact(agent):
    data = ALL_BYTES + os.urandom(1 << 20) + b'\x00'
    status, out, err = host(agent, 'cat-stdin', stdin=data, options=[])
    assert (status, err) == (0, b'')
    assert len(out) == len(data) + 5 and out == data + b'<eof>'


def test_no_stdin_sends_nothing(agent):
    # The command sees end of file at once (else it would time out).
    assert host(agent, 'cat-stdin', stdin=b'must not arrive',
                options=['--no-stdin']) == (0, b'<eof>', b'')


def test_empty_stdin(agent):
    assert host(agent, 'cat-stdin', stdin=b'', options=[]) == (
        0, b'<eof>', b'')


def test_stdin_option_forwards(agent):
    assert host(agent, 'cat-stdin', stdin=b'abc\n', options=['--stdin']) == (
        0, b'abc\n<eof>', b'')


ODD_ARGS = ['two words', '"double"', "'single'", '$HOME', '*', '', '-t',
            '--json', '-n', '--', '`id`', '$(id)', 'a;b|c&d', '\\n', ' ',
            'tab\there', 'new\nline', '~', '>x', '-']


def test_arguments_arrive_verbatim(agent):
    status, out, err = host(agent, 'args', *ODD_ARGS)
    assert (status, err) == (0, b'')
    assert out == b''.join(b(a) + b'\x00' for a in ODD_ARGS)


def test_options_after_command_belong_to_the_command(agent):
    # Options between SOCKET and COMMAND are the host's; after COMMAND,
    # everything is the command's.
    status, out, err = cli(['host', agent.socket, '-n', '--json', 'args',
                            '-t', '--json', '-v', '--list'])
    assert (status, err) == (0, b'')
    result = json.loads(out.decode('ascii'))
    assert result['command'] == ['args', '-t', '--json', '-v', '--list']
    assert base64.b64decode(result['out-data']) == (
        b'-t\x00--json\x00-v\x00--list\x00')


def test_non_utf8_argument_arrives_verbatim(agent):
    arg = b'\xff\xfe-\x80'
    if sys.version_info[0] < 3:
        args = ['host', '-n', agent.socket, 'args', arg]
    else:
        args = [b'host', b'-n', agent.socket.encode('ascii'), b'args', arg]
    assert cli(args) == (0, arg + b'\x00', b'')


def test_non_ascii_argument_in_c_locale(monkeypatch):
    # Guest agents usually run as services, without LANG.
    monkeypatch.delenv('LANG', raising=False)
    monkeypatch.setenv('LC_ALL', 'C')
    wd = Workdir()
    try:
        make_command(wd.commands, 'args', SCRIPTS['args'])
        c_agent = Agent(wd, verbose=False)
        try:
            word = u'caf\xe9'
            if sys.version_info[0] < 3:
                word = word.encode('utf-8')
            result = c_agent.host('args', word)
        finally:
            c_agent.stop()
    finally:
        wd.cleanup()
    assert result == (0, b'caf\xc3\xa9\x00', b'')


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------

def read_until(fd, done, timeout):
    """Read ``fd`` until ``done(data)`` or end of file, within ``timeout``."""
    data = b''
    deadline = time.time() + timeout
    while not done(data):
        remaining = deadline - time.time()
        if remaining <= 0:
            raise AssertionError('nothing more within {0} s; got {1!r}'.format(
                timeout, data))
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def test_output_streams_while_the_command_runs(agent, workdir):
    # The command prints a line, then waits for the marker file, which is
    # created only after that line has arrived here: no timing involved.
    marker = workdir.join('marker')
    process = subprocess.Popen(
        [sys.executable, NEGOTIATOR, 'host', '-n', '-t', '60', agent.socket,
         'streamer', marker], stdin=open(os.devnull, 'rb'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd = process.stdout.fileno()
        first = read_until(fd, lambda data: b'\n' in data, HANG)
        assert first == b'first\n'
        open(marker, 'w').close()
        rest = read_until(fd, lambda data: False, HANG)
        assert rest == b'second\n'
        err = read_until(process.stderr.fileno(), lambda data: False, HANG)
        assert err == b''
        wait_for(lambda: process.poll() is not None)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_stdout_closed_early_ends_the_call_and_its_command(agent):
    # `host ... | head -c 10`: the reader has gone, so the call ends
    # quietly, with 141 as if SIGPIPE had ended it, and the agent kills
    # the command, which would write for ever.
    script = ('{0} {1} host -n -t 0 {2} endless | head -c 10 | od -An -tx1; '
              'echo "${{PIPESTATUS[0]}}"').format(
                  shell_quote(sys.executable), shell_quote(NEGOTIATOR),
                  shell_quote(agent.socket))
    process = subprocess.Popen(['bash', '-c', script], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = communicate(process, b'', time.time() + HANG)
    assert process.returncode == 0
    assert err == b''
    assert out.split() == [b'79', b'0a'] * 5 + [b'141']
    agent.wait_log('killing command pid')


@pytest.mark.parametrize('command, status, message', [
    ('big-output', 253, b'negotiator: cannot write to standard output: No '
                        b'space left on device\n'),
    ('silent', 0, b''),
], ids=['output', 'no-output'])
def test_stdout_that_takes_nothing_is_an_error(agent, command, status,
                                               message):
    if not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full')
    with open('/dev/full', 'wb') as full:
        process = subprocess.Popen(
            [sys.executable, NEGOTIATOR, 'host', '-n', agent.socket,
             command], stdout=full, stderr=subprocess.PIPE)
        err = communicate(process, None, time.time() + HANG)[1]
    assert (process.returncode, err) == (status, message)


def test_closed_stdout_is_an_error_and_gets_no_socket(agent):
    """Descriptor 1 closed: the socket must not take its number (the
    output would go to the agent); writing fails with EBADF."""
    process = subprocess.Popen(
        [sys.executable, NEGOTIATOR, 'host', '-n', agent.socket, 'hostname'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1))
    out, err = communicate(process, None, time.time() + HANG)
    assert (process.returncode, out, err) == (
        253, b'', b'negotiator: cannot write to standard output: Bad file '
                  b'descriptor\n')


# ---------------------------------------------------------------------------
# --list, --ping, --json
# ---------------------------------------------------------------------------

def test_list(agent):
    status, out, err = host(agent, options=['--list'])
    assert (status, err) == (0, b'')
    assert out == b''.join(
        b(name + ('  (built-in)' if name in BUILTINS else '') + '\n')
        for name in ALL_COMMANDS)


def test_list_json(agent):
    status, out, err = host(agent, options=['--list', '--json'])
    assert (status, err) == (0, b'')
    assert json.loads(out.decode('ascii')) == {'commands': [
        {'name': name, 'kind': 'builtin' if name in BUILTINS else 'user'}
        for name in ALL_COMMANDS]}


def test_ping(agent):
    status, out, err = host(agent, options=['--ping'])
    assert (status, err) == (0, b'')
    assert re.match(
        r'\A' + re.escape(agent.socket) + r': agent ' +
        re.escape(negotiator.__version__) + r', round trip \d+\.\d\d ms\n\Z',
        out.decode('ascii')), out


def test_ping_json(agent):
    status, out, err = host(agent, options=['--ping', '--json'])
    assert (status, err) == (0, b'')
    result = json.loads(out.decode('ascii'))
    assert sorted(result) == ['connect-ms', 'round-trip-ms', 'version']
    assert result['version'] == negotiator.__version__
    assert 0 <= result['round-trip-ms'] < HANG * 1000
    assert 0 <= result['connect-ms'] < HANG * 1000


JSON_KEYS = ['command', 'err-data', 'exitcode', 'out-data', 'signal',
             'status', 'stderr', 'stdout', 'timed-out']


def test_json_success(agent, workdir):
    stdout, stderr = b'hello \xff\n\x00', b'warn\n'
    status, out, err = host(
        agent, 'cat-files', write_file(workdir.join('out'), stdout),
        write_file(workdir.join('err'), stderr), options=['-n', '--json'])
    assert (status, err) == (0, b'')
    assert out.endswith(b'}\n') and out.count(b'\n') == 1
    result = json.loads(out.decode('ascii'))
    assert sorted(result) == JSON_KEYS
    assert result['command'] == ['cat-files', workdir.join('out'),
                                 workdir.join('err')]
    assert (result['exitcode'], result['signal'], result['timed-out'],
            result['status']) == (0, None, False, 0)
    assert result['stdout'] == u'hello \ufffd\n\x00'
    assert result['stderr'] == u'warn\n'
    assert base64.b64decode(result['out-data']) == stdout
    assert base64.b64decode(result['err-data']) == stderr


@pytest.mark.parametrize('command, expected', [
    (['exit-with', '3'], (3, None, 3, u'out 3', u'err 3')),
    (['kill-self'], (None, 9, 137, u'before', u'')),
])
def test_json_status(agent, command, expected):
    status, out, err = host(agent, *command, options=['-n', '--json'])
    assert (status, err) == (expected[2], b'')
    result = json.loads(out.decode('ascii'))
    assert sorted(result) == JSON_KEYS
    assert (result['exitcode'], result['signal'], result['status'],
            result['stdout'], result['stderr']) == expected
    assert result['timed-out'] is False


def test_json_not_found(agent):
    status, out, err = host(agent, 'nope', options=['-n', '--json'])
    assert status == 127
    assert err == not_found_message(agent, 'nope')
    assert json.loads(out.decode('ascii')) == {
        'error': {'class': 'NegotiatorCommandNotFound',
                  'desc': not_found_message(agent, 'nope').decode('ascii')[
                      len('negotiator: '):-1]},
        'status': 127}


def test_json_connect_error(workdir):
    path = workdir.join('missing.sock')
    status, out, err = cli(['host', '-n', '--json', path, 'uptime'])
    desc = ('cannot connect to {0}: no such socket: is the guest running, '
            'and does its definition have the negotiator-host-to-guest.0 '
            'channel?'.format(path))
    assert status == 255
    assert err == b('negotiator: ' + desc + '\n')
    assert json.loads(out.decode('ascii')) == {
        'error': {'class': 'ConnectError', 'desc': desc}, 'status': 255}


# ---------------------------------------------------------------------------
# Logging: -q keeps errors, -v adds details
# ---------------------------------------------------------------------------

def missing_socket_message(path):
    return b('negotiator: cannot connect to {0}: no such socket: is the guest '
             'running, and does its definition have the '
             'negotiator-host-to-guest.0 channel?\n'.format(path))


def test_quiet_still_reports_errors(workdir):
    path = workdir.join('missing.sock')
    assert cli(['host', '-q', '-n', path, 'uptime']) == (
        255, b'', missing_socket_message(path))


def test_verbose_adds_details(workdir):
    path = workdir.join('missing.sock')
    status, out, err = run_cli(['host', '-v', '-n', path, 'uptime'])
    assert (status, out) == (255, b'')
    assert err.startswith(missing_socket_message(path))
    assert b'Traceback' in err   # -v: "log debugging details (and tracebacks)"


# ---------------------------------------------------------------------------
# Connection errors
# ---------------------------------------------------------------------------

def test_missing_socket(workdir):
    path = workdir.join('missing.sock')
    assert cli(['host', '-n', path, 'uptime']) == (
        255, b'', missing_socket_message(path))


@pytest.mark.parametrize('kind', ['file', 'directory'])
def test_not_a_socket(workdir, kind):
    path = workdir.join('not-a-socket')
    if kind == 'file':
        write_file(path, b'{"return": {}}\n')
    else:
        os.mkdir(path)
    status, out, err = cli(['host', '-n', path, 'uptime'])
    assert (status, out) == (255, b'')
    assert re.match(b'\\Anegotiator: cannot connect to ' +
                    re.escape(b(path)) + b': [^\n]+\n\\Z', err), err


def test_connection_refused(workdir):
    path = workdir.join('dead.sock')
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    status, out, err = cli(['host', '-n', path, 'uptime'])
    assert (status, out) == (255, b'')
    assert err == b(
        'negotiator: cannot connect to {0}: connection refused: nothing '
        'serves this socket (the guest is stopped?)\n'.format(path))


def test_permission_denied(workdir):
    if os.geteuid() == 0:
        pytest.skip('root bypasses the socket file permission check')
    path = workdir.join('locked.sock')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        os.chmod(path, 0)
        status, out, err = cli(['host', '-n', path, 'uptime'])
    finally:
        server.close()
    assert (status, out) == (255, b'')
    assert err == b(
        'negotiator: cannot connect to {0}: permission denied: run as root '
        '(or the socket\'s owner)\n'.format(path))


def test_nobody_answers(workdir):
    # A socket that accepts connections but never reads nor answers.
    path = workdir.join('silent.sock')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        status, out, err = cli(['host', '-n', '-t', '1', path, 'uptime'])
    finally:
        server.close()
    assert (status, out) == (255, b'')
    assert err == b(
        'negotiator: no agent answered on {0} within 1 s: is "negotiator.py '
        'guest" running in the guest? (another client may hold the port '
        'too)\n'.format(path))


# ---------------------------------------------------------------------------
# Connecting: a full client queue, a path too long for AF_UNIX
# ---------------------------------------------------------------------------

def test_full_client_queue_is_waited_for_until_the_timeout(workdir):
    path = workdir.join('busy.sock')
    held = fill_backlog(path)
    try:
        status, out, err = cli(['host', '-n', '-t', '1', path, 'true'])
    finally:
        for sock in held:
            sock.close()
    assert (status, out) == (255, b'')
    assert err == b('negotiator: cannot connect to {0}: busy: QEMU has other '
                    'clients of this socket queued\n'.format(path))


def test_socket_path_too_long_for_af_unix(workdir):
    path = workdir.join('x' * 120 + '.sock')
    assert len(path) > 108
    status, out, err = cli(['host', '-n', path, 'true'])
    assert (status, out) == (255, b'')
    assert err == b('negotiator: cannot connect to {0}: AF_UNIX path too '
                    'long\n'.format(path))


# ---------------------------------------------------------------------------
# Standard input closed (cmd <&-)
# ---------------------------------------------------------------------------

def test_closed_stdin_forwards_nothing(agent):
    process = subprocess.Popen(
        [sys.executable, NEGOTIATOR, 'host', agent.socket, 'cat-stdin'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        preexec_fn=lambda: os.close(0))
    out, err = communicate(process, None, time.time() + HANG)
    assert (process.returncode, out, err) == (0, b'<eof>', b'')
    process = subprocess.Popen(
        [sys.executable, NEGOTIATOR, 'host', agent.socket, 'exit-with', '3'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        preexec_fn=lambda: os.close(0))
    out, err = communicate(process, None, time.time() + HANG)
    assert (process.returncode, out, err) == (3, b'out 3', b'err 3')


# ---------------------------------------------------------------------------
# A peer's odd command names: escaped in the log, UTF-8 only
# ---------------------------------------------------------------------------

def test_control_characters_of_a_command_name_are_escaped_in_the_log(agent):
    name = 'a\nnegotiator: forged'
    client = agent.client()
    try:
        reply = client.call({'execute': 'negotiator-execute', 'id': 'forge',
                             'arguments': {'command': name}})
    finally:
        client.close()
    assert reply == {'id': 'forge', 'error': {
        'class': 'NegotiatorCommandNotFound',
        'desc': not_found_message(agent, name).decode('utf-8')[
            len('negotiator: '):-1]}}
    # The error reply is logged (-v) before the reply is sent.
    log = agent.log()
    assert "Command 'a\\nnegotiator: forged' not found" in log
    assert [line for line in log.splitlines()
            if line.startswith('negotiator: forged')] == []


@pytest.mark.parametrize('arguments, member', [
    (b'{"command": "\\ud800"}', 'command'),
    (b'{"command": "args", "args": ["ok", "\\udbff\\udfff\\udfff"]}', 'args'),
], ids=['command', 'args'])
def test_lone_surrogate_in_a_command_name_is_refused(agent, arguments, member):
    """Only U+DC80..U+DCFF stand for bytes; any other lone surrogate is
    refused on every Python (Python 2's codec would encode it)."""
    client = agent.client()
    try:
        client.send(b'{"execute": "negotiator-execute", "id": 5, '
                    b'"arguments": ' + arguments + b'}\n')
        reply = client.read_message()
    finally:
        client.close()
    assert reply == {'id': 5, 'error': {
        'class': 'GenericError',
        'desc': "Parameter '{0}' holds a lone surrogate that stands for no "
                "byte (only U+DC80..U+DCFF do)".format(member)}}
    assert 'internal error' not in agent.log()


# ---------------------------------------------------------------------------
# Last: the agent survived every error above
# ---------------------------------------------------------------------------

def test_zz_agent_still_serves(agent):
    status, out, err = host(agent, options=['--ping'])
    assert (status, err) == (0, b'')
    assert out.startswith(b(agent.socket + ': agent '))


def serve_like_negotiator_1_0(listener, requests):
    """One connection of an agent that predates raw output: it refuses the
    argument as qemu-ga's checks do, and sends output as base64 events."""
    def script(request):
        requests.append(request)
        arguments = request.get('arguments', {})
        if request['execute'] == 'guest-sync-delimited':
            reply = [b'\xff', {'return': arguments['id']}]
        elif 'raw-output' in arguments:
            reply = [{'error': {'class': 'GenericError', 'desc':
                                "Parameter 'raw-output' is unexpected"},
                      'id': request['id']}]
        else:
            reply = [{'event': 'negotiator-output', 'data': {
                'id': request['id'], 'out-data': 'b2xkCg=='}},
                {'return': {'exitcode': 3}, 'id': request['id']}]
        return b''.join(part if isinstance(part, bytes) else
                        json.dumps(part).encode('ascii') + b'\n'
                        for part in reply)
    scripted_agent(listener.accept()[0], script)


def test_an_agent_without_raw_output_gets_the_call_in_base64(workdir):
    path = workdir.join('old.sock')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    requests = []
    thread = threading.Thread(target=serve_like_negotiator_1_0,
                              args=(listener, requests))
    thread.daemon = True
    thread.start()
    try:
        assert cli(['host', '-n', path, 'x', 'a']) == (3, b'old\n', b'')
    finally:
        thread.join(HANG)
        listener.close()
    executes = [r['arguments'] for r in requests
                if r['execute'] == 'negotiator-execute']
    assert [sorted(a) for a in executes] == [
        ['args', 'command', 'raw-output', 'timeout'],
        ['args', 'command', 'timeout']]

