"""guest-exec's and guest-file-open's bounds, which qemu-ga has not:
programs kept, output kept, files open.

(What qemu-ga answers to the same requests, tests/test_qemu_ga.py
compares.)  Must stay valid on Python 2.7 and 3.6+.
"""

import base64
import os
import signal

import pytest

import negotiator
from helpers import agent_running, process_state, serving_here, wait_for


@pytest.fixture(scope='module')
def agent():
    with agent_running(['--block-rpcs', '']) as running:  # else refused
        yield running


def call(agent, name, **arguments):
    client = agent.client()
    try:
        return client.call({'execute': name, 'arguments': arguments})
    finally:
        client.close()


def start(agent, path, *args):
    reply = call(agent, 'guest-exec', path=path, arg=list(args),
                 **{'capture-output': True})
    return reply['return']['pid']


def ended(agent, pid):
    replies = []

    def fetch():
        replies.append(call(agent, 'guest-exec-status', pid=pid))
        return replies[-1] != {'return': {'exited': False}}
    wait_for(fetch)
    return replies[-1]['return']


def test_programs_kept_up_to_the_bound(agent):
    """MAX_EXECS programs kept: the next forgets the oldest that ended
    without its end fetched, or is refused while all run."""
    pids = [start(agent, '/bin/sleep', '60')
            for _ in range(negotiator.MAX_EXECS - 1)]
    done = start(agent, '/bin/true')
    try:
        wait_for(lambda: process_state(done) is None)  # ended, reaped
        pids.append(start(agent, '/bin/sleep', '60'))
        assert call(agent, 'guest-exec-status', pid=done) == {'error': {
            'class': 'GenericError', 'desc': "Invalid parameter 'pid'"}}
        assert call(agent, 'guest-exec', path='/bin/true') == {'error': {
            'class': 'GenericError',
            'desc': 'guest-exec runs {0} programs already: wait for one to '
                    'end'.format(negotiator.MAX_EXECS)}}
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        assert ended(agent, pid) == {'exited': True, 'signal': 9}


def test_output_kept_up_to_the_cap(agent):
    """qemu-ga's cap: MAX_CAPTURE bytes of a stream, then out-truncated."""
    pid = start(agent, 'head', '-c', str(negotiator.MAX_CAPTURE + 1),
                '/dev/zero')
    result = ended(agent, pid)
    assert base64.b64decode(result.pop('out-data')) == (
        b'\0' * negotiator.MAX_CAPTURE)
    assert result == {'exited': True, 'exitcode': 0, 'out-truncated': True}


def test_capture_at_its_limit():
    capture = negotiator.Capture(limit=4)
    capture.add('out-data', b'ab')
    capture.add('out-data', b'cd')
    capture.add('err-data', b'12345')
    capture.add('err-data', b'6')
    assert capture.add_to({}) == {
        'out-data': 'YWJjZA==', 'out-truncated': False,
        'err-data': 'MTIzNA==', 'err-truncated': True}
    assert negotiator.Capture().add_to({'exitcode': 0}) == {'exitcode': 0}


def test_files_open_up_to_the_bound(agent):
    """MAX_FILES handles, numbered from 1000 as qemu-ga numbers them, and
    the next open is refused; closing one makes room."""
    handles = [call(agent, 'guest-file-open', path='/dev/null')['return']
               for _ in range(negotiator.MAX_FILES)]
    try:
        assert handles == list(range(1000, 1000 + negotiator.MAX_FILES))
        assert call(agent, 'guest-file-open', path='/dev/null') == {
            'error': {'class': 'GenericError',
                      'desc': 'guest-file-open keeps {0} files open already; '
                              'close one with guest-file-close first'.format(
                                  negotiator.MAX_FILES)}}
        assert call(agent, 'guest-file-close', handle=handles.pop()) == {
            'return': {}}
        handles.append(call(agent, 'guest-file-open', path='/dev/null',
                            mode='w')['return'])
        assert handles[-1] == 1000 + negotiator.MAX_FILES
        assert call(agent, 'guest-file-write', handle=handles[-1],
                    **{'buf-b64': 'aGk='}) == {
                        'return': {'count': 2, 'eof': False}}
    finally:
        for handle in handles:
            call(agent, 'guest-file-close', handle=handle)


def test_host_daemon_does_not_serve_guest_exec_nor_files():
    names = [request[0] for request in negotiator.DaemonServer.REQUESTS]
    for name in names:
        assert not name.startswith(('guest-exec', 'guest-file')), name


def test_a_file_replaced_while_it_is_opened_is_refused(monkeypatch):
    """guest-file-open's child opens the file, then the agent again: a file
    that is not the one the child opened (a symbolic link swapped in) is
    refused, not handed out."""
    monkeypatch.setattr(negotiator, 'open_file', lambda path, flags: b'0 0')
    with serving_here() as ask:
        assert ask({'execute': 'guest-file-open', 'arguments': {
            'path': '/dev/null'}}) == {'error': {
                'class': 'GenericError', 'desc': "failed to open file "
                "'/dev/null' (mode: 'r'): the file was replaced while it was "
                "opened"}}
        assert ask({'execute': 'guest-ping'}) == {'return': {}}


def test_reads_up_to_the_bound(agent):
    """guest-file-read takes MAX_READ_COUNT bytes at once, not one more
    (qemu-ga's QGA_READ_COUNT_MAX)."""
    handle = call(agent, 'guest-file-open', path='/dev/zero')['return']
    try:
        size = negotiator.MAX_READ_COUNT
        assert call(agent, 'guest-file-read', handle=handle,
                    count=size + 1) == {'error': {
                        'class': 'GenericError', 'desc': "value '{0}' is "
                        "invalid for argument count".format(size + 1)}}
        result = call(agent, 'guest-file-read', handle=handle,
                      count=size)['return']
        assert base64.b64decode(result.pop('buf-b64')) == b'\0' * size
        assert result == {'count': size, 'eof': False}
    finally:
        call(agent, 'guest-file-close', handle=handle)
