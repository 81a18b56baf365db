"""The wire protocol: framing, encoding, resync, and the agent's answers."""

import base64
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import threading

import pytest

import negotiator
from helpers import (HANG, Agent, Workdir, b, make_command, scripted_agent,
                     wait_for)


# ---------------------------------------------------------------------------
# Framing and encoding, in-process
# ---------------------------------------------------------------------------

def test_line_reader_keeps_partial_lines_between_reads():
    reader = negotiator.LineReader()
    assert reader.feed(b'{"a"') == []
    assert reader.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert reader.feed(b':3}\n') == [b'{"c":3}']


def test_line_reader_resync_byte_drops_the_partial_line():
    reader = negotiator.LineReader()
    items = reader.feed(b'{"execute":"guest-pi\xff{"x":1}\n')
    assert items == [negotiator.RESYNC, b'{"x":1}']
    assert reader.feed(b'half') == []
    assert reader.feed(b'\xff\xffwhole\n') == [
        negotiator.RESYNC, negotiator.RESYNC, b'whole']


def test_line_reader_drops_oversized_lines_and_recovers():
    reader = negotiator.LineReader(limit=10)
    assert reader.feed(b'0123456789\n') == [b'0123456789']
    assert reader.feed(b'0123456') == []
    assert reader.feed(b'7890') == [negotiator.OVERSIZED]
    assert reader.feed(b'more junk\nok\n') == [b'ok']
    # A 0xFF also ends the dropping.
    assert reader.feed(b'x' * 20 + b'\xffok\n') == [
        negotiator.OVERSIZED, negotiator.RESYNC, b'ok']


class RecordingHandler(object):
    """A Channel's handler that takes every line and notes what came."""

    def __init__(self):
        self.seen = []

    def ready(self):
        return True

    def on_line(self, line):
        self.seen.append(line)

    def on_drained(self):
        self.seen.append('drained')

    def on_disconnect(self):
        self.seen.append('disconnected')

    def on_failure(self, error):
        raise error


def turn(loop):
    """One turn of the loop, a short one when nothing happens."""
    loop.call_later(0.01, lambda: None)
    loop.run_once()


def test_channel_paused_by_its_backlog_reads_again_once_drained():
    """While a peer leaves more than HIGH_WATER bytes of replies unread,
    its lines are not read; being readable meanwhile (an event of the same
    turn) is no hang-up; once it reads them all, its lines are."""
    loop = negotiator.Loop()
    ours, theirs = socket.socketpair()
    try:
        negotiator.set_nonblocking(ours.fileno())
        handler = RecordingHandler()
        channel = negotiator.Channel(loop, ours.fileno(), handler, 'test')
        channel.send_raw(b'x' * (2 * negotiator.HIGH_WATER))
        channel.deliver()
        theirs.sendall(b'{"a":1}\n')
        channel._on_readable(False)
        assert channel.connected and handler.seen == []
        received = 0
        theirs.settimeout(HANG)
        while received < 2 * negotiator.HIGH_WATER:
            received += len(theirs.recv(1 << 20))
            turn(loop)
        wait_for(lambda: turn(loop) or handler.seen[1:] == [b'{"a":1}'])
        assert handler.seen == ['drained', b'{"a":1}']
        theirs.close()
        wait_for(lambda: turn(loop) or not channel.connected)
    finally:
        ours.close()
        loop.close()


def test_encode_message_is_one_ascii_line():
    line = negotiator.encode_message(
        {'return': u'caf\u00e9 \u2603 \n \x00', 'id': 1})
    assert line.endswith(b'\n') and line.count(b'\n') == 1
    line.decode('ascii')
    assert json.loads(line.decode('ascii')) == {
        'return': u'caf\u00e9 \u2603 \n \x00', 'id': 1}


@pytest.mark.parametrize('line, desc', [
    (b'{bad', 'Invalid JSON syntax'),
    (b'[1, 2]', 'QMP input must be a JSON object'),
    (b'"text"', 'QMP input must be a JSON object'),
    (b'{"a": "\xc3\x28"}', 'Invalid JSON syntax: the line is not valid UTF-8'),
])
def test_decode_message_refuses_what_is_not_a_json_object(line, desc):
    with pytest.raises(negotiator.RequestError) as caught:
        negotiator.decode_message(line)
    assert caught.value.desc.startswith(desc)
    assert caught.value.error_class == 'GenericError'


