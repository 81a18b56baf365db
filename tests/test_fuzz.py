# -*- coding: utf-8 -*-
"""Fuzzing: the real agent and the real host daemon fed generated input.

The agent runs as ``negotiator.py guest --listen SOCKET``; the daemon as
``negotiator.py host --daemon --guest fuzz0=SOCKET ... --guest good=SOCKET``,
for which this module plays the guests (the daemon connects to their
sockets).  Cases are mutated requests (every member with every wrong type,
huge, negative, float, nested and deep ids, unicode, escaped lone
surrogates, NUL, raw 0xFF, invalid UTF-8, path tricks in command names,
absurd timeouts, invalid base64), random bytes, pipelined bursts and
resynchronisations.  They are fed on CONNECTIONS connections at once, many
in flight on each, each case followed by a marker request whose reply
tells which case the replies before it belong to.  After each batch come
clients that hang up halfway through a request or a reply, more clients
than the agent may open files, and a client that never reads.

The oracles, checked on every line received and after every batch:

- everything the process writes is lines of one strict JSON object each
  (ASCII; no NaN or Infinity), with exactly one of "return", "error" or
  "event" (the raw bytes announced by "out-bytes"/"err-bytes" are skipped),
  and no error reply says "Internal error";
- each marker is answered, in order, within HANG seconds;
- the process is alive; its log holds no traceback and no internal error,
  and every log line starts with "negotiator: " (a peer cannot forge one);
- a well-behaved client (for the daemon: its guest "good") gets exact
  answers: guest-sync-delimited, guest-ping, and commands' exact output;
- no canary ran: executables just outside the commands directory, and
  inside it where only a path trick would reach them;
- resident memory (VmRSS, and its peak VmHWM) stays within RSS_GROWTH of
  what it was after start-up, also while a client never reads;
- once a batch's clients are gone, the process is back to the descriptors
  it had after start-up and runs no command any more.

test_fuzz_agent and test_fuzz_daemon feed NEGOTIATOR_FUZZ_CASES cases each
(default 1000).  Runs are seeded: every failure message gives the seed, and
NEGOTIATOR_FUZZ_SEED=N replays that run's input on the same Python (how the
kernel cuts the stream into reads is not replayed).  The other tests feed
fixed input, under the same oracles: the inputs in KNOWN, which once broke
a target, and the clients that never read or come too many at once.

Must stay valid on Python 2.7 and 3.6+: no f-strings.
"""

import base64
import binascii
import errno
import fcntl
import json
import os
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from collections import deque

import pytest

import negotiator
from helpers import HANG, NEGOTIATOR, Workdir, connectable, make_command


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

def _env_int(name, default):
    text = os.environ.get(name, '').strip()
    return int(text) if text else default


#: Cases fed to each target (the agent, the daemon) in one run.
CASES = _env_int('NEGOTIATOR_FUZZ_CASES', 1000)
#: The run's seed; each target's generator starts from its own seed made
#: from it, so a target's input does not depend on what ran before.
SEED = (_env_int('NEGOTIATOR_FUZZ_SEED', 0) or
        random.SystemRandom().randrange(1, 1 << 31))
#: Cases between two checks of the oracles.
BATCH = 1000
#: Connections fed at once (requests on one are answered one at a time).
CONNECTIONS = 8
#: The agent's limit of open files (many_clients() goes past it).
FILE_LIMIT = 256
#: How much resident memory may grow, past what the process held after
#: start-up.  Cases send lines below 2 MiB (but one over MAX_LINE, which
#: the agent drops as it reads it), at most WINDOW_BYTES waiting on each
#: connection; a megabyte of a command's output on each connection at once
#: took 20 MiB, and runs of 25,000 cases up to 15 MiB at their peak (the
#: figures print it).
RSS_GROWTH = 96 * 1024 * 1024
#: Lines sent but not answered yet on a fuzzing connection: the daemon
#: cuts off a guest that queues MAX_PENDING (64).
WINDOW_LINES = 48
#: Bytes sent but not answered yet (a longer case waits until all before
#: it are answered): the daemon cuts off a guest that queues more than
#: MAX_LINE, and what waits takes memory.
WINDOW_BYTES = 1024 * 1024
#: Lines of one daemon case at most: it cuts off a guest after 16 failed
#: requests in a row, and the marker after each case is a success.
DAEMON_CASE_LINES = 12
#: Seconds a client that never reads waits for the agent to stop taking
#: its bytes before it decides that it has.
STALL = 0.5
#: Bytes of "x\n" a client that never reads sends at most (an error reply
#: is 50 times as long as its line).
FLOOD = 4 * 1024 * 1024

MAX_LINE = negotiator.MAX_LINE
PY = '{0}.{1}.{2}'.format(*sys.version_info[:3])


# ---------------------------------------------------------------------------
# Generator: cases as bytes, from a random.Random (same code on 2.7 and 3)
# ---------------------------------------------------------------------------

def utf8(codepoint):
    """The UTF-8 bytes of any code point, lone surrogates included (as
    Python 2 writes them; Python 3 refuses them, which is the point)."""
    if codepoint < 0x80:
        values = [codepoint]
    elif codepoint < 0x800:
        values = [0xc0 | codepoint >> 6, 0x80 | codepoint & 0x3f]
    elif codepoint < 0x10000:
        values = [0xe0 | codepoint >> 12, 0x80 | codepoint >> 6 & 0x3f,
                  0x80 | codepoint & 0x3f]
    else:
        values = [0xf0 | codepoint >> 18, 0x80 | codepoint >> 12 & 0x3f,
                  0x80 | codepoint >> 6 & 0x3f, 0x80 | codepoint & 0x3f]
    return bytes(bytearray(values))


def quote(text):
    """``text`` as a JSON string, ASCII-escaped."""
    return json.dumps(text).encode('ascii')


def number(value):
    return str(value).encode('ascii')


#: Number literals, valid JSON or not, that a parser may take for a number.
NUMBERS = [
    b'0', b'-0', b'1', b'-1', b'7', b'2147483648', b'9223372036854775807',
    b'9223372036854775808', b'-9223372036854775808', b'-9223372036854775809',
    b'18446744073709551616', b'1' + b'0' * 40, b'1' + b'0' * 4400,
    b'0.0', b'-0.0', b'0.5', b'1.0', b'1e3', b'1E-3', b'1e308', b'1e309',
    b'-1e309', b'1e-400', b'4.9e-324', b'1e1000000', b'NaN', b'Infinity',
    b'-Infinity', b'01', b'1.', b'.5', b'+1', b'0x10', b'1e', b'--1',
    b'1_000', b'123456789.123456789e-5',
]
#: Other literals.
LITERALS = [b'true', b'false', b'null', b'True', b'None', b'nul', b'tru',
            b'undefined', b'""', b'[]', b'{}', b'[', b'{', b'"', b']', b'}']
#: Escapes inside a JSON string, valid or not.
ESCAPES = [
    b'\\n', b'\\"', b'\\\\', b'\\/', b'\\b', b'\\f', b'\\r', b'\\t',
    b'\\u0000', b'\\u0001', b'\\u001f', b'\\u007f', b'\\u00e9', b'\\u2603',
    b'\\u2028', b'\\ud800', b'\\udbff', b'\\udc00', b'\\udc80', b'\\udcff',
    b'\\udfff', b'\\ud83d\\ude00', b'\\ude00\\ud83d', b'\\ud800\\u0041',
    b'\\ufffe', b'\\uffff', b'\\uFEFF', b'\\u0041', b'\\x41', b'\\u12',
    b'\\U0001F600', b'\\', b'\\a', b'\\0',
]
#: Raw bytes inside a string: control characters, invalid UTF-8, 0xFF.
RAW_BYTES = [
    b'\x00', b'\x01', b'\t', b'\x1b', b'\x7f', b'\x80', b'\xbf', b'\xc0\xaf',
    b'\xc3', b'\xe0\x80\xaf', b'\xed\xa0\x80', b'\xed\xb3\xbf', b'\xf4\x90',
    b'\xf8\x88\x80\x80\x80', b'\xfe', b'\xff', b'\r',
]
#: Letters of plain words.
LETTERS = 'abcdefghijklmnopqrstuvwxyz-_.0123456789'
#: Words of their own.
WORDS = ['ok', 'cat', 'canary', 'sub', 'id', 'execute',
         'arguments', 'command', 'args', 'input-data', 'timeout', 'raw-output',
         'return', 'error', 'event', 'guest-ping', 'negotiator-execute', '-n',
         '--', '-', 'a b', '*', '$HOME', '`id`', '$(id)', ';', '|', '&&', '%s',
         '%n', '{0}', '\\', 'hostname', 'uptime', 'null', 'true', '0', '-1']

