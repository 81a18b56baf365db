# -*- coding: utf-8 -*-
"""``host --all``: one command on every running guest, from one loop.

Guests are agents serving sockets in a channel directory (``--channel-dir``,
libvirt's older flat layout NAME.PORT); each agent gets its guest's name in
its environment, so that a command can say where it ran.

Must stay valid on Python 2.7 and 3.6+.
"""

import errno
import json
import os
import socket

import pytest

import negotiator
from helpers import Agent, Workdir, b, cli, make_command

PORT = negotiator.HOST_TO_GUEST_PORT

#: Prints where it runs and its arguments, a line on stderr, a last line
#: without its newline, and exits with its guest's status: 3 for "b".
WHERE = (
    '#!/bin/sh\n'
    'echo "on $GUEST_NAME: $*"\n'
    'echo "err $GUEST_NAME" >&2\n'
    'printf "end $GUEST_NAME"\n'
    '[ "$GUEST_NAME" = b ] && exit 3\n'
    'exit 0\n')


class Fleet(object):
    """Agents for the guests ``names`` (and a dead socket for ``dead``)."""

    def __init__(self, names, dead=False):
        self.wd = Workdir()
        self.channels = self.wd.join('channels')
        os.mkdir(self.channels)
        make_command(self.wd.commands, 'where', WHERE)
        make_command(self.wd.commands, 'echo-input', '#!/bin/sh\ncat\n')
        self.agents = []
        try:
            for name in names:
                self.agents.append(Agent(
                    self.wd, socket=self.socket(name), log_name=name,
                    env=dict(os.environ, GUEST_NAME=name)))
            if dead:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(self.socket('dead'))
                sock.close()
        except Exception:
            self.stop()
            raise

    def socket(self, name):
        return os.path.join(self.channels, name + '.' + PORT)

    def host(self, *args, **kwargs):
        return cli(['host', '--all', '--channel-dir', self.channels, '-n'] +
                   list(args), **kwargs)

    def stop(self):
        try:
            for agent in self.agents:
                agent.stop()
        finally:
            self.wd.cleanup()


@pytest.fixture
def fleet():
    three = Fleet(['a', 'b', 'c'])
    yield three
    three.stop()


def sorted_lines(data):
    return sorted(data.splitlines(True))


def test_each_line_goes_out_after_its_guests_name(fleet):
    status, out, err = fleet.host('where', '-x', 'y z')
    assert sorted_lines(out) == [
        b'a: end a\n', b'a: on a: -x y z\n', b'b: end b\n',
        b'b: on b: -x y z\n', b'c: end c\n', b'c: on c: -x y z\n']
    assert sorted_lines(err) == [b'a: err a\n', b'b: err b\n', b'c: err c\n']
    assert status == 3


def test_one_at_a_time_the_guests_output_comes_whole(fleet):
    status, out, err = fleet.host('--parallel', '1', 'where')
    assert out == (b'a: on a: \na: end a\nb: on b: \nb: end b\n'
                   b'c: on c: \nc: end c\n')
    assert status == 3


def test_json_gives_one_object_per_guest(fleet):
    status, out, err = fleet.host('--json', 'where', 'q')
    assert status == 3
    results = sorted((json.loads(line.decode('ascii'))
                      for line in out.splitlines()),
                     key=lambda result: result['guest'])
    assert [(result['guest'], result['status'], result['exitcode'],
             result['stdout'], result['stderr'], result['command'])
            for result in results] == [
        (name, 3 if name == 'b' else 0, 3 if name == 'b' else 0,
         'on {0}: q\nend {0}'.format(name), 'err {0}\n'.format(name),
         ['where', 'q']) for name in ('a', 'b', 'c')]
    assert err == b''


def test_standard_input_goes_to_every_guest(fleet):
    status, out, err = cli(['host', '--all', '--channel-dir', fleet.channels,
                            'echo-input'], stdin=b'one\ntwo')
    assert (status, sorted_lines(out), err) == (0, [
        b'a: one\n', b'a: two\n', b'b: one\n', b'b: two\n', b'c: one\n',
        b'c: two\n'], b'')


def test_json_objects_of_several_megabytes_come_whole(fleet):
    """Each call's object waits in a temporary file until its call ends:
    it is written there in pieces and read back whole."""
    text = u''.join(u'{0} \u00e9\n'.format(i) for i in range(400000))
    status, out, err = cli(['host', '--all', '--channel-dir', fleet.channels,
                            '--json', 'echo-input'],
                           stdin=text.encode('utf-8'))
    results = [json.loads(line.decode('ascii')) for line in out.splitlines()]
    assert (status, err, sorted(result['guest'] for result in results)) == (
        0, b'', ['a', 'b', 'c'])
    assert [result['stdout'] for result in results] == [text] * 3