def test_bytes_travel_as_base64_exactly():
    every_byte = bytes(bytearray(range(256))) * 3
    text = negotiator.encode_bytes(every_byte)
    assert text == base64.b64encode(every_byte).decode('ascii')
    assert negotiator.decode_bytes(text, 'x') == every_byte
    with pytest.raises(negotiator.RequestError) as caught:
        negotiator.decode_bytes('not base64!', 'input-data')
    assert caught.value.desc == "Parameter 'input-data' is not valid base64"
    with pytest.raises(negotiator.RequestError):
        negotiator.decode_bytes(5, 'input-data')


@pytest.mark.parametrize('name', [
    '', '/bin/sh', 'a/b', '..', '../x', '.hidden', 'a\0b', 5, None])
def test_command_names_that_could_escape_are_refused(name):
    with pytest.raises(negotiator.RequestError):
        negotiator.check_command_name(name)


@pytest.mark.parametrize('result, status', [
    ({'exitcode': 0}, 0), ({'exitcode': 3}, 3), ({'signal': 9}, 137),
    ({'signal': 9, 'timed-out': True}, 124)])
def test_exit_status_of_a_result(result, status):
    assert negotiator.status_of(result) == status


# ---------------------------------------------------------------------------
# The host client's resynchronisation against a scripted agent
# ---------------------------------------------------------------------------

def synced_client(play):
    """A Client on one end of a socketpair, synchronised with ``play(the
    other end)`` answering in a thread; ``(client, our socket, thread)``."""
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=play, args=(theirs,))
    thread.daemon = True
    thread.start()
    negotiator.set_nonblocking(ours.fileno())
    client = negotiator.Client(ours.fileno(), negotiator.monotonic() + 30,
                               'test')
    client.sync()
    return client, ours, thread


def test_client_never_takes_a_stale_reply_for_its_own():
    """Replies left by an earlier client, before and after 0xFF, are skipped."""
    def script(request):
        if request['execute'] == 'guest-sync-delimited':
            sync_id = request['arguments']['id']
            return (b'{"return":{"exitcode":0},"id":1}\n'
                    b'{"event":"negotiator-output","data":{"out-data":"c3RhbGU="}}\n'
                    b'\xff{"return":12345}\n'
                    b'{"error":{"class":"GenericError","desc":"stale"}}\n' +
                    b'\xff' + json.dumps({'return': sync_id}).encode('ascii') +
                    b'\n')
        request_id = request['id']
        stale = {'return': {'exitcode': 99}, 'id': request_id - 1}
        stale_event = {'event': 'negotiator-output',
                       'data': {'out-data': 'c3RhbGU=', 'id': request_id + 1}}
        event = {'event': 'negotiator-output',
                 'data': {'out-data': 'b3Vycw==', 'id': request_id}}
        reply = {'return': {'exitcode': 7}, 'id': request_id}
        lines = [json.dumps(m).encode('ascii') + b'\n'
                 for m in (stale, stale_event, event, reply)]
        # Raw output is not lines, whoever it is for: a forged reply in a
        # stale request's raw bytes, then raw bytes of ours.
        forged = b'\xff\n' + json.dumps(reply).encode('ascii') + b'\n'
        raw = [json.dumps({'event': 'negotiator-output', 'data': {
            'out-bytes': len(forged), 'id': request_id + 1}}).encode('ascii'),
            b'\n', forged,
            json.dumps({'event': 'negotiator-output', 'data': {
                'err-bytes': 3, 'id': request_id}}).encode('ascii'),
            b'\n', b'\x00\n\xff']
        return b''.join(lines[:3] + raw + lines[3:])

    client, ours, thread = synced_client(
        lambda theirs: scripted_agent(theirs, script))
    events = []
    result = client.call('negotiator-execute', {'command': 'x'},
                         lambda stream, data: events.append((stream, data)))
    assert result == {'exitcode': 7}
    assert events == [('out-data', b'ours'), ('err-data', b'\x00\n\xff')]
    ours.close()
    thread.join(10)