#: The commands directory's stand-in commands (canaries aside).
USER_COMMANDS = ['ok', 'cat']
#: The agent's built-in commands.
BUILTINS = ['hostname', 'os-info', 'ip-addresses', 'disk-usage', 'uptime']
#: Command names that must never run anything, as JSON text: path tricks
#: that would reach a canary (see write_commands()), and names no command
#: file has.
PATH_TRICKS = [quote(name) for name in [
    u'../canary', u'..', u'.', u'./ok', u'sub/canary', u'sub/../../canary',
    u'.canary', u'./.canary', u'sub/./canary', u'//canary', u'/', u'ok/',
    u'ok/.', u'../commands/ok', u'sub/../ok', u'..\\canary',
    u'\u2024\u2024/canary', u'\uff0e\uff0e\uff0fcanary', u'%2e%2e%2fcanary',
    u'../canary\u0000', u'\u0000../canary', u'.canary\u0000', u' ../canary',
    u'\t.canary', u'\n.canary', u'..\u2215canary', u'sub\u2215canary',
    u'~/canary', u'*', u'ok\n', u'ok ', u'OK', u'\u0000', u'', u'canary',
    u'/bin/sh', u'sub', u'sub/', u'-', u'--help', u'\u00e9', u'caf\u00e9',
    u'\u2603', u'\U0001f600',
]] + [
    b'"\\udcff"', b'"ok\\udcff"', b'"\\udcff../canary"', b'"..\\udcff/canary"',
    b'"\\udc2e\\udc2e/canary"', b'"\\ud800"', b'"\\udcae\\udcae"',
    b'"\xc3\xa9"', b'"\xff"', b'"\xed\xb3\xbf"', b'"../canary\xff"',
    b'"\\u002e\\u002e\\u002fcanary"', b'"\\u002ecanary"', b'"sub\\/canary"',
]
#: input-data values that are not base64, or are in a corner of it.
INPUT_DATA = [
    b'"abc"', b'"a==="', b'"===="', b'"ab=c"', b'"YWJj\\n"', b'"YW Jj"',
    b'"\\u00e9\\u00e9\\u00e9\\u00e9"', b'"\\udcff\\udcff\\udcff\\udcff"',
    b'"YWJj\\u0000"', b'"-_-_"', b'"YQ=="', b'""', b'"=="', b'"A==="',
    b'"AAAA===="', b'"YWJj\xc3\xa9"', b'"YWJ\xffj"', b'"YQ==YQ=="',
    b'"\\u0059\\u0051\\u003d\\u003d"',
]
#: Timeouts that are absurd, or only just right.
TIMEOUTS = [
    b'-1', b'-0.0', b'0', b'0.0', b'1e9', b'1000000000', b'1000000001',
    b'1e10', b'1e309', b'-1e309', b'NaN', b'Infinity', b'-Infinity', b'"10"',
    b'true', b'false', b'null', b'[1]', b'{}', b'9223372036854775808',
    b'1' + b'0' * 400, b'1e-300', b'4.9e-324', b'5e-324', b'3600', b'10.5',
    b'-9223372036854775809', b'1e999999',
]
#: raw-output values.
RAW_OUTPUT = [b'true', b'false', b'1', b'0', b'"true"', b'null', b'[]']
#: Request names that are not quite the ones served.
NAME_VARIANTS = [
    b'"Guest-ping"', b'"guest-ping "', b'" guest-ping"', b'"guest_ping"',
    b'"guest-ping\\u0000"', b'"guest-p\\u0069ng"', b'"g\\u00fcest-ping"',
    b'"\xc3\xa9"', b'"guest-\xffping"', b'"guest-\\udcffping"', b'""',
    b'"guest-exec"', b'"guest-shutdown"', b'"guest-file-open"',
    b'"negotiator-"', b'"NEGOTIATOR-EXECUTE"', b'"__init__"',
    b'"rpc_execute"', b'"_handle"', b'"methods"', b'"\\ud800"',
    b'"\\u2603"', b'"\xf0\x9f\x98\x80"', b'"guest-ping\\n"',
]
#: Keys that are not quite the ones expected.
KEY_VARIANTS = [
    b'"Execute"', b'"execute "', b'"\\u0065xecute"', b'"exec\\u0000ute"',
    b'"arguments\\udcff"', b'"id\xc3\xa9"', b'"\xc3\xa9"', b'""', b'"ID"',
    b'"\\ud800"', b'"\xff"', b'"command "', b'"arg\\u0073"',
    b'"input_data"', b'"raw_output"', b'"\\u2603"',
]
#: Bytes a framing mutation puts somewhere in a line.
INSERTS = [b'\x00', b'\x80', b'\xff', b'\n', b'\r', b'\x7f', b'\xc3',
           b'\xed\xb3\xbf', b'\t', b' ', b'\\', b'"', b'}', b'\n\n']

#: What each target serves; the generator asks both for each other's too.
AGENT_REQUESTS = [
    ('negotiator-execute', 30), ('guest-sync', 12),
    ('guest-sync-delimited', 8), ('guest-ping', 10), ('guest-info', 5),
    ('negotiator-list-commands', 5), ('guest-get-host-name', 3),
    ('guest-get-osinfo', 2), ('guest-network-get-interfaces', 2),
    ('guest-get-time', 2), ('guest-get-timezone', 2),
    ('guest-get-users', 1), ('guest-get-vcpus', 1), ('guest-get-fsinfo', 2),
    ('guest-get-disks', 1),
]
DAEMON_REQUESTS = [
    ('negotiator-execute', 30), ('guest-sync', 12),
    ('guest-sync-delimited', 8), ('guest-ping', 10), ('guest-info', 5),
    ('negotiator-list-commands', 5), ('guest-get-host-name', 1),
    ('guest-get-osinfo', 1),
]


def weighted(pairs):
    """A list in which each item appears its weight's number of times."""
    items = []
    for item, weight in pairs:
        items.extend([item] * weight)
    return items


class Case(object):
    """What one case sends: whole lines (a last line without its newline
    gets one, or it would swallow the marker that follows)."""

    __slots__ = ('kind', 'data', 'lines', 'resync')

    def __init__(self, kind, data):
        if not data.endswith(b'\n'):
            data += b'\n'
        self.kind = kind
        self.data = data
        #: Lines that may be answered (an upper bound).
        self.lines = sum(1 for line in data.split(b'\n') if line.strip())
        #: A 0xFF drops requests waiting before it, so the requests sent
        #: before this case must all be answered first.
        self.resync = b'\xff' in data

    def __repr__(self):
        shown = self.data if len(self.data) <= 400 else (
            self.data[:300] + b'...' + self.data[-60:])
        return '{0} case, {1} bytes: {2!r}'.format(self.kind, len(self.data),
                                                  shown)