def test_a_guest_that_cannot_be_reached_says_so_and_sets_the_status():
    fleet = Fleet(['a'], dead=True)
    try:
        status, out, err = fleet.host('where')
        json_status, json_out, _ = fleet.host('--json', 'where')
    finally:
        fleet.stop()
    refused = ('negotiator: cannot connect to {0}: connection refused: '
               'nothing serves this socket (the guest is stopped?)'.format(
                   fleet.socket('dead')))
    assert (status, out, sorted_lines(err)) == (
        255, b'a: on a: \na: end a\n', [b'a: err a\n', b(
            'dead: ' + refused + '\n')])
    results = dict((result['guest'], result) for result in (
        json.loads(line.decode('ascii')) for line in json_out.splitlines()))
    assert results['dead'] == {'guest': 'dead', 'status': 255, 'error': {
        'class': 'ConnectError', 'desc': refused[len('negotiator: '):]}}
    assert (sorted(results), results['a']['status'], json_status) == (
        ['a', 'dead'], 0, 255)


def test_no_guest_is_a_warning_and_success():
    wd = Workdir()
    try:
        status, out, err = cli(['host', '--all', '--channel-dir', wd.path,
                                'where'])
    finally:
        wd.cleanup()
    assert (status, out, err) == (0, b'', b(
        'negotiator: no running guest has a {0} channel\n'.format(PORT)))


@pytest.mark.parametrize('args, message', [
    (['--all'], '--all takes COMMAND [ARG...]'),
    (['--all', '--list'], '--all takes COMMAND [ARG...]'),
    (['--all', '--ping', 'x'], '--all takes COMMAND [ARG...]'),
    (['--all', '--parallel', '0', 'x'], '--parallel must be from 1 to 256'),
    (['--all', '--parallel', '257', 'x'], '--parallel must be from 1 to 256'),
])
def test_usage_errors(args, message):
    status, out, err = cli(['host'] + args)
    assert (status, out) == (2, b'')
    assert err.endswith(b('error: ' + message + '\n'))


def test_a_line_without_end_is_written_in_pieces():
    """write_lines() holds back at most READ_SIZE bytes of a line."""
    wd = Workdir()
    path = wd.join('out')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        size = negotiator.READ_SIZE
        rest = negotiator.write_lines(fd, b'g: ', b'x' * size)
        assert rest == b'x' * size
        rest = negotiator.write_lines(fd, b'g: ', rest + b'y')
        assert rest == b''
        rest = negotiator.write_lines(fd, b'g: ', b'1\n2\n3')
        assert rest == b'3'
        assert negotiator.write_lines(fd, b'g: ', rest, final=True) == b''
        os.close(fd)
        with open(path, 'rb') as handle:
            data = handle.read()
    finally:
        wd.cleanup()
    assert data == (b'g: ' + b'x' * size + b'y\n' + b'g: 1\ng: 2\ng: 3\n')


def run_all_here(fleet, args):
    """run_all() in this process: its exit status."""
    options, command = negotiator.host_parser().parse_args(
        ['--all', '--channel-dir', fleet.channels, '-n'] + args)
    return negotiator.run_all(options, command)


def test_out_of_descriptors_a_call_waits_for_another_to_end(
        fleet, monkeypatch, capfd):
    """Every other start fails (EMFILE): each is tried again once a call
    has ended, and every guest is served."""
    real_process = negotiator.Process
    starts = []

    def scarce(*args, **kwargs):
        starts.append(1)
        if len(starts) % 2 == 0:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_process(*args, **kwargs)
    monkeypatch.setattr(negotiator, 'Process', scarce)
    assert run_all_here(fleet, ['where']) == 3
    out, err = capfd.readouterr()
    assert out.count('\n') == 6 and 'c: end c\n' in out
    assert len(starts) == 5


def test_a_call_that_cannot_start_with_none_running_fails(fleet, monkeypatch,
                                                          capfd):
    def no_process(*args, **kwargs):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    monkeypatch.setattr(negotiator, 'Process', no_process)
    assert run_all_here(fleet, ['where']) == 255
    out, err = capfd.readouterr()
    assert (out, sorted(err.splitlines(True))) == ('', [
        '{0}: negotiator: cannot start the call: {1}\n'.format(
            name, os.strerror(errno.EAGAIN)) for name in 'abc'])