def test_client_times_out_when_nothing_answers():
    ours, theirs = socket.socketpair()
    negotiator.set_nonblocking(ours.fileno())
    client = negotiator.Client(ours.fileno(), negotiator.monotonic() + 0.3,
                               'test')
    with pytest.raises(negotiator.CallTimeout):
        client.sync()
    ours.close()
    theirs.close()


@pytest.mark.parametrize('announced', [1000, -1, 2 ** 40, '10', None])
def test_client_refuses_raw_output_cut_short_or_announced_wrongly(
        announced):
    """Raw bytes that never all arrive, or a size that is no size, end
    the call with a one-line error instead of a hang or garbage."""
    def agent_that_goes_away(theirs):
        stream = theirs.makefile('rb')
        sync = json.loads(stream.readline()[1:].decode('ascii'))
        theirs.sendall(b'\xff' + json.dumps(
            {'return': sync['arguments']['id']}).encode('ascii') + b'\n')
        request = json.loads(stream.readline().decode('ascii'))
        theirs.sendall(json.dumps({'event': 'negotiator-output', 'data': {
            'id': request['id'], 'out-bytes': announced}}).encode(
                'ascii') + b'\nonly ten b')
        stream.close()
        theirs.close()
    client, ours, thread = synced_client(agent_that_goes_away)
    if announced == 1000:
        expected, message = negotiator.ConnectError, (
            'test: the connection closed before the other side answered')
    else:
        expected, message = negotiator.ProtocolError, (
            'the other side announced {0!r} bytes of output'.format(
                json.loads(json.dumps(announced))))  # u'10' on Python 2
    with pytest.raises(expected) as caught:
        client.call('negotiator-execute', {'command': 'x'},
                    lambda stream, chunk: None)
    assert str(caught.value) == message
    ours.close()
    thread.join(HANG)