class Generator(object):
    """Cases for one target, from ``rng`` alone.

    :param daemon: generate for the host daemon: only what it serves is
        valid, and nothing that it rightly cuts a guest off for (more than
        DAEMON_CASE_LINES lines in a case, a line over MAX_LINE).
    """

    def __init__(self, rng, daemon=False):
        self.rng = rng
        self.daemon = daemon
        #: Whether the case being made may send a lot.
        self.heavy = False
        self.requests = weighted(DAEMON_REQUESTS if daemon else
                                 AGENT_REQUESTS)
        self.commands = USER_COMMANDS + ([] if daemon else BUILTINS)
        self.mutations = weighted([
            (self.m_value, 10), (self.m_drop, 3), (self.m_add, 3),
            (self.m_duplicate, 2), (self.m_key, 2), (self.m_arguments, 2),
            (self.m_id, 6), (self.m_name, 3), (self.m_command, 6),
            (self.m_args, 6), (self.m_input, 4), (self.m_timeout, 4),
            (self.m_raw, 2),
        ])

    # -- values --------------------------------------------------------------

    def word(self):
        r = self.rng
        if r.random() < 0.5:
            return r.choice(WORDS)
        return ''.join(r.choice(LETTERS) for _ in range(r.randint(0, 12)))

    def some_bytes(self, size):
        """``size`` random bytes (a fast way that is the same on 2.7 and 3)."""
        if not size:
            return b''
        return binascii.unhexlify('{0:0{1}x}'.format(
            self.rng.getrandbits(8 * size), 2 * size).encode('ascii'))

    def string(self):
        """A JSON string literal (mostly valid, with all kinds of content)."""
        r = self.rng
        parts = [b'"']
        for _ in range(r.choice((0, 1, 1, 2, 3, 5, 8))):
            x = r.random()
            if x < 0.4:
                parts.append(self.word().encode('ascii'))
            elif x < 0.65:
                parts.append(r.choice(ESCAPES))
            elif x < 0.85:
                parts.append(utf8(r.choice((
                    r.randint(0x80, 0x7ff), r.randint(0x800, 0xffff),
                    r.randint(0xd800, 0xdfff), r.randint(0x10000, 0x10ffff),
                    r.randint(0x110000, 0x1fffff)))))
            elif x < 0.97:
                parts.append(r.choice(RAW_BYTES))
            elif self.heavy:
                parts.append(b'x' * r.choice((1000, 70000, 140000)))
        if r.random() > 0.02:
            parts.append(b'"')
        return b''.join(parts)

    def number(self):
        r = self.rng
        x = r.random()
        if x < 0.5:
            return r.choice(NUMBERS)
        if x < 0.8:
            return number(r.randint(-2 ** 70, 2 ** 70) >> r.randint(0, 70))
        return number(r.uniform(-1e6, 1e6))

    def value(self, depth=0):
        """Any JSON value, or something close to one."""
        r = self.rng
        x = r.random()
        if x < 0.3:
            return self.number()
        if x < 0.6:
            return self.string()
        if x < 0.75 or depth >= 3:
            return r.choice(LITERALS)
        if x < 0.85:
            return self.array(depth + 1)
        if x < 0.97:
            return self.object(depth + 1)
        return self.deep()

    def array(self, depth):
        items = [self.value(depth) for _ in range(self.rng.randint(0, 4))]
        return b'[' + b','.join(items) + b']'

    def object(self, depth):
        members = [(self.string(), self.value(depth))
                   for _ in range(self.rng.randint(0, 4))]
        return b'{' + b','.join(k + b':' + v for k, v in members) + b'}'

    def deep(self):
        """Nesting, mostly around where the interpreter's JSON stops: 1000
        levels less the stack in use up to 3.11, 1500 on 3.12, 10000 on
        3.13."""
        r = self.rng
        depth = r.choice((2, 10, 100, 500, 900, 990, 1000, 1100, 5000,
                          r.randint(950, 1010), r.randint(950, 1010),
                          r.randint(1480, 1510), r.randint(9980, 10010)))
        if self.heavy and r.random() < 0.3:
            depth = 100000
        if r.random() < 0.5:
            return b'[' * depth + b'1' + b']' * depth
        return b'{"a":' * depth + b'1' + b'}' * depth

    def request_id(self):
        r = self.rng
        x = r.random()
        if x < 0.4:
            return number(r.randint(0, 10 ** 6))
        if x < 0.6:
            return quote(self.word())
        return self.value()

    def base64(self, size):
        return quote(base64.b64encode(self.some_bytes(size)).decode('ascii'))

    # -- requests ------------------------------------------------------------

    def valid_arguments(self, name):
        """The valid arguments of request ``name``: members, or None."""
        r = self.rng
        if name in ('guest-sync', 'guest-sync-delimited'):
            return [(b'"id"', number(r.randint(0, 2 ** 63 - 1)))]
        if name == 'negotiator-execute':
            members = [(b'"command"', quote(r.choice(self.commands)))]
            if r.random() < 0.7:
                members.append((b'"args"', b'[' + b','.join(
                    quote(self.word()) for _ in range(r.randint(0, 4))) +
                    b']'))
            if r.random() < 0.3:
                members.append((b'"input-data"',
                                self.base64(r.randint(0, 64))))
            if r.random() < 0.3:
                members.append((b'"timeout"', r.choice(
                    (b'0', b'5', b'10.5', b'1e9', b'3600'))))
            if r.random() < 0.3:
                members.append((b'"raw-output"', r.choice((b'true',
                                                           b'false'))))
            return members
        return None if r.random() < 0.7 else []

    def request_line(self):
        """A request, mutated 0 to 4 times, as a line without its newline."""
        r = self.rng
        name = r.choice(self.requests)
        request = {'top': [(b'"execute"', quote(name))],
                   'args': self.valid_arguments(name)}
        if request['args'] is not None:
            request['top'].append((b'"arguments"', None))
        if r.random() < 0.8:
            request['top'].append((b'"id"', self.request_id()))
        for _ in range(r.choice((0, 1, 1, 1, 2, 2, 3, 4))):
            r.choice(self.mutations)(request)
        return self.encode(request)

    def encode(self, request):
        r = self.rng
        if r.random() < 0.1:
            r.shuffle(request['top'])
        spaced = r.random() < 0.05
        args = request['args']
        if isinstance(args, list):
            args = self.members(args, spaced)
        elif args is None:
            args = b'{}'
        return self.members([(k, args if v is None else v)
                             for k, v in request['top']], spaced)

    def members(self, members, spaced):
        if not spaced:
            return b'{' + b','.join(k + b':' + v for k, v in members) + b'}'
        space = self.rng.choice((b' ', b'\t', b'\r', b' \t ', b'\x0b',
                                 b'\x0c', b'\xc2\xa0'))
        return (b'{' + space + (b',' + space).join(
            k + space + b':' + space + v for k, v in members) + space + b'}')

    # -- mutations of a request ----------------------------------------------

    def _members(self, request):
        """The member list to mutate: the request's, or its arguments'."""
        if isinstance(request['args'], list) and self.rng.random() < 0.6:
            return request['args']
        return request['top']

    def m_value(self, request):
        members = self._members(request)
        if members:
            index = self.rng.randrange(len(members))
            members[index] = (members[index][0], self.value())

    def m_drop(self, request):
        members = self._members(request)
        if members:
            del members[self.rng.randrange(len(members))]

    def m_add(self, request):
        r = self.rng
        key = r.choice((b'"id"', b'"execute"', b'"arguments"', b'"command"',
                        b'"args"', b'"timeout"', b'"x"', self.string()))
        members = self._members(request)
        members.insert(r.randint(0, len(members)), (key, self.value()))

    def m_duplicate(self, request):
        members = self._members(request)
        if members:
            member = self.rng.choice(members)
            if self.rng.random() < 0.5:
                member = (member[0], self.value())
            members.insert(self.rng.randint(0, len(members)), member)

    def m_key(self, request):
        members = self._members(request)
        if members:
            index = self.rng.randrange(len(members))
            members[index] = (self.rng.choice(KEY_VARIANTS),
                              members[index][1])

    def m_arguments(self, request):
        r = self.rng
        request['args'] = r.choice((b'[]', b'null', b'"x"', b'1', b'[{}]',
                                    b'true', self.value()))
        if (b'"arguments"', None) not in request['top']:
            request['top'].append((b'"arguments"', None))

    def _set(self, request, key, value):
        """Set an argument (making arguments an object if need be)."""
        if not isinstance(request['args'], list):
            request['args'] = []
            if (b'"arguments"', None) not in request['top']:
                request['top'].append((b'"arguments"', None))
        members = request['args']
        for index, (k, _) in enumerate(members):
            if k == key:
                members[index] = (key, value)
                return
        members.append((key, value))

    def _set_top(self, request, key, value):
        top = request['top']
        for index, (k, _) in enumerate(top):
            if k == key:
                top[index] = (key, value)
                return
        top.append((key, value))

    def m_id(self, request):
        r = self.rng
        value = r.choice((
            b'NaN', b'Infinity', b'-Infinity', b'1e309', b'-1e309', b'1e-400',
            b'-0', b'1E400', b'0.1', b'1' + b'0' * 30, self.deep(),
            self.string(), self.value(), b'[' * 970 + b']' * 970,
            b'{"a":' * 980 + b'1' + b'}' * 980))
        if r.random() < 0.3:
            self._set(request, b'"id"', value)  # guest-sync's own id
        else:
            self._set_top(request, b'"id"', value)

    def m_name(self, request):
        r = self.rng
        name = r.choice((r.choice(NAME_VARIANTS), self.string(),
                         self.value(), quote(r.choice(self.requests))))
        self._set_top(request, b'"execute"', name)

    def m_command(self, request):
        r = self.rng
        self._set_top(request, b'"execute"', b'"negotiator-execute"')
        name = r.choice(PATH_TRICKS) if r.random() < 0.7 else self.string()
        self._set(request, b'"command"', name)

    def m_args(self, request):
        r = self.rng
        self._set_top(request, b'"execute"', b'"negotiator-execute"')
        x = r.random()
        if x < 0.5:
            items = [r.choice((self.string(), quote(self.word()),
                               b'"a\\u0000b"', b'"\\u0000"', b'"\\udcff"',
                               b'"\\ud800"', b'"\xff"', b'"\xed\xb3\xbf"'))
                     for _ in range(r.randint(1, 4))]
            value = b'[' + b','.join(items) + b']'
        elif x < 0.8:
            value = r.choice((b'"x"', b'[1]', b'[null]', b'[["x"]]',
                              b'{"a":"b"}', b'null', b'[true]', b'[{}]'))
        elif not self.heavy or x < 0.9:
            count = r.choice((100, 1000))
            value = b'[' + b','.join([quote(self.word())] * count) + b']'
        elif x < 0.95:  # over what the system takes in one argument
            value = b'["' + b'x' * r.choice((131071, 131072, 200000)) + b'"]'
        else:  # more than the system takes in all
            count = r.choice((5000, 300000))
            value = b'[' + b','.join([b'"x"'] * count) + b']'
        self._set(request, b'"args"', value)

    def m_input(self, request):
        r = self.rng
        self._set_top(request, b'"execute"', b'"negotiator-execute"')
        value = r.choice((r.choice(INPUT_DATA), self.value()))
        if self.heavy:
            value = self.base64(r.choice((1000, 30000, 300000)))
        self._set(request, b'"input-data"', value)

    def m_timeout(self, request):
        r = self.rng
        self._set_top(request, b'"execute"', b'"negotiator-execute"')
        self._set(request, b'"timeout"', r.choice(
            (r.choice(TIMEOUTS), self.number())))

    def m_raw(self, request):
        self._set(request, b'"raw-output"', self.rng.choice(RAW_OUTPUT))

    # -- framing -------------------------------------------------------------

    def frame(self, line):
        """The line ended, or cut, doubled, or with a byte put in."""
        r = self.rng
        if r.random() < 0.85:
            return line + b'\n'
        where = r.randint(0, len(line))
        return r.choice((
            lambda: line[:where],
            lambda: line[:where] + r.choice(INSERTS) + line[where:],
            lambda: (line[:where] + bytes(bytearray([r.getrandbits(8)])) +
                     line[where + 1:]),
            lambda: line + line,
            lambda: line + b'\r\n',
            lambda: b' \t' + line + b' \t\n',
            lambda: line[:where] + b'\xff' + line,
            lambda: line + b'\x00',
            lambda: b'\xef\xbb\xbf' + line,
        ))() + b'\n'

    # -- cases ---------------------------------------------------------------

    def case(self):
        """The next case; one in fifty may send a lot (a long string, a big
        input, a nesting 100,000 deep)."""
        while True:
            self.heavy = self.rng.random() < 0.02
            case = self._case()
            if not self.daemon or case.lines <= DAEMON_CASE_LINES:
                return case

    def _case(self):
        r = self.rng
        x = r.random()
        if x < 0.72:
            return Case('request', self.frame(self.request_line()))
        if x < 0.80:
            self.heavy = False
            return Case('lines', b''.join(self.frame(self.request_line())
                                          for _ in range(r.randint(2, 8))))
        if x < 0.85:
            return Case('bytes', self.random_bytes())
        if x < 0.88:
            return Case('path', self.execute(r.choice(PATH_TRICKS)) + b'\n')
        if x < 0.90:
            return Case('deep', r.choice((
                self.deep(),
                b'{"execute":"guest-ping","id":' + self.deep() + b'}',
                b'{"execute":"guest-sync","arguments":{"id":' + self.deep() +
                b'}}',
                b'{"execute":"negotiator-execute","arguments":{"command":"ok",'
                b'"args":' + self.deep() + b'}}')))
        if x < 0.93:
            return Case('resync', self.resync())
        if x < 0.955:
            return Case('stdin', self.execute(
                b'"cat"', b'"input-data":' + self.base64(r.choice(
                    (0, 1, 100, 4096, 70000 if self.heavy else 5000))) +
                b',"raw-output":' +
                r.choice((b'true', b'false'))) + b'\n')
        if x < 0.965:
            return Case('timeout', self.execute(
                b'"sleepy"', b'"timeout":' + r.choice(
                    (b'0.001', b'0.01', b'0.05', b'1e-9', b'5e-324'))) + b'\n')
        if x < 0.97:
            return Case('big', self.execute(
                b'"big"', b'"raw-output":' + r.choice((b'true', b'false'))) +
                b'\n')
        if x < 0.972 and not self.daemon:
            # More requests than may wait behind a running command (and
            # then a 0xFF that drops them: the marker must not be refused).
            self.heavy = False
            return Case('burst', self.execute(b'"sleepy"') + b'\n' + b''.join(
                self.frame(self.request_line()) for _ in range(100)) +
                b'\xff')
        if x < 0.9721 and not self.daemon and self.heavy:
            return Case('oversized', b'{"execute":"guest-ping","id":"' +
                        b'x' * MAX_LINE + b'"}\n')
        return Case('request', self.frame(self.request_line()))

    def execute(self, command, extra=b''):
        return (b'{"execute":"negotiator-execute","arguments":{"command":' +
                command + (b',' + extra if extra else b'') + b'},"id":' +
                self.request_id() + b'}')

    def random_bytes(self):
        return self.some_bytes(self.rng.choice((1, 2, 8, 64, 300, 2000)))

    def resync(self):
        """0xFF where it drops a partial line, waiting requests or a
        running command."""
        r = self.rng
        line = self.request_line()
        return r.choice((
            lambda: line[:r.randint(0, len(line))] + b'\xff' + line + b'\n',
            lambda: (self.execute(b'"sleepy"') + b'\n' + line + b'\n\xff' +
                     line + b'\n'),
            lambda: (self.execute(b'"ok"') + b'\n' + b'\xff' * r.randint(1, 3) +
                     line + b'\n'),
            lambda: b'\xff' * r.randint(1, 5) + line + b'\n',
            lambda: line + b'\n\xff',
            lambda: (b'\xff{"execute":"guest-sync-delimited","arguments":'
                     b'{"id":' + number(r.randint(0, 2 ** 63 - 1)) + b'}}\n'),
        ))()


# ---------------------------------------------------------------------------
# Oracles on what a process writes
# ---------------------------------------------------------------------------

class Problem(Exception):
    """What a received line did wrong."""


class Failure(AssertionError):
    """An oracle failed; the message gives the seed and the context."""


#: The non-standard constants (NaN, Infinity) the last strict_json() met.
_CONSTANTS = []


def _refuse_constant(name):
    _CONSTANTS.append(name)
    raise ValueError('non-standard JSON constant {0}'.format(name))


def _keep(text):
    return text


def _integer(text):
    try:
        return int(text)
    except ValueError:  # Python 3.11+: more digits than int() takes
        return text


def strict_json(text):
    """Parse JSON as a strict peer would: no NaN or Infinity; a fraction is
    kept as its text, and so is an integer too long for int().

    :raises Problem: for what is not JSON.
    """
    del _CONSTANTS[:]
    limit = sys.getrecursionlimit()
    try:
        try:
            return json.loads(text, parse_constant=_refuse_constant,
                              parse_int=_integer, parse_float=_keep)
        except RuntimeError:  # RecursionError: nested deeper than we go
            sys.setrecursionlimit(limit + 20000)
            return json.loads(text, parse_constant=_refuse_constant,
                              parse_int=_integer, parse_float=_keep)
    except (ValueError, RuntimeError) as e:
        if _CONSTANTS:
            raise Problem('non-standard JSON constant {0}'.format(
                _CONSTANTS[0]))
        raise Problem('a line that is not JSON ({0})'.format(e))
    finally:
        sys.setrecursionlimit(limit)


MESSAGE_KEYS = {
    'return': set(['return', 'id']),
    'error': set(['error', 'id']),
    'event': set(['event', 'data', 'timestamp']),
}


def check_line(line):
    """One received line as a message; raises Problem if it is not one."""
    try:
        text = line.decode('ascii')
    except UnicodeDecodeError:
        raise Problem('a line that is not ASCII')
    message = strict_json(text)
    if not isinstance(message, dict):
        raise Problem('a line that is not a JSON object')
    kinds = [kind for kind in ('return', 'error', 'event') if kind in message]
    if len(kinds) != 1:
        raise Problem('a message without exactly one of return, error and '
                      'event')
    if not set(message) <= MESSAGE_KEYS[kinds[0]]:
        raise Problem('a message with members {0}'.format(sorted(message)))
    if kinds[0] == 'error':
        error = message['error']
        if not (isinstance(error, dict) and
                set(error) == set(['class', 'desc']) and
                isinstance(error['desc'], type(u''))):
            raise Problem('an error that is not {class, desc}')
        if 'internal error' in error['desc'].lower():
            raise Problem('an "Internal error" reply')
    if kinds[0] == 'event':
        data = message['data']
        if message['event'] != 'negotiator-output' or not isinstance(
                data, dict):
            raise Problem('an event that is not negotiator-output')
        streams = set(data) & set(['out-data', 'err-data', 'out-bytes',
                                   'err-bytes'])
        if len(streams) != 1:
            raise Problem('an event without exactly one chunk')
    return message