# ---------------------------------------------------------------------------
# The agent's answers, over a socket standing in for the port
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def agent():
    workdir = Workdir()
    make_command(workdir.commands, 'echo-args',
                 '#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    make_command(workdir.commands, 'cat', '#!/bin/sh\nexec cat\n')
    make_command(workdir.commands, 'both',
                 '#!/bin/sh\nprintf out; printf err >&2; exit 5\n')
    make_command(workdir.commands, 'big',
                 '#!/bin/sh\nexec head -c "$1" /dev/zero | tr "\\0" x\n')
    # $1 bytes of x in a single write(): the kernel fills the pipe before
    # it lets a reader in (the writer holds the pipe's lock until the pipe
    # is full), so no read sees part of a refill, whatever the load.
    make_command(workdir.commands, 'one-write',
                 '#!{0}\nimport os, sys\n'
                 "data = b'x' * int(sys.argv[1])\n"
                 'while data:\n    data = data[os.write(1, data):]\n'.format(
                     sys.executable))
    # $1 bytes on stdout, then the sizes of its stdout and stderr pipes
    # (F_GETPIPE_SZ): a write of more than a pipe holds returns once the
    # agent has read a full pipe at least once.
    make_command(workdir.commands, 'pipe-size',
                 '#!{0}\nimport fcntl, os, sys\n'
                 "data = b'x' * int(sys.argv[1])\n"
                 'while data:\n    data = data[os.write(1, data):]\n'
                 "os.write(1, ('%d %d\\n' % (fcntl.fcntl(1, 1032), "
                 'fcntl.fcntl(2, 1032))).encode())\n'.format(sys.executable))
    make_command(workdir.commands, 'touch-marker',
                 '#!/bin/sh\ntouch "$1"\n')
    make_command(workdir.commands, 'sleep-pid',
                 '#!/bin/sh\necho $$ > "$1"\nexec sleep 60\n')
    agent = Agent(workdir)
    yield agent
    agent.stop()
    workdir.cleanup()


def execute(client, command, args=(), request_id=1, **extra):
    """Run a command; returns (events' data dicts, final reply)."""
    arguments = {'command': command, 'args': list(args)}
    arguments.update(extra)
    client.request({'execute': 'negotiator-execute', 'arguments': arguments,
                    'id': request_id})
    events = []
    while True:
        message = client.read_message()
        if 'event' in message:
            events.append(message)
        else:
            return events, message


def output_of(events, stream='out-data'):
    return b''.join(base64.b64decode(e['data'][stream])
                    for e in events if stream in e['data'])


def test_guest_sync_echoes_the_id(agent):
    client = agent.client()
    assert client.call({'execute': 'guest-sync',
                        'arguments': {'id': 1234567}}) == {'return': 1234567}
    client.request({'execute': 'guest-sync-delimited',
                    'arguments': {'id': 42}, 'id': 'x'})
    assert client.read_line() == b'\xff{"return":42,"id":"x"}'
    client.close()


@pytest.mark.parametrize('request_id', ['x', 7, {'a': [1]}, None, 1.5])
def test_guest_ping_echoes_any_id(agent, request_id):
    client = agent.client()
    request = {'execute': 'guest-ping'}
    expected = {'return': {}}
    if request_id is not None:
        request['id'] = request_id
        expected['id'] = request_id
    assert client.call(request) == expected
    client.close()


def test_guest_info_lists_what_is_served(agent):
    client = agent.client()
    info = client.call({'execute': 'guest-info'})['return']
    assert info['version'] == negotiator.__version__
    names = [c['name'] for c in info['supported_commands']]
    assert sorted(names) == sorted(
        name for name, _, _ in negotiator.Server.REQUESTS)
    for entry in info['supported_commands']:
        assert entry == {'name': entry['name'], 'enabled': entry['name']
                         not in negotiator.DEFAULT_BLOCKED_RPCS,
                         'success-response': entry['name'] !=
                         'guest-shutdown'}
    client.close()


@pytest.mark.parametrize('message, error', [
    ({'execute': 'guest-nosuch'},
     {'class': 'CommandNotFound',
      'desc': 'The command guest-nosuch has not been found'}),
    ({'execute': 'guest-sync'},
     {'class': 'GenericError', 'desc': "Parameter 'id' is missing"}),
    ({'execute': 'guest-sync', 'arguments': {'id': 'x'}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'id', expected: integer"}),
    ({'execute': 'guest-ping', 'arguments': []},
     {'class': 'GenericError',
      'desc': "QMP input member 'arguments' must be an object"}),
    ({'execute': 5},
     {'class': 'GenericError',
      'desc': "QMP input member 'execute' must be a string"}),
    ({}, {'class': 'GenericError', 'desc': "QMP input lacks member 'execute'"}),
    ({'execute': 'guest-ping', 'bogus': 1},
     {'class': 'GenericError', 'desc': "QMP input member 'bogus' is unexpected"}),
    ({'execute': 'negotiator-execute', 'arguments': {}},
     {'class': 'GenericError', 'desc': "Parameter 'command' is missing"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'echo-args', 'args': 'a b'}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'args', expected: array"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'echo-args', 'args': [1]}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'args[0]', expected: string"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'cat', 'input-data': '%%%'}},
     {'class': 'GenericError',
      'desc': "Parameter 'input-data' is not valid base64"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'cat', 'capture-output': 'yes'}},
     {'class': 'GenericError', 'desc': "Invalid parameter type for "
      "'capture-output', expected: boolean"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'cat', 'timeout': -1}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'timeout', expected: number >= 0"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'cat', 'timeout': 'soon'}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'timeout', expected: number >= 0"}),
    ({'execute': 'negotiator-execute',
      'arguments': {'command': 'cat', 'raw-output': 'yes'}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'raw-output', expected: boolean"}),
    ({'execute': 'negotiator-execute', 'arguments': {'command': 7}},
     {'class': 'GenericError',
      'desc': "Invalid parameter type for 'command', expected: string"}),
])
def test_bad_requests_get_qemu_ga_style_errors(agent, message, error):
    client = agent.client()
    message = dict(message, id='r')
    assert client.call(message) == {'error': error, 'id': 'r'}
    assert client.call({'execute': 'guest-ping'}) == {'return': {}}
    client.close()


@pytest.mark.parametrize('name', ['../commands/touch-marker', '/bin/touch',
                                  '.hidden', 'a\0b', '', '..'])
def test_path_tricks_run_nothing(agent, name):
    marker = agent.workdir.join('tricked')
    client = agent.client()
    events, reply = execute(client, name, [marker])
    assert events == []
    assert reply['error']['class'] == 'GenericError'
    assert reply['error']['desc'].startswith('Invalid command name')
    assert not os.path.exists(marker)
    client.close()


def test_malformed_input_is_answered_and_serving_goes_on(agent):
    client = agent.client()
    client.send(b'{bad\n\n   \n[1]\n\x00\x01\x02\n{"execute":"guest-ping","id":1}\n')
    replies = [client.read_message() for _ in range(4)]
    assert [r.get('error', {}).get('class') for r in replies[:3]] == [
        'GenericError'] * 3
    assert replies[3] == {'return': {}, 'id': 1}
    client.close()


def test_random_bytes_then_resync(agent):
    client = agent.client()
    noise = os.urandom(1024 * 1024).replace(b'\xff', b'\xfe')
    client.send(noise)
    client.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":9}}\n')
    while True:
        line = client.read_line()
        if line.startswith(b'\xff'):
            break
    assert line == b'\xff{"return":9}'
    assert client.call({'execute': 'guest-ping'}) == {'return': {}}
    client.close()


def test_resync_byte_mid_line_drops_the_partial_request(agent):
    client = agent.client()
    client.send(b'{"execute":"guest-ping","id":"lost"')
    client.send(b'\xff{"execute":"guest-ping","id":"kept"}\n')
    assert client.read_message() == {'return': {}, 'id': 'kept'}
    # Replies come in the order of what was read: anything the dropped
    # part caused would come before this one.
    assert client.call({'execute': 'guest-ping', 'id': 'next'}) == {
        'return': {}, 'id': 'next'}
    client.close()


def test_a_100_mb_line_is_refused_and_serving_goes_on(agent):
    client = agent.client()
    chunk = b'x' * (1024 * 1024)
    client.send(b'{"execute":"guest-ping","id":"')
    for _ in range(100):
        client.send(chunk)
    client.send(b'"}\n{"execute":"guest-ping","id":2}\n')
    assert client.read_message() == {'error': {
        'class': 'GenericError',
        'desc': 'Request line longer than 16777216 bytes; dropped'}}
    assert client.read_message() == {'return': {}, 'id': 2}
    client.close()


def test_execute_streams_events_then_replies(agent):
    client = agent.client()
    events, reply = execute(client, 'both', request_id='e1')
    assert reply == {'return': {'exitcode': 5}, 'id': 'e1'}
    for event in events:
        assert event['event'] == 'negotiator-output'
        assert event['data']['id'] == 'e1'
        assert sorted(event['timestamp']) == ['microseconds', 'seconds']
    assert output_of(events, 'out-data') == b'out'
    assert output_of(events, 'err-data') == b'err'
    client.close()


def test_captured_output_comes_in_the_reply_without_events(agent):
    """capture-output: true, for clients that never show events (virsh
    qemu-agent-command): the output in the reply, as guest-exec-status
    gives it, only for the streams that wrote something."""
    client = agent.client()
    client.request({'execute': 'negotiator-execute', 'id': 'c', 'arguments': {
        'command': 'both', 'capture-output': True}})
    assert client.read_message() == {'id': 'c', 'return': {
        'exitcode': 5, 'out-data': 'b3V0', 'out-truncated': False,
        'err-data': 'ZXJy', 'err-truncated': False}}
    client.request({'execute': 'negotiator-execute', 'id': 'd', 'arguments': {
        'command': 'cat', 'capture-output': True, 'raw-output': True}})
    assert client.read_message() == {'id': 'd', 'return': {'exitcode': 0}}
    client.close()


def test_captured_output_is_cut_at_the_cap(agent):
    client = agent.client()
    size = negotiator.MAX_REPLY_CAPTURE
    events, reply = execute(client, 'big', [str(size + 1)],
                            **{'capture-output': True})
    assert events == []
    result = reply['return']
    assert base64.b64decode(result.pop('out-data')) == b'x' * size
    assert result == {'exitcode': 0, 'out-truncated': True}
    client.close()


def test_arguments_and_binary_stdin_arrive_exactly(agent):
    client = agent.client()
    args = ['a b', '', '$HOME', '*', '-n', u'caf\u00e9']
    events, reply = execute(client, 'echo-args', args)
    assert reply['return'] == {'exitcode': 0}
    assert output_of(events).decode('utf-8') == u''.join(
        u'[{0}]\n'.format(a) for a in args)
    data = bytes(bytearray(range(256))) * 4096 + b'\x00\xc3\x28'
    events, reply = execute(client, 'cat',
                            **{'input-data': negotiator.encode_bytes(data)})
    assert reply['return'] == {'exitcode': 0}
    assert output_of(events) == data
    client.close()


def test_fifty_megabytes_of_output_arrive_intact(agent):
    client = agent.client()
    size = 50 * 1024 * 1024
    client.request({'execute': 'negotiator-execute', 'id': 1,
                    'arguments': {'command': 'big', 'args': [str(size)]}})
    digest = hashlib.sha256()
    received = 0
    while True:
        message = client.read_message()
        if 'event' not in message:
            break
        chunk = base64.b64decode(message['data']['out-data'])
        digest.update(chunk)
        received += len(chunk)
    assert message == {'return': {'exitcode': 0}, 'id': 1}
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(b'x' * size).hexdigest()
    client.close()


RAW_EVENT = re.compile(
    br'\A\{"event":"negotiator-output","data":\{"id":"r","(out|err)-bytes":'
    br'(\d+)\},"timestamp":\{"seconds":\d+,"microseconds":\d+\}\}\Z')


def raw_execute(client, command, args=(), **extra):
    """Run a command with raw output; ``(chunks, final reply)``.

    Every event line must be exactly a raw chunk's header; the chunks come
    as ``(stream, bytes)`` in order.
    """
    arguments = {'command': command, 'args': list(args), 'raw-output': True}
    arguments.update(extra)
    client.request({'execute': 'negotiator-execute', 'arguments': arguments,
                    'id': 'r'})
    chunks = []
    while True:
        line = client.read_line()
        match = RAW_EVENT.match(line)
        if not match:
            return chunks, json.loads(line.decode('ascii'))
        stream = match.group(1).decode('ascii') + '-data'
        chunks.append((stream, client.read_bytes(int(match.group(2)))))


def test_raw_output_follows_its_event_line_byte_for_byte(agent):
    client = agent.client()
    data = bytes(bytearray(range(256))) * 4096 + b'\n\xff{"return":{}}\n'
    chunks, reply = raw_execute(
        client, 'cat', **{'input-data': negotiator.encode_bytes(data)})
    assert reply == {'return': {'exitcode': 0}, 'id': 'r'}
    assert set(stream for stream, _ in chunks) == set(['out-data'])
    assert b''.join(chunk for _, chunk in chunks) == data
    chunks, reply = raw_execute(client, 'both')
    assert reply == {'return': {'exitcode': 5}, 'id': 'r'}
    assert sorted(chunks) == [('err-data', b'err'), ('out-data', b'out')]
    chunks, reply = raw_execute(client, 'hostname')  # a built-in
    assert reply == {'return': {'exitcode': 0}, 'id': 'r'}
    assert chunks == [('out-data', b(socket.gethostname() + '\n'))]
    assert client.call({'execute': 'guest-ping', 'id': 2}) == {
        'return': {}, 'id': 2}
    client.close()


def test_fifty_megabytes_of_raw_output_arrive_intact_in_big_chunks(agent):
    client = agent.client()
    size = 50 * 1024 * 1024
    chunks, reply = raw_execute(client, 'one-write', [str(size)])
    assert reply == {'return': {'exitcode': 0}, 'id': 'r'}
    assert sum(len(chunk) for _, chunk in chunks) == size
    assert all(chunk == b'x' * len(chunk) for _, chunk in chunks)
    # With the command's one write() a read finds the pipe as the writer
    # left it when it had to wait, full (or emptied by the reads since).
    # The first read takes all of a new pipe (64 KiB) and enlarges it to
    # 1 MiB; once the writer has refilled that, reads of 128, 256 and
    # 512 KiB in a row come back full, however the agent and the command
    # are scheduled.
    assert max(len(chunk) for _, chunk in chunks) >= 512 * 1024
    client.close()


@pytest.mark.parametrize('raw', [False, True])
def test_replies_keep_the_order_of_requests_sent_at_once(agent, raw):
    """A built-in's output and reply come whole, before the answer to the
    request sent after it, even when writing them drains the channel."""
    client = agent.client()
    client.send(b''.join(json.dumps(m).encode('ascii') + b'\n' for m in (
        {'execute': 'negotiator-execute', 'id': 1,
         'arguments': {'command': 'echo-args', 'args': ['x']}},
        {'execute': 'negotiator-execute', 'id': 2,
         'arguments': {'command': 'hostname', 'raw-output': raw}},
        {'execute': 'guest-ping', 'id': 3})))
    hostname = b(socket.gethostname() + '\n')
    seen = []
    while not seen or seen[-1] != ('return', 3):
        message = client.read_message()
        if 'event' not in message:
            seen.append(('return', message['id']))
        elif 'out-bytes' in message['data']:
            seen.append(('raw', message['data']['id'], client.read_bytes(
                message['data']['out-bytes'])))
        else:
            seen.append(('base64', message['data']['id'], base64.b64decode(
                message['data']['out-data'])))
    assert seen == [('base64', 1, b'[x]\n'), ('return', 1),
                    ('raw' if raw else 'base64', 2, hostname), ('return', 2),
                    ('return', 3)]
    client.close()


def new_pipe_size():
    """What a new pipe holds here (64 KiB with 4 KiB pages)."""
    read_end, write_end = os.pipe()
    try:
        return fcntl.fcntl(read_end, 1032)  # F_GETPIPE_SZ
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize('size', [262144, 1000])
def test_a_command_pipe_is_enlarged_to_one_megabyte_once_it_fills_up(
        agent, size):
    client = agent.client()
    events, reply = execute(client, 'pipe-size', [str(size)])
    assert reply['return'] == {'exitcode': 0}
    new = new_pipe_size()
    stdout = max(new, 1048576) if size > new else new
    assert output_of(events) == b'x' * size + b(
        '{0} {1}\n'.format(stdout, new))
    client.close()


def test_requests_wait_behind_a_running_command_in_order(agent):
    client = agent.client()
    client.request({'execute': 'negotiator-execute', 'id': 1,
                    'arguments': {'command': 'both'}})
    client.request({'execute': 'guest-ping', 'id': 2})
    ids = []
    while len(ids) < 2:
        message = client.read_message()
        if 'event' not in message:
            ids.append(message['id'])
    assert ids == [1, 2]
    client.close()


def pid_gone(pid):
    try:
        with open('/proc/{0}/stat'.format(pid)) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except IOError:
        return True


def busy_with_one_waiting(agent, name):
    """A client whose command runs while a second request waits behind it.

    :returns: the client, the running command's pid, and the file the
        waiting request would create.
    """
    pid_file = agent.workdir.join(name + '.pid')
    marker = agent.workdir.join(name + '.marker')
    client = agent.client()
    client.request({'execute': 'negotiator-execute', 'id': 1,
                    'arguments': {'command': 'sleep-pid', 'args': [pid_file]}})
    wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read())
    client.request({'execute': 'negotiator-execute', 'id': 2,
                    'arguments': {'command': 'touch-marker', 'args': [marker]}})
    return client, int(open(pid_file).read()), marker