def lenient_json(line):
    """What a line that failed check_line() says, as far as it can be read
    (the size of the raw chunk after an event line with an id of NaN, say),
    else {}."""
    try:
        message = json.loads(line.decode('utf-8', 'replace'))
    except (ValueError, RuntimeError):
        return {}
    return message if isinstance(message, dict) else {}


def raw_size(message):
    """The size of the raw chunk following an event line, else 0."""
    data = message.get('data')
    if 'event' in message and isinstance(data, dict):
        for member in ('out-bytes', 'err-bytes'):
            if isinstance(data.get(member), int):
                return data[member]
    return 0


class Reader(object):
    """Cuts what a connection receives into checked messages.

    0xFF bytes may precede a line (guest-sync-delimited); the raw bytes
    after an "out-bytes"/"err-bytes" event go to that event's ``raw``.
    """

    def __init__(self):
        self.buffer = b''
        self._raw_left = 0
        self._raw_event = None

    def feed(self, data):
        """The messages completed by ``data``, in order, with a Problem in
        the place of each line that is not one."""
        buf = self.buffer + data
        pos = 0
        messages = []
        while True:
            if self._raw_left:
                take = min(self._raw_left, len(buf) - pos)
                self._raw_event['raw'].append(buf[pos:pos + take])
                self._raw_left -= take
                pos += take
                if self._raw_left:
                    break
            while buf[pos:pos + 1] == b'\xff':
                pos += 1
            end = buf.find(b'\n', pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 1
            try:
                message = check_line(line)
            except Problem as e:
                messages.append(Problem('{0}: {1!r}'.format(e, line[:2000])))
                message = lenient_json(line)  # to go on after it
            else:
                messages.append(message)
            size = raw_size(message)
            if size:
                message['raw'] = []
                self._raw_event = message
                self._raw_left = size
        self.buffer = buf[pos:]
        return messages


def output_of(messages, stream='out'):
    """The bytes a command wrote on ``stream``, from its events."""
    chunks = []
    for message in messages:
        data = message.get('data', {})
        if stream + '-data' in data:
            chunks.append(base64.b64decode(data[stream + '-data']))
        elif stream + '-bytes' in data:
            chunks.extend(message['raw'])
    return b''.join(chunks)


# ---------------------------------------------------------------------------
# Driver: the processes, and the connections that feed them
# ---------------------------------------------------------------------------

def send_some(sock, data):
    """Bytes a non-blocking socket took: 0 when none now, None when the
    other side has gone."""
    try:
        return sock.send(data)
    except (socket.error, OSError) as e:
        if e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            return 0
        if e.args[0] in (errno.ECONNRESET, errno.EPIPE):
            return None
        raise


def receive_some(sock):
    """Bytes a non-blocking socket received: None when none now, b'' when
    the other side has gone."""
    try:
        return sock.recv(1 << 20)
    except (socket.error, OSError) as e:
        if e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            return None
        if e.args[0] in (errno.ECONNRESET, errno.EPIPE):
            return b''
        raise


def unread(sock):
    """Bytes sent on ``sock`` that the other side has not read yet."""
    return struct.unpack('i', fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                          b'\0\0\0\0'))[0]


def marker(index):
    return (b'{"execute":"guest-ping","id":"fuzz-marker-' + number(index) +
            b'"}\n')


class Pipeline(object):
    """Feeds cases to one connection, each followed by a marker request,
    with at most WINDOW_LINES lines and WINDOW_BYTES bytes unanswered; a
    case holding 0xFF waits until everything before it is answered.

    Replies come in order, so the replies before a marker's belong to its
    case: a bad one fails with that case.  feed() runs several at once.
    """

    def __init__(self, target, sock, cases):
        """:param cases: an iterable, made as they are needed, so that
        making them overlaps with the target's work."""
        self.target = target
        self.sock = sock
        sock.setblocking(False)
        self.reader = Reader()
        self.cases = iter(cases)
        self.queue = deque()
        #: (marker id, case) of the cases sent and not answered, in order.
        self.waiting = deque()
        self.lines = 0  # ... and their lines and bytes
        self.bytes = 0
        self.out = deque()
        self.out_offset = 0
        self.markers = 0
        self.last_progress = time.time()

    @property
    def done(self):
        return not (self.queue or self.waiting or self.more())

    def more(self):
        """Whether a case is queued, making the next one if need be."""
        if not self.queue and self.cases is not None:
            for case in self.cases:
                self.queue.append(case)
                break
            else:
                self.cases = None
        return bool(self.queue)

    def unanswered(self):
        return [case for _, case in self.waiting]

    def fill(self):
        """Send what the window lets through."""
        while self.more():
            case = self.queue[0]
            if self.waiting and (
                    case.resync or self.lines + case.lines >= WINDOW_LINES or
                    self.bytes + len(case.data) >= WINDOW_BYTES):
                return
            self.queue.popleft()
            self.markers += 1
            self.out.append(case.data + marker(self.markers))
            self.waiting.append(('fuzz-marker-{0}'.format(self.markers), case))
            self.lines += case.lines + 1
            self.bytes += len(case.data)

    def on_writable(self):
        sent = send_some(self.sock, memoryview(self.out[0])[self.out_offset:])
        if sent is None:
            self.target.fail('the connection closed', self.unanswered())
        self.out_offset += sent
        if self.out_offset == len(self.out[0]):
            self.out.popleft()
            self.out_offset = 0
        if sent:
            self.last_progress = time.time()

    def on_readable(self):
        data = receive_some(self.sock)
        if data == b'':
            self.target.fail('the connection closed', self.unanswered())
        if data:
            self.last_progress = time.time()
            self.take(data)

    def take(self, data):
        for message in self.reader.feed(data):
            if not self.waiting:
                self.target.fail('a reply after the last marker: {0}'.format(
                    message))
                continue
            name, case = self.waiting[0]
            if isinstance(message, Problem):
                self.target.fail(str(message), [case])
                continue
            request_id = message.get('id')
            if request_id == name and 'return' in message:
                self.waiting.popleft()
                self.lines -= case.lines + 1
                self.bytes -= len(case.data)
            elif (isinstance(request_id, type(u'')) and
                  request_id.startswith('fuzz-marker-')):
                self.target.fail('marker {0} answered while {1} waits: '
                                 '{2!r}'.format(request_id, name, message),
                                 [case])


def feed(target, pipelines):
    """Run ``pipelines`` until each has its cases answered."""
    poller = select.poll()
    by_fd = {}
    for pipeline in pipelines:
        by_fd[pipeline.sock.fileno()] = pipeline
        poller.register(pipeline.sock.fileno(), select.POLLIN)
    while by_fd:
        for fd, pipeline in list(by_fd.items()):
            pipeline.fill()
            if pipeline.done:
                poller.unregister(fd)
                del by_fd[fd]
            elif time.time() - pipeline.last_progress > HANG:
                target.fail('no reply within {0} s'.format(HANG),
                            pipeline.unanswered())
            else:
                poller.modify(fd, select.POLLIN |
                              (select.POLLOUT if pipeline.out else 0))
        for fd, event in poller.poll(1000) if by_fd else ():
            pipeline = by_fd[fd]
            if event & select.POLLOUT and pipeline.out:
                pipeline.on_writable()
            if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                pipeline.on_readable()


class Target(object):
    """A process under test: its start, its oracles, its failure messages.

    Subclasses give ``label``, ``start()``, ``fuzz_sockets()``,
    ``done_with(sockets)``, ``well_behaved()`` and ``after_batch(gen)``.
    """

    label = 'target'

    def __init__(self, workdir, test=None):
        self.workdir = workdir
        #: The test running, for the failure message.
        self.test = test
        #: The fuzzing batch running, None outside of fuzz().
        self.batch = None
        #: An oracle failed: the process may be in any state.
        self.failed = False
        self.process = None
        self.log_path = workdir.join(self.label + '.log')
        self._log_offset = 0
        self._log_rest = b''
        self.canary_marker = workdir.join('canary-ran')
        write_commands(workdir, self.canary_marker)

    # -- the process ---------------------------------------------------------

    def spawn(self, argv, preexec_fn=None):
        log_file = open(self.log_path, 'ab')
        devnull = open(os.devnull, 'rb')
        try:
            self.process = subprocess.Popen(
                [sys.executable, NEGOTIATOR] + argv, stdin=devnull,
                stdout=log_file, stderr=subprocess.STDOUT, close_fds=True,
                preexec_fn=preexec_fn)
        finally:
            log_file.close()
            devnull.close()

    @property
    def pid(self):
        return self.process.pid

    def settled(self):
        """After start-up and a first round of well-behaved calls (which
        opens what is opened once, like /dev/null): the baselines."""
        self.well_behaved()
        self.fds = self.fd_count()
        self.rss = self.memory('VmRSS')

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            deadline = time.time() + HANG
            while self.process.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    # -- failures ------------------------------------------------------------

    def fail(self, what, cases=()):
        """Raise Failure: what happened, the cases it may come from, the
        seed to replay, the log's end."""
        self.failed = True
        status = self.process.poll()
        lines = ['{0} on Python {1}: {2}'.format(self.label, PY, what)]
        if status is not None:
            lines.append('the {0} exited with status {1}'.format(
                self.label, status))
        cases = list(cases)
        if len(cases) == 1:
            lines.append('in reply to this {0!r}'.format(cases[0]))
        elif cases:
            lines.append('while these cases were unanswered (oldest first, '
                         '{0} in all):'.format(len(cases)))
            lines.extend('  ' + repr(case) for case in cases[:12])
        if self.batch is not None:
            lines.append('seed {0}, batch {1}; replay: NEGOTIATOR_FUZZ_SEED={0}'
                         ' NEGOTIATOR_FUZZ_CASES={2} python -m pytest '
                         'tests/test_fuzz.py -k {3}'.format(
                             SEED, self.batch, CASES, self.test))
        lines.append('end of the {0} log:'.format(self.label))
        lines.append(self.log_tail())
        raise Failure('\n'.join(lines))

    def log_tail(self, size=3000):
        with open(self.log_path, 'rb') as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode('utf-8', 'replace')

    # -- oracles -------------------------------------------------------------

    def memory(self, field):
        """A /proc/PID/status memory figure, in bytes."""
        with open('/proc/{0}/status'.format(self.pid)) as handle:
            for line in handle:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
        return 0

    def fd_count(self):
        return len(os.listdir('/proc/{0}/fd'.format(self.pid)))

    def cpu_ticks(self):
        """User and system CPU time used so far, in clock ticks."""
        with open('/proc/{0}/stat'.format(self.pid)) as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def children(self):
        path = '/proc/{0}/task/{0}/children'.format(self.pid)
        with open(path) as handle:
            return handle.read().split()

    def check_alive(self):
        if self.process.poll() is not None:
            self.fail('died')

    def check_memory(self, when):
        self.check_alive()
        for field in ('VmRSS', 'VmHWM'):
            size = self.memory(field)
            if size > self.rss + RSS_GROWTH:
                self.fail('{0} {1} is {2:.1f} MiB, more than {3:.1f} MiB '
                          'over the {4:.1f} MiB after start-up'.format(
                              when, field, size / 1048576.0,
                              RSS_GROWTH / 1048576.0, self.rss / 1048576.0))

    def check_log(self):
        """No traceback, no internal error, no forged line."""
        with open(self.log_path, 'rb') as handle:
            handle.seek(self._log_offset)
            data = self._log_rest + handle.read()
            self._log_offset = handle.tell()
        lines = data.split(b'\n')
        self._log_rest = lines.pop()
        for line in lines:
            if (not line.startswith(b'negotiator: ') or
                    b'internal error' in line or b'Traceback' in line):
                self.fail('a log line that is no line of its own, or tells '
                          'of an error: {0!r}'.format(line[:2000]))

    def check_settled(self):
        """Back to the descriptors of the start, with no command left
        running (waiting at most HANG seconds for it)."""
        deadline = time.time() + HANG
        while True:
            self.check_alive()
            fds = self.fd_count()
            children = self.children()
            if fds == self.fds and not children:
                return
            if time.time() > deadline:
                self.fail('{0} open descriptors ({1} after start-up) and '
                          'children {2} {3} s after the clients of the batch '
                          'have gone; descriptors: {4}'.format(
                              fds, self.fds, children, HANG,
                              self.describe_fds()))
            time.sleep(0.01)

    def describe_fds(self):
        found = []
        directory = '/proc/{0}/fd'.format(self.pid)
        for name in sorted(os.listdir(directory), key=int):
            try:
                found.append('{0}->{1}'.format(name, os.readlink(
                    os.path.join(directory, name))))
            except OSError:
                pass
        return ', '.join(found)

    def check_health(self):
        """The oracles that follow each batch."""
        self.check_alive()
        self.well_behaved()
        if os.path.exists(self.canary_marker):
            with open(self.canary_marker) as handle:
                self.fail('a canary ran: {0}'.format(handle.read().strip()))
        self.check_memory('after the batch,')
        self.check_settled()
        self.check_log()
        self.check_alive()

    # -- well-behaved calls --------------------------------------------------

    def well_behaved_calls(self, sock):
        """Exact answers on ``sock``: a resync, a ping, commands' output."""
        conn = Conversation(self, sock)
        sync_id = random.randint(1, 2 ** 63 - 1)
        conn.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":' +
                  number(sync_id) + b'}}\n')
        conn.expect_bytes(b'\xff{"return":' + number(sync_id) + b'}\n')
        conn.send(b'{"execute":"guest-ping","id":"wb-ping"}\n')
        conn.expect([], {'return': {}, 'id': 'wb-ping'})
        conn.send(b'{"execute":"negotiator-execute","arguments":{"command":'
                  b'"ok","args":["a b","\\u00fc","","-n","\\udcff"]},'
                  b'"id":"wb-ok"}\n')
        conn.expect_output(b'a b\n\xc3\xbc\n\n-n\n\xff\n', b'',
                           {'return': {'exitcode': 0}, 'id': 'wb-ok'})
        every_byte = bytes(bytearray(range(256)))
        conn.send(b'{"execute":"negotiator-execute","arguments":{"command":'
                  b'"cat","raw-output":true,"input-data":"' +
                  base64.b64encode(every_byte) + b'"},"id":7}\n')
        conn.expect_output(every_byte, b'',
                           {'return': {'exitcode': 0}, 'id': 7})
        return conn


class Conversation(object):
    """A well-behaved client's exchange, each answer read within HANG."""

    def __init__(self, target, sock, reader=None):
        self.target = target
        self.sock = sock
        self.reader = reader or Reader()
        self.queue = deque()
        sock.settimeout(HANG)

    def send(self, data):
        self.sock.sendall(data)

    def _receive(self, what):
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            data = None
        if not data:
            self.target.fail('a well-behaved client got {0} instead of {1}'
                             .format('nothing within {0} s'.format(HANG)
                                     if data is None else 'end of file',
                                     what))
        return data

    def expect_bytes(self, expected):
        while len(self.reader.buffer) < len(expected):
            self.reader.buffer += self._receive(repr(expected))
        got = self.reader.buffer[:len(expected)]
        self.reader.buffer = self.reader.buffer[len(expected):]
        if got != expected:
            self.target.fail('a well-behaved client got {0!r}, not {1!r}'
                             .format(got, expected))

    def next_message(self, what):
        while not self.queue:
            self.queue.extend(self.reader.feed(self._receive(what)))
        message = self.queue.popleft()
        if isinstance(message, Problem):
            self.target.fail('a well-behaved client got {0}'.format(message))
        return message

    def messages_until_reply(self, what):
        """Events up to a reply, and the reply."""
        messages = [self.next_message(what)]
        while 'event' in messages[-1]:
            messages.append(self.next_message(what))
        return messages

    def expect(self, events, reply):
        messages = self.messages_until_reply(repr(reply))
        if messages[-1] != reply or len(messages) != len(events) + 1:
            self.target.fail('a well-behaved client got {0!r}, not {1!r}'
                             .format(messages, reply))

    def expect_output(self, out, err, reply):
        messages = self.messages_until_reply(repr(reply))
        got = (output_of(messages[:-1]), output_of(messages[:-1], 'err'),
               messages[-1])
        if got != (out, err, reply):
            self.target.fail('a well-behaved client got {0!r}, not '
                             '{1!r}'.format(got, (out, err, reply)))

    def expect_end(self):
        """Half-close, then the end of file that tells the other side has
        closed its end too."""
        self.sock.shutdown(socket.SHUT_WR)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            self.target.fail('no end of file within {0} s after the '
                             'well-behaved client hung up'.format(HANG))
        if data:
            self.target.fail('a well-behaved client got {0!r} after it hung '
                             'up'.format(data[:2000]))