def test_resync_abandons_the_running_command_and_waiting_requests(agent):
    """A 0xFF means a new client: nothing the old one asked for goes on."""
    client, pid, marker = busy_with_one_waiting(agent, 'resync')
    client.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":3}}\n')
    assert client.read_line() == b'\xff{"return":3}'
    wait_for(lambda: pid_gone(pid))
    assert client.call({'execute': 'guest-ping', 'id': 4}) == {
        'return': {}, 'id': 4}
    assert not os.path.exists(marker)
    client.close()


def test_hang_up_kills_the_command_and_drops_waiting_requests(agent):
    client, pid, marker = busy_with_one_waiting(agent, 'hangup')
    client.close()
    wait_for(lambda: pid_gone(pid))
    fresh = agent.client()
    assert fresh.call({'execute': 'guest-ping'}) == {'return': {}}
    fresh.close()
    assert not os.path.exists(marker)


def test_list_commands(agent):
    client = agent.client()
    reply = client.call({'execute': 'negotiator-list-commands'})
    kinds = dict((c['name'], c['kind']) for c in reply['return'])
    assert kinds == {
        'big': 'user', 'both': 'user', 'cat': 'user', 'echo-args': 'user',
        'one-write': 'user', 'pipe-size': 'user', 'sleep-pid': 'user',
        'touch-marker': 'user', 'disk-usage': 'builtin',
        'hostname': 'builtin', 'ip-addresses': 'builtin', 'os-info': 'builtin',
        'uptime': 'builtin'}
    client.close()