def write_commands(workdir, canary_marker):
    """The commands directory, and canaries where only a trick reaches.

    ``WORK/canary`` and ``WORK/commands/.canary`` and
    ``WORK/commands/sub/canary`` append their path to ``canary_marker``.
    """
    commands = workdir.commands
    make_command(commands, 'ok', "#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    make_command(commands, 'cat', '#!/bin/sh\nexec cat\n')
    make_command(commands, 'big',
                 '#!/bin/sh\nexec head -c 1048576 /dev/zero\n')
    make_command(commands, 'sleepy', '#!/bin/sh\nexec sleep 30\n')
    canary = '#!/bin/sh\necho "$0" >> {0}\n'.format(canary_marker)
    os.mkdir(os.path.join(commands, 'sub'))
    for directory, name in ((workdir.path, 'canary'), (commands, '.canary'),
                            (os.path.join(commands, 'sub'), 'canary')):
        make_command(directory, name, canary)


def limit_open_files():
    """The agent's limit of open files, low enough for a test to reach."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


class AgentTarget(Target):
    """``negotiator.py guest --listen SOCKET`` at its default log level, with
    at most FILE_LIMIT open files."""

    label = 'agent'

    def start(self):
        self.socket_path = self.workdir.join('agent.sock')
        self.spawn(['guest', '--listen', self.socket_path,
                    '--commands-dir', self.workdir.commands],
                   preexec_fn=limit_open_files)
        deadline = time.time() + HANG
        while not connectable(self.socket_path):
            if self.process.poll() is not None or time.time() > deadline:
                self.fail('did not start')
            time.sleep(0.01)
        self.settled()

    def connect(self):
        """A new client; while the agent's queue of clients is full (a
        UNIX socket's connect() says EAGAIN then), it tries again."""
        deadline = time.time() + HANG
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except (socket.error, OSError) as e:
                sock.close()
                if e.args[0] != errno.EAGAIN:
                    raise
                if time.time() > deadline:
                    self.fail('no room for a client within {0} s'.format(
                        HANG))
                time.sleep(0.01)
                continue
            sock.settimeout(HANG)
            return sock

    def fuzz_sockets(self):
        return [self.connect() for _ in range(CONNECTIONS)]

    def done_with(self, socks):
        for sock in socks:
            sock.close()

    def well_behaved(self):
        sock = self.connect()
        try:
            self.well_behaved_calls(sock).expect_end()
        finally:
            sock.close()

    def after_batch(self, gen):
        """Clients that hang up halfway; every fourth batch more clients
        than the agent may open files, every eighth one that never reads
        (test_agent_client_that_never_reads has one at the start)."""
        for _ in range(gen.rng.randint(1, 3)):
            hang_up_mid_request(self, gen, self.connect())
        hang_up_mid_reply(self, gen, self.connect())
        if self.batch % 4 == 0:
            many_clients(self)
        if self.batch % 8 == 7:
            never_reads(self, self.connect(), [b'x\n' * (FLOOD // 2)])


class StandIn(object):
    """A listening socket where a guest's QEMU would listen."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path + '.new')
        self.sock.listen(4)
        os.rename(path + '.new', path)

    def accept(self, target):
        ready, _, _ = select.select([self.sock], [], [], HANG)
        if not ready:
            target.fail('no connection to {0} within {1} s'.format(
                os.path.basename(self.path), HANG))
        return self.sock.accept()[0]

    def close(self):
        self.sock.close()


class DaemonTarget(Target):
    """``negotiator.py host --daemon -v`` serving stand-in guests: CONNECTIONS
    guests "fuzz0", "fuzz1"... fed the cases, and "good", well-behaved."""

    label = 'daemon'

    def start(self):
        self.guests = {}
        self.ends = {}
        argv = ['host', '--daemon', '-v', '--commands-dir',
                self.workdir.commands]
        self.names = ['fuzz{0}'.format(i) for i in range(CONNECTIONS)]
        for name in self.names + ['good']:
            self.guests[name] = StandIn(self.workdir.join(name + '.sock'))
            argv += ['--guest', '{0}={1}'.format(
                name, self.guests[name].path)]
        self.spawn(argv)
        for name in self.names + ['good']:
            self.ends[name] = self.guests[name].accept(self)
        self.good = self.ends['good']
        self.settled()

    def stop(self):
        Target.stop(self)
        for name in self.guests:
            self.ends[name].close()
            self.guests[name].close()

    def fuzz_sockets(self):
        return [self.ends[name] for name in self.names]

    def done_with(self, socks):
        pass

    def reconnect(self, name):
        """After a guest hung up: the daemon connects again (after 0.5 s)."""
        self.ends[name].close()
        self.ends[name] = self.guests[name].accept(self)

    def well_behaved(self):
        self.well_behaved_calls(self.good)

    def after_batch(self, gen):
        """Every fourth batch (the daemon waits 0.5 s before it connects
        again), a guest hangs up halfway through a request or a reply, or
        after requests whose replies it never reads."""
        if self.batch % 4:
            return
        name = gen.rng.choice(self.names)
        what = self.batch // 4 % 3
        if what == 0:
            hang_up_mid_request(self, gen, self.ends[name], close=False)
        elif what == 1:
            hang_up_mid_reply(self, gen, self.ends[name], close=False)
        else:
            self.never_reads(name)
        self.reconnect(name)

    def never_reads(self, name):
        """A guest that asks for 40 MiB of output and reads none of it
        (fewer than the 64 requests the daemon lets wait): the well-behaved
        guest is served all the same."""
        request = (b'{"execute":"negotiator-execute","arguments":'
                   b'{"command":"big"}}\n')
        never_reads(self, self.ends[name], [request] * 40, close=False)
        self.well_behaved()


def hang_up_mid_request(target, gen, sock, close=True):
    """A client that hangs up in the middle of a line, or while a command
    runs for it with requests waiting."""
    r = gen.rng
    if r.random() < 0.5:
        data = gen.case().data
        data = data[:r.randint(0, len(data) - 1)]
    else:
        data = (b'{"execute":"negotiator-execute","arguments":{"command":'
                b'"sleepy"}}\n{"execute":"guest-ping"}\n{"execute":"gu')
    try:
        sock.sendall(data)
    except (socket.error, OSError):
        pass  # it may have refused the start of it already
    if close:
        sock.close()


def hang_up_mid_reply(target, gen, sock, close=True):
    """A client that hangs up, or sends 0xFF, in the middle of a megabyte
    of output; after a 0xFF the stream must go on whole."""
    r = gen.rng
    raw = r.choice((b'true', b'false'))
    sock.settimeout(HANG)
    sock.sendall(b'{"execute":"negotiator-execute","arguments":{"command":'
                 b'"big","raw-output":' + raw + b'}}\n')
    reader = Reader()
    wanted = r.randint(1, 1 << 20)
    received = 0
    while received < wanted:
        try:
            data = sock.recv(wanted - received)
        except socket.timeout:
            data = None
        if not data:
            target.fail('{0} after {1} bytes of a command\'s output'.format(
                'nothing more within {0} s'.format(HANG) if data is None else
                'end of file', received))
        received += len(data)
        for message in reader.feed(data):
            if isinstance(message, Problem):
                target.fail(str(message))
    if r.random() < 0.5:
        sock.sendall(b'\xff{"execute":"guest-ping","id":"after-ff"}\n')
        conversation = Conversation(target, sock, reader)
        message = conversation.next_message('the reply after 0xFF')
        while message != {'return': {}, 'id': 'after-ff'}:
            if 'event' not in message and 'return' not in message:
                target.fail('got {0!r} after 0xFF'.format(message))
            message = conversation.next_message('the reply after 0xFF')
    if close:
        sock.close()


def never_reads(target, sock, pieces, close=True):
    """A client that sends ``pieces`` (bytes) and never reads: the process
    must stop taking them, or take them without growing (its memory is
    checked as they go).  It has stopped taking them when, for STALL
    seconds, it has read nothing more and used no CPU time."""
    sock.setblocking(False)
    pieces = deque(pieces)
    offset = 0
    sent = 0
    checked = 0
    when = 'with a client that never reads ({0} bytes sent),'

    def progress():
        return unread(sock), target.cpu_ticks() // 3

    while pieces:
        before = progress()
        _, writable, _ = select.select([], [sock], [], STALL)
        if not writable:
            if progress() == before:
                break
            continue
        taken = send_some(sock, memoryview(pieces[0])[offset:])
        if taken is None:
            break  # it hung up on us: another way to stop taking them
        sent += taken
        offset += taken
        if offset == len(pieces[0]):
            pieces.popleft()
            offset = 0
        if sent - checked >= 65536:
            checked = sent
            target.check_memory(when.format(sent))
    # Until it has taken all that was sent, or has stopped taking it.
    before = progress()
    quiet_since = time.time()
    while before[0] and time.time() - quiet_since < STALL:
        target.check_memory(when.format(sent))
        time.sleep(0.05)
        now = progress()
        if now != before:
            before = now
            quiet_since = time.time()
    target.check_memory(when.format(sent))
    if close:
        sock.close()


def many_clients(target, count=FILE_LIMIT + 64):
    """More clients at once than the agent may open files: it serves those
    it can and must not fall over for the others."""
    socks = []
    deadline = time.time() + HANG
    try:
        while len(socks) < count:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(target.socket_path)
            except (socket.error, OSError) as e:
                sock.close()
                if e.args[0] == errno.ECONNREFUSED:
                    target.fail('refused a client after {0} others'.format(
                        len(socks)))
                if e.args[0] != errno.EAGAIN:
                    raise
                # Its queue of clients is full: it has stopped accepting
                # at its limit of files, or has not caught up yet.
                if len(socks) >= FILE_LIMIT or time.time() > deadline:
                    break
                time.sleep(0.001)
                continue
            socks.append(sock)
        time.sleep(0.1)
        target.check_alive()
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def fuzz(target, seed_offset, daemon, figures):
    """Feed CASES cases to ``target`` in batches of BATCH, on CONNECTIONS
    connections at once, checking the oracles after each batch."""
    def generator(index):
        seed = (SEED * 16 + seed_offset) * 16 + index
        return Generator(random.Random(seed), daemon)
    gens = [generator(index) for index in range(CONNECTIONS)]
    side = generator(CONNECTIONS)
    started = time.time()
    done = 0
    target.batch = 0
    while done < CASES:
        size = min(BATCH, CASES - done)
        socks = target.fuzz_sockets()
        feed(target, [Pipeline(target, sock, (gen.case() for _ in range(
            (size + index) // CONNECTIONS)))
            for index, (sock, gen) in enumerate(zip(socks, gens))])
        target.done_with(socks)
        target.after_batch(side)
        target.check_health()
        done += size
        target.batch += 1
    took = time.time() - started
    figures('fuzz {0} on Python {1}: {2} cases in {3:.1f} s, {4:.0f} per '
            'second, peak memory {5:.1f} MiB over start-up, seed {6}'.format(
                target.label, PY, done, took, done / took,
                (target.memory('VmHWM') - target.rss) / 1048576.0, SEED))


def run_fuzz(target_class, test, seed_offset, daemon, figures):
    workdir = Workdir()
    target = target_class(workdir, test)
    try:
        target.start()
        fuzz(target, seed_offset, daemon, figures)
    finally:
        target.stop()
        workdir.cleanup()


def test_fuzz_agent(figures):
    run_fuzz(AgentTarget, 'test_fuzz_agent', 1, False, figures)


def test_fuzz_daemon(figures):
    run_fuzz(DaemonTarget, 'test_fuzz_daemon', 2, True, figures)


class Shared(object):
    """One target for many tests, started again after an oracle failed."""

    def __init__(self, target_class):
        self.target_class = target_class
        self.target = None
        self.workdir = None

    def get(self, test):
        if self.target is not None and (
                self.target.failed or self.target.process.poll() is not None):
            self.close()
        if self.target is None:
            self.workdir = Workdir()
            self.target = self.target_class(self.workdir)
            self.target.start()
        self.target.test = test
        return self.target

    def close(self):
        if self.target is not None:
            self.target.stop()
            self.workdir.cleanup()
            self.target = None


@pytest.fixture(scope='module')
def shared_agent():
    shared = Shared(AgentTarget)
    yield shared
    shared.close()


@pytest.fixture(scope='module')
def shared_daemon():
    shared = Shared(DaemonTarget)
    yield shared
    shared.close()


def ping_nested(depth, before=b''):
    return (before + b'{"execute":"guest-ping","id":' + b'[' * depth +
            b']' * depth + b'}\n')


#: Inputs that broke the agent or the daemon, each a list of cases: name ->
#: lines.  Each case is fed as the fuzzing feeds it, followed by its marker.
KNOWN = {
    # Replies that are not JSON.
    'id NaN': [b'{"execute":"guest-ping","id":NaN}\n'],
    'id 1e309': [b'{"execute":"guest-ping","id":1e309}\n'],
    'id -Infinity': [b'{"execute":"guest-ping","id":-Infinity}\n'],
    'sync id NaN': [
        b'{"execute":"guest-sync","arguments":{"id":1},"id":NaN}\n'],
    # Nesting near and past the recursion limit, decoded or encoded (up to
    # Python 3.11 the depth that breaks the encoder depends on the call's
    # depth: a request served once a command has ended is deeper; 3.12 and
    # 3.13 refuse to decode more than 1497 and 9998 levels).
    'ids nested 960 to 1000 deep': [ping_nested(depth)
                                    for depth in range(960, 1001)],
    'ids nested 960 to 1000 deep behind a command': [
        ping_nested(depth, b'{"execute":"negotiator-execute","arguments":'
                           b'{"command":"ok"}}\n')
        for depth in range(960, 1001, 2)],
    'nested 100000 deep': [b'[' * 100000 + b'\n'],
    # A million values looked at all at once (160 MiB on Python 3).
    'a million strings': [b'{"execute":"guest-ping","id":[' +
                          b'"x",' * 1000000 + b'1]}\n'],
    # NUL inside an argument.
    'NUL in an argument': [
        b'{"execute":"negotiator-execute","arguments":{"command":"ok",'
        b'"args":["a\\u0000b"]},"id":1}\n'],
    # Python 2: text that is not ASCII in an error message.
    'request name not ASCII': [b'{"execute":"\\u00e9","id":1}\n'],
    'member not ASCII': [b'{"\\u00e9":0,"id":1}\n'],
    'argument not ASCII': [
        b'{"execute":"guest-ping","arguments":{"\\u00e9":0},"id":1}\n'],
    # Python 2: an escaped byte (a lone surrogate) in a command name.
    'command name of an escaped byte': [
        b'{"execute":"negotiator-execute","arguments":{"command":"\\udcff"},'
        b'"id":1}\n'],
    'invalid command name with an escaped byte': [
        b'{"execute":"negotiator-execute","arguments":{"command":'
        b'"/\\udcff"},"id":1}\n'],
}


def feed_known(target, name):
    sock = (target.connect() if isinstance(target, AgentTarget) else
            target.fuzz_sockets()[0])
    feed(target, [Pipeline(target, sock, [Case(name, data)
                                          for data in KNOWN[name]])])
    target.done_with([sock])
    target.check_health()


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_agent_known_input(shared_agent, name):
    feed_known(shared_agent.get('test_agent_known_input'), name)


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_daemon_known_input(shared_daemon, name):
    feed_known(shared_daemon.get('test_daemon_known_input'), name)


def test_agent_client_that_never_reads(shared_agent):
    """Megabytes of short bad lines from a client that reads no reply."""
    agent = shared_agent.get('test_agent_client_that_never_reads')
    never_reads(agent, agent.connect(), [b'x\n' * (FLOOD // 2)])
    agent.check_health()


def test_agent_requests_waiting_behind_a_command(shared_agent):
    """60 requests of 4 MiB each (fewer than MAX_PENDING) waiting behind a
    command that runs."""
    agent = shared_agent.get('test_agent_requests_waiting_behind_a_command')
    line = b'{"execute":"guest-ping","id":"' + b'x' * (4 << 20) + b'"}\n'
    never_reads(agent, agent.connect(), [
        b'{"execute":"negotiator-execute","arguments":{"command":"sleepy"}}\n'
    ] + [line] * 60)
    agent.check_health()


def test_agent_more_clients_than_it_may_open_files(shared_agent):
    agent = shared_agent.get('test_agent_more_clients_than_it_may_open_files')
    many_clients(agent)
    agent.check_health()


def test_daemon_guest_that_never_reads(shared_daemon):
    daemon = shared_daemon.get('test_daemon_guest_that_never_reads')
    name = daemon.names[0]
    daemon.never_reads(name)
    daemon.reconnect(name)
    daemon.check_health()
