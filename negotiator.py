#!/usr/bin/env python
"""negotiator: a scriptable KVM/QEMU guest agent in one file.

Copy this file onto a guest and run it; nothing outside the standard library
is needed, on Python 2.6, 2.7 and 3.x.

Inside the guest, ``python negotiator.py guest`` serves the virtio-serial port
``negotiator-host-to-guest.0``: it answers the QEMU guest agent protocol
(``guest-sync``, ``guest-ping``, ``guest-info``, ...) and runs the executables
found in ``/usr/lib/negotiator/commands``.

On the host, ``python negotiator.py host SOCKET COMMAND [ARG...]`` runs COMMAND
in the guest through the UNIX socket QEMU exposes for that port: the command's
output arrives on stdout and stderr as it is produced and its exit status
becomes this command's exit status.

The wire protocol is qemu-ga's: one JSON object per line, ``execute`` requests,
``return``/``error`` replies, 0xFF resynchronisation.  negotiator adds its own
``negotiator-*`` commands and streams command output as ``event`` lines.
README.txt documents it in full.
"""

__version__ = '1.1.0'

import binascii
import codecs
import errno
import fcntl
import grp
import json
import os
import pwd
import re
import select
import signal
import stat
import struct
import sys
import time


# ============================================================================
# Compatibility: the few names that differ between Python 2 and 3
# ============================================================================

try:
    import six
except ImportError:
    six = None

if six is not None:
    PY3 = six.PY3
    string_types = six.string_types
    integer_types = six.integer_types
elif sys.version_info[0] >= 3:
    PY3 = True
    string_types = (str,)
    integer_types = (int,)
else:
    PY3 = False
    string_types = (basestring,)  # novm (Python 2 only)
    integer_types = (int, long)  # novm (Python 2 only)

#: A clock that never jumps, where the interpreter has one (3.3+).
#: A clock that only goes forward whatever is done to the wall clock
#: (guest-set-time, NTP): timers and timeouts run on it.  Python 2 has
#: none: times(2)'s clock ticks since boot stand in (10 ms ones).
monotonic = getattr(time, 'monotonic', lambda: os.times()[4])
#: The finest clock for a short measure (a round trip, a command's run):
#: on Python 2 the wall clock, whose jump would spoil only that figure.
stopwatch = getattr(time, 'monotonic', time.time)
#: fcntl's F_SETPIPE_SZ (Linux 2.6.35+), which Python names from 3.10 on.
F_SETPIPE_SZ = getattr(fcntl, 'F_SETPIPE_SZ', 1031)

# Command names and arguments are bytes to the operating system and text on
# the wire.  The wire carries them as UTF-8 text in which each byte that is
# not UTF-8 stands as a lone surrogate U+DC80..U+DCFF, Python 3's
# "surrogateescape", so that any argument arrives byte for byte.

if PY3:
    #: Popen arguments for a command: every descriptor but stdin, stdout
    #: and stderr closed, and a session (and process group) of its own, so
    #: that a whole command tree can be killed at once.
    CHILD_OPTIONS = {'close_fds': True, 'start_new_session': True}

    def u(text):
        """A text literal: a message that embeds a peer's text must be
        text on Python 2 too, or formatting it fails on non-ASCII."""
        return text

    def wire_text(arg):
        """A command-line argument, a path or a name of this machine
        (bytes or str) as wire text."""
        return os.fsencode(arg).decode('utf-8', 'surrogateescape')  # novm

    def wire_bytes(text):
        """The bytes that wire text stands for."""
        return text.encode('utf-8', 'surrogateescape')

    def native_str(text):
        """Wire text as this Python's str."""
        return text

    def bytes_from(data, start):
        """The bytes of ``data`` from ``start`` on, without copying them:
        what is left to write after a partial write (one write() on a port
        takes at most 32 KiB of a line that may hold megabytes)."""
        return memoryview(data)[start:]  # novm

    def decode_utf8(data):
        """Strict UTF-8: a surrogate's bytes (ED A0..ED BF) are refused."""
        return data.decode('utf-8')

    def local_bytes(path):
        """A path of this machine (an option's value) as bytes."""
        return os.fsencode(path)  # novm

    def base64_line(data):
        """Base64 of ``data``, without the newline (nor a copy to drop it)."""
        return binascii.b2a_base64(data, newline=False)  # novm

    def output_text(data):
        """A child's output as this Python's str, names byte for byte."""
        return data.decode('utf-8', 'surrogateescape')  # novm

    def local_timezone():
        """The local time zone's abbreviation, and its offset east of UTC
        in seconds, now."""
        now = time.localtime()
        return now.tm_zone, now.tm_gmtoff
else:
    def _start_child():
        """In a command's child, before exec: a session of its own, and
        SIGPIPE and SIGXFSZ back to their defaults from Python's SIG_IGN,
        which exec would keep (Python 3's Popen restores them itself)."""
        os.setsid()
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)

    #: Python 2's close_fds=True closes every number up to the limit of
    #: open files (milliseconds per command where the limit is high), and
    #: closing only the open ones in the forked child, in Python, cost an
    #: execute about 9 ms in an emulated guest.  So Process marks them all
    #: close-on-exec beforehand (cloexec_all(), the one place Python 2's
    #: descriptors get the flag) and the child only starts its session.
    CHILD_OPTIONS = {'close_fds': False, 'preexec_fn': _start_child}

    def u(text):
        return text.decode('ascii')

    def _escape_undecodable(error):
        undecodable = error.object[error.start:error.end]
        return (''.join('\\udc%02x' % ord(b) for b in undecodable)
                .decode('unicode_escape'), error.end)
    codecs.register_error('negotiator-surrogateescape', _escape_undecodable)

    #: A lone surrogate U+DC80..U+DCFF as Python 2's UTF-8 encoder writes it.
    _ESCAPED_BYTE = re.compile(b'\xed[\xb2\xb3][\x80-\xbf]')
    #: Any other surrogate, which Python 3's encoder refuses.
    _OTHER_SURROGATE = re.compile(b'\xed[\xa0-\xb1\xb4-\xbf]')
    #: Python 2's UTF-8 decoder takes a surrogate's bytes; Python 3's not.
    _SURROGATE = re.compile(b'\xed[\xa0-\xbf]')

    def _unescape_byte(match):
        low, high = ord(match.group()[1]), ord(match.group()[2])
        return chr(((low & 0x3f) << 6 | (high & 0x3f)) - 0xc00)

    def wire_text(arg):
        if not isinstance(arg, bytes):
            return arg
        return arg.decode('utf-8', 'negotiator-surrogateescape')

    def wire_bytes(text):
        if isinstance(text, bytes):
            return text
        data = text.encode('utf-8')
        if b'\xed' not in data:
            return data
        if _OTHER_SURROGATE.search(data):
            raise UnicodeEncodeError('utf-8', text, 0, 1, 'a surrogate')
        return _ESCAPED_BYTE.sub(_unescape_byte, data)

    native_str = local_bytes = wire_bytes

    def bytes_from(data, start):
        return buffer(data, start)  # novm

    def decode_utf8(data):
        if b'\xed' in data and _SURROGATE.search(data):
            raise UnicodeDecodeError('utf-8', data, 0, 1, 'a surrogate')
        return data.decode('utf-8')

    def base64_line(data):
        return binascii.b2a_base64(data)[:-1]

    def output_text(data):
        return data

    def local_timezone():
        dst = time.localtime().tm_isdst > 0
        return time.tzname[dst], -(time.altzone if dst else time.timezone)


# ============================================================================
# Constants
# ============================================================================

class Pattern(object):
    """A regular expression compiled when first used: a path that never
    uses it does not pay for it (compiling them all at start-up costs a
    millisecond, many more in an emulated guest)."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.compiled = None

    def __getattr__(self, name):  # match, sub, ...
        if self.compiled is None:
            self.compiled = re.compile(self.pattern)
        return getattr(self.compiled, name)


#: The virtio-serial port on which the host asks and the guest answers.
HOST_TO_GUEST_PORT = 'negotiator-host-to-guest.0'
#: The port on which the guest asks and the host answers.
GUEST_TO_HOST_PORT = 'negotiator-guest-to-host.0'
#: The name the earliest python-negotiator release used for host-to-guest.
LEGACY_PORT = 'negotiator-channel.0'
#: The ports negotiator serves or calls through, as channel target names.
OUR_PORTS = (HOST_TO_GUEST_PORT, GUEST_TO_HOST_PORT, LEGACY_PORT)
#: Where the guest looks for its port when nothing else is found.
FALLBACK_DEVICE = '/dev/vport0p1'
#: Where libvirt puts the UNIX sockets of its guests' channels.
DEFAULT_CHANNEL_DIR = '/var/lib/libvirt/qemu/channel/target'
#: Executables in this directory are the commands the other side may run.
DEFAULT_COMMANDS_DIR = '/usr/lib/negotiator/commands'
#: Requests the agent refuses unless --allow-rpcs or --block-rpcs say
#: otherwise, as qemu-ga is shipped by RHEL and CentOS (their sysconfig
#: block list): these run any program, or read and write any file, as root.
DEFAULT_BLOCKED_RPCS = ('guest-file-open', 'guest-file-close',
                        'guest-file-read', 'guest-file-write',
                        'guest-file-seek', 'guest-file-flush', 'guest-exec',
                        'guest-exec-status')
#: Seconds the host client waits for a whole call by default (0 = forever).
DEFAULT_TIMEOUT = 10.0
#: The longest timeout accepted, in seconds (about 31 years).
MAX_TIMEOUT = 1e9
#: The longest single wait in poll(), in seconds: a later deadline is
#: reached by waiting again (poll's millisecond count is a C int).
MAX_POLL_WAIT = 3600.0

#: Longest request or reply line accepted.  Standard input travels inside a
#: request, base64-encoded, so it may be up to three quarters of this.
MAX_LINE = 16 * 1024 * 1024
#: Largest standard input the host client forwards.
MAX_STDIN = MAX_LINE // 4 * 3 - 64 * 1024
#: Requests read and waiting behind a running command beyond which no
#: more are read from that peer until they are answered (and no more than
#: MAX_LINE bytes of them).
MAX_WAITING = 64
#: Longest number a message may hold, in characters: Python's int() of a
#: digit string takes time that grows with the square of its length.
MAX_NUMBER = 100
#: Most levels a message may nest and most values it may hold (counted as
#: its commas and containers): decoding recurses at every level, and makes
#: a Python object of up to some 300 bytes of each value.
MAX_DEPTH = 64
MAX_VALUES = 65536
#: Longest JSON text of a request's ``id``, which every reply repeats.
MAX_ID_SIZE = 1024
#: Bytes read from a pipe or a socket at once.
READ_SIZE = 65536
#: Bytes of each output stream kept of a program that guest-exec started
#: (qemu-ga's GUEST_EXEC_MAX_OUTPUT); what follows is read and dropped.
MAX_CAPTURE = 16 * 1024 * 1024
#: Bytes of each stream negotiator-execute's capture-output keeps: its
#: reply (base64: four thirds) stays under the 10 MiB libvirt takes from
#: an agent (past that, libvirt drops the agent of that guest).
MAX_REPLY_CAPTURE = 3 * 1024 * 1024
#: Programs that guest-exec started and the agent keeps, running or with
#: their end not fetched yet by guest-exec-status; beyond, the oldest
#: ended one is forgotten, or guest-exec refused while all run (qemu-ga
#: keeps any number).  Each holds up to 2 * MAX_CAPTURE bytes of output.
MAX_EXECS = 16
#: Files guest-file-open keeps open at once; it is refused beyond (qemu-ga
#: keeps any number, up to its descriptor limit).
MAX_FILES = 64
#: Children killed (timed out, or their client gone) that have not ended:
#: stuck in the kernel, as on a hung NFS server, each holding a process
#: and its memory.  While as many are stuck, no request starts another.
MAX_STUCK = 16
#: The first handle guest-file-open gives; each open gives the next.
#: qemu-ga counts from there too (and keeps its count across restarts).
FIRST_FILE_HANDLE = 1000
#: Bytes guest-file-read reads by default, and at most (qemu-ga's
#: QGA_READ_COUNT_DEFAULT and GUEST_FILE_READ_COUNT_MAX).
DEFAULT_READ_COUNT = 4096
MAX_READ_COUNT = 48 * 1024 * 1024
#: A command's output pipe that fills up is enlarged to this (Linux's limit
#: for users), and reads from it grow up to it while they come back full:
#: a command that writes a lot costs fewer wake-ups per megabyte, and one
#: that writes little costs no call to enlarge its pipes.
PIPE_SIZE = 1024 * 1024
#: One read() on a virtio-serial port returns at most this many bytes.
PORT_READ = 4096
#: While more than this waits to be sent to a peer, neither its requests
#: nor its command's output are read (passed by at most one read of each),
#: until it has read all.
HIGH_WATER = 1024 * 1024
#: Seconds between checks whether a host connected to an idle port, in case
#: the kernel sends no SIGIO; SIGIO normally wakes the agent at once.
RECONNECT_CHECK = 1.0
#: Seconds between attempts to open a port that is missing or busy.
OPEN_RETRY = 1.0
#: Seconds a --listen agent out of descriptors leaves new clients waiting.
ACCEPT_PAUSE = 1.0
#: Seconds between repeated log lines about a port that stays unavailable.
OPEN_LOG_EVERY = 60.0
#: Seconds between tries for a port, lock or socket that others hold.
LOCK_RETRY = 0.02
#: Seconds between the host daemon's looks for guests that came or went.
DEFAULT_RESCAN = 10.0
#: Seconds the host daemon waits before connecting again to a guest whose
#: socket closed or refused; doubled after each failure up to the maximum.
#: A restarted QEMU listens at once, long before its guest has booted, but
#: a guest may call the host as soon as it is up (a caller waits for the
#: daemon only within its own timeout): the daemon must be back within a
#: small part of that, however long QEMU was down.  A refused connect()
#: costs microseconds, so the wait does not grow past a second.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 1.0
#: Seconds between a guest caller's looks whether the host daemon has
#: connected to the port (a port without a host says so at once, in poll()).
DAEMON_CHECK = 0.1
#: Seconds a guest that flooded the host daemon or sent it garbage stays
#: cut off.
CUT_OFF_PAUSE = 30.0
#: Failed requests (malformed, unknown, refused) in a row after which a
#: guest is cut off.
GARBAGE_LIMIT = 16
#: Seconds a virsh call may take before it is killed.
VIRSH_TIMEOUT = 30.0
#: The virsh command that follows libvirt's lifecycle events for the host
#: daemon: a line for each domain started, stopped, ...
VIRSH_EVENTS = 'event --loop --event lifecycle'
#: Seconds --list-guests waits for each guest's agent to answer.
PROBE_TIMEOUT = 2.0
#: Guests host --all calls at once by default, and at most (each call is
#: a process with three pipes).
DEFAULT_PARALLEL = 16
MAX_PARALLEL = 256
#: Seconds past its --timeout after which host --all kills a guest's call
#: (which gives up by itself 2 s past it).
CALL_GRACE = 5.0

#: Where the guest agent looks for the tools some qemu-ga requests run
#: (chpasswd, shutdown, hwclock), whatever PATH it was started with (an
#: init script's may lack the sbin directories).  The environment variable
#: NEGOTIATOR_TOOL_PATH replaces it (tests put stand-in tools there).
TOOL_PATH = os.environ.get(
    'NEGOTIATOR_TOOL_PATH',
    '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
#: Seconds such a tool, or guest-fstrim's FITRIM of every filesystem (a
#: big slow disk takes minutes), may run before it is killed.
TOOL_TIMEOUT = 600.0
#: Bytes kept of a tool's stdout and of its stderr: its error message, or
#: guest-fstrim's result for thousands of mounts.
TOOL_OUTPUT = 1024 * 1024

#: Where syslog listens (--syslog).
SYSLOG_SOCKET = '/dev/log'

#: Exit statuses of the host client besides the remote command's own.
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
#: The reader of our output went away (what SIGPIPE's death would give).
EXIT_READER_GONE = 128 + signal.SIGPIPE
#: The output could not be written here (a full disk, an I/O error).
EXIT_OUTPUT = 253
EXIT_PROTOCOL = 254
EXIT_CONNECT = 255

#: The byte that makes the reader of a stream drop its partial input.
RESYNC_BYTE = b'\xff'

#: Debian release codenames by major version, for guests whose
#: /etc/debian_version holds only a number.
DEBIAN_CODENAMES = {
    '4': 'etch', '5': 'lenny', '6': 'squeeze', '7': 'wheezy', '8': 'jessie',
    '9': 'stretch', '10': 'buster', '11': 'bullseye', '12': 'bookworm',
    '13': 'trixie', '14': 'forky',
}

#: Filesystem types the disk-usage command skips: pseudo filesystems, and
#: network and cluster filesystems, whose statvfs() can hang on a dead
#: server (so can a FUSE daemon's: types starting "fuse" are skipped too).
SKIPPED_FILESYSTEMS = frozenset(name.encode('ascii') for name in [
    'afs', 'autofs', 'beegfs', 'binfmt_misc', 'bpf', 'ceph', 'cgroup',
    'cgroup2', 'cifs', 'coda', 'configfs', 'davfs', 'debugfs', 'devpts',
    'devtmpfs', 'efivarfs', 'gfs2', 'glusterfs', 'gpfs', 'hugetlbfs',
    'lustre', 'mqueue', 'ncpfs', 'nfs', 'nfs4', 'nsfs', 'ocfs2', 'proc',
    'pstore', 'rpc_pipefs', 'securityfs', 'selinuxfs', 'smb3', 'smbfs',
    'sysfs', 'tracefs', 'virtiofs', '9p'])

#: The login records guest-get-users reads (glibc's _PATH_UTMP).
UTMP_PATH = '/var/run/utmp'
#: One utmp record as glibc lays it out on x86_64 and i386 alike (384
#: bytes, its login time in 32-bit seconds and microseconds): the type,
#: the user name and the login time; the rest is skipped.
UTMP_RECORD = struct.Struct('=h42x32s264xii36x')
#: The type of a utmp record of a logged-in user (<utmp.h>).
USER_PROCESS = 7
#: Where Linux lists the processors: cpuN/online holds 1 or 0, where the
#: processor can be taken offline.
SYS_CPU = '/sys/devices/system/cpu'
#: A processor's directory in SYS_CPU, as qemu-ga's sscanf("cpu%ld") takes it.
CPU_DIRECTORY = Pattern(r'cpu([+-]?[0-9]+)')
#: What guest-get-fsinfo and guest-get-disks read: the mounts, sysfs, and
#: udev's database (where qemu-ga's libudev finds serial numbers and
#: device-mapper names).
MOUNTINFO_PATH = '/proc/self/mountinfo'
SYS = '/sys'
UDEV_DATA = '/run/udev/data'
#: The PCI drivers of the disk controllers qemu-ga describes.
DISK_DRIVERS = ('ata_piix', 'sym53c8xx', 'virtio-pci', 'ahci', 'nvme')
#: A PCI address in a sysfs path (domain:bus:slot.function, hexadecimal).
PCI_ADDRESS = Pattern(
    r'/([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)')
#: A SCSI target's path in sysfs: targetH:C:T/H:C:T:L, for C, T and L.
SCSI_TARGET = Pattern(r'/target[0-9]+:[0-9]+:[0-9]+/[0-9]+:([0-9]+):'
                      r'([0-9]+):([0-9]+)')
#: What follows a disk's name in its partitions' (sda1, nvme0n1p1).
PARTITION = Pattern('p?[0-9]')
#: Seconds guest-get-fsinfo, guest-set-vcpus and guest-ssh-* may take in
#: their child (Server._answer_from_child): then it is abandoned and the
#: request answered with an error (libvirt gives up after 5 seconds).
CHILD_ANSWER_TIMEOUT = 10.0


# ============================================================================
# Log: the logging module, imported when there is something to write
# ============================================================================

#: Log levels, numbered as the logging module numbers them.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class Log(object):
    """negotiator's log: the logging module's 'negotiator' logger, with the
    module imported when the first message is to be written.

    The logging module, and the traceback module it imports, take 7-16 ms
    of a short call's start-up; a host call that logs nothing never needs
    them.  Until setup() gives a level (negotiator imported as a module),
    the logger's own level decides.
    """

    def __init__(self):
        self.level = None
        self._logger = None
        self._use_syslog = False
        #: True from setup() until the handler is added.
        self._handler_pending = False

    def setup(self, level, use_syslog, now):
        """Log at ``level`` and up; add the handler ``now``, or with the
        first message."""
        self.level = level
        self._use_syslog = use_syslog
        self._handler_pending = True
        if now:
            self.logger()

    def logger(self):
        if self._logger is None:
            import logging
            self._logger = logging.getLogger('negotiator')
        if self._handler_pending:
            self._handler_pending = False
            add_log_handler(self._logger, self.level, self._use_syslog)
        return self._logger

    def isEnabledFor(self, level):
        if self.level is None:
            return self.logger().isEnabledFor(level)
        return level >= self.level

    def log(self, level, message, *args, **kwargs):
        if self.isEnabledFor(level):
            self.logger().log(level, message, *args, **kwargs)

    def debug(self, message, *args, **kwargs):
        # Called for every request: the level is looked at here, at once.
        if self.level is None or self.level <= DEBUG:
            self.logger().log(DEBUG, message, *args, **kwargs)

    def info(self, message, *args, **kwargs):
        self.log(INFO, message, *args, **kwargs)

    def warning(self, message, *args, **kwargs):
        self.log(WARNING, message, *args, **kwargs)

    def error(self, message, *args, **kwargs):
        self.log(ERROR, message, *args, **kwargs)


log = Log()


# ============================================================================
# Errors
# ============================================================================

class NegotiatorError(Exception):
    """Base of the errors this module raises on purpose.

    ``status`` is the exit status the command-line interface ends with.
    """
    status = 1

    @property
    def text(self):
        """The message, as given (str() of a Python 2 exception fails on
        a non-ASCII one)."""
        return self.args[0] if self.args else ''


class UsageError(NegotiatorError):
    """The command line asks for something that cannot be done."""
    status = EXIT_USAGE


class ConnectError(NegotiatorError):
    """The other side cannot be reached."""
    status = EXIT_CONNECT


class ProtocolError(NegotiatorError):
    """The other side said something this side cannot accept."""
    status = EXIT_PROTOCOL


class OutputError(NegotiatorError):
    """This side's stdout or stderr does not take the output."""
    status = EXIT_OUTPUT


class ReaderGone(OutputError):
    """The reader of this side's output has gone (EPIPE: ``| head``): the
    call ends, quietly, as a command that SIGPIPE killed."""
    status = EXIT_READER_GONE


class CallTimeout(NegotiatorError):
    """A call did not finish within its time limit."""
    status = EXIT_TIMEOUT


#: Error classes of negotiator-execute and the exit statuses they map to.
ERROR_STATUSES = {
    'NegotiatorCommandNotFound': EXIT_NOT_FOUND,
    'NegotiatorCommandNotExecutable': EXIT_NOT_EXECUTABLE,
}


class RemoteError(NegotiatorError):
    """The agent answered a request with an error reply.

    :param error_class: the reply's ``class``, e.g. ``CommandNotFound``.
    :param desc: the reply's human-readable ``desc``.
    """

    def __init__(self, error_class, desc):
        NegotiatorError.__init__(self, desc)
        self.error_class = error_class
        self.desc = desc
        self.status = ERROR_STATUSES.get(error_class, EXIT_PROTOCOL)


class RequestError(Exception):
    """A request the agent refuses; becomes an ``error`` reply.

    :param desc: what was wrong, in qemu-ga's wording where it has one.
    :param error_class: the reply's error class.
    """

    def __init__(self, desc, error_class='GenericError'):
        Exception.__init__(self, desc)
        self.desc = desc
        self.error_class = error_class


# ============================================================================
# Wire protocol: newline-delimited JSON, as qemu-ga speaks it
# ============================================================================

#: Compact, ASCII-only JSON; made once, as json.dumps() with separators
#: would make one per message.  NaN and infinities are not JSON: never
#: sent (and never received, see below).
JSON_ENCODER = json.JSONEncoder(separators=(',', ':'), allow_nan=False)


#: What float() makes of a JSON number too big for it (1e309).
INFINITY = float('inf')


def parse_number(text, kind=int):
    """A JSON number: MAX_NUMBER characters at most (Python's int() of a
    digit string takes time that grows with the square of its length),
    and finite."""
    if len(text) > MAX_NUMBER:
        raise ValueError('a number longer than {0} characters'.format(
            MAX_NUMBER))
    value = kind(text)
    if value in (INFINITY, -INFINITY):
        raise ValueError('a number out of range')
    return value


def refuse_constant(name):
    """NaN and Infinity, which Python's json takes, are not JSON."""
    raise ValueError('{0} is not JSON'.format(name))


#: The decoder json.loads() would use, without its checks of the argument,
#: and with bounded numbers.
JSON_DECODER = json.JSONDecoder(
    parse_int=parse_number, parse_float=lambda text: parse_number(text, float),
    parse_constant=refuse_constant)


def encode_message(message):
    """Return ``message`` as one wire line: ASCII-only JSON ending in ``\\n``."""
    line = JSON_ENCODER.encode(message)
    if not isinstance(line, bytes):
        line = line.encode('ascii')
    return line + b'\n'


#: Every byte but quotes, commas, brackets and braces: what check_shape()
#: takes out before it looks.
NOT_STRUCTURE = bytes(bytearray(code for code in range(256)
                                if code not in bytearray(b'",[]{}')))
#: How much of a line check_shape() splits at quotes at a time (a line of
#: many short strings, split whole, took 40 bytes per string on Python 3).
SHAPE_CHUNK = 64 * 1024
#: An opening bracket's and brace's codes.
OPENING = tuple(bytearray(b'[{'))


def decode_message(line):
    """Parse one received line into a dict.

    :raises RequestError: for anything but a UTF-8 JSON object, and for
        one that check_shape() refuses.
    """
    check_shape(line)
    try:
        message = JSON_DECODER.decode(decode_utf8(line))
    except UnicodeDecodeError:
        raise RequestError('Invalid JSON syntax: the line is not valid UTF-8')
    except ValueError as e:
        raise RequestError('Invalid JSON syntax: {0}'.format(e))
    if not isinstance(message, dict):
        raise RequestError('QMP input must be a JSON object')
    return message


def check_shape(line):
    """Refuse a line, before decoding it, that nests deeper than MAX_DEPTH
    or holds more than MAX_VALUES values (which a usual request is far
    from: it is looked at closer only when the line holds more commas,
    brackets and braces than MAX_DEPTH, strings included).

    :raises RequestError: naming the limit.
    """
    if line.count(b',') + line.count(b'[') + line.count(b'{') <= MAX_DEPTH:
        return
    if b'\\' in line:  # escapes go first: an escaped quote ends no string
        line = line.replace(b'\\\\', b'').replace(b'\\"', b'')
    line = line.translate(None, NOT_STRUCTURE)
    commas = halves = in_string = 0
    brackets = []
    for start in range(0, len(line), SHAPE_CHUNK):
        parts = line[start:start + SHAPE_CHUNK].split(b'"')
        outside = b''.join(parts[in_string::2])
        in_string ^= (len(parts) - 1) & 1
        brackets.append(outside.translate(None, b','))
        commas += len(outside) - len(brackets[-1])
        halves += len(brackets[-1])
        if commas + halves // 2 > MAX_VALUES:
            raise RequestError('A message may hold {0} values at most'
                               .format(MAX_VALUES))
    depth = 0
    for code in bytearray(b''.join(brackets)):
        depth += 1 if code in OPENING else -1
        if depth > MAX_DEPTH:
            raise RequestError('A message may nest {0} levels deep at '
                               'most'.format(MAX_DEPTH))


def check_id(request_id):
    """Refuse an id that every reply would repeat at some cost.

    :raises RequestError: for an id longer than MAX_ID_SIZE as JSON (the
        error reply carries no id).
    """
    if isinstance(request_id, string_types):
        if len(request_id) * 6 + 2 <= MAX_ID_SIZE:  # "\\uXXXX" at most
            return
    elif not isinstance(request_id, (list, dict)):
        return
    if len(JSON_ENCODER.encode(request_id)) > MAX_ID_SIZE:
        raise RequestError("The member 'id' is longer than {0} bytes as "
                           'JSON'.format(MAX_ID_SIZE))


def shown(text):
    """A peer's name as an error reply shows it: 100 characters at most,
    so that a reply never outgrows the request that caused it."""
    return text if len(text) <= 100 else text[:100] + '...'


#: What printable() shows escaped.
CONTROL_CHARACTERS = Pattern('[\x00-\x1f\x7f]')


def printable(text):
    """``text`` for a log line: a peer's control characters (a newline
    would start a forged log line) shown escaped."""
    return CONTROL_CHARACTERS.sub(lambda m: repr(str(m.group()))[1:-1],
                                  text)


#: What base64 text may hold (a2b_base64 alone skips stray characters).
BASE64_TEXT = Pattern(r'\A[A-Za-z0-9+/]*={0,2}\Z')


def encode_bytes(data):
    """Bytes as the base64 text qemu-ga uses for ``input-data``/``out-data``."""
    return base64_line(data).decode('ascii')


def decode_bytes(text, name):
    """The bytes a base64 member carries.

    :param name: the member's name, for the error message.
    :raises RequestError: when ``text`` is not base64.
    """
    if not isinstance(text, string_types):
        raise RequestError(
            "Invalid parameter type for '{0}', expected: string".format(name))
    if len(text) % 4 or not BASE64_TEXT.match(text):
        raise RequestError("Parameter '{0}' is not valid base64".format(name))
    return binascii.a2b_base64(text.encode('ascii'))


#: What qemu-ga takes as base64 at all: glib decodes any string of these,
#: skipping newlines (line-wrapped base64 has them: Perl's, Proxmox's).
BASE64_CHARACTERS = Pattern(r'\A[A-Za-z0-9+/=\n]*\Z')
#: The quotes around a path in qemu-ga's (GLib's) messages.
OPENING_QUOTE = b'\xe2\x80\x9c'.decode('utf-8')
CLOSING_QUOTE = b'\xe2\x80\x9d'.decode('utf-8')


def decode_qga_bytes(text, name):
    """decode_bytes() of a qemu-ga request's member, read as qemu-ga reads
    it: newlines skipped, and qemu-ga's error for a character that base64
    has not.  A wrong length or padding, which glib decodes into bytes
    nobody meant, is refused as not base64."""
    if not BASE64_CHARACTERS.match(text):
        raise RequestError('Base64 data contains invalid characters')
    return decode_bytes(text.replace('\n', ''), name)


#: The request id of a request that had none ("id": null is an id).
NO_ID = object()


#: The end of a negotiator-output event line, after the chunk's member.
EVENT_END = b'},"timestamp":{"seconds":%d,"microseconds":%d}}\n'
#: The members of a raw chunk's size, by the stream's base64 member.
RAW_MEMBERS = {'out-data': 'out-bytes', 'err-data': 'err-bytes'}


class OutputEvents(object):
    """Makes the events that carry one request's command output.

    An event is QMP-style, tied to the request by ``data.id``::

        {"event":"negotiator-output","data":{"id":ID,"out-data":"BASE64"},
         "timestamp":{"seconds":S,"microseconds":US}}

    With ``raw`` (the client asked for "raw-output") the line gives the
    chunk's size instead, ``"out-bytes":N``, and the N bytes themselves
    follow the newline as they are: no base64 to make and read back, and a
    quarter fewer bytes on the port.  Streams are ``'out-data'`` (stdout)
    and ``'err-data'`` (stderr).

    Events are the bulk of what the agent sends, so their lines are put
    together from bytes: each stream's start is made once, and the base64
    text (which needs no escaping) never passes through the JSON encoder.
    """

    def __init__(self, request_id, raw=False):
        self.raw = raw
        self.request_id = request_id
        #: Each stream's line up to its value, made with its first chunk:
        #: many commands print nothing on one stream or both.
        self._starts = {}

    def pieces(self, stream, data):
        """What to send, in a row, for a chunk of output."""
        if self.raw:
            return self.header(stream, len(data)), data
        return (self._line(stream, b'"' + base64_line(data) + b'"'),)

    def header(self, stream, size):
        """The line that announces ``size`` raw bytes of output."""
        return self._line(stream, str(size).encode('ascii'))

    def _line(self, stream, value):
        start = self._starts.get(stream)
        if start is None:
            start = self._starts[stream] = self._start(stream)
        now = time.time()
        return b''.join([start, value, EVENT_END % (
            int(now), int(now % 1 * 1e6))])

    def _start(self, stream):
        id_member = b''
        if self.request_id is not NO_ID:
            id_member = (b'"id":' + encode_message(self.request_id)[:-1] +
                         b',')
        member = RAW_MEMBERS[stream] if self.raw else stream
        return (b'{"event":"negotiator-output","data":{' + id_member + b'"' +
                member.encode('ascii') + b'":')


#: Markers LineReader.feed() returns besides complete lines.
RESYNC = object()
OVERSIZED = object()


class LineReader(object):
    """Cuts a byte stream into lines, keeping the partial last line between reads.

    A 0xFF byte drops the partial line, as in qemu-ga: a client that starts
    with 0xFF knows the agent's reader starts afresh.  A line longer than
    ``limit`` is dropped up to its newline and reported once as OVERSIZED.
    """

    def __init__(self, limit=MAX_LINE):
        self.limit = limit
        self.reset()

    def reset(self):
        """Forget the partial line."""
        self._chunks = []
        self._size = 0
        self._dropping = False

    def feed(self, data):
        """Take received bytes.

        :returns: complete lines (bytes, without the newline), RESYNC where
            a 0xFF byte was and OVERSIZED where a too-long line began,
            in stream order.
        """
        if (not self._chunks and not self._dropping and
                data.endswith(b'\n') and len(data) <= self.limit and
                RESYNC_BYTE not in data):
            return data.split(b'\n')[:-1]  # the usual case: whole lines
        items = []
        for index, piece in enumerate(data.split(RESYNC_BYTE)):
            if index:
                self.reset()
                items.append(RESYNC)
            self._feed_piece(piece, items)
        return items

    def _feed_piece(self, piece, items):
        start = 0
        newline = piece.find(b'\n')
        while newline >= 0:
            self._append(piece[start:newline], items)
            if not self._dropping:
                items.append(b''.join(self._chunks))
            self.reset()
            start = newline + 1
            newline = piece.find(b'\n', start)
        self._append(piece[start:], items)

    def _append(self, part, items):
        if self._dropping or not part:
            return
        self._size += len(part)
        if self._size > self.limit:
            self._chunks = []
            self._dropping = True
            items.append(OVERSIZED)
        else:
            self._chunks.append(part)


# ============================================================================
# Event loop: one epoll loop for every descriptor
# ============================================================================

#: errno values that mean the other end of a descriptor has gone.
DISCONNECT_ERRORS = (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENOTCONN,
                     errno.ESHUTDOWN, errno.ENXIO)
#: errno values that mean "nothing to do right now".
WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)
#: errno values of accept() that mean no descriptor or memory to spare.
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: poll()'s (and epoll's, the same numbers) events: readable, writable, and
#: the bits that mean hung up or failed, which are reported unasked.
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


class Disconnected(Exception):
    """The other end of a descriptor has gone."""


def io_op(call, *args):
    """``call(*args)``, a system call, made again when a signal interrupts
    it (Python 3 does so itself; Python 2 raises EINTR).

    :returns: ``(its result, None)``, or ``(None, the exception)``.
    """
    while True:
        try:
            return call(*args), None
        except (OSError, IOError) as e:
            if e.args[0] != errno.EINTR:
                return None, e


def read_fd(fd, size=READ_SIZE):
    """Read what is there without blocking.

    :returns: bytes; ``b''`` at end of file or when the peer has gone;
        None when nothing can be read yet.
    """
    data, error = io_op(os.read, fd, size)
    if error is None or error.args[0] in WOULD_BLOCK:
        return data
    if error.args[0] in DISCONNECT_ERRORS:
        return b''
    raise error


def write_fd(fd, data):
    """Write what the descriptor takes now.

    :returns: the number of bytes written, 0 when it takes nothing yet.
    :raises Disconnected: when the peer has gone.
    """
    written, error = io_op(os.write, fd, data)
    if error is None:
        return written
    if error.args[0] in WOULD_BLOCK:
        return 0
    if error.args[0] in DISCONNECT_ERRORS:
        raise Disconnected(os.strerror(error.args[0]))
    raise error


def set_nonblocking(fd):
    """Make ``fd`` non-blocking.

    Close-on-exec needs no call here: Python 3 opens every descriptor so
    (PEP 446), and on Python 2 cloexec_all() marks them before a command
    starts.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def open_fds():
    """The numbers of this process's open descriptors (and of the
    listing's own, closed by the time it is returned)."""
    try:
        return [int(name) for name in os.listdir('/proc/self/fd')]
    except OSError:
        return range(os.sysconf('SC_OPEN_MAX'))


def cloexec_all():
    """Mark every open descriptor above 2 close-on-exec (for Python 2,
    before a command starts): those the agent inherited, and those it or a
    library opened without the flag, such as a syslog handler's socket."""
    for fd in open_fds():  # FD_CLOEXEC is the only descriptor flag: set it
        if fd > 2:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
            except (OSError, IOError):
                pass  # the listing's own descriptor, closed by now


def wait_ready(poller, timeout):
    """Wait on a poll or epoll object.

    :param timeout: seconds, or None to wait forever.
    :returns: ``(fd, readable, writable, hung_up)`` tuples; none also when
        a signal interrupted the wait.
    """
    if timeout is not None:
        timeout = min(max(timeout, 0), MAX_POLL_WAIT)
    try:
        if isinstance(poller, select.epoll):
            events = poller.poll(-1 if timeout is None else timeout)
        else:
            events = poller.poll(
                None if timeout is None else int(timeout * 1000 + 0.999))
    except (select.error, OSError, IOError) as e:
        if e.args[0] == errno.EINTR:
            return []
        raise
    return [(fd, bool(event & POLLIN), bool(event & POLLOUT),
             bool(event & HANGUP)) for fd, event in events]


def poll_fd(fd, events, timeout):
    """Wait until ``fd`` is ready for ``events`` (POLLIN, POLLOUT) or hung
    up: ``(readable, writable, hung_up)``, all False at the timeout."""
    poller = select.poll()
    poller.register(fd, events)
    for _, readable, writable, hung_up in wait_ready(poller, timeout):
        return readable, writable, hung_up
    return False, False, False


def error_text(error):
    """An exception in one line of a log: its type and message."""
    try:
        text = str(error)
    except Exception:  # Python 2: a message that is not ASCII
        text = repr(error.args)
    return printable('{0}: {1}'.format(type(error).__name__, text))


def log_failure(name, consequence, error):
    """Log an exception in one line: whose, what follows from it, what it
    is (and its traceback with -v)."""
    log.error('%s: internal error, %s: %s', name, consequence,
              error_text(error), exc_info=log.isEnabledFor(DEBUG))


class Timer(object):
    """A callback the loop runs once at ``deadline`` unless cancelled."""

    def __init__(self, deadline, callback, on_error):
        self.deadline = deadline
        self.callback = callback
        self.on_error = on_error
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Loop(object):
    """Maps descriptors to callbacks and runs them as they become ready.

    Signals wake the loop through a pipe (``signal.set_wakeup_fd``); their
    handlers run as ordinary callbacks from the loop, never in the middle
    of other work.  One epoll object lives as long as the loop and follows
    every change of what is watched: its wait costs nothing per idle
    descriptor (the host daemon watches one socket per guest).

    Containment: every callback is given with an ``on_error(error)``, the
    end of the conversation it serves (a client's, a guest's), which an
    exception in it calls; without one, the exception is logged.  Either
    way the loop and every other conversation go on.  KeyboardInterrupt
    and SystemExit are not Exceptions: they end the loop.
    """

    def __init__(self):
        #: fd -> (callback, on_error, events): POLLIN, or 0 to be told of
        #: a hang-up only.
        self._readers = {}
        #: fd -> (callback, on_error).
        self._writers = {}
        self._poller = select.epoll()
        #: What the epoll object watches: fd -> events.
        self._masks = {}
        self._timers = []
        self._signal_callbacks = {}
        self._signals_seen = []
        self.running = True
        self._wake_read, self._wake_write = os.pipe()
        set_nonblocking(self._wake_read)
        set_nonblocking(self._wake_write)
        self.add_reader(self._wake_read, self._on_wakeup)

    def add_reader(self, fd, callback, on_error=None, hangup_only=False):
        """Call ``callback(hung_up)`` whenever ``fd`` is readable or hung
        up; with ``hangup_only``, when it is hung up (a reader that waits
        until it may read again must still see its peer go)."""
        self._readers[fd] = (callback, on_error, 0 if hangup_only else POLLIN)
        self._watch(fd)

    def remove_reader(self, fd):
        if self._readers.pop(fd, None) is not None:
            self._watch(fd)

    def add_writer(self, fd, callback, on_error=None):
        """Call ``callback(hung_up)`` when ``fd`` is writable or hung up."""
        self._writers[fd] = (callback, on_error)
        self._watch(fd)

    def remove_writer(self, fd):
        if self._writers.pop(fd, None) is not None:
            self._watch(fd)

    def _watch(self, fd):
        """Bring the epoll object up to date for ``fd``."""
        old = self._masks.get(fd)
        if fd not in self._readers and fd not in self._writers:
            if old is not None:
                del self._masks[fd]
                try:
                    self._poller.unregister(fd)
                except (IOError, OSError):
                    pass  # closed already: epoll forgot it then
            return
        mask = self._readers[fd][2] if fd in self._readers else 0
        if fd in self._writers:
            mask |= POLLOUT
        if mask == old:
            return
        self._masks[fd] = mask
        if old is None:
            self._poller.register(fd, mask)
            return
        try:
            self._poller.modify(fd, mask)
        except (IOError, OSError) as e:
            if e.args[0] != errno.ENOENT:
                raise
            self._poller.register(fd, mask)  # closed, number reused

    def call_later(self, delay, callback, on_error=None):
        """Run ``callback()`` after ``delay`` seconds; returns a Timer."""
        timer = Timer(monotonic() + delay, callback, on_error)
        self._timers.append(timer)
        return timer

    def on_signal(self, signum, callback):
        """Run ``callback()`` from the loop whenever ``signum`` arrives."""
        self._signal_callbacks[signum] = callback
        signal.signal(signum, self._note_signal)
        signal.siginterrupt(signum, False)
        signal.set_wakeup_fd(self._wake_write)

    def call(self, on_error, callback, *args):
        """Run ``callback(*args)``; an exception is contained (see above)."""
        try:
            callback(*args)
        except Exception as error:
            self._contain(error, on_error)

    def _contain(self, error, on_error):
        if on_error is None:
            log_failure('loop', 'carrying on', error)
            return
        try:
            on_error(error)
        except Exception as second:
            log_failure('loop', 'while ending a conversation', second)

    def close(self):
        """Release the wakeup pipe and restore the signals' defaults."""
        for signum in self._signal_callbacks:
            signal.signal(signum, signal.SIG_DFL)
        if self._signal_callbacks:
            signal.set_wakeup_fd(-1)
        os.close(self._wake_read)
        os.close(self._wake_write)
        self._poller.close()

    def _note_signal(self, signum, frame):
        self._signals_seen.append(signum)

    def _on_wakeup(self, hung_up):
        """Run the callbacks of the signals that arrived, and empty the
        wakeup pipe, which holds a byte for each."""
        # A read less than full has emptied the pipe: no read for EAGAIN.
        data = read_fd(self._wake_read)
        while data and len(data) == READ_SIZE:
            data = read_fd(self._wake_read)
        while self._signals_seen:
            self.call(None, self._signal_callbacks[self._signals_seen.pop(0)])

    def _next_timeout(self):
        self._timers = [t for t in self._timers if not t.cancelled]
        if not self._timers:
            return None
        return max(0.0, min(t.deadline for t in self._timers) - monotonic())

    def run_once(self):
        """Wait for the next events and run their callbacks."""
        timeout = None
        if self._timers:
            timeout = self._next_timeout()
        for fd, readable, writable, hung_up in wait_ready(self._poller,
                                                          timeout):
            entry = None
            try:
                if (readable or hung_up) and fd in self._readers:
                    entry = self._readers[fd]
                    entry[0](hung_up)
                if (writable or hung_up) and fd in self._writers:
                    entry = self._writers[fd]
                    entry[0](hung_up)
            except Exception as error:
                self._contain(error, entry[1])
        if self._signals_seen:  # arrived during this turn's callbacks:
            self._on_wakeup(False)  # not a turn of their own for them
        if self._timers:
            self._run_due_timers()

    def _run_due_timers(self):
        now = monotonic()
        for timer in list(self._timers):
            if timer.deadline <= now and not timer.cancelled:
                timer.cancelled = True
                self.call(timer.on_error, timer.callback)

    def run(self):
        """Run until ``running`` is set to False."""
        while self.running:
            self.run_once()

    def stop_on(self, *signums):
        """End run() when one of these signals arrives."""
        def stop():
            log.info('stopping')
            self.running = False
        for signum in signums:
            self.on_signal(signum, stop)


class Channel(object):
    """One conversation's descriptor: lines in, buffered non-blocking writes out.

    The handler receives whole lines and events and never touches the
    descriptor: ``on_line(line)``, ``on_resync(dropped)``,
    ``on_oversized()``, ``on_drained()`` (output that had to wait for the
    peer is all written now), ``on_disconnect()`` and ``on_failure(error)``
    (a callback of this conversation raised).  on_drained() comes from the
    loop, never from inside a send: a handler may send in the middle of its
    own work.

    Backpressure: a line is handed over only while the handler is
    ``ready()`` and less than HIGH_WATER bytes wait for the peer; until
    then it waits here.  While MAX_WAITING lines or MAX_LINE bytes wait, or
    HIGH_WATER bytes of replies, the descriptor is not read, only watched
    for a hang-up.  So a peer that sends faster than it is answered, or
    never reads, makes this side hold that much and one read more, and
    nothing it sent is refused or lost.  A 0xFF byte drops what waits
    before it (``on_resync(dropped)``).
    """

    def __init__(self, loop, fd, handler, name):
        from collections import deque  # only a serving side needs it
        self.loop = loop
        self.fd = fd
        self.handler = handler
        self.name = wire_text(name)  # (for log lines: text, as a peer's)
        self.reader = LineReader()
        self._out = []
        self.backlog = 0
        #: What was read and not handed over yet: lines and OVERSIZED, and
        #: their bytes.
        self._items = deque()
        self._waiting = 0
        self._paused = False
        self.connected = True
        self._watch()

    def _watch(self):
        self.loop.add_reader(self.fd, self._on_readable,
                             self.handler.on_failure, self._paused)

    def send(self, message):
        """Queue one message; dropped silently once the peer has gone."""
        self.send_raw(encode_message(message))

    def send_raw(self, data):
        """Queue bytes as they are: an encoded line, the 0xFF of
        guest-sync-delimited, or a chunk of raw output after its line.

        They are written at once unless earlier bytes wait for the peer.
        """
        if self.connected:
            self._out.append(data)
            self.backlog += len(data)
            if len(self._out) == 1:
                self._write_out()

    def _write_out(self):
        """Write what the peer takes; wait for it (_on_writable) if not all.

        :returns: True when everything queued is written.
        """
        try:
            while self._out:
                chunk = self._out[0]
                written = write_fd(self.fd, chunk)
                if not written:
                    self.loop.add_writer(self.fd, self._on_writable,
                                         self.handler.on_failure)
                    return False
                self.backlog -= written
                if written < len(chunk):
                    self._out[0] = bytes_from(chunk, written)
                else:
                    self._out.pop(0)
        except Disconnected as e:
            self.disconnect(str(e))
            return False
        return True

    def _on_writable(self, hung_up):
        if self._write_out():
            self.loop.remove_writer(self.fd)
            self.handler.on_drained()
            self.deliver()
        elif hung_up:  # a port without a host takes nothing, with no error
            self.disconnect('hung up')

    def _on_readable(self, hung_up):
        if self._paused:  # (readable, in a turn that paused it meanwhile)
            if hung_up:
                self.disconnect('hung up')
            return
        for _ in range(16):
            data = read_fd(self.fd)
            if data is None:
                return
            if not data:
                self.disconnect('end of file')
                return
            self._take(self.reader.feed(data))
            if not self.connected or self._paused or len(data) < PORT_READ:
                return  # (emptied: another read would only say EAGAIN)

    def _take(self, items):
        if RESYNC in items:
            last = len(items) - items[::-1].index(RESYNC)
            dropped = len(self._items) + len(
                [item for item in items[:last] if item is not RESYNC])
            self._items.clear()
            self._waiting = 0
            del items[:last]
            self.handler.on_resync(dropped)
        for item in items:
            if item is not OVERSIZED:
                self._waiting += len(item)
        self._items.extend(items)
        self.deliver()

    def deliver(self):
        """Hand over what waits, while the handler takes it; read on while
        little waits (see above)."""
        items = self._items
        while (items and self.connected and self.backlog < HIGH_WATER and
               self.handler.ready()):
            item = items.popleft()
            if item is OVERSIZED:
                self.handler.on_oversized()
            else:
                self._waiting -= len(item)
                self.handler.on_line(item)
        paused = (len(items) >= MAX_WAITING or self._waiting >= MAX_LINE or
                  self.backlog >= HIGH_WATER)
        if self.connected and paused != self._paused:
            self._paused = paused
            self._watch()

    def disconnect(self, why):
        """Stop reading and writing; drop what was not sent or handed over."""
        if not self.connected:
            return
        log.debug('%s: disconnected (%s)', self.name, why)
        self.connected = False
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._out = []
        self.backlog = 0
        self._items.clear()
        self._waiting = 0
        self._paused = False
        self.reader.reset()
        self.handler.on_disconnect()

    def reconnect(self):
        """Serve the descriptor again after a disconnect (virtio ports)."""
        self.connected = True
        self._watch()


# ============================================================================
# Commands: the executables of the commands directory and the built-ins
# ============================================================================

def check_command_name(name):
    """Refuse names that could reach outside the commands directory.

    :returns: the name's bytes.
    :raises RequestError: for an empty name or one with ``/``, a leading
        dot (so also ``..``) or a NUL byte, or a surrogate that stands for
        no byte (text_argument()).
    """
    if not isinstance(name, string_types):
        raise RequestError(
            "Invalid parameter type for 'command', expected: string")
    if not name or '/' in name or name.startswith('.') or '\0' in name:
        raise RequestError(u(
            "Invalid command name '{0}': a name is a file directly inside "
            'the commands directory').format(shown(name)))
    return text_argument(name, 'command')


def text_argument(text, what):
    """The bytes of a command's name or argument: wire text with no NUL.

    :raises RequestError: naming ``what`` otherwise.
    """
    try:
        data = wire_bytes(text)
    except UnicodeError:
        raise RequestError("Parameter '{0}' holds a lone surrogate that "
                           'stands for no byte (only U+DC80..U+DCFF '
                           'do)'.format(what))
    if b'\0' in data:
        raise RequestError("Parameter '{0}' holds a NUL character, which a "
                           'command line cannot carry'.format(what))
    return data


def environment(entries):
    """The environment of ``NAME=value`` entries (wire text), as guest-exec
    gives a whole one (an entry without ``=`` is left out: Popen takes a
    mapping)."""
    env = {}
    for entry in entries:
        name, equals, value = text_argument(entry, 'env').partition(b'=')
        if equals:
            env[name] = value
    return env


class CommandSet(object):
    """The commands one side offers: a directory's executables and built-ins.

    Names and paths are bytes to the system, as they are on disk, and wire
    text on the wire, whatever the locale and Python.

    :param directory: the commands directory (it need not exist).
    :param builtins: name -> function returning ``(output_bytes, status)``.
    :param label: how error replies name the directory (default: its
        path; the host daemon does not show guests its paths).
    """

    def __init__(self, directory, builtins, label=None):
        self.directory = local_bytes(directory)
        self.builtins = builtins
        self.label = label

    def names(self):
        """List ``(name, kind)`` for every command, sorted by name."""
        found = {}
        for name in self.builtins:
            found[name] = 'builtin'
        try:
            entries = os.listdir(self.directory)
        except OSError:
            entries = []
        for name in entries:
            if not name.startswith(b'.') and self._executable(name):
                found[wire_text(name)] = 'user'
        return sorted(found.items())

    def _executable(self, name):
        try:
            return self._file(name) is not None
        except RequestError:
            return False

    def resolve(self, name):
        """Find what runs for ``name`` (wire text).

        A file of the name wins over a built-in, so a built-in's name costs
        a look into the directory; any other name is taken to be a file
        without looking (a stat() and an access() less per command, slow
        calls in an emulated guest): when it cannot start, start_failure()
        finds out why.  So a name that is nowhere costs a failed start
        (its pipes and a fork) before it is refused.

        :returns: a command file's path (bytes) or a built-in's function.
        :raises RequestError: for a name check_command_name() refuses, and
            NegotiatorCommandNotExecutable when a file of a built-in's
            name cannot run.
        """
        data = check_command_name(name)
        if name not in self.builtins:
            return os.path.join(self.directory, data)
        return self._file(data) or self.builtins[name]

    def start_failure(self, name, error):
        """The RequestError to answer when the file ``name`` did not start.

        NegotiatorCommandNotFound when there is no such file;
        NegotiatorCommandNotExecutable when it is not an executable regular
        file, or when it could not start all the same, for the reason in
        ``error``: exec refused it (an interpreter named by its ``#!`` line
        is missing, say), or the system had no pipe or process to spare.
        """
        try:
            path = self._file(wire_bytes(name))
        except RequestError as e:
            return e
        if path is None and name not in self.builtins:
            return RequestError(
                u("Command '{0}' not found in {1}; available: {2}").format(
                    shown(name), self.label or wire_text(self.directory),
                    u(', ').join(n for n, _ in self.names()) or 'none'),
                'NegotiatorCommandNotFound')
        return RequestError(
            u("Command '{0}' could not start: {1}").format(
                shown(name), os.strerror(error.errno)),  # (3.6's: the path)
            'NegotiatorCommandNotExecutable')

    def _file(self, name):
        """The path of the command file ``name`` (bytes), None if there is
        none.

        :raises RequestError: NegotiatorCommandNotExecutable when it is not
            an executable regular file.
        """
        path = os.path.join(self.directory, name)
        try:
            info = os.stat(path)
        except OSError:
            return None
        if stat.S_ISREG(info.st_mode) and os.access(path, os.X_OK):
            return path
        name = shown(wire_text(name))
        where = shown(wire_text(path))
        if self.label:
            where = u('{0} in {1}').format(name, self.label)
        raise RequestError(
            u("Command '{0}' is not executable: {1} is not a regular file "
              'with execute permission (chmod +x it)').format(name, where),
            'NegotiatorCommandNotExecutable')


class Children(object):
    """The child processes not reaped yet; checked whenever SIGCHLD arrives.

    Also holds /dev/null, opened once: the stdin of every command given no
    input (an open() per command costs a path lookup, slow in an emulated
    guest); and, as the one registry all of an agent's conversations
    share, what outlives the conversation that made it: the programs
    guest-exec started (``execs``, GuestExec objects in start order) and
    the files guest-file-open opened (``files``: handle -> descriptor).
    """

    def __init__(self):
        self.running = set()
        self.execs = []
        self.files = {}
        self.next_handle = FIRST_FILE_HANDLE
        self._null = None

    def check(self):
        for process in list(self.running):
            process.loop.call(process.on_failure, process.check_exit)

    def close(self):
        """Kill what still runs; close the files and /dev/null."""
        for process in list(self.running):
            process.kill()
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        if self._null is not None:
            os.close(self._null)
            self._null = None

    def check_room(self):
        """:raises RequestError: while MAX_STUCK killed children have not
            ended: each request on a hung filesystem would add one."""
        stuck = [process for process in self.running
                 if process.killed or process.timed_out]
        if len(stuck) >= MAX_STUCK:
            raise RequestError(
                '{0} killed child processes have not ended (stuck in the '
                'kernel?): none is started until one ends'.format(len(stuck)))

    def null_input(self):
        if self._null is None:
            self._null = os.open(os.devnull, os.O_RDONLY)
        return self._null


def make_pipe(opened, ours):
    """A new pipe's ``(read end, write end)``, also added to ``opened``.

    :param ours: the end the agent keeps (0 or 1), made non-blocking with
        one call: a new pipe has no other status flag to keep.
    """
    ends = os.pipe()
    opened.extend(ends)
    fcntl.fcntl(ends[ours], fcntl.F_SETFL, os.O_NONBLOCK)
    return ends


def enlarge_pipe(fd):
    """Give the pipe ``fd`` room for PIPE_SIZE bytes, where the kernel
    lets us (F_SETPIPE_SZ: Linux 2.6.35 and later, within the user's
    quota)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except (IOError, OSError):
        pass


#: The signals a forked built-in puts back to their defaults: those the
#: loop handles, and those Python ignores.
CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                 signal.SIGIO, signal.SIGPIPE, signal.SIGXFSZ)


class Builtin(object):
    """A built-in command run in a forked child, as Popen runs a program.

    A built-in that blocks (a statvfs() on a dead network filesystem, a
    read of /etc on a hung NFS root) then holds up only itself, and it has
    the timeout, kill and log line of any command.  Offers what Process
    uses of a Popen object: ``pid``, ``poll()``, ``returncode``.
    """

    def __init__(self, function, args, stdin, stdout, stderr):
        self.returncode = None
        self.pid = os.fork()
        if not self.pid:
            self._run(function, args, (stdin, stdout, stderr))

    @staticmethod
    def _run(function, args, streams):
        """The child: the command's streams as 0, 1 and 2 and nothing else
        open (it must not hold the port), then the function."""
        status = 1
        try:
            os.setsid()
            for signum in CHILD_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            for target, fd in enumerate(streams):
                os.dup2(fd, target)
            os.closerange(3, max(open_fds()) + 1)
            output, status = function(args)
            while output:
                output = output[os.write(1, output):]
        except Exception as e:
            os.write(2, error_text(e).encode('utf-8') + b'\n')
        finally:
            os._exit(status)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.WEXITSTATUS(status)
                if os.WIFSIGNALED(status):
                    self.returncode = -os.WTERMSIG(status)
        return self.returncode


class Process(object):
    """A command running as a child whose pipes join the loop.

    The child runs in a session of its own with every other descriptor
    closed, so that a background process it leaves behind never holds the
    agent's port, and so that ``kill()`` reaches its whole process tree.

    :param argv: the command file's path and arguments (bytes), or a
        built-in's function and arguments.
    :param children: the Children registry that reaps it.
    :param on_output: called with ``('out-data'|'err-data', bytes)``.
    :param on_exit: called once with the reply's ``return`` dict.
    :param on_failure: the end of the conversation it runs for, should
        one of its callbacks raise.
    :param stdin_fd: without ``stdin_data``, the descriptor to give the
        child as its stdin instead of /dev/null.
    :param on_timeout: called ``timeout`` seconds on instead of killing
        the process group and reporting a timed-out end.
    """

    def __init__(self, loop, children, argv, env, stdin_data, timeout,
                 on_output, on_exit, on_failure, stdin_fd=None,
                 on_timeout=None):
        self.loop = loop
        self.children = children
        self.on_output = on_output
        self.on_exit = on_exit
        self.on_failure = on_failure
        self.timed_out = False
        self.killed = False
        self._stdin_data = stdin_data
        self._stdin_sent = 0
        self._stdin_fd = None
        self._paused = False
        #: stopwatch() at the start, for the log line at the end.
        self.started = stopwatch()
        # The pipes are made here rather than by Popen: plain descriptors,
        # without the file objects Popen would wrap them in.
        opened = []  # closed again if the command cannot start
        try:
            if stdin_data:
                stdin, self._stdin_fd = make_pipe(opened, 1)
            elif stdin_fd is not None:
                stdin = stdin_fd
            else:
                stdin = children.null_input()
            out_fd, stdout = make_pipe(opened, 0)
            err_fd, stderr = make_pipe(opened, 0)
            if callable(argv[0]):
                self.popen = Builtin(argv[0], argv[1:], stdin, stdout, stderr)
            else:
                import subprocess  # only the serving side needs it
                if not PY3:
                    cloexec_all()
                self.popen = subprocess.Popen(
                    argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd='/',
                    env=env, **CHILD_OPTIONS)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in (stdout, stderr):  # the child's ends
            os.close(fd)
        if stdin_data:
            os.close(stdin)
        self.pid = self.popen.pid
        children.running.add(self)
        #: Open output pipes: descriptor -> [stream name, read size].
        self._pipes = {out_fd: ['out-data', READ_SIZE],
                       err_fd: ['err-data', READ_SIZE]}
        for fd in self._pipes:
            loop.add_reader(fd, self._reader(fd), on_failure)
        if stdin_data:
            loop.add_writer(self._stdin_fd, self._feed_stdin, on_failure)
        self._timer = None
        if timeout:
            self._timer = loop.call_later(
                timeout, on_timeout or self._on_timeout, on_failure)

    def _feed_stdin(self, hung_up):
        start = self._stdin_sent
        try:
            self._stdin_sent += write_fd(
                self._stdin_fd, self._stdin_data[start:start + READ_SIZE])
        except Disconnected:
            self._stdin_sent = len(self._stdin_data)
        if self._stdin_sent >= len(self._stdin_data):
            self._close_stdin()

    def _close_stdin(self):
        self._stdin_data = b''
        if self._stdin_fd is not None:
            self.loop.remove_writer(self._stdin_fd)
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def _reader(self, fd):
        """The loop's callback for the output pipe ``fd``: it reads that
        pipe alone (a command's stdout and stderr rarely both have
        something at once)."""
        def on_readable(hung_up):
            self._read_pipe(fd)
            if not self._pipes:  # the end of all output: most likely an exit
                self.check_exit()
        return on_readable

    def _read_pipe(self, fd):
        data = self._read_output(fd)
        if data is None:
            return
        if not data:
            self._close_pipe(fd)
        else:
            self.on_output(self._pipes[fd][0], data)

    def _read_output(self, fd):
        """read_fd() of an output pipe, with reads that grow while they
        come back full (up to PIPE_SIZE) so that a flood of output costs
        few reads, and shrink again when they come back less than half
        full: a big read costs its size in memory however little it gets.
        A read of READ_SIZE bytes (what a new pipe holds) that comes back
        full enlarges the pipe: only a command that fills it pays the
        call (again after a quiet spell, when it changes nothing)."""
        pipe = self._pipes[fd]
        data = read_fd(fd, pipe[1])
        if data and len(data) == pipe[1] and pipe[1] < PIPE_SIZE:
            if pipe[1] == READ_SIZE:
                enlarge_pipe(fd)
            pipe[1] *= 2
        elif data and len(data) < pipe[1] // 2 and pipe[1] > READ_SIZE:
            pipe[1] //= 2
        return data

    def _close_pipe(self, fd):
        self.loop.remove_reader(fd)
        del self._pipes[fd]
        os.close(fd)

    def pause(self):
        """Stop reading output until resume(): the peer is slower than us."""
        if not self._paused:
            self._paused = True
            for fd in self._pipes:
                self.loop.remove_reader(fd)

    def resume(self):
        if self._paused:
            self._paused = False
            for fd in self._pipes:
                self.loop.add_reader(fd, self._reader(fd), self.on_failure)

    def check_exit(self):
        """Finish once the child has exited (called on SIGCHLD, and at the
        end of the output in case no signal comes).

        Output already in the pipes is read first; the pipes are not waited
        on after that, as a background process the command started may hold
        them open for ever.
        """
        if self.popen.poll() is None:
            return
        for fd in list(self._pipes):
            left = 2 * PIPE_SIZE  # what a pipe holds, and some more
            while left > 0 and not self.killed and fd in self._pipes:
                data = self._read_output(fd)
                if not data:
                    break
                left -= len(data)
                self.on_output(self._pipes[fd][0], data)
            if fd in self._pipes:
                self._close_pipe(fd)
        self._finish()

    def _finish(self):
        self.children.running.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._close_stdin()
        status = self.popen.returncode
        result = {}
        if status < 0:
            result['signal'] = -status
        else:
            result['exitcode'] = status
        if self.timed_out:
            result['timed-out'] = True
        if not self.killed:
            self.on_exit(result)

    def _on_timeout(self):
        log.info('command pid %d timed out: killing its process group',
                 self.pid)
        self.timed_out = True
        self._kill_group()

    def kill(self):
        """Kill the whole process tree and discard its output and result.

        The child stays registered until SIGCHLD lets check_exit() reap it.
        """
        self.killed = True
        if self._timer is not None:
            self._timer.cancel()
        self._kill_group()
        for fd in list(self._pipes):
            self._close_pipe(fd)
        self._close_stdin()

    def _kill_group(self):
        """SIGKILL the process group; the process alone while it has no
        group of its own yet (a built-in's child before its setsid())."""
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, signal.SIGKILL)
                return
            except OSError:
                pass


class Capture(object):
    """A command's output kept whole, as qemu-ga's guest-exec keeps it:
    ``limit`` bytes of each stream at most, the rest read and dropped."""

    #: Each stream's member in a reply, and the member that says whether
    #: some of it was dropped.
    MEMBERS = (('out-data', 'out-truncated'), ('err-data', 'err-truncated'))

    def __init__(self, limit=MAX_CAPTURE):
        self.limit = limit
        #: stream -> [chunks, their size, truncated?]
        self._kept = {'out-data': [[], 0, False], 'err-data': [[], 0, False]}

    def add(self, stream, data):
        kept = self._kept[stream]
        room = self.limit - kept[1]
        if len(data) > room:
            kept[2] = True
            data = data[:room]
        if data:
            kept[0].append(data)
            kept[1] += len(data)

    def output(self, stream):
        """The bytes kept of ``stream``."""
        return b''.join(self._kept[stream][0])

    def add_to(self, result):
        """Put the output in a reply's ``result``: each stream that wrote
        something as base64, with its truncated flag (qemu-ga's members).

        :returns: ``result``.
        """
        for stream, truncated in self.MEMBERS:
            if self._kept[stream][1]:
                result[stream] = encode_bytes(self.output(stream))
                result[truncated] = self._kept[stream][2]
        return result


def make_room_for_exec(execs):
    """Below MAX_EXECS programs kept, forgetting the oldest that has ended
    with its end not fetched, if need be.

    :raises RequestError: when all that are kept still run.
    """
    if len(execs) < MAX_EXECS:
        return
    for started in execs:
        if started.result is not None:
            log.info('guest-exec pid %d: its end was never fetched; '
                     'forgotten', started.pid)
            execs.remove(started)
            return
    raise RequestError('guest-exec runs {0} programs already: wait for one '
                       'to end'.format(MAX_EXECS))


class GuestExec(object):
    """A program guest-exec started.  It runs apart from any conversation
    (a client polls for its end, perhaps on another connection), and its
    end and output wait in the agent's table, ``children.execs``, until a
    guest-exec-status reports them.

    :param capture: a Capture for its output, or None to drop it.
    """

    def __init__(self, loop, children, argv, env, stdin_data, capture):
        self.children = children
        self.capture = capture
        #: The reply's exitcode or signal once it has ended.
        self.result = None
        self.process = Process(loop, children, argv, env, stdin_data, 0,
                               self._on_output, self._on_exit,
                               self._on_failure)
        self.pid = self.process.pid
        children.execs.append(self)

    def _on_output(self, stream, data):
        if self.capture:
            self.capture.add(stream, data)

    def _on_exit(self, result):
        log.info('guest-exec pid %d: %s', self.pid, describe_result(result))
        self.result = result

    def _on_failure(self, error):
        log_failure('guest-exec pid {0}'.format(self.pid), 'dropping it',
                    error)
        self.process.kill()
        self.children.execs.remove(self)

    def status(self):
        """guest-exec-status's reply; the end, once reported, is
        forgotten."""
        if self.result is None:
            return {'exited': False}
        self.children.execs.remove(self)
        result = dict(self.result, exited=True)
        return self.capture.add_to(result) if self.capture else result


# ---------------------------------------------------------------------------
# guest-file-*: each operation on a file runs in a forked child, whose stdin
# is the file (the same open file, so the same position): a file on a hung
# filesystem holds up only the conversation that asked.
# ---------------------------------------------------------------------------

#: guest-file-open's modes (fopen()'s, as qemu-ga takes them) and their
#: open() flags; non-blocking, as qemu-ga opens them, so that a FIFO or a
#: device never waits.
FILE_MODES = dict(
    (mode, flags | os.O_NONBLOCK | os.O_NOCTTY)
    for modes, flags in (
        ('r rb', os.O_RDONLY),
        ('w wb', os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ('a ab', os.O_WRONLY | os.O_CREAT | os.O_APPEND),
        ('r+ rb+ r+b', os.O_RDWR),
        ('w+ wb+ w+b', os.O_RDWR | os.O_CREAT | os.O_TRUNC),
        ('a+ ab+ a+b', os.O_RDWR | os.O_CREAT | os.O_APPEND))
    for mode in modes.split())
#: guest-file-seek's whence names and their numbers (qemu-ga's QGASeek,
#: the numbers of lseek()'s SEEK_SET, SEEK_CUR and SEEK_END).
SEEK_NAMES = {'set': 0, 'cur': 1, 'end': 2}


def file_operation(args):
    """A guest-file-* operation in its child: ``args[0](*args[1:])``, its
    output, or the words of its errno on stderr (as qemu-ga's error
    reply ends with them) and exit status 1."""
    try:
        return args[0](*args[1:]), 0
    except OSError as e:
        os.write(2, os.strerror(e.errno).encode('ascii'))
        return b'', 1


def open_file(path, flags):
    """Open ``path`` as qemu-ga does, in the child (the agent opens it
    again once it did): a file it creates is made alone (O_EXCL) and
    given mode 0666 whatever the umask; then closed.

    :returns: its device and inode numbers, so that the agent can tell
        that it opened the same file.
    """
    created = flags & os.O_CREAT
    try:
        fd = os.open(path, flags | (os.O_EXCL if created else 0), 0)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        fd = os.open(path, flags & ~os.O_CREAT)
        created = False
    if created:
        os.fchmod(fd, int('666', 8))
    opened = os.fstat(fd)
    os.close(fd)
    return ascii_number(opened.st_dev) + b' ' + ascii_number(opened.st_ino)


def read_file(count):
    """Up to ``count`` bytes of stdin: less only at its end."""
    chunks = []
    while count > 0:
        data = os.read(0, min(count, PIPE_SIZE))
        if not data:
            break
        chunks.append(data)
        count -= len(data)
    return b''.join(chunks)


def write_file(data):
    while data:
        data = data[os.write(0, data):]
    return b''


def seek_file(offset, whence):
    return ascii_number(os.lseek(0, offset, whence))


# ---------------------------------------------------------------------------
# Built-in commands: read-only facts about this machine, in plain text
# ---------------------------------------------------------------------------

def read_bytes(path):
    """A small file's bytes, or None when it cannot be read."""
    try:
        handle = open(path, 'rb')
        try:
            return handle.read()
        finally:
            handle.close()
    except (IOError, OSError):
        return None


def read_text(path):
    """A small file's text (UTF-8, whatever the locale; a byte that is
    not UTF-8 read as U+FFFD), or None when it cannot be read."""
    data = read_bytes(path)
    return None if data is None else data.decode('utf-8', 'replace')


#: A backslash escape inside double quotes, as os-release(5) allows them.
SHELL_ESCAPE = Pattern(r'\\([\\"$`])')


def read_os_release(root='/'):
    """The fields of /etc/os-release, else /usr/lib/os-release (may be {})."""
    return parse_shell_assignments(
        read_text(os.path.join(root, 'etc/os-release')) or
        read_text(os.path.join(root, 'usr/lib/os-release')))


def parse_shell_assignments(text):
    """``KEY=value`` lines as in os-release and lsb-release, quotes removed."""
    values = {}
    for line in (text or '').splitlines():
        line = line.strip()
        if not line or line.startswith('#') or '=' not in line:
            continue
        key, value = line.split('=', 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = SHELL_ESCAPE.sub(r'\1', value[1:-1])
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def os_identity(root='/'):
    """Name the distribution, from whichever release files the guest has.

    Tried in order: /etc/os-release (systemd era), /etc/lsb-release
    (Ubuntu), /etc/redhat-release (RHEL, CentOS, Fedora), /etc/debian_version.

    :param root: the filesystem root to read from (a test seam).
    :returns: dict with ``id``, ``name``, ``release``, ``codename`` and
        ``pretty-name`` (empty strings when unknown).
    """
    def etc(name):
        return read_text(os.path.join(root, 'etc', name))

    info = {'id': '', 'name': '', 'release': '', 'codename': '',
            'pretty-name': ''}
    release = read_os_release(root)
    lsb = parse_shell_assignments(etc('lsb-release'))
    redhat = (etc('redhat-release') or '').strip()
    debian = (etc('debian_version') or '').strip()
    if release:
        info.update({
            'id': release.get('ID', ''), 'name': release.get('NAME', ''),
            'release': release.get('VERSION_ID', ''),
            'codename': release.get('VERSION_CODENAME', ''),
            'pretty-name': release.get('PRETTY_NAME', '')})
    elif lsb.get('DISTRIB_ID'):
        info.update({
            'id': lsb['DISTRIB_ID'].lower(), 'name': lsb['DISTRIB_ID'],
            'release': lsb.get('DISTRIB_RELEASE', ''),
            'codename': lsb.get('DISTRIB_CODENAME', ''),
            'pretty-name': lsb.get('DISTRIB_DESCRIPTION', '')})
    elif redhat:
        info.update(parse_redhat_release(redhat))
    elif debian:
        info.update({
            'id': 'debian', 'name': 'Debian GNU/Linux', 'release': debian,
            'pretty-name': u('Debian GNU/Linux {0}').format(debian)})
    if not info['codename']:
        info['codename'] = (
            lsb.get('DISTRIB_CODENAME') or
            (redhat and parse_redhat_release(redhat)['codename']) or
            (info['id'] == 'debian' and
             DEBIAN_CODENAMES.get(debian.split('.')[0])) or '')
    return info


def parse_redhat_release(text):
    """Read e.g. ``CentOS release 6.10 (Final)`` into identity fields."""
    text = text.strip()
    words = text.split()
    release = codename = ''
    if 'release' in words:
        position = words.index('release')
        name = ' '.join(words[:position])
        rest = words[position + 1:]
        if rest:
            release = rest[0]
        if '(' in text and text.endswith(')'):
            codename = text[text.rindex('(') + 1:-1]
    else:
        name = text
    lowered = name.lower()
    if lowered.startswith('red hat'):
        distro_id = 'rhel'
    else:
        distro_id = lowered.split()[0] if lowered else ''
    return {'id': distro_id, 'name': name, 'release': release,
            'codename': codename, 'pretty-name': text}


def text_lines(lines):
    """A built-in's output: each line ends in a newline, UTF-8 encoded."""
    return ''.join(line + '\n' for line in lines).encode('utf-8')


def builtin_hostname(args):
    return local_bytes(os.uname()[1]) + b'\n', 0


def builtin_os_info(args):
    info = os_identity()
    uname = os.uname()
    info['kernel'] = uname[2]
    info['machine'] = uname[4]
    return text_lines([u('{0}={1}').format(key, info[key]) for key in
                       ('id', 'name', 'release', 'codename', 'pretty-name',
                        'kernel', 'machine')]), 0


def builtin_ip_addresses(args):
    lines = []
    for interface in network_interfaces():
        for address in interface.get('ip-addresses', []):
            lines.append('{0} {1} {2}/{3}'.format(
                interface['name'], address['ip-address-type'].replace(
                    'ipv4', 'inet').replace('ipv6', 'inet6'),
                address['ip-address'], address['prefix']))
    return text_lines(lines), 0


def builtin_disk_usage(args, mounts_path='/proc/mounts'):
    lines = [b'Filesystem               Type          1K-blocks         Used'
             b'    Available Use% Mounted on\n']
    for device, mountpoint, fstype, size, used, available in disk_usage(
            mounts_path):
        percent = b'-'
        if used + available:  # rounded up, as df does
            percent = ascii_number((used * 100 + used + available - 1) //
                                   (used + available)) + b'%'
        lines.append(b'%-24s %-10s %12s %12s %12s %4s %s\n' % (
            device, fstype, ascii_number(size // 1024),
            ascii_number(used // 1024), ascii_number(available // 1024),
            percent, mountpoint))
    return b''.join(lines), 0


def ascii_number(number):
    return str(number).encode('ascii')


def builtin_uptime(args):
    uptime = (read_text('/proc/uptime') or '0').split()[0]
    load = (read_text('/proc/loadavg') or '0 0 0').split()[:3]
    text = 'uptime-seconds={0}\nload-1={1}\nload-5={2}\nload-15={3}\n'.format(
        uptime, load[0], load[1], load[2])
    return text.encode('ascii'), 0


#: The built-in commands: name -> function(args) -> (stdout bytes, status).
BUILTINS = {
    'hostname': builtin_hostname,
    'os-info': builtin_os_info,
    'ip-addresses': builtin_ip_addresses,
    'disk-usage': builtin_disk_usage,
    'uptime': builtin_uptime,
}


#: An octal escape in /proc/mounts (space, tab, newline, backslash).
MOUNT_ESCAPE = Pattern(b'\\\\([0-7]{3})')


def unescape_mount(field):
    """A field of /proc/mounts or mountinfo, its octal escapes undone."""
    return MOUNT_ESCAPE.sub(lambda m: struct.pack('B', int(m.group(1), 8)),
                            field)


def disk_usage(mounts_path='/proc/mounts'):
    """Sizes of mounted local filesystems, like df; devices, mount points
    and types as bytes, as the kernel gives them.

    :returns: ``(device, mountpoint, type, size, used, available)`` tuples,
        sizes in bytes, one per mount point.
    """
    mounts = {}
    order = []
    for line in (read_bytes(mounts_path) or b'').splitlines():
        fields = [unescape_mount(field) for field in line.split()[:3]]
        if (len(fields) == 3 and fields[2] not in SKIPPED_FILESYSTEMS and
                not fields[2].startswith(b'fuse')):
            if fields[1] not in mounts:
                order.append(fields[1])
            mounts[fields[1]] = fields  # the last mount on a path is visible
    rows = []
    for mountpoint in order:
        device, _, fstype = mounts[mountpoint]
        try:
            usage = os.statvfs(mountpoint)
        except OSError:
            continue
        if not usage.f_blocks:
            continue
        size = usage.f_blocks * usage.f_frsize
        available = usage.f_bavail * usage.f_frsize
        used = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
        rows.append((device, mountpoint, fstype, size, used, available))
    return rows


def network_interfaces(sys_net='/sys/class/net'):
    """Interfaces with their addresses, in guest-network-get-interfaces' shape.

    Addresses come from the kernel over netlink (every address, not only the
    first per interface as SIOCGIFCONF gives); names, hardware addresses and
    statistics come from sysfs.
    """
    names = {}
    try:
        entries = sorted(os.listdir(sys_net))
    except OSError:
        entries = []
    for name in entries:
        index = read_text(os.path.join(sys_net, name, 'ifindex'))
        if index and index.strip().isdigit():
            names[int(index)] = name
    addresses = {}
    for index, family, address, prefix in netlink_addresses():
        addresses.setdefault(index, []).append({
            'ip-address-type': family, 'ip-address': address,
            'prefix': prefix})
    interfaces = []
    for index in sorted(names):
        name = names[index]
        interface = {'name': name}
        if index in addresses:  # qemu-ga leaves both out otherwise
            interface['ip-addresses'] = addresses[index]
            interface['statistics'] = interface_statistics(sys_net, name)
        hardware = read_text(os.path.join(sys_net, name, 'address'))
        if hardware and hardware.strip():
            interface['hardware-address'] = hardware.strip()
        interfaces.append(interface)
    return interfaces


def interface_statistics(sys_net, name):
    """Counters in qemu-ga's names, from /sys/class/net/NAME/statistics."""
    counters = {}
    for ours, kernel in (('rx-bytes', 'rx_bytes'), ('rx-packets', 'rx_packets'),
                         ('rx-errs', 'rx_errors'), ('rx-dropped', 'rx_dropped'),
                         ('tx-bytes', 'tx_bytes'), ('tx-packets', 'tx_packets'),
                         ('tx-errs', 'tx_errors'), ('tx-dropped', 'tx_dropped')):
        value = read_text(os.path.join(sys_net, name, 'statistics', kernel))
        counters[ours] = int(value) if value and value.strip().isdigit() else 0
    return counters


#: Netlink constants from <linux/netlink.h>, <linux/rtnetlink.h>.
NETLINK_ROUTE = 0
RTM_GETADDR = 22
RTM_NEWADDR = 20
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
IFA_ADDRESS = 1
IFA_LOCAL = 2


def netlink_addresses():
    """Ask the kernel for every interface address (RTM_GETADDR dump).

    :returns: ``(interface_index, 'ipv4'|'ipv6', address, prefix)`` tuples.
    """
    import socket  # not at start: a guest's call never needs it
    families = {socket.AF_INET: 'ipv4', socket.AF_INET6: 'ipv6'}
    found = []
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        request = struct.pack('=IHHII', 16 + 8, RTM_GETADDR,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        sock.send(request + struct.pack('=BBBBI', 0, 0, 0, 0, 0))
        done = False
        while not done:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from('=IH', data, offset)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
                    done = True
                    break
                if kind == RTM_NEWADDR:
                    entry = parse_address_message(
                        data[offset + 16:offset + length], families)
                    if entry:
                        found.append(entry)
                offset += (length + 3) & ~3
    finally:
        sock.close()
    return found


def parse_address_message(body, families):
    """One RTM_NEWADDR message body into an address tuple (or None)."""
    family, prefix, _, _, index = struct.unpack_from('=BBBBI', body)
    if family not in families:
        return None
    attributes = {}
    offset = 8
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from('=HH', body, offset)
        if length < 4:
            break
        attributes[kind] = body[offset + 4:offset + length]
        offset += (length + 3) & ~3
    raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if raw is None:
        return None
    import socket
    return index, families[family], socket.inet_ntop(family, raw), prefix


def logged_in_users():
    """The users logged in, as guest-get-users lists them: one entry per
    name, in the order of its first utmp record, with its earliest login
    time in seconds (a float, as qemu-ga computes it).

    The file is read in the loop: /var/run is a tmpfs (or the root
    filesystem, on the oldest guests), whose reads cannot hang.  A
    trailing partial record is left out, as glibc leaves it out.
    """
    data = read_bytes(UTMP_PATH) or b''
    users = []
    earliest = {}
    for start in range(0, len(data) - UTMP_RECORD.size + 1, UTMP_RECORD.size):
        kind, name, seconds, microseconds = UTMP_RECORD.unpack_from(
            data, start)
        if kind != USER_PROCESS:
            continue
        name = wire_text(name.split(b'\0', 1)[0])
        login = float(seconds) + microseconds / 1000000.0
        if name not in earliest:
            earliest[name] = {'user': name, 'login-time': login}
            users.append(earliest[name])
        elif login < earliest[name]['login-time']:
            earliest[name]['login-time'] = login
    return users


def block_mounts():
    """The mounts of block devices, as qemu-ga 7.2 lists them: from
    mountinfo, those whose device number has a major (btrfs, whose
    number has none, by its device file's).

    :returns: ``(mountpoint, type, major, minor)`` tuples, bytes and ints.
    """
    mounts = []
    for line in (read_bytes(MOUNTINFO_PATH) or b'').splitlines():
        fields = line.split()
        if b'-' not in fields[6:] or len(fields) < 7:
            continue
        dash = fields.index(b'-', 6)
        number = fields[2].split(b':')
        if dash + 1 >= len(fields) or len(number) != 2 or not (
                number[0].isdigit() and number[1].isdigit()):
            continue
        fstype = fields[dash + 1]
        major, minor = int(number[0]), int(number[1])
        if not major:
            if fstype != b'btrfs' or dash + 2 >= len(fields):
                continue
            try:
                device = os.stat(unescape_mount(fields[dash + 2]))
            except OSError:
                continue
            if not stat.S_ISBLK(device.st_mode):
                continue
            major, minor = os.major(device.st_rdev), os.minor(device.st_rdev)
        mounts.append((unescape_mount(fields[4]), fstype, major, minor))
    return mounts


def filesystems():
    """guest-get-fsinfo's answer: the block devices' filesystems, the last
    mounted first, as qemu-ga lists them.  Run in a child: statvfs() of a
    dead device's filesystem can hang."""
    found = []
    for mountpoint, fstype, major, minor in block_mounts():
        info = {'mountpoint': wire_text(mountpoint),
                'type': wire_text(fstype), 'disk': []}
        add_disks(os.path.join(SYS, 'dev', 'block', '{0}:{1}'.format(
            major, minor)), info)
        try:
            usage = os.statvfs(mountpoint)
        except OSError:
            pass
        else:  # root's reserve counts in neither
            used = usage.f_blocks - usage.f_bfree
            info['used-bytes'] = used * usage.f_frsize
            info['total-bytes'] = (used + usage.f_bavail) * usage.f_frsize
        found.insert(0, info)
    return found


def add_disks(device, info):
    """Name the filesystem on ``device`` (a sysfs path) in ``info`` and add
    the disks under it: the device itself, or for a virtual device (LVM,
    RAID, dm-crypt) those it is made of, in turn."""
    if not os.path.exists(device):  # a container's /sys may lack it
        info.setdefault('name', wire_text(os.path.basename(device)))
        return
    syspath = os.path.realpath(device)
    info.setdefault('name', wire_text(os.path.basename(syspath)))
    if '/devices/virtual/block/' not in syspath:
        disk = disk_address(syspath)
        if disk:
            info['disk'].insert(0, disk)
        return
    slaves = os.path.join(syspath, 'slaves')
    for name in list_directory(slaves):
        if os.path.islink(os.path.join(slaves, name)):
            add_disks(os.path.join(slaves, name), info)


def list_directory(path):
    """A directory's entries in its own order ([] if it cannot be read)."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def disk_address(syspath):
    """Where a disk sits, as qemu-ga's guest-get-fsinfo describes it (None
    when nothing is known): its controller's PCI address, its bus type
    and numbers, its device file and its serial number (both from udev,
    as qemu-ga's libudev has them)."""
    disk = {'pci-controller': {'domain': -1, 'bus': -1, 'slot': -1,
                               'function': -1},
            'bus-type': 'unknown', 'bus': 0, 'target': 0, 'unit': 0}
    for member, value in (('dev', device_file(syspath)),
                          ('serial', udev_property(syspath, 'ID_SERIAL'))):
        if value:
            disk[member] = value
    if '/devices/pci' in syspath:
        known = describe_pci_disk(syspath, disk)
    elif '/virtio' in syspath and '/block' in syspath:
        known = True  # virtio without PCI (virtio-mmio)
        target = SCSI_TARGET.search(syspath)
        if target:
            disk['bus'], disk['target'], disk['unit'] = map(
                int, target.groups())
        disk['bus-type'] = 'scsi' if target else 'virtio'
    else:  # s390 channel devices among others: qemu-ga reads ccw-address
        known = False
    if known or 'dev' in disk or 'serial' in disk:
        return disk
    return None


def describe_pci_disk(syspath, disk):
    """Fill in a disk behind a PCI controller qemu-ga knows: the first
    device on the sysfs path, bridges passed, whose driver is in
    DISK_DRIVERS.  Returns whether its bus was understood."""
    start = syspath.find('/devices/pci') + 12
    address = PCI_ADDRESS.match(syspath, syspath.find('/', start))
    while address:
        driver = os.path.basename(os.path.realpath(
            syspath[:address.end()] + '/driver'))
        if driver in DISK_DRIVERS:
            break
        address = PCI_ADDRESS.match(syspath, address.end())
    if not address:
        return False
    target = SCSI_TARGET.search(syspath)
    target = target and [int(number) for number in target.groups()]
    host = controller_index(syspath)
    pci = disk['pci-controller']
    pci['domain'], pci['bus'], pci['slot'], pci['function'] = [
        int(number, 16) for number in address.groups()]
    if driver == 'nvme':
        disk['bus-type'] = 'nvme'
    elif driver == 'virtio-pci':
        disk['bus-type'] = 'scsi' if target else 'virtio'
        if target:
            disk['unit'] = target[2]
    elif not target or (driver != 'sym53c8xx' and host is None):
        return False
    elif driver == 'sym53c8xx':
        disk['bus-type'], disk['unit'] = 'scsi', target[1]
    elif driver == 'ata_piix':  # a host per IDE bus
        disk['bus-type'], disk['bus'], disk['unit'] = 'ide', host, target[1]
    else:  # ahci: a host per port
        disk['bus-type'], disk['unit'] = 'sata', host
    return True


def controller_index(syspath):
    """The rank of the disk's ataN (else hostN) among its controller's
    first eight, in number order (None when it has none): qemu-ga's bus
    number for IDE, its unit for SATA."""
    for kind in ('ata', 'host'):
        match = re.search('/' + kind + '([0-9]+)', syspath)
        if match:
            break
    if not match:
        return None
    numbers = []
    for name in list_directory(syspath[:match.start()]):
        number = re.match(kind + '([0-9]+)', name)
        if number and len(numbers) < 8:
            numbers.append(int(number.group(1)))
    numbers.sort()
    host = int(match.group(1))
    return numbers.index(host) if host in numbers else None


def udev_fields(syspath):
    """A block device's uevent fields (DEVNAME, MAJOR, MINOR...)."""
    fields = {}
    for line in (read_bytes(os.path.join(syspath, 'uevent')) or
                 b'').splitlines():
        key, _, value = line.partition(b'=')
        fields[key] = value
    return fields


def device_file(syspath):
    """The device file udev names for it: /dev/ and the kernel's name."""
    name = udev_fields(syspath).get(b'DEVNAME')
    return name and wire_text(b'/dev/' + name)


def udev_property(syspath, key):
    """A property udev's rules gave the block device, from its database
    (ID_SERIAL, DM_NAME...); None when udev has none."""
    fields = udev_fields(syspath)
    number = [fields.get(name, b'').decode('ascii', 'replace')
              for name in (b'MAJOR', b'MINOR')]
    prefix = b'E:' + key.encode('ascii') + b'='
    for line in (read_bytes(os.path.join(UDEV_DATA, 'b{0}:{1}'.format(
            *number))) or b'').splitlines():
        if line.startswith(prefix):
            return wire_text(line[len(prefix):])
    return None


def disks():
    """guest-get-disks' answer, as qemu-ga lists them: each disk of
    /sys/block with a size (its partitions before it, the last disk
    first), with the disks it is made of, its address, and its
    device-mapper name.  sysfs and udev's database only: read in the
    loop, as their reads cannot hang."""
    block = os.path.join(SYS, 'block')
    try:
        names = os.listdir(block)
    except OSError as e:
        raise RequestError('Can\'t open directory "/sys/block": {0}'.format(
            os.strerror(e.errno)))
    found = []
    for name in names:
        syspath = os.path.join(block, name)
        device = device_file(syspath)
        if (not os.path.islink(syspath) or not device or
                read_bytes(os.path.join(syspath, 'size')) in (None, b'0\n')):
            continue
        disk = {'name': device, 'partition': False}
        alias = udev_property(syspath, 'DM_NAME')
        if alias:
            disk['alias'] = alias
        found.insert(0, disk)
        if '/devices/virtual/block/' not in os.path.realpath(syspath):
            info = {'disk': []}
            add_disks(syspath, info)
            if info['disk']:
                disk['address'] = info['disk'][0]
        slaves = os.path.join(syspath, 'slaves')
        if os.path.isdir(slaves):
            disk['dependencies'] = []
            for slave in list_directory(slaves):
                slave_device = device_file(os.path.join(slaves, slave))
                if slave_device:
                    disk['dependencies'].insert(0, slave_device)
        for entry in list_directory(syspath):
            partition = os.path.join(syspath, entry)
            if not (entry.startswith(name) and
                    PARTITION.match(entry[len(name):]) and
                    os.path.isdir(partition) and
                    not os.path.islink(partition)):
                continue
            partition = device_file(partition)
            if partition:
                found.insert(0, {'name': partition, 'partition': True,
                                 'dependencies': [device]})
    return found


def reply_of(args):
    """A function's work for Server._answer_from_child, in its forked
    child: the reply that ``args[0](*args[1:])`` makes, as one JSON line."""
    try:
        reply = {'return': args[0](*args[1:])}
    except RequestError as e:
        reply = {'error': {'class': e.error_class, 'desc': e.desc}}
    return encode_message(reply), 0


def value_of_reply(output):
    """The value of the reply reply_of() wrote, or its RequestError."""
    if len(output) >= TOOL_OUTPUT:
        raise RequestError('the answer is longer than {0} bytes'.format(
            TOOL_OUTPUT))
    reply = json.loads(output.decode('ascii'))
    if 'error' in reply:
        raise RequestError(reply['error']['desc'], reply['error']['class'])
    return reply['return']


def processor_ids():
    """The processors' numbers, in the order of SYS_CPU's entries (qemu-ga's
    order: the directory's, not the numbers')."""
    try:
        names = os.listdir(SYS_CPU)
    except OSError as e:
        raise RequestError('failed to list entries: {0}: {1}'.format(
            SYS_CPU, os.strerror(e.errno)))
    return [int(match.group(1)) for match in map(CPU_DIRECTORY.match, names)
            if match]


def open_cpu_online(logical_id, flags):
    """A processor's ``online`` file opened, and its path for messages.

    :returns: ``(path, fd)``, fd None where the file is missing: a
        processor (cpu0, mostly) that cannot be taken offline.
    :raises RequestError: in qemu-ga's words, for a processor that does
        not exist or a file that cannot be opened.
    """
    directory = '{0}/cpu{1}/'.format(SYS_CPU, logical_id)
    path = directory + '/online'  # qemu-ga's messages show the "//"
    try:
        os.close(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as e:
        raise RequestError(sysfs_error('open', directory, e))
    try:
        return path, os.open(path, flags)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise RequestError(sysfs_error('open', path, e))
        return path, None


def sysfs_error(call, path, error):
    return '{0}("{1}"): {2}'.format(call, path, os.strerror(error.errno))


def read_online(path, fd):
    """Whether the processor is online: its ``online`` file's first byte."""
    try:
        status = os.read(fd, 1)
    except OSError as e:
        raise RequestError(sysfs_error('pread', path, e))
    if not status:
        raise RequestError('pread("{0}"): unexpected EOF'.format(path))
    return status != b'0'


def vcpu_state(logical_id):
    """One guest-get-vcpus entry."""
    path, fd = open_cpu_online(logical_id, os.O_RDONLY)
    if fd is None:
        return {'logical-id': logical_id, 'online': True,
                'can-offline': False}
    try:
        return {'logical-id': logical_id, 'online': read_online(path, fd),
                'can-offline': True}
    finally:
        os.close(fd)


def set_vcpus(vcpus):
    """Bring processors on- or offline, in order, until one fails.

    :returns: how many were done; the first one's error when none was.
    """
    for done, vcpu in enumerate(vcpus):
        try:
            set_vcpu(vcpu['logical-id'], vcpu['online'])
        except RequestError:
            if not done:
                raise
            return done
    return len(vcpus)


def set_vcpu(logical_id, online):
    path, fd = open_cpu_online(logical_id, os.O_RDWR)
    if fd is None:
        if not online:
            raise RequestError("logical processor #{0} can't be offlined"
                               .format(logical_id))
        return
    try:
        if read_online(path, fd) != online:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, b'1' if online else b'0')
            except OSError as e:
                raise RequestError(sysfs_error('pwrite', path, e))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Acting on the guest: the tools some qemu-ga requests run
# ---------------------------------------------------------------------------

def find_tool(*names):
    """The path of the first of ``names`` that TOOL_PATH has.

    :raises RequestError: naming them, when it has none (busybox guests
        have no chpasswd).
    """
    for name in names:
        for directory in TOOL_PATH.split(':'):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    raise RequestError("cannot find '{0}' program in PATH ({1})".format(
        "' or '".join(names), TOOL_PATH))


def check_tool(result, message, failure):
    """Refuse a tool's end unless it exited with status 0.

    :param message: what it wrote (bytes), added to the desc as newer
        qemu-ga add it (7.2 sends the tool's output to /dev/null).
    :param failure: the desc for a non-zero exit status, in qemu-ga's
        words.
    """
    if 'signal' in result:
        raise RequestError('child process has terminated abnormally')
    if result['exitcode']:
        message = message.decode('utf-8', 'replace').strip()
        raise RequestError(failure + (message and ': ' + message))


def clock_time(time_ns):
    """A time in nanoseconds since the epoch as ``(seconds,
    microseconds)``, cut toward zero as qemu-ga's C division does.

    :raises RequestError: as qemu-ga, "Time N is too large" where a C long
        (time_t) cannot hold its seconds (32-bit guests), "Invalid time"
        unless its year, in local time, is 1970 to 2069.
    """
    seconds, nanoseconds = divmod(abs(time_ns), 10 ** 9)
    microseconds = nanoseconds // 1000
    if time_ns < 0:
        seconds, microseconds = -seconds, -microseconds
    if abs(seconds) >= 2 ** (8 * struct.calcsize('l') - 1):
        raise RequestError('Time {0} is too large'.format(time_ns))
    if not 1970 <= time.localtime(seconds).tm_year < 2070:
        raise RequestError('Invalid time')
    return seconds, microseconds


def set_clock(seconds, microseconds):
    """settimeofday(), as qemu-ga calls it, through ctypes: the one way
    every Python from 2.6 on has (time.clock_settime() is 3.3+, and
    ``date -s`` drops the microseconds or is busybox's).  Tests replace
    this function."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.settimeofday((ctypes.c_long * 2)(seconds, microseconds), None):
        raise RequestError('Failed to set time to guest: ' +
                           os.strerror(ctypes.get_errno()))


#: The ioctl that discards a filesystem's free blocks: _IOWR('X', 121,
#: struct fstrim_range), the range being three 64-bit numbers: start,
#: length and minimum extent (the kernel writes back the bytes trimmed and
#: the minimum it used).
FITRIM = 0xc0185879


def trim_filesystems(minimum):
    """guest-fstrim's work, in a forked child: FITRIM on each mount point
    of block_mounts(), the last mounted first as qemu-ga lists them.

    :param minimum: the smallest extent to discard, in bytes.
    """
    paths = []
    for path, _, _, _ in reversed(block_mounts()):
        result = {'path': wire_text(path)}
        paths.append(result)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            result['error'] = 'failed to open: ' + os.strerror(e.errno)
            continue
        try:
            _, trimmed, minimum = struct.unpack('=QQQ', fcntl.ioctl(
                fd, FITRIM, struct.pack('=QQQ', 0, 2 ** 64 - 1,
                                        minimum % 2 ** 64)))
            result.update(trimmed=trimmed, minimum=minimum)
        except (IOError, OSError) as e:
            result['error'] = (
                'trim not supported' if e.errno in (errno.ENOTTY,
                                                    errno.EOPNOTSUPP)
                else 'failed to trim: ' + os.strerror(e.errno))
        finally:
            os.close(fd)
    return {'paths': paths}


#: guest-shutdown's modes: shutdown's option, and the tool run where
#: there is no shutdown.
SHUTDOWN_MODES = {'powerdown': ('-P', 'poweroff'), 'halt': ('-H', 'halt'),
                  'reboot': ('-r', 'reboot')}



# ---------------------------------------------------------------------------
# ~/.ssh/authorized_keys, kept as qemu-ga's guest-ssh-* requests keep it
# ---------------------------------------------------------------------------

#: Bytes of an authorized_keys file read at most: its keys must fit in a
#: reply from the child (TOOL_OUTPUT), even escaped 6 characters a byte.
AUTHORIZED_KEYS_LIMIT = TOOL_OUTPUT // 8

#: What glib's g_strstrip() strips: bytes.strip()'s spaces but \v.
GLIB_SPACES = b' \t\n\f\r'

#: How glib, whose messages qemu-ga passes on, quotes a file name.
GLIB_QUOTED = json.loads('"\\u201c%s\\u201d"')


def public_keys(keys):
    """The keys' bytes, each checked as qemu-ga checks them: a key is one
    line, not a comment.

    :raises RequestError: in qemu-ga's words, for the first that is not.
    """
    found = []
    for key in keys:
        try:
            data = wire_bytes(key)
        except UnicodeError:  # a lone surrogate that stands for no byte
            data = None
        if data is None or data[:1] == b'#' or b'\n' in data or \
                b'\0' in data:
            raise RequestError(
                u("invalid OpenSSH public key: '{0}'").format(key))
        found.append(data)
    return found


def become_user(username):
    """The user's passwd entry, this forked child then acting as that user
    (when it runs as root): the kernel checks what it reads and writes
    under the home as the user's own doing, so a ~/.ssh or authorized_keys
    that is a symlink to /etc, or a file of someone else's, gets nothing
    the user could not get (qemu-ga, as root, follows them).

    :raises RequestError: for an unknown user (qemu-ga's words: its
        lookup's errno is 0) or one without a home directory (qemu-ga
        would use a path relative to its working directory).
    """
    try:
        user = pwd.getpwnam(native_str(username))
    except (KeyError, ValueError, UnicodeError):
        raise RequestError(
            u("failed to lookup user '{0}': Success").format(username))
    if not os.path.isabs(user.pw_dir):
        raise RequestError(u("user '{0}' has no home directory").format(
            username))
    if os.geteuid() == 0 and user.pw_uid != 0:
        try:
            os.setgroups([user.pw_gid] + [group.gr_gid for group in
                                          grp.getgrall()
                                          if user.pw_name in group.gr_mem])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        except OSError as e:
            raise RequestError(u("failed to act as user '{0}': {1}").format(
                username, os.strerror(e.errno)))
    return user


def authorized_keys_path(user):
    return os.path.join(user.pw_dir, '.ssh', 'authorized_keys')


def read_authorized_keys(path, missing_ok=False):
    """The file's lines (bytes), split at each newline as qemu-ga splits
    them (a last newline leaves an empty last line).

    :param missing_ok: return None if the file (or ~/.ssh) does not exist.
    :raises RequestError: as qemu-ga's (glib's) messages say, or for a
        file longer than AUTHORIZED_KEYS_LIMIT.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if missing_ok and e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise file_error('read', path, 'Failed to open file {0}: {1}',
                         os.strerror(e.errno))
    data = b''
    try:
        while len(data) <= AUTHORIZED_KEYS_LIMIT:
            chunk = os.read(fd, AUTHORIZED_KEYS_LIMIT + 1 - len(data))
            if not chunk:
                return data.split(b'\n')
            data += chunk
    except OSError as e:
        raise file_error('read', path, 'Error reading file {0}: {1}',
                         os.strerror(e.errno))
    finally:
        os.close(fd)
    raise file_error('read', path, 'File {0} is longer than {1} bytes',
                     AUTHORIZED_KEYS_LIMIT)


def file_error(action, path, message, reason, subject=None):
    """qemu-ga's error for a failed read or write of ``path``, with glib's
    ``message`` inside, about ``subject`` (default: the file) and why."""
    return RequestError(u("failed to {0} '{1}': {2}").format(
        action, wire_text(path), u(message).format(
            GLIB_QUOTED % wire_text(subject or path), reason)))


def write_authorized_keys(path, lines, user):
    """Replace the file with ``lines``, joined with newlines as qemu-ga
    joins them: a new file, the user's and 0600 before it has a byte,
    renamed over the old one, so that a crash leaves the old file or the
    new one (and a symlink there is replaced, never followed)."""
    temporary = '{0}.{1}'.format(path, native_str(wire_text(
        binascii.hexlify(os.urandom(4)))))
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                     os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise file_error('write to', path, 'Failed to create file {0}: {1}',
                         os.strerror(e.errno), temporary)
    try:
        os.fchown(fd, user.pw_uid, user.pw_gid)
        os.fchmod(fd, 0o600)
        data = b'\n'.join(lines)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
        os.rename(temporary, path)
    except OSError as e:
        os.unlink(temporary)
        raise file_error('write to', path, 'Failed to write file {0}: {1}',
                         os.strerror(e.errno), temporary)
    finally:
        os.close(fd)
    return {}


def make_ssh_directory(path, user):
    """~/.ssh, made as qemu-ga makes it: 0700 and the user's."""
    try:
        os.mkdir(path, 0o700)
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, 0o700)
    except OSError as e:
        raise RequestError(u("failed to create directory '{0}': {1}").format(
            wire_text(path), os.strerror(e.errno)))


def get_authorized_keys(username):
    """guest-ssh-get-authorized-keys' work, in a forked child: the keys,
    stripped, without blank lines and comments, the last first (as
    qemu-ga lists them)."""
    lines = read_authorized_keys(authorized_keys_path(become_user(username)))
    keys = [line.strip(GLIB_SPACES) for line in reversed(lines)]
    return {'keys': [wire_text(key) for key in keys
                     if key[:1] not in (b'', b'#')]}


def add_authorized_keys(username, keys, reset):
    """guest-ssh-add-authorized-keys' work, in a forked child: the keys
    not there yet appended (all of them, to no other line, if ``reset``);
    ~/.ssh made if there is no file.  A file that cannot be read is an
    error: qemu-ga would replace it, keys lost for a passing I/O error."""
    user = become_user(username)
    path = authorized_keys_path(user)
    lines = None if reset else read_authorized_keys(path, missing_ok=True)
    if lines is None:
        lines = []
        if not os.path.isdir(os.path.dirname(path)):
            make_ssh_directory(os.path.dirname(path), user)
    for key in keys:
        if key not in lines:
            lines.append(key)
    return write_authorized_keys(path, lines, user)


def remove_authorized_keys(username, keys):
    """guest-ssh-remove-authorized-keys' work, in a forked child: the lines
    that are one of the keys removed; no file, nothing to do."""
    user = become_user(username)
    path = authorized_keys_path(user)
    lines = read_authorized_keys(path, missing_ok=True)
    if lines is None:
        return {}
    return write_authorized_keys(
        path, [line for line in lines if line not in keys], user)


# ============================================================================
# Serving requests: one Server per channel, on the guest and on the host
# ============================================================================

class Server(object):
    """Answers the requests arriving on one channel, one at a time.

    Requests wait in order behind a running command.  Whatever the client
    sent before a 0xFF byte or before it hung up is dropped unanswered: on a
    virtio-serial port such bytes can outlive their client, and a command
    must never run for a client that has gone.

    :param commands: the CommandSet offered to this channel.
    :param children: the Children registry that reaps the commands run.
    :param env: extra environment variables for the commands run.
    :param on_disconnect: called after the client has gone.
    :param refused: names of requests answered "has been disabled".
    """

    #: The requests served: (name, method, parameters), each parameter as
    #: (name, type in PARAMETER_TYPES, required?), checked in this order
    #: before the method runs, as QEMU's generated code checks them.
    REQUESTS = (
        ('guest-sync-delimited', 'rpc_sync_delimited', (('id', 'int', True),)),
        ('guest-sync', 'rpc_sync', (('id', 'int', True),)),
        ('guest-ping', 'rpc_ping', ()),
        ('guest-info', 'rpc_info', ()),
        ('guest-get-host-name', 'rpc_host_name', ()),
        ('guest-get-osinfo', 'rpc_osinfo', ()),
        ('guest-get-time', 'rpc_time', ()),
        ('guest-get-timezone', 'rpc_timezone', ()),
        ('guest-get-users', 'rpc_users', ()),
        ('guest-get-vcpus', 'rpc_vcpus', ()),
        ('guest-get-fsinfo', 'rpc_fsinfo', ()),
        ('guest-get-disks', 'rpc_disks', ()),
        ('guest-set-vcpus', 'rpc_set_vcpus', (('vcpus', (
            ('logical-id', 'int', True), ('online', 'bool', True),
            ('can-offline', 'bool', False)), True),)),
        ('guest-network-get-interfaces', 'rpc_network_interfaces', ()),
        ('guest-set-user-password', 'rpc_set_user_password', (
            ('username', 'str', True), ('password', 'str', True),
            ('crypted', 'bool', True))),
        ('guest-ssh-get-authorized-keys', 'rpc_ssh_get_keys', (
            ('username', 'str', True),)),
        ('guest-ssh-add-authorized-keys', 'rpc_ssh_add_keys', (
            ('username', 'str', True), ('keys', 'strs', True),
            ('reset', 'bool', False))),
        ('guest-ssh-remove-authorized-keys', 'rpc_ssh_remove_keys', (
            ('username', 'str', True), ('keys', 'strs', True))),
        ('guest-shutdown', 'rpc_shutdown', (('mode', 'str', False),)),
        ('guest-set-time', 'rpc_set_time', (('time', 'int', False),)),
        ('guest-fstrim', 'rpc_fstrim', (('minimum', 'int', False),)),
        ('guest-exec', 'rpc_exec', (
            ('path', 'str', True), ('arg', 'strs', False),
            ('env', 'strs', False), ('input-data', 'str', False),
            ('capture-output', 'bool', False))),
        ('guest-exec-status', 'rpc_exec_status', (('pid', 'int', True),)),
        ('guest-file-open', 'rpc_file_open', (
            ('path', 'str', True), ('mode', 'str', False))),
        ('guest-file-close', 'rpc_file_close', (('handle', 'int', True),)),
        ('guest-file-read', 'rpc_file_read', (
            ('handle', 'int', True), ('count', 'int', False))),
        ('guest-file-write', 'rpc_file_write', (
            ('handle', 'int', True), ('buf-b64', 'str', True),
            ('count', 'int', False))),
        ('guest-file-seek', 'rpc_file_seek', (
            ('handle', 'int', True), ('offset', 'int', True),
            ('whence', 'whence', True))),
        ('guest-file-flush', 'rpc_file_flush', (('handle', 'int', True),)),
        ('negotiator-list-commands', 'rpc_list_commands', ()),
        ('negotiator-execute', 'rpc_execute', (
            ('command', 'str', True), ('args', 'strs', False),
            ('input-data', 'str', False), ('timeout', 'seconds', False),
            ('raw-output', 'bool', False),
            ('capture-output', 'bool', False))),
    )

    #: Level of the log line for each error reply.
    ERROR_LOG_LEVEL = INFO

    def __init__(self, loop, fd, name, commands, children, env=None,
                 on_disconnect=None, refused=()):
        self.loop = loop
        self.commands = commands
        self.children = children
        #: The commands' environment: ours, with ``env`` added, made once.
        self.env = dict(os.environ)
        self.env.update(env or {})
        self._on_disconnect = on_disconnect
        self.process = None
        #: (id,) of the request being answered (NO_ID: it has none), or
        #: None: a request's id may be null.
        self._answering = None
        self.methods = {}
        for request, method, parameters in self.REQUESTS:
            self.methods[request] = (getattr(self, method), parameters)
        self.refused = refused
        self.channel = Channel(loop, fd, self, name)

    # -- what the channel reports ------------------------------------------

    def ready(self):
        """Whether a request may be handled now: requests are answered one
        at a time, in order; those sent behind a running command wait in
        the channel (and then in the peer's own buffers)."""
        return self.process is None

    def on_line(self, line):
        if line.strip():
            self._handle(line)

    def on_resync(self, dropped):
        if dropped or self.process:
            log.info('%s: 0xFF received: dropping %d waiting request(s)%s',
                     self.channel.name, dropped,
                     ' and the running command' if self.process else '')
        self._abandon()

    def on_oversized(self):
        log.warning('%s: dropped a request line longer than %d bytes',
                    self.channel.name, MAX_LINE)
        self._send_error(NO_ID, RequestError(
            'Request line longer than {0} bytes; dropped'.format(MAX_LINE)))

    def on_drained(self):
        if self.process:
            self.process.resume()

    def on_disconnect(self):
        self._abandon()
        if self._on_disconnect:
            self._on_disconnect()

    def on_failure(self, error):
        """A callback of this conversation raised: end it (the loop and
        every other conversation go on)."""
        log_failure(self.channel.name, 'ending the conversation', error)
        try:
            self._answer_failure()
        finally:
            self.channel.disconnect('internal error')

    def _answer_failure(self):
        """Answer the request being answered, if any, with an error: on a
        port the client cannot see its conversation end, and would wait for
        its timeout."""
        if self._answering is not None:
            Server._send_error(self, self._answering[0], RequestError(
                'negotiator failed while answering this request and ended '
                'the conversation (its log says why)'))

    def close(self):
        """Stop serving: kill what runs, release the channel's callbacks."""
        self.channel.disconnect('closing')

    def _abandon(self):
        if self.process:
            log.info('%s: killing command pid %d: its client has gone',
                     self.channel.name, self.process.pid)
            self.process.kill()
            self.process = None
        self._answering = None

    # -- answering ---------------------------------------------------------

    def _handle(self, line):
        """Answer one request line.  A RequestError is the peer's mistake
        and gets an error reply; any other exception is a fault of ours
        and ends the conversation (Loop's containment)."""
        request_id = NO_ID
        try:
            request = decode_message(line)
            if 'id' in request:
                check_id(request['id'])
                request_id = request['id']
            name, arguments = self._parse_request(request)
            log.debug('%s: request %s', self.channel.name, name)
            method, parameters = self.methods[name]
            if arguments or parameters:  # guest-ping has nothing to check
                check_arguments(arguments, parameters)
            self._answering = (request_id,)
            result = method(arguments, request_id)
        except RequestError as e:
            self._refuse(request_id, e)
            return
        if result is not None:
            self._send_return(request_id, result)

    def _refuse(self, request_id, error):
        """Send the error reply for a RequestError, and log it."""
        log.log(self.ERROR_LOG_LEVEL, '%s: error reply: %s',
                self.channel.name, printable(error.desc))
        self._send_error(request_id, error)

    def _parse_request(self, request):
        """The request's name and arguments, checked in qemu-ga's order."""
        name = request.get('execute')
        if 'execute' in request and not isinstance(name, string_types):
            raise RequestError("QMP input member 'execute' must be a string")
        arguments = request.get('arguments', {})
        if not isinstance(arguments, dict):
            raise RequestError(
                "QMP input member 'arguments' must be an object")
        for key in request:
            if key not in ('execute', 'arguments', 'id'):
                raise RequestError(
                    u("QMP input member '{0}' is unexpected").format(
                        shown(key)))
        if name is None:
            raise RequestError("QMP input lacks member 'execute'")
        if name not in self.methods:
            raise RequestError(
                u('The command {0} has not been found').format(shown(name)),
                'CommandNotFound')
        if name in self.refused:
            raise RequestError('Command {0} has been disabled'.format(name),
                               'CommandNotFound')
        return name, arguments

    def _send_return(self, request_id, result):
        self._send({'return': result}, request_id)

    def _send_error(self, request_id, error):
        self._send({'error': {'class': error.error_class, 'desc': error.desc}},
                   request_id)

    def _send(self, reply, request_id):
        """Send a request's reply, which ends its answering."""
        self._answering = None
        if request_id is not NO_ID:
            reply['id'] = request_id
        self.channel.send(reply)

    # -- the requests ------------------------------------------------------

    def rpc_sync(self, arguments, request_id):
        """Echo the client's id: it proves which reply belongs to whom."""
        return arguments['id']

    def rpc_sync_delimited(self, arguments, request_id):
        """Like guest-sync, with 0xFF first so the client can skip stale data."""
        self.channel.send_raw(RESYNC_BYTE)
        return arguments['id']

    def rpc_ping(self, arguments, request_id):
        return {}

    def rpc_info(self, arguments, request_id):
        supported = []
        for name, _, _ in self.REQUESTS:
            # guest-shutdown, as qemu-ga's, replies only when it fails.
            supported.append({'enabled': name not in self.refused,
                              'name': name,
                              'success-response': name != 'guest-shutdown'})
        return {'version': __version__, 'supported_commands': supported}

    def rpc_host_name(self, arguments, request_id):
        return {'host-name': os.uname()[1]}  # gethostname()'s, on Linux

    def rpc_osinfo(self, arguments, request_id):
        info = os_identity()
        uname = os.uname()
        result = {'kernel-release': uname[2], 'kernel-version': uname[3],
                  'machine': uname[4]}
        for ours, theirs in (('id', 'id'), ('name', 'name'),
                             ('pretty-name', 'pretty-name'),
                             ('release', 'version-id')):
            if info[ours]:
                result[theirs] = info[ours]
        release = read_os_release()
        if release.get('VERSION'):
            result['version'] = release['VERSION']
        return result

    def rpc_time(self, arguments, request_id):
        """Nanoseconds since the epoch, to the microsecond, as qemu-ga."""
        return int(time.time() * 1000000) * 1000

    def rpc_timezone(self, arguments, request_id):
        zone, offset = local_timezone()
        return {'zone': wire_text(zone), 'offset': offset}

    def rpc_users(self, arguments, request_id):
        return logged_in_users()

    def rpc_vcpus(self, arguments, request_id):
        """sysfs only: its reads cannot hang."""
        return [vcpu_state(logical_id) for logical_id in processor_ids()]

    def rpc_set_vcpus(self, arguments, request_id):
        """In a child: taking a processor offline may take a while."""
        self._answer_from_child(
            request_id, [reply_of, set_vcpus, arguments['vcpus']],
            'child process has failed to set processors',
            reply=value_of_reply, timeout=CHILD_ANSWER_TIMEOUT)

    def rpc_fsinfo(self, arguments, request_id):
        self._answer_from_child(
            request_id, [reply_of, filesystems],
            'child process has failed to list filesystems',
            reply=value_of_reply, timeout=CHILD_ANSWER_TIMEOUT)

    def rpc_disks(self, arguments, request_id):
        return disks()

    def rpc_network_interfaces(self, arguments, request_id):
        return network_interfaces()

    def rpc_list_commands(self, arguments, request_id):
        return [{'name': name, 'kind': kind}
                for name, kind in self.commands.names()]

    def rpc_exec(self, arguments, request_id):
        """Start any program, as the agent's user, as qemu-ga does: the
        reply gives its pid at once, guest-exec-status its end."""
        make_room_for_exec(self.children.execs)
        self.children.check_room()
        path = arguments['path']
        argv = [text_argument(path, 'path')] + [
            text_argument(arg, 'arg') for arg in arguments.get('arg', ())]
        env = self.env
        if 'env' in arguments:
            env = environment(arguments['env'])
        stdin_data = decode_qga_bytes(arguments.get('input-data', ''),
                                      'input-data')
        capture = Capture() if arguments.get('capture-output') else None
        try:
            if not path:  # (Popen would look in every directory of PATH)
                raise OSError(errno.ENOENT, 'an empty path')
            started = GuestExec(self.loop, self.children, argv, env,
                                stdin_data, capture)
        except OSError as e:
            raise RequestError(u(
                "Guest agent command failed, error was 'Failed to execute "
                "child process {0}{1}{2} ({3})'").format(
                    OPENING_QUOTE, shown(path), CLOSING_QUOTE,
                    os.strerror(e.errno)))
        log.info('%s: guest-exec %s with %d argument(s) as pid %d',
                 self.channel.name, printable(shown(path)), len(argv) - 1,
                 started.pid)
        return {'pid': started.pid}

    def rpc_exec_status(self, arguments, request_id):
        for started in self.children.execs:
            if started.pid == arguments['pid']:
                return started.status()
        raise RequestError("Invalid parameter 'pid'")

    def rpc_file_open(self, arguments, request_id):
        self._check_room()
        path, mode = arguments['path'], arguments.get('mode', 'r')
        if mode not in FILE_MODES:
            raise RequestError(u("invalid file open mode '{0}'").format(
                shown(mode)))
        name = text_argument(path, 'path')
        failure = u("failed to open file '{0}' (mode: '{1}')").format(
            shown(path), mode)

        def opened(output):
            self._check_room()  # (again: other conversations opened some)
            fd, error = io_op(os.open, name, FILE_MODES[mode] & ~os.O_CREAT)
            if error is not None:
                raise RequestError(u('{0}: {1}').format(
                    failure, os.strerror(error.errno)))
            found = os.fstat(fd)
            if output.split() != [ascii_number(found.st_dev),
                                  ascii_number(found.st_ino)]:
                os.close(fd)  # replaced meanwhile (a symbolic link?)
                raise RequestError(u('{0}: the file was replaced while it '
                                     'was opened').format(failure))
            handle = self.children.next_handle
            self.children.next_handle += 1
            self.children.files[handle] = fd
            return handle
        self._answer_from_child(
            request_id, [file_operation, open_file, name, FILE_MODES[mode]],
            failure, reply=opened)

    def rpc_file_close(self, arguments, request_id):
        fd = self._file(arguments)
        del self.children.files[arguments['handle']]
        _, error = io_op(os.close, fd)
        if error is not None:
            raise RequestError('failed to close handle: {0}'.format(
                os.strerror(error.errno)))
        return {}

    def rpc_file_read(self, arguments, request_id):
        fd = self._file(arguments)
        count = arguments.get('count', DEFAULT_READ_COUNT)
        check_count(count, MAX_READ_COUNT)
        self._answer_from_child(
            request_id, [file_operation, read_file, count],
            'failed to read file', stdin_fd=fd, keep=MAX_READ_COUNT,
            reply=lambda data: {'count': len(data), 'eof': len(data) < count,
                                'buf-b64': encode_bytes(data)})

    def rpc_file_write(self, arguments, request_id):
        fd = self._file(arguments)
        data = decode_qga_bytes(arguments['buf-b64'], 'buf-b64')
        count = arguments.get('count', len(data))
        check_count(count, len(data))
        self._answer_from_child(
            request_id, [file_operation, write_file, data[:count]],
            'failed to write to file', stdin_fd=fd,
            reply=lambda output: {'count': count, 'eof': False})

    def rpc_file_seek(self, arguments, request_id):
        fd = self._file(arguments)
        whence = SEEK_NAMES.get(arguments['whence'], arguments['whence'])
        if whence not in SEEK_NAMES.values():
            raise RequestError('invalid whence code {0}'.format(whence))
        self._answer_from_child(
            request_id, [file_operation, seek_file, arguments['offset'],
                         whence], 'failed to seek file', stdin_fd=fd,
            reply=lambda output: {'position': int(output), 'eof': False})

    def rpc_file_flush(self, arguments, request_id):
        """Nothing to do: writes are not buffered here."""
        self._file(arguments)
        return {}

    def _check_room(self):
        if len(self.children.files) >= MAX_FILES:
            raise RequestError(
                'guest-file-open keeps {0} files open already; close one '
                'with guest-file-close first'.format(MAX_FILES))

    def _file(self, arguments):
        """The descriptor of the request's file handle."""
        fd = self.children.files.get(arguments['handle'])
        if fd is None:
            raise RequestError("handle '{0}' has not been found".format(
                arguments['handle']))
        return fd

    def rpc_execute(self, arguments, request_id):
        """Run a command, streaming its output as events, then reply; or,
        with capture-output, reply with the output (for clients such as
        ``virsh qemu-agent-command`` that never show events)."""
        name = arguments['command']
        target = self.commands.resolve(name)
        argv = [text_argument(arg, 'args') for arg in arguments.get('args',
                                                                     ())]
        stdin_data = b''
        if arguments.get('input-data') is not None:
            stdin_data = decode_bytes(arguments['input-data'], 'input-data')
        events = OutputEvents(request_id, arguments.get('raw-output', False))
        capture = None
        if arguments.get('capture-output'):
            capture = Capture(MAX_REPLY_CAPTURE)
        self.children.check_room()
        env = dict(self.env)
        env['NEGOTIATOR_COMMAND'] = wire_bytes(name)
        env['NEGOTIATOR_VERSION'] = __version__
        try:
            self.process = Process(
                self.loop, self.children, [target] + argv, env, stdin_data,
                arguments.get('timeout', 0),
                capture.add if capture else lambda stream, data:
                    self._send_output(events.pieces(stream, data)),
                lambda result: self._finish_execute(
                    request_id, capture.add_to(result) if capture else result),
                self.on_failure)
        except OSError as e:
            raise self.commands.start_failure(name, e)
        #: The command, for its log lines.
        self._command = u('{0} with {1} argument(s)').format(
            printable(wire_text(target) if isinstance(target, bytes) else
                      u('built-in {0}').format(name)), len(argv))
        log.debug('%s: running %s as pid %d', self.channel.name,
                  self._command, self.process.pid)
        return None

    def _send_output(self, pieces):
        for piece in pieces:
            self.channel.send_raw(piece)
        if self.process and self.channel.backlog >= HIGH_WATER:
            self.process.pause()

    def _finish_execute(self, request_id, result):
        process, self.process = self.process, None
        self._send_return(request_id, result)
        self._log_exit(process, result)

    def _log_exit(self, process, result):
        """Log a command's end and answer the requests waiting behind it.
        Logged once the reply is on its way: the line costs the caller
        nothing (under emulation a log line takes about 0.4 ms)."""
        log.info('%s: %s, pid %d, %s after %.1f ms',
                 self.channel.name, self._command,
                 process.pid, describe_result(result),
                 (stopwatch() - process.started) * 1e3)
        self.channel.deliver()

    def _answer_from_child(self, request_id, argv, failure, stdin_data=b'',
                           reply=lambda output: {}, timeout=None,
                           stdin_fd=None, keep=TOOL_OUTPUT):
        """Answer a request when a child exits: a tool, or a function whose
        work may take long or hang (a statvfs(), FITRIM or read of a dead
        disk) and then holds up only that child.  Requests wait behind it
        as behind negotiator-execute.  After ``timeout`` seconds (default
        TOOL_TIMEOUT) the child is killed and left to Children (one stuck
        in the kernel dies only when its call returns), and the request
        answered with an error.

        :param argv: the tool's path (find_tool()) and arguments, or a
            function and its arguments, run in a forked child (Builtin):
            ``[reply_of, function, ...]`` with ``reply=value_of_reply``
            makes the function's value, or its RequestError, the reply.
        :param failure: the error reply's desc if the child fails, in
            qemu-ga's words; its message (stderr, else stdout) is added.
        :param reply: makes the reply's value from the child's stdout
            (None: no reply); by default qemu-ga's {} for a request that
            returns nothing.
        :param stdin_fd: the child's stdin, instead of ``stdin_data``.
        :param keep: bytes of each output stream kept.
        """
        self.children.check_room()
        output = Capture(keep)
        timeout = timeout or TOOL_TIMEOUT

        def on_exit(result):
            process, self.process = self.process, None
            try:
                check_tool(result, output.output('err-data') or
                           output.output('out-data'), failure)
                value = reply(output.output('out-data'))
            except RequestError as e:
                self._refuse(request_id, e)
            else:
                if value is None:
                    self._answering = None
                else:
                    self._send_return(request_id, value)
            self._log_exit(process, result)

        def give_up():
            process.kill()
            self.process = None
            self._refuse(request_id, RequestError(
                'child process has terminated abnormally: killed after '
                '{0:g} seconds'.format(timeout)))
            self._log_exit(process, {'signal': signal.SIGKILL,
                                     'timed-out': True})

        env = dict(self.env, PATH=TOOL_PATH)
        try:
            process = self.process = Process(
                self.loop, self.children, argv, env, stdin_data, timeout,
                output.add, on_exit, self.on_failure, stdin_fd, give_up)
        except OSError as e:
            raise RequestError('failed to create child process: ' +
                               os.strerror(e.errno))
        functions = [item for item in argv if callable(item)]
        self._command = printable(wire_text(
            functions[-1].__name__ if functions else argv[0]))

    def rpc_set_user_password(self, arguments, request_id):
        """chpasswd, given ``USER:PASSWORD`` on stdin, as qemu-ga runs it."""
        password = decode_qga_bytes(arguments['password'], 'password')
        if b'\n' in password or b'\0' in password:
            raise RequestError('forbidden characters in raw password')
        username = text_argument(arguments['username'], 'username')
        if b'\n' in username or b':' in username:
            raise RequestError('forbidden characters in username')
        argv = [find_tool('chpasswd')]
        if arguments['crypted']:
            argv.append('-e')
        self._answer_from_child(
            request_id, argv, 'child process has failed to set user '
            'password', username + b':' + password + b'\n')

    def rpc_ssh_get_keys(self, arguments, request_id):
        """In a child, as the user (become_user()): a home may be on a
        hung NFS server."""
        self._answer_ssh(request_id, get_authorized_keys,
                         arguments['username'])

    def rpc_ssh_add_keys(self, arguments, request_id):
        self._answer_ssh(request_id, add_authorized_keys,
                         arguments['username'],
                         public_keys(arguments['keys']),
                         arguments.get('reset', False))

    def rpc_ssh_remove_keys(self, arguments, request_id):
        self._answer_ssh(request_id, remove_authorized_keys,
                         arguments['username'],
                         public_keys(arguments['keys']))

    def _answer_ssh(self, request_id, function, *args):
        self._answer_from_child(
            request_id, [reply_of, function] + list(args),
            'child process has failed to handle authorized keys',
            reply=value_of_reply, timeout=CHILD_ANSWER_TIMEOUT)

    def rpc_shutdown(self, arguments, request_id):
        """``shutdown -h -P|-H|-r +0 MESSAGE``, as qemu-ga 7.2 runs it,
        else (busybox) poweroff, halt or reboot.  No reply when it has
        started the shutdown, as qemu-ga."""
        mode = arguments.get('mode', 'powerdown')
        if mode not in SHUTDOWN_MODES:
            raise RequestError('mode is invalid (valid values are: '
                               'halt|powerdown|reboot')
        option, fallback = SHUTDOWN_MODES[mode]
        argv = [find_tool('shutdown', fallback)]
        if os.path.basename(argv[0]) == 'shutdown':
            argv += ['-h', option, '+0', 'hypervisor initiated shutdown']
        self._answer_from_child(
            request_id, argv, 'child process has failed to shutdown',
            reply=lambda output: None)

    def rpc_set_time(self, arguments, request_id):
        """Set the system clock to ``time``, then the hardware clock from
        it (``hwclock -w``); without a time, the system clock from the
        hardware clock (``hwclock -s``): as qemu-ga 7.2."""
        hwclock = find_tool('hwclock')
        if 'time' in arguments:
            set_clock(*clock_time(arguments['time']))
        self._answer_from_child(
            request_id, [hwclock, '-w' if 'time' in arguments else '-s'],
            'hwclock failed to set hardware clock to system time')

    def rpc_fstrim(self, arguments, request_id):
        """FITRIM on every mounted filesystem, as qemu-ga 7.2, in a forked
        child: a trim may take minutes, or hang on a sick disk."""
        self._answer_from_child(
            request_id, [reply_of, trim_filesystems,
                         arguments.get('minimum', 0)],
            'child process has failed to trim', reply=value_of_reply)


def describe_result(result):
    """A negotiator-execute result in words, for the log."""
    if 'signal' in result:
        words = 'killed by signal {0}'.format(result['signal'])
    else:
        words = 'exit status {0}'.format(result['exitcode'])
    if result.get('timed-out'):
        words = 'timed out, ' + words
    return words


def is_int64(value):
    return (isinstance(value, integer_types) and not isinstance(value, bool)
            and -2 ** 63 <= value < 2 ** 63)


def is_seconds(value):
    return (isinstance(value, integer_types + (float,)) and
            not isinstance(value, bool) and 0 <= value <= MAX_TIMEOUT)


def is_whence(value):
    """A name or a number (check_whence() says which are refused)."""
    return (isinstance(value, string_types + integer_types + (float,)) and
            not isinstance(value, bool))


#: Parameter types: name -> (check, what the error says is expected).
PARAMETER_TYPES = {
    'int': (is_int64, 'integer'),
    'str': (lambda value: isinstance(value, string_types), 'string'),
    'strs': (lambda value: isinstance(value, list), 'array'),  # of 'str's
    'seconds': (is_seconds, 'number >= 0'),
    'bool': (lambda value: isinstance(value, bool), 'boolean'),
    'whence': (is_whence, 'GuestFileWhence'),  # an int, or a SEEK_NAMES key
}


def check_count(count, maximum):
    if not 0 <= count <= maximum:
        raise RequestError("value '{0}' is invalid for argument count"
                           .format(count))


def check_whence(name, value):
    """qemu-ga's errors for a whence, a name or an integer."""
    if isinstance(value, string_types):
        if value not in SEEK_NAMES:
            raise RequestError(
                u("Parameter '{0}' does not accept value '{1}'").format(
                    name, shown(value)))
    elif not is_int64(value):
        raise RequestError(
            "Invalid parameter type for '{0}', expected: integer".format(
                name))


def check_arguments(arguments, parameters, prefix=''):
    """Check a request's arguments, with qemu-ga's error messages.

    :param parameters: ``(name, type, required)`` tuples, checked in order;
        members not named there are refused last.  A type that is a tuple
        of such parameters is a list of objects with those members.
    :param prefix: where ``arguments`` is, for the messages (``vcpus[0].``).
    :raises RequestError: for a missing, mistyped or unexpected member.
    """
    for name, kind, required in parameters:
        path = prefix + name
        if name not in arguments:
            if required:
                raise RequestError("Parameter '{0}' is missing".format(path))
            continue
        if isinstance(kind, tuple):
            check_object_list(arguments[name], kind, path)
            continue
        check, expected = PARAMETER_TYPES[kind]
        if not check(arguments[name]):
            raise_mistyped(path, expected)
        if kind == 'strs':
            for index, item in enumerate(arguments[name]):
                if not isinstance(item, string_types):
                    raise_mistyped('{0}[{1}]'.format(path, index), 'string')
        if kind == 'whence':
            check_whence(path, arguments[name])
    known = [name for name, _, _ in parameters]
    for name in arguments:
        if name not in known:
            raise RequestError(u("Parameter '{0}{1}' is unexpected").format(
                prefix, shown(name)))


def check_object_list(value, members, path):
    """Check a list of objects as qemu-ga does: each object whole, in turn."""
    if not isinstance(value, list):
        raise_mistyped(path, 'array')
    for index, item in enumerate(value):
        where = '{0}[{1}]'.format(path, index)
        if not isinstance(item, dict):
            raise_mistyped(where, 'object')
        check_arguments(item, members, where + '.')


def raise_mistyped(path, expected):
    raise RequestError("Invalid parameter type for '{0}', expected: {1}"
                       .format(path, expected))


# ============================================================================
# Guest agent: find and hold the port, serve it for ever
# ============================================================================

def find_port(names=(HOST_TO_GUEST_PORT, LEGACY_PORT),
              sys_ports='/sys/class/virtio-ports', dev='/dev',
              fallback='vport0p1'):
    """Find the device of the first port named in ``names``.

    Looks in sysfs (any kernel with virtio-serial), then for udev's
    /dev/virtio-ports/NAME links, then falls back to /dev/``fallback``
    (the first port, where the host-to-guest port normally is).

    :returns: the device path, or None when no candidate exists.
    """
    try:
        entries = sorted(os.listdir(sys_ports))
    except OSError:
        entries = []
    for wanted in names:
        for entry in entries:
            port_name = read_text(os.path.join(sys_ports, entry, 'name'))
            if port_name and port_name.strip() == wanted:
                return os.path.join(dev, entry)
        link = os.path.join(dev, 'virtio-ports', wanted)
        if os.path.exists(link):
            return link
    if fallback and os.path.exists(os.path.join(dev, fallback)):
        return os.path.join(dev, fallback)
    return None


def lock_path_for(device, lock_dir=None):
    """The lock file that keeps two agents off one port."""
    if lock_dir is None:
        lock_dir = '/run/lock' if os.path.isdir('/run/lock') else '/var/lock'
        if not os.path.isdir(lock_dir):
            lock_dir = '/tmp'
    name = os.path.realpath(device).strip('/').replace('/', '-')
    return os.path.join(lock_dir, 'negotiator.{0}.lock'.format(name))


def open_lock_file(path):
    """Open (or create) a lock file; it must belong to this user.

    Lock directories are writable by everyone: a file that someone else
    made there, and may hold locked for ever, is refused with a message.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT |
                     os.O_NOFOLLOW, int('644', 8))
    except OSError as e:
        raise NegotiatorError('cannot open the lock file {0}: {1}'.format(
            path, e.strerror))
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise NegotiatorError(
            'the lock file {0} belongs to another user (uid {1}); remove '
            'it'.format(path, owner))
    set_nonblocking(fd)
    return fd


def try_lock(fd):
    """Lock an open lock file if no other process holds it: whether it
    did."""
    _, error = io_op(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if error is not None and error.args[0] not in WOULD_BLOCK + (
            errno.EACCES,):
        raise error
    return error is None


def take_lock(path):
    """Hold ``path`` locked for as long as this process lives.

    :returns: the lock file's descriptor.
    :raises NegotiatorError: when another agent holds it.
    """
    fd = open_lock_file(path)
    if not try_lock(fd):
        holder = (read_text(path) or '?').strip()
        os.close(fd)
        raise NegotiatorError(
            'another negotiator agent (pid {0}) already serves this port '
            '(lock {1}); not starting a second one'.format(holder, path))
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode('ascii') + b'\n')
    return fd


class PortService(object):
    """Serves a virtio-serial port, through every host connect and hang-up.

    While no host client is connected the port reports hang-up and reads
    return end-of-file at once; polling it then would spin.  So after a
    hang-up the port leaves the poll set, and the agent looks again when
    SIGIO says something changed, or every RECONNECT_CHECK seconds.  SIGIO
    is asked for (O_ASYNC) only while no host is connected: a connected
    port is polled, and a signal per request would cost a loop turn.

    :param device: the port's path, or None to look for it with find_port().
    :param serve: makes the Server of a connection: ``serve(fd, name,
        on_disconnect)``.
    """

    def __init__(self, loop, device, serve):
        self.loop = loop
        self.device = device
        self.serve = serve
        self.server = None
        self._check_timer = None
        self._last_complaint = None

    def start(self):
        self.loop.on_signal(signal.SIGIO, self._watch_for_host)
        self._try_open()

    def _try_open(self):
        device = self.device or find_port()
        if device is None:
            self._complain('no virtio-serial port named %s found: is the '
                           'channel in the guest\'s definition and the '
                           'virtio_console module loaded? Waiting for it.',
                           HOST_TO_GUEST_PORT)
            self.loop.call_later(OPEN_RETRY, self._try_open)
            return
        fd, e = io_op(open_device, device)
        if e is not None:
            if e.errno == errno.EBUSY:
                self._complain('port %s is busy: another process has it '
                               'open (find it with: fuser -v %s); retrying',
                               device, device)
            elif e.errno == errno.ENOENT:
                self._complain('port %s does not exist yet; waiting for it',
                               device)
            else:
                self._complain('cannot open port %s: %s; retrying', device,
                               e.strerror)
            self.loop.call_later(OPEN_RETRY, self._try_open)
            return
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        log.info('serving port %s', device)
        self.server = self.serve(fd, device, self._watch_for_host)
        self._watch_for_host()

    def _complain(self, message, *args):
        now = monotonic()
        if (self._last_complaint is None or
                now - self._last_complaint >= OPEN_LOG_EVERY):
            log.warning(message, *args)
            self._last_complaint = now

    def _watch_for_host(self):
        """Serve the port while a host is connected; else check back later."""
        if self.server is None:
            return
        if self._check_timer:
            self._check_timer.cancel()
            self._check_timer = None
        channel = self.server.channel
        if channel.connected:
            if port_hung_up(channel.fd):
                channel.disconnect('host hung up')  # comes back here
            return
        set_async(channel.fd, True)  # before looking: no arrival is missed
        if port_hung_up(channel.fd):
            self._check_timer = self.loop.call_later(
                RECONNECT_CHECK, self._watch_for_host)
        else:
            set_async(channel.fd, False)
            log.debug('host connected to the port')
            channel.reconnect()

    def stop(self):
        if self.server:
            self.server.close()


def open_device(device):
    """A port's descriptor, non-blocking; never a controlling terminal.
    (Python 3's open() refuses a port: "not seekable".)"""
    return os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)


def set_async(fd, enabled):
    """Ask for SIGIO whenever ``fd`` changes state (O_ASYNC), or stop.

    A device that refuses (a hung-up terminal does) is only checked every
    RECONNECT_CHECK seconds.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if enabled:
        flags |= os.O_ASYNC
    else:
        flags &= ~os.O_ASYNC
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    except (IOError, OSError) as e:
        log.debug('cannot change O_ASYNC on the port: %s', e)


def port_hung_up(fd):
    """Whether no host client holds the port right now."""
    return poll_fd(fd, POLLIN, 0)[2]


class ListenService(object):
    """Serves a UNIX socket, each connection as a conversation of its own.

    This is what a port looks like without a VM: for tests, and to try
    negotiator on a laptop (like qemu-ga's ``-m unix-listen``).
    """

    def __init__(self, loop, path, serve):
        self.loop = loop
        self.path = path
        self.serve = serve
        self.servers = {}
        self.sock = None
        #: Running out of descriptors was logged, and not accepting since.
        self._starved = False

    def start(self):
        import socket  # (see netlink_addresses)
        refuse_if_served(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        set_nonblocking(self.sock.fileno())
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        log.info('listening on %s', self.path)

    def _accept(self, hung_up):
        import socket
        try:
            conn, _ = self.sock.accept()
        except socket.error as e:
            if e.args[0] in OUT_OF_RESOURCES:
                self._pause_accepting(e)
            elif e.args[0] not in WOULD_BLOCK + (errno.EINTR,
                                                 errno.ECONNABORTED):
                raise
            return
        self._starved = False
        set_nonblocking(conn.fileno())
        name = '{0}#{1}'.format(self.path, conn.fileno())
        log.debug('%s: client connected', name)
        self.servers[conn] = self.serve(conn.fileno(), name,
                                        lambda: self._forget(conn))

    def _pause_accepting(self, error):
        """Out of descriptors (or memory): leave new clients waiting in the
        socket's queue for ACCEPT_PAUSE seconds, serving those connected;
        logged once until a client is accepted again."""
        if not self._starved:
            log.warning('%s: cannot accept clients (%s); trying again every '
                        '%g s, serving the %d connected', self.path,
                        os.strerror(error.args[0]), ACCEPT_PAUSE,
                        len(self.servers))
            self._starved = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(ACCEPT_PAUSE, lambda: self.loop.add_reader(
            self.sock.fileno(), self._accept), self._pause_accepting)

    def _forget(self, conn):
        self.servers.pop(conn, None)
        conn.close()

    def stop(self):
        for server in list(self.servers.values()):
            server.close()
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


def refuse_if_served(path):
    """Remove a stale socket file; refuse to take over a live one, or
    anything that is not a socket."""
    import socket
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError('{0} exists and is not a socket; not replacing it '
                         '(listen on another path)'.format(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except socket.error:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise NegotiatorError(
        'another agent already listens on {0}; not starting a second '
        'one'.format(path))


def refused_requests(requests, allowed, blocked):
    """The names of the requests the agent refuses, by qemu-ga's rules.

    With an allow list only the requests it names are served, with a block
    list all but those it names, with both those allowed and not blocked;
    with neither, all but DEFAULT_BLOCKED_RPCS.  A name the agent does not
    serve is ignored with a warning: a list written for qemu-ga may name
    requests negotiator does not have (guest-fsfreeze-freeze, ...).

    :param allowed: the names of --allow-rpcs, or None.
    :param blocked: the names of --block-rpcs, or None.
    """
    served = [request[0] for request in requests]
    for option, names in (('--allow-rpcs', allowed),
                          ('--block-rpcs', blocked)):
        for name in sorted(set(names or ()) - set(served)):
            log.warning('%s: %s is not a request negotiator serves; '
                        'ignored', option, name)
    if allowed is None and blocked is None:
        blocked = DEFAULT_BLOCKED_RPCS
    refused = set(blocked or ())
    if allowed is not None:
        refused.update(set(served) - set(allowed))
    return frozenset(refused.intersection(served))


def run_guest(options):
    """The guest agent's main loop; returns when SIGTERM or SIGINT arrive."""
    commands = CommandSet(options.commands_dir, BUILTINS)
    children = Children()
    loop = Loop()
    refused = refused_requests(Server.REQUESTS, options.allow_rpcs,
                               options.block_rpcs)

    def serve(fd, name, on_disconnect):
        return Server(loop, fd, name, commands, children,
                      on_disconnect=on_disconnect, refused=refused)
    lock_fd = None
    try:
        if options.listen:
            service = ListenService(loop, options.listen, serve)
        else:
            device = options.device or find_port() or FALLBACK_DEVICE
            lock_fd = take_lock(lock_path_for(device))
            service = PortService(loop, options.device, serve)
        loop.stop_on(signal.SIGTERM, signal.SIGINT)
        loop.on_signal(signal.SIGCHLD, children.check)
        service.start()
        log.info('negotiator %s guest agent started (commands: %s)',
                 __version__, options.commands_dir)
        if refused:
            log.info('refusing the requests %s', ', '.join(sorted(refused)))
        exposed = [name for name, _, _ in Server.REQUESTS
                   if name in DEFAULT_BLOCKED_RPCS and name not in refused]
        if exposed:
            log.warning('serving %s: the host may run any program, and read '
                        'and write any file, as this agent\'s user',
                        ', '.join(exposed))
        if not os.path.isdir(options.commands_dir):
            log.warning('commands directory %s does not exist: only the '
                        'built-in commands are offered', options.commands_dir)
        loop.run()
        service.stop()
        children.close()
    finally:
        loop.close()
        if lock_fd is not None:
            os.close(lock_fd)
    return 0


# ============================================================================
# Host client: one call through the socket of a guest's port
# ============================================================================

class Client(object):
    """One conversation with an agent: resynchronise, then call.

    Everything a previous client left behind in the port (replies it did not
    wait for) is skipped: the conversation starts with 0xFF and
    ``guest-sync-delimited`` with a fresh random id, and every line up to
    that id's reply is discarded.  Afterwards only lines that carry this
    client's request ids are taken.

    :param fd: a connected, non-blocking descriptor.
    :param deadline: monotonic() time by which everything must be done,
        or None.
    """

    def __init__(self, fd, deadline, name):
        self.fd = fd
        self.deadline = deadline
        self.name = name
        self.reader = LineReader()
        self._items = []
        #: The last bytes read, taken from ``_taken`` on: raw output may
        #: follow a line, so lines are cut from them one at a time.
        self._unread = b''
        self._taken = 0
        self._next_id = random_id()
        #: Watches fd for reading, made once for the many waits of a call.
        self._poller = select.poll()
        self._poller.register(fd, POLLIN)

    def send(self, data):
        sent = 0
        while sent < len(data):
            try:
                written = write_fd(self.fd, bytes_from(data, sent))
            except Disconnected as e:
                raise ConnectError('{0}: the agent side closed the connection '
                                   '({1})'.format(self.name, e))
            sent += written
            if not written:
                self._wait(writable=True)

    def _wait(self, writable=False):
        timeout = time_left(self.deadline, CallTimeout('timed out'))
        if writable:
            _, ready, hung_up = poll_fd(self.fd, POLLOUT, timeout)
            if hung_up and not ready:
                raise ConnectError('{0}: the other side went away'.format(
                    self.name))
        else:
            wait_ready(self._poller, timeout)

    def receive(self):
        """The next received item (line, RESYNC or OVERSIZED); waits for it."""
        while not self._items:
            start = self._next_unread()
            end = self._unread.find(b'\n', start) + 1 or len(self._unread)
            self._items.extend(self.reader.feed(self._unread[start:end]))
            self._taken = end
        return self._items.pop(0)

    def receive_bytes(self, size):
        """The next ``size`` bytes as they are (raw output); waits for them."""
        chunks = []
        while size:
            start = self._next_unread()
            chunks.append(self._unread[start:start + size])
            self._taken = start + len(chunks[-1])
            size -= len(chunks[-1])
        return b''.join(chunks)

    def _next_unread(self):
        """Where the bytes not taken yet start; reads more when none are."""
        if self._taken == len(self._unread):
            self._unread, self._taken = self._read_some(), 0
        return self._taken

    def _read_some(self):
        while True:
            data = read_fd(self.fd)
            if data:
                return data
            if data is not None:
                raise ConnectError(
                    '{0}: the connection closed before the other side '
                    'answered'.format(self.name))
            self._wait()

    def sync(self):
        """Start the conversation afresh, skipping any stale output."""
        sync_id = random_id()
        self.send(RESYNC_BYTE + encode_message(
            {'execute': 'guest-sync-delimited', 'arguments': {'id': sync_id}}))
        after_delimiter = False
        while True:
            item = self.receive()
            if item is RESYNC:
                after_delimiter = True
                continue
            if item is OVERSIZED or not after_delimiter:
                continue
            message = parse_reply(item)
            if message is not None and message.get('return') == sync_id:
                return
            log.debug('%s: skipping a stale line before the sync reply',
                      self.name)

    def call(self, name, arguments=None, on_output=None):
        """Send one request; wait for its reply.

        :param on_output: called as ``on_output(stream, data)`` with each
            chunk of output (``'out-data'`` or ``'err-data'``, bytes) of
            this request's negotiator-output events, base64 or raw.
        :returns: the reply's ``return`` value.
        :raises RemoteError: for an ``error`` reply.
        """
        request_id = self._next_id
        self._next_id += 1
        request = {'execute': name, 'id': request_id}
        if arguments is not None:
            request['arguments'] = arguments
        self.send(encode_message(request))
        while True:
            item = self.receive()
            if item is RESYNC or item is OVERSIZED:
                continue
            message = parse_reply(item)
            if message is None:
                continue
            if 'event' in message:
                self._take_event(message, request_id, on_output)
                continue
            if message.get('id') != request_id:
                continue
            if 'error' in message:
                error = expect(message['error'], lambda value: isinstance(
                    value, dict) and all(isinstance(value.get(key, ''),
                                                    string_types)
                                         for key in ('class', 'desc')),
                    'error reply')
                raise RemoteError(error.get('class', 'GenericError'),
                                  error.get('desc', ''))
            if 'return' not in message:
                raise ProtocolError('reply without return or error: {0!r}'
                                    .format(item[:200]))
            return message['return']

    def _take_event(self, message, request_id, on_output):
        """Pass on an event's output; read the raw bytes it announces even
        when it is not ours, as they are not lines."""
        data = message.get('data')
        if message['event'] != 'negotiator-output' or not isinstance(data,
                                                                   dict):
            return
        ours = on_output is not None and data.get('id') == request_id
        for stream, raw_member in RAW_MEMBERS.items():
            if raw_member in data:
                size = data[raw_member]
                if not is_int64(size) or not 0 <= size <= MAX_LINE:
                    raise ProtocolError('the other side announced {0!r} '
                                        'bytes of output'.format(size))
                chunk = self.receive_bytes(size)
            elif stream in data and ours:
                chunk = decode_output(data[stream])
            else:
                continue
            if ours:
                on_output(stream, chunk)


def time_left(deadline, error):
    """Seconds left until ``deadline``, a monotonic() time (None: there
    is none, and no limit).

    :raises: ``error`` once the deadline has passed.
    """
    if deadline is None:
        return None
    left = deadline - monotonic()
    if left <= 0:
        raise error
    return left


def decode_output(text):
    """A base64 output member's bytes (ProtocolError when it is not)."""
    try:
        return binascii.a2b_base64(text.encode('ascii'))
    except (binascii.Error, AttributeError, UnicodeError):
        raise ProtocolError('the other side sent output that is not base64')


def parse_reply(line):
    """A received line as a dict, or None for anything else (logged)."""
    try:
        message = decode_message(line)
    except RequestError:
        log.debug('skipping a line that is not a JSON object: %r', line[:80])
        return None
    return message


def random_id():
    """A random positive id that fits in the 63 bits qemu-ga accepts."""
    return int(binascii.hexlify(os.urandom(7)), 16)


def connect_socket(path, port=HOST_TO_GUEST_PORT, wait=True, deadline=None):
    """Connect to the UNIX socket of a guest's port.

    :param wait: whether to wait, until ``deadline`` (a monotonic() time,
        or None for ever), while QEMU's queue of clients is full; the host
        daemon never waits: it serves other guests.
    :raises ConnectError: with a one-line reason and what to do about it.
    """
    import socket
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        set_nonblocking(sock.fileno())
        try:
            sock.connect(path)
            return sock
        except socket.error as e:
            sock.close()
            failure = e
            code = getattr(e, 'errno', None)
        if (code not in WOULD_BLOCK or not wait or
                (deadline is not None and monotonic() >= deadline)):
            break
        time.sleep(LOCK_RETRY)
    if code is None:
        reason = str(failure)  # e.g. a path too long for a UNIX socket
    elif code == errno.ENOENT:
        reason = ('no such socket: is the guest running, and does its '
                  'definition have the {0} channel?'.format(port))
    elif code in WOULD_BLOCK:
        reason = 'busy: QEMU has other clients of this socket queued'
    elif code == errno.EACCES:
        reason = 'permission denied: run as root (or the socket\'s owner)'
    elif code == errno.ECONNREFUSED:
        reason = ('connection refused: nothing serves this socket '
                  '(the guest is stopped?)')
    elif code == errno.ENOTSOCK:
        reason = 'not a socket'
    else:
        reason = os.strerror(code)
    raise ConnectError('cannot connect to {0}: {1}'.format(path, reason))


def open_client(path, timeout):
    """Connect and resynchronise; returns ``(socket, Client)``."""
    deadline = None
    if timeout:
        deadline = monotonic() + timeout
    sock = connect_socket(path, deadline=deadline)
    client = Client(sock.fileno(), deadline, path)
    try:
        client.sync()
    except CallTimeout:
        sock.close()
        raise ConnectError(
            'no agent answered on {0} within {1:g} s: is "negotiator.py '
            'guest" running in the guest? (another client may hold the port '
            'too)'.format(path, timeout))
    except NegotiatorError:
        sock.close()
        raise
    return sock, client


#: Where the host client writes each stream of a command's output.
STREAM_FDS = {'out-data': 1, 'err-data': 2}


def write_all(fd, data):
    """Write all of ``data`` to this side's stdout (1) or stderr (2).

    :raises ReaderGone: when the reader has gone (EPIPE).
    :raises OutputError: for any other error (ENOSPC, EIO, EBADF...).
    """
    done = 0
    while done < len(data):
        written, error = io_op(os.write, fd, bytes_from(data, done))
        if error is None:
            done += written
        elif error.args[0] in WOULD_BLOCK:
            poll_fd(fd, POLLOUT, None)
        elif error.args[0] == errno.EPIPE:
            raise ReaderGone('')
        else:
            raise OutputError('cannot write to standard {0}: {1}'.format(
                'output' if fd == 1 else 'error', os.strerror(error.args[0])))


def print_out(text):
    """A line of this side's own output (a listing, JSON) on stdout, as
    UTF-8 (names as their bytes), whatever the locale."""
    try:
        data = wire_bytes(text)
    except UnicodeError:  # a surrogate that stands for no byte
        data = text.encode('ascii', 'backslashreplace')
    write_all(1, data + b'\n')


class OutputWriter(object):
    """Writes streamed output to stdout/stderr exactly as it arrives.

    In ``collect`` mode (for --json) it keeps the bytes instead, MAX_STDIN
    of them at most (JSON holds them three times over).  An error writing,
    or more output to keep, ends the call (OutputError): the other side
    kills the command.
    """

    def __init__(self, collect):
        self.collect = collect
        self.captured = {'out-data': [], 'err-data': []}
        self._kept = 0

    def __call__(self, stream, chunk):
        if not self.collect:
            write_all(STREAM_FDS[stream], chunk)
            return
        self._kept += len(chunk)
        if self._kept > MAX_STDIN:
            raise OutputError('the output is larger than {0} bytes, which '
                              '--json holds in memory: run the command '
                              'without --json'.format(MAX_STDIN))
        self.captured[stream].append(chunk)

    def text(self, stream):
        return b''.join(self.captured[stream]).decode('utf-8', 'replace')

    def data(self, stream):
        return encode_bytes(b''.join(self.captured[stream]))


def read_stdin(deadline):
    """All of standard input, within the call's deadline."""
    chunks = []
    size = 0
    while True:
        timeout = time_left(deadline, CallTimeout(
            'timed out reading standard input (use -n or </dev/null when '
            'there is none)'))
        if not any(poll_fd(0, POLLIN, timeout)):
            continue
        data, error = io_op(os.read, 0, READ_SIZE)
        if error is not None:
            if error.args[0] == errno.EBADF:  # started with stdin closed
                return b''
            raise error
        if not data:
            return b''.join(chunks)
        chunks.append(data)
        size += len(data)
        if size > MAX_STDIN:
            raise NegotiatorError(
                'standard input is larger than {0} bytes: pass big data '
                'another way'.format(MAX_STDIN))


def status_of(result):
    """The shell-style exit status of a negotiator-execute result.

    :raises ProtocolError: for anything but such a result.
    """
    if isinstance(result, dict):
        if result.get('timed-out') is True:
            return EXIT_TIMEOUT
        signum, code = result.get('signal'), result.get('exitcode')
        if is_int64(signum) and 0 < signum < 128:
            return 128 + signum
        if is_int64(code) and 0 <= code <= 255 and signum is None:
            return code
    expect(result, lambda value: False, 'negotiator-execute result')


def expect(value, check, what):
    """``value``, when ``check(value)`` holds.

    :raises ProtocolError: naming ``what`` otherwise.
    """
    if not check(value):
        raise ProtocolError('the other side sent a malformed {0}: {1}'.format(
            what, printable(repr(value)[:200])))
    return value


def run_host(options, target, command):
    """``host`` mode: one call; returns the exit status.

    :param target: the socket of the guest's port, or a libvirt guest name.
    """
    timeout = options.timeout or None
    started = monotonic()
    stdin_data = read_input(options, started)
    socket_path = resolve_guest(target, options.connect, options.channel_dir)
    sock, client = open_client(socket_path, timeout)
    try:
        return run_call(client, command, options, started, 'in the guest',
                        stdin_data)
    finally:
        sock.close()


def read_input(options, started):
    """The standard input a command call forwards, read before the call
    takes its turn on the port: a slow writer must not hold up others."""
    if options.ping or options.list or options.no_stdin:
        return b''
    if options.stdin or not os.isatty(0):
        deadline = None
        if options.timeout:
            deadline = started + options.timeout
        return read_stdin(deadline)
    return b''


def run_call(client, command, options, started, where, stdin_data):
    """--ping, --list or a command, through a synchronised client."""
    if options.ping:
        return show_ping(client, started, options.json)
    if options.list:
        return show_commands(client, options.json)
    return run_remote(client, command, options, where, stdin_data)


def ping_agent(client):
    """``(version, guest-ping round trip in ms)`` of the other side."""
    sent = stopwatch()
    client.call('guest-ping')
    round_trip = (stopwatch() - sent) * 1000
    info = expect(client.call('guest-info'), lambda value: isinstance(
        value, dict) and isinstance(value.get('version', ''), string_types),
        'guest-info reply')
    return info.get('version', '?'), round_trip


def show_ping(client, started, as_json):
    connected = monotonic()
    version, round_trip = ping_agent(client)
    if as_json:
        print_json({'version': version, 'round-trip-ms': round(round_trip, 3),
                    'connect-ms': round((connected - started) * 1000, 3)})
    else:
        print_out(u('{0}: agent {1}, round trip {2:.2f} ms').format(
            wire_text(client.name), version, round_trip))
    return 0


def show_commands(client, as_json):
    try:
        commands = client.call('negotiator-list-commands')
    except RemoteError as e:
        if e.error_class != 'CommandNotFound':
            raise
        raise ProtocolError('the agent does not offer negotiator commands '
                            '(is it qemu-ga rather than negotiator?)')
    expect(commands, lambda value: isinstance(value, list) and all(
        isinstance(entry, dict) and isinstance(entry.get('name'), string_types)
        for entry in value), 'list of commands')
    if as_json:
        print_json({'commands': commands})
    else:
        for entry in commands:
            print_out(u('{0}{1}').format(
                entry['name'],
                '  (built-in)' if entry.get('kind') == 'builtin' else ''))
    return 0


def run_remote(client, command, options, where, stdin_data):
    """Run ``command`` on the other side; returns its exit status."""
    timeout = options.timeout
    arguments = {'command': wire_text(command[0]),
                 'args': [wire_text(arg) for arg in command[1:]],
                 'raw-output': True}
    if stdin_data:
        arguments['input-data'] = encode_bytes(stdin_data)
    if client.deadline is not None:
        arguments['timeout'] = max(0.001, client.deadline - monotonic())
        # The agent kills the command at the deadline and says so: allow
        # that answer a moment to arrive.
        client.deadline += 2.0
    writer = OutputWriter(collect=options.json)
    try:
        try:
            result = client.call('negotiator-execute', arguments, writer)
        except RemoteError as e:
            if e.desc != "Parameter 'raw-output' is unexpected":
                raise
            # negotiator 1.0 on the other side: base64 events, then.
            del arguments['raw-output']
            result = client.call('negotiator-execute', arguments, writer)
    except CallTimeout:
        raise CallTimeout("'{0}' timed out after {1:g} s".format(
            command[0], timeout))
    status = status_of(result)
    if options.json:
        print_json({'command': command, 'exitcode': result.get('exitcode'),
                    'signal': result.get('signal'),
                    'timed-out': bool(result.get('timed-out')),
                    'status': status, 'stdout': writer.text('out-data'),
                    'stderr': writer.text('err-data'),
                    'out-data': writer.data('out-data'),
                    'err-data': writer.data('err-data')})
    elif result.get('timed-out'):
        log.error("'%s' timed out after %g s and was killed %s",
                  command[0], timeout, where)
    return status


def print_json(value):
    print_out(json.dumps(value, sort_keys=True))


# ============================================================================
# Finding guests: libvirt's virsh, its channel directory, or NAME=SOCKET
# ============================================================================

#: A per-domain channel directory of newer libvirt: domain-ID-NAME.
DOMAIN_DIR = Pattern(r'^domain-(\d+)-(.+)$')
#: The line virsh echoes between the outputs of several commands in one
#: call; libvirt's XML cannot hold it as a line of its own outside comments
#: and CDATA.
VIRSH_SEPARATOR = '<<negotiator>>'
#: Running domains: the table (ids, states), then the exact names (the
#: table pads them and, outside UTF-8 locales, escapes non-ASCII).
LIST_COMMAND = 'list; echo "{0}"; list --name'.format(VIRSH_SEPARATOR)


def virsh_argv(connect, command):
    """The argv running one virsh command line (``;`` separates several)."""
    argv = ['virsh']
    if connect:
        argv += ['--connect', connect]
    return argv + [command]


def virsh_env():
    """The environment for virsh: English table headers, any character set."""
    env = dict(os.environ)
    everything = env.pop('LC_ALL', None)
    if everything:
        env.setdefault('LC_CTYPE', everything)
    env['LC_MESSAGES'] = 'C'
    return env


def virsh_quote(name):
    """``name`` as one argument of virsh's own command-line parser."""
    return '"{0}"'.format(name.replace('\\', '\\\\').replace('"', '\\"'))


def dumpxml_command(domains):
    """One virsh command line describing each domain (id, UUID or name)."""
    return ' '.join('dumpxml --domain {0}; echo "{1}";'.format(
        virsh_quote(domain), VIRSH_SEPARATOR) for domain in domains)


def parse_virsh_list(text):
    """The ``(id, name, state)`` of each domain that LIST_COMMAND lists.

    The table's columns are cut where its header puts them; the names are
    then taken from ``list --name`` when it lists as many.
    """
    table, _, names = ('\n' + text).partition('\n' + VIRSH_SEPARATOR + '\n')
    domains = []
    columns = None
    for line in table.splitlines():
        if columns is None:
            if 'Id' in line and 'Name' in line and 'State' in line:
                columns = (line.index('Name'), line.index('State'))
            continue
        if not line.strip() or not line.strip('- '):
            continue
        name_at, state_at = columns
        domains.append((line[:name_at].strip(), line[name_at:state_at].strip(),
                        line[state_at:].strip()))
    names = [name for name in names.split('\n') if name]
    if len(names) == len(domains):
        domains = [(domain_id, name, state) for (domain_id, _, state), name
                   in zip(domains, names)]
    return domains


def parse_domains_xml(text):
    """``{name: (id, {port: socket path})}`` from ``virsh dumpxml`` output.

    ``text`` may hold several domains' XML, each followed by the
    VIRSH_SEPARATOR line.  Only UNIX channels that QEMU listens on
    (``mode='bind'``), with a virtio target named as one of our ports,
    count.
    """
    from xml.etree import ElementTree  # only discovery needs it
    domains = {}
    for piece in ('\n' + text).split('\n' + VIRSH_SEPARATOR + '\n'):
        if not piece.strip():
            continue
        try:
            root = ElementTree.fromstring(wire_bytes(piece))
        except Exception as e:  # ParseError, or ExpatError on Python 2.6
            log.warning('cannot parse a domain\'s XML from virsh: %s', e)
            continue
        channels = {}
        for channel in root.findall('devices/channel'):
            source = channel.find('source')
            target = channel.find('target')
            if (channel.get('type') != 'unix' or source is None or
                    target is None or source.get('mode') != 'bind' or
                    target.get('type') != 'virtio' or
                    target.get('name') not in OUR_PORTS or
                    not source.get('path')):
                continue
            channels[target.get('name')] = native_str(source.get('path'))
        domains[native_str(root.findtext('name') or '')] = (root.get('id'),
                                                            channels)
    return domains


def scan_channel_dir(directory):
    """``{guest name: {port: socket path}}`` of the sockets in ``directory``.

    Older libvirt names the sockets NAME.PORT; newer libvirt puts them in a
    directory per running domain, domain-ID-NAME/PORT (NAME may be
    shortened there).  Where a guest has several such directories the
    highest ID, its latest start, wins.
    """
    found = {}
    latest = {}
    try:
        entries = os.listdir(directory)
    except OSError:
        return found
    for entry in sorted(entries):
        path = os.path.join(directory, entry)
        match = DOMAIN_DIR.match(entry)
        if match and os.path.isdir(path):
            name, domain_id = match.group(2), int(match.group(1))
            if latest.get(name, -1) > domain_id:
                continue
            ports = {}
            for port in OUR_PORTS:
                if is_socket(os.path.join(path, port)):
                    ports[port] = os.path.join(path, port)
            if ports:
                latest[name] = domain_id
                found[name] = ports
            continue
        for port in OUR_PORTS:
            if entry.endswith('.' + port) and is_socket(path):
                found.setdefault(entry[:-len(port) - 1], {})[port] = path
    return found


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class Discovery(object):
    """Asks libvirt which running guests have our ports: ``virsh list``,
    then ``virsh dumpxml`` of each domain not described yet, by id (virsh
    would take a numeric name for an id; a domain's id changes with each
    start, and with it its channels' paths).  virsh runs as a child whose
    output joins the loop, VIRSH_TIMEOUT at most, so that a slow libvirtd
    never delays a guest's call to the host daemon.

    :param port: the port that matters: a domain without it is logged.
    """

    def __init__(self, loop, children, connect, port=None):
        self.loop = loop
        self.children = children
        self.connect = connect
        self.port = port
        #: What dumpxml said of each running domain: (id, name) -> ports.
        self.described = {}

    def look(self, on_done, only=None):
        """Call ``on_done(guests, error)``: guests as ``[(name, state,
        ports)]`` (None when ``virsh list`` failed), and why virsh failed
        (None when it did not).

        :param only: the name of the one guest wanted, or None for all.
        """
        def listed(output, error):
            if output is None:
                on_done(None, error)
                return
            running = [domain for domain in parse_virsh_list(output)
                       if only is None or domain[1] == only]
            keys = set((domain_id, name) for domain_id, name, _ in running)
            for key in list(self.described):
                if key not in keys:
                    del self.described[key]
            unknown = [key[0] for key in keys if key not in self.described]
            if not unknown:
                done(running, None)
                return
            self._virsh(dumpxml_command(unknown),
                        lambda xml, error: described(running, keys, xml,
                                                     error))

        def described(running, keys, xml, error):
            for name, (domain_id, ports) in parse_domains_xml(
                    xml or '').items():
                if (domain_id, name) in keys:
                    self.described[(domain_id, name)] = ports
                    if self.port and self.port not in ports:
                        log.debug('guest %s has no %s channel', name,
                                  self.port)
            done(running, error)

        def done(running, error):
            on_done([(name, state, self.described[(domain_id, name)])
                     for domain_id, name, state in running
                     if self.described.get((domain_id, name))], error)

        self._virsh(LIST_COMMAND, listed)

    def _virsh(self, command, on_done):
        """Run virsh: ``on_done(output, None)``, or ``(None, why)``."""
        out = []
        err = []
        delivered = []  # on_done() was called

        def collect(stream, data):
            (out if stream == 'out-data' else err).append(data)

        def deliver(output, why):
            delivered.append(True)
            on_done(output, why)

        def finished(result):
            if result.get('exitcode') == 0:
                deliver(output_text(b''.join(out)), None)
            elif result.get('timed-out'):
                deliver(None, 'virsh timed out after {0:g} s'.format(
                    VIRSH_TIMEOUT))
            else:
                deliver(None, first_line(b''.join(err).decode(
                    'utf-8', 'replace')) or 'virsh failed: {0}'.format(result))

        def failed(error):
            if delivered:  # on_done() itself raised: not virsh's fault
                log_failure('guest discovery', 'carrying on', error)
                return
            log_failure('virsh', 'taking it as failed', error)
            processes[0].kill()
            deliver(None, 'virsh failed: {0}'.format(error_text(error)))

        processes = []
        try:
            processes.append(Process(
                self.loop, self.children, virsh_argv(self.connect, command),
                virsh_env(), b'', VIRSH_TIMEOUT, collect, finished, failed))
        except OSError as e:
            on_done(None, 'cannot run virsh: {0}'.format(e.strerror))


def first_line(text):
    """The first non-empty line of ``text``, or ''."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ''


def ask_libvirt(connect, only=None):
    """Discovery.look()'s ``(guests, error)``, waited for in a loop of its
    own."""
    loop = Loop()
    children = Children()
    answer = []
    try:
        loop.on_signal(signal.SIGCHLD, children.check)
        Discovery(loop, children, connect).look(
            lambda guests, error: answer.extend((guests, error)), only)
        while not answer:
            loop.run_once()
    finally:
        children.close()
        loop.close()
    return answer


def find_guests(connect=None, channel_dir=None, only=None):
    """The running guests that have our ports: ``[(name, state, ports)]``.

    Asks libvirt (see Discovery); where virsh is missing or fails, and no
    --connect URI was given, scans libvirt's channel directory instead.
    An explicit ``channel_dir`` is scanned without asking virsh.

    :param only: the name of the one guest wanted, or None for all.
    """
    if channel_dir is None:
        guests, error = ask_libvirt(connect, only)
        if guests or (guests is not None and not error):
            return guests
        if connect:
            raise ConnectError(printable(error))
        log.warning('%s; looking in %s instead', printable(error),
                    DEFAULT_CHANNEL_DIR)
    found = scan_channel_dir(channel_dir or DEFAULT_CHANNEL_DIR)
    return [(name, '-', found[name]) for name in sorted(found)
            if only is None or name == only]


def resolve_guest(target, connect=None, channel_dir=None):
    """The socket of ``target``'s host-to-guest port.

    ``target`` is a socket path (anything holding a slash, or a socket in
    the current directory) or the name of a running libvirt guest.

    :raises ConnectError: when no such guest has the port.
    """
    if '/' in target or is_socket(target):
        return target
    for name, _, ports in find_guests(connect, channel_dir, only=target):
        for port in (HOST_TO_GUEST_PORT, LEGACY_PORT):
            if port in ports:
                return ports[port]
        raise ConnectError(
            'guest {0} has no {1} channel: add it to its definition '
            '(libvirt: <channel type="unix"> with <target type="virtio" '
            'name="{1}"/>)'.format(target, HOST_TO_GUEST_PORT))
    raise ConnectError(
        'no running guest named {0} has negotiator ports (a socket path '
        'must hold a slash: ./{0}); see --list-guests'.format(target))


def host_list_guests(options):
    """``host --list-guests``: each running guest with our ports."""
    guests = find_guests(options.connect, options.channel_dir)
    paths = [ports.get(HOST_TO_GUEST_PORT) or ports.get(LEGACY_PORT)
             for _, _, ports in guests]
    answers = probe_agents([path for path in paths if path], PROBE_TIMEOUT)
    if options.json:
        listing = []
        for (name, state, ports), path in zip(guests, paths):
            answer, error = answers.get(path, (None, None))
            for port in ports:
                ports[port] = wire_text(ports[port])
            listing.append({'name': wire_text(name), 'state': state,
                            'ports': ports, 'agent': answer, 'error': error})
        print_json({'guests': listing})
        return 0
    rows = [('NAME', 'STATE', 'PORTS', 'AGENT')]
    for (name, state, ports), path in zip(guests, paths):
        answer, error = answers.get(path, (None, None))
        if answer:
            agent = u('{0} ({1:.2f} ms)').format(answer['version'],
                                                 answer['round-trip-ms'])
        else:
            agent = 'no answer' if error else '-'
        rows.append((wire_text(name), state, ','.join(sorted(ports)), agent))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print_out(u('{0}  {1}  {2}  {3}').format(
            row[0].ljust(widths[0]), row[1].ljust(widths[1]),
            row[2].ljust(widths[2]), row[3]).rstrip())
    return 0


def probe_agents(paths, timeout):
    """Ping every agent at once: ``{path: (answer or None, error or None)}``."""
    import threading  # only --list-guests needs it
    results = {}

    def probe(path):
        results[path] = probe_agent(path, timeout)

    threads = [threading.Thread(target=probe, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def probe_agent(path, timeout):
    """``({'version', 'round-trip-ms'}, None)``, or ``(None, why not)``."""
    try:
        sock, client = open_client(path, timeout)
    except NegotiatorError as e:
        return None, e.text
    try:
        version, round_trip = ping_agent(client)
        return {'version': version,
                'round-trip-ms': round(round_trip, 3)}, None
    except NegotiatorError as e:
        return None, e.text
    finally:
        sock.close()


# ============================================================================
# Every guest at once: host --all
# ============================================================================

class Fleet(object):
    """``host --all``: one command on every running guest with the port.

    Each guest's call is ``host`` itself in a forked child (a Builtin:
    nothing to start), ``--parallel`` of them at once, their output joining
    one loop.  Each line goes out after its guest's name, as pdsh prints
    it; with --json each guest's object goes out with "guest" added.  The
    object waits in a temporary file until its call ends: the loop holds
    one at a time, not --parallel (each call's child holds its own output,
    as ``host --json`` does).

    :param guests: ``[(name, socket path)]``.
    """

    def __init__(self, options, command, guests, stdin_data):
        self.options = options
        self.command = command
        self.waiting = list(guests)
        self.stdin_data = stdin_data
        self.loop = Loop()
        self.children = Children()
        self.running = 0
        #: The largest exit status so far.
        self.status = 0
        #: What ended it early: this side's output failing.
        self.failure = None

    def run(self):
        """Every call; returns the largest of their exit statuses."""
        try:
            self.loop.on_signal(signal.SIGCHLD, self.children.check)
            self._start_more()
            while self.running and self.failure is None:
                self.loop.run_once()
        finally:
            self.children.close()
            self.loop.close()
        if self.failure is not None:
            raise self.failure
        return self.status

    def _start_more(self):
        while self.waiting and self.running < self.options.parallel:
            name, path = self.waiting.pop(0)
            try:
                self._start(name, path)
            except OSError as e:  # out of processes or descriptors
                if self.running:  # again once a call has ended
                    self.waiting.insert(0, (name, path))
                    return
                self._not_started(name, e)
            else:
                self.running += 1

    def _not_started(self, name, error):
        why = 'cannot start the call: {0}'.format(os.strerror(error.errno))
        if self.options.json:
            print_json({'guest': wire_text(name), 'status': EXIT_CONNECT,
                        'error': {'class': 'OSError', 'desc': why}})
        else:
            write_lines(2, wire_bytes(name) + b': ', b'negotiator: ' +
                        why.encode('ascii') + b'\n')
        self.status = max(self.status, EXIT_CONNECT)

    def _start(self, name, path):
        prefix = wire_bytes(name) + b': '
        partial = {'out-data': b'', 'err-data': b''}
        spool = None  # the JSON object, with --json: on disk while it runs
        if self.options.json:
            import tempfile
            spool = tempfile.TemporaryFile()

        def on_output(stream, data):
            if spool and stream == 'out-data':
                spool.write(data)
            else:
                partial[stream] = write_lines(STREAM_FDS[stream], prefix,
                                              partial[stream] + data)

        def on_exit(result):
            self.running -= 1
            for stream in partial:
                write_lines(STREAM_FDS[stream], prefix, partial[stream], True)
            status = status_of(result)
            if spool:
                spool.seek(0)
                print_json(guest_result(name, spool.read(), status))
                spool.close()
            self.status = max(self.status, status)
            self._start_more()

        def failed(error):
            self.failure = error

        timeout = self.options.timeout and self.options.timeout + CALL_GRACE
        try:
            Process(self.loop, self.children,
                    [call_guest, self.options, path, self.command], None,
                    self.stdin_data, timeout, on_output, on_exit, failed)
        except BaseException:
            if spool:
                spool.close()
            raise


def call_guest(args):
    """A guest's call of ``host --all``, in its forked child: ``(b'',
    exit status)``."""
    options, path, command = args
    try:
        return b'', run_host(options, path, command)
    except NegotiatorError as e:
        return b'', report_error(e, options)


def write_lines(fd, prefix, data, final=False):
    """Write the whole lines of ``data``, each after ``prefix``; returns the
    rest, a partial line, written as well when ``final`` or when longer
    than READ_SIZE (a line without end must not grow without bound)."""
    lines = data.split(b'\n')
    rest = lines.pop()
    if rest and (final or len(rest) > READ_SIZE):
        lines.append(rest)
        rest = b''
    if lines:
        write_all(fd, b''.join(prefix + line + b'\n' for line in lines))
    return rest


def guest_result(name, output, status):
    """A guest's --json object: what its call printed, with "guest"."""
    try:
        result = json.loads(output.decode('utf-8'))
    except ValueError:
        result = None
    if not isinstance(result, dict):
        result = {'status': status}
    result['guest'] = wire_text(name)
    return result


def run_all(options, command):
    """``host --all``: the largest exit status of the guests' calls."""
    stdin_data = read_input(options, monotonic())
    guests = []
    for name, _, ports in find_guests(options.connect, options.channel_dir):
        path = ports.get(HOST_TO_GUEST_PORT) or ports.get(LEGACY_PORT)
        if path:
            guests.append((name, path))
    if not guests:
        log.warning('no running guest has a %s channel', HOST_TO_GUEST_PORT)
    return Fleet(options, command, guests, stdin_data).run()


# ============================================================================
# Host daemon: every guest's guest-to-host port, served from one loop
# ============================================================================

class DaemonServer(Server):
    """Answers one guest's calls on the host.

    A guest is trusted less than the host: it gets the commands directory
    and the protocol's basics, no built-ins and no host facts but
    negotiator's version, and a guest that sends garbage, or whose
    conversation raised, is cut off.  Its error replies are logged only
    with -v.

    :param on_abuse: called with the reason to cut the guest off.
    """

    #: No capture-output: the daemon would hold a guest's output whole;
    #: guest --call streams it.
    REQUESTS = tuple(
        (name, method, tuple(parameter for parameter in parameters
                             if parameter[0] != 'capture-output'))
        for name, method, parameters in Server.REQUESTS if name in (
            'guest-sync-delimited', 'guest-sync', 'guest-ping', 'guest-info',
            'negotiator-list-commands', 'negotiator-execute'))
    ERROR_LOG_LEVEL = DEBUG

    def __init__(self, loop, fd, name, commands, children, env, on_disconnect,
                 on_abuse):
        Server.__init__(self, loop, fd, name, commands, children, env,
                        on_disconnect)
        self._on_abuse = on_abuse
        self._failures = 0

    def on_oversized(self):
        self._on_abuse('a line longer than {0} bytes'.format(MAX_LINE))

    def on_failure(self, error):
        """A fault of ours while serving this guest cuts it off, as abuse
        does: whatever caused it stops for a while, and the daemon serves
        the others."""
        log.debug('%s: internal error', self.channel.name, exc_info=True)
        try:
            self._answer_failure()
        finally:
            self._on_abuse('internal error: ' + error_text(error))

    def _send_error(self, request_id, error):
        """Every error reply is a strike; GARBAGE_LIMIT in a row cut the
        guest off (a peer answering our replies with replies, too)."""
        self._failures += 1
        if self._failures >= GARBAGE_LIMIT:
            self._on_abuse('{0} failed requests in a row'.format(
                GARBAGE_LIMIT))
        else:
            Server._send_error(self, request_id, error)

    def _send_return(self, request_id, result):
        self._failures = 0
        Server._send_return(self, request_id, result)


class GuestLink(object):
    """The host daemon's connection to one guest's guest-to-host socket.

    QEMU serves the socket; the daemon connects as its client, and connects
    again, after a pause that grows while it keeps failing (up to
    RECONNECT_MAX), whenever the connection closes (the guest stopped, or
    QEMU was restarted with the same socket path).
    """

    def __init__(self, daemon, name, path):
        self.daemon = daemon
        self.loop = daemon.loop
        self.name = name
        self.path = path
        self.sock = None
        self.server = None
        self._timer = None
        self._delay = RECONNECT_MIN
        self._trouble_logged = False
        self.closed = False

    def connect(self):
        """Connect now (also cutting a pending wait short).  A fault of
        ours while connecting is logged, and connecting tried again later,
        as after a refusal."""
        self._cancel_timer()
        if self.sock is None:
            self.loop.call(self._connect_failed, self._connect)

    def _connect_failed(self, error):
        log_failure('guest ' + self.name, 'trying again later', error)
        if self.server is None and self.sock is not None:
            self.sock.close()
            self.sock = None
        self._retry_later()

    def _connect(self):
        try:
            self.sock = connect_socket(self.path, GUEST_TO_HOST_PORT,
                                       wait=False)
        except ConnectError as e:
            if not self._trouble_logged:
                log.warning('guest %s: %s; retrying', self.name, e)
                self._trouble_logged = True
            self._retry_later()
            return
        log.info('guest %s: connected to %s', self.name, self.path)
        self._trouble_logged = False
        self._delay = RECONNECT_MIN
        self.server = DaemonServer(
            self.loop, self.sock.fileno(), 'guest ' + self.name,
            self.daemon.commands, self.daemon.children,
            {'NEGOTIATOR_GUEST': self.name}, self._lost, self.cut_off)

    def cut_off(self, why):
        log.warning('guest %s: cut off for %g s: %s', self.name,
                    CUT_OFF_PAUSE, why)
        self._delay = CUT_OFF_PAUSE
        self._trouble_logged = True
        self.server.close()

    def _lost(self):
        self.server = None
        self.sock.close()
        self.sock = None
        if self.closed:
            return
        if not self._trouble_logged:
            log.info('guest %s: connection closed (guest stopped?); '
                     'reconnecting', self.name)
            # Stopped, its socket may be gone; restarted, at a new path.
            self.daemon.rescan()
        self._retry_later()

    def _retry_later(self):
        self._timer = self.loop.call_later(self._delay, self.connect)
        self._delay = min(RECONNECT_MAX, self._delay * 2)

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self):
        """Forget the guest: kill what runs for it, close the socket."""
        self.closed = True
        self._cancel_timer()
        if self.server is not None:
            self.server.close()  # closes the socket too, through _lost()


class HostDaemon(object):
    """Serves the guest-to-host port of every guest it finds.

    Guests come from ``--guest NAME=SOCKET`` pairs; else from
    ``--channel-dir``; else from libvirt (Discovery), with libvirt's
    channel directory standing in while virsh has never worked.
    """

    def __init__(self, loop, commands, pairs=None, connect=None,
                 channel_dir=None, rescan=DEFAULT_RESCAN):
        self.loop = loop
        self.commands = commands
        self.children = Children()
        self.pairs = pairs
        self.connect = connect
        self.channel_dir = channel_dir
        self.rescan_every = rescan
        self.links = {}
        #: A domain without our ports is described again only once it
        #: restarts (or on SIGHUP).
        self.discovery = Discovery(loop, self.children, connect,
                                   GUEST_TO_HOST_PORT)
        #: A virsh child is running (one at a time), and whether to look
        #: again once it is done: something changed meanwhile.
        self._scanning = False
        self._scan_again = False
        #: ``virsh event`` ended with an error, logged.
        self._events_failed = False
        self._virsh_worked = False
        self._virsh_failed = False
        self._timer = None

    def start(self):
        self.loop.on_signal(signal.SIGCHLD, self.children.check)
        self.loop.on_signal(signal.SIGHUP, self.rescan_now)
        self.rescan()
        if self.pairs is None and self.channel_dir is None:
            self._follow_events()

    def _follow_events(self):
        """Look again at every lifecycle event libvirt reports, so that a
        guest just started is served within a second, not at the next
        rescan.  Whenever ``virsh event`` ends (libvirtd restarted, or a
        virsh too old to have it) it starts again a rescan later; the
        rescans go on meanwhile."""
        err = []

        def on_output(stream, data):
            if stream == 'out-data':
                self.rescan()
            elif len(err) < 4:
                err.append(data)

        def on_exit(result):
            why = first_line(b''.join(err).decode('utf-8', 'replace'))
            ended('virsh event ended: {0}'.format(
                why or describe_result(result)))

        def ended(why):
            if not self._events_failed:
                self._events_failed = True
                log.warning('%s; following guests by looking every %g s',
                            printable(why), self.rescan_every)
            self.loop.call_later(self.rescan_every, self._follow_events)

        def failed(error):
            log_failure('virsh event', 'starting it again later', error)
            process[0].kill()
            ended('virsh event failed')

        process = []
        try:
            process.append(Process(
                self.loop, self.children, virsh_argv(self.connect,
                                                     VIRSH_EVENTS),
                virsh_env(), b'', 0, on_output, on_exit, failed))
        except OSError as e:
            ended('cannot run virsh: {0}'.format(e.strerror))

    def rescan_now(self):
        """SIGHUP: look for guests now, and retry waiting connections."""
        log.info('SIGHUP: looking for guests again')
        self.discovery.described = {}  # a channel may have been added
        for link in list(self.links.values()):
            link.connect()
        self.rescan()

    def rescan(self):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.rescan_every, self.rescan)
        if self.pairs is not None:
            self.update(self.pairs)
        elif self.channel_dir is not None:
            self.update(self._scanned(self.channel_dir))
        elif self._scanning:
            self._scan_again = True
        else:
            self._scanning = True
            self.discovery.look(self._on_libvirt)

    def _scanned(self, directory):
        found = {}
        for name, ports in scan_channel_dir(directory).items():
            if GUEST_TO_HOST_PORT in ports:
                found[name] = ports[GUEST_TO_HOST_PORT]
        return found

    def _on_libvirt(self, guests, error):
        self._scanning = False
        if self._scan_again:
            self._scan_again = False
            self.loop.call_later(0, self.rescan)
        if guests is not None:
            self._virsh_worked = True
        if error:
            self._virsh_trouble(error)
        elif self._virsh_failed:
            log.info('virsh works again')
            self._virsh_failed = False
        if guests is None:
            # A libvirtd restart must not drop every guest: the channel
            # directory stands in only while virsh has never worked.
            if not (self._virsh_worked or self.connect):
                self.update(self._scanned(DEFAULT_CHANNEL_DIR))
            return
        self.update(dict((name, ports[GUEST_TO_HOST_PORT])
                         for name, _, ports in guests
                         if GUEST_TO_HOST_PORT in ports))

    def _virsh_trouble(self, why):
        """Log once that virsh fails, and what happens meanwhile."""
        if self._virsh_failed:
            return
        self._virsh_failed = True
        if self._virsh_worked or self.connect:
            log.warning('%s; serving the guests known so far until virsh '
                        'works', printable(why))
        else:
            log.warning('%s; looking in %s until virsh works',
                        printable(why), DEFAULT_CHANNEL_DIR)

    def update(self, found):
        """Serve exactly the guests in ``found``: ``{name: socket path}``."""
        for name, link in list(self.links.items()):
            if found.get(name) != link.path:
                log.info('guest %s: gone', name)
                link.close()
                del self.links[name]
        for name in sorted(found):
            if name not in self.links:
                log.info('guest %s: found (%s)', name, found[name])
                self.links[name] = GuestLink(self, name, found[name])
                self.links[name].connect()

    def stop(self):
        if self._timer is not None:
            self._timer.cancel()
        for link in self.links.values():
            link.close()
        self.links = {}
        self.children.close()


def parse_guest_pairs(pairs):
    """``{name: socket}`` from ``--guest NAME=SOCKET`` options.

    :raises ValueError: for a pair that is not NAME=SOCKET.
    """
    found = {}
    for pair in pairs:
        name, sep, path = pair.partition('=')
        if not sep or not name or not path:
            raise ValueError('--guest takes NAME=SOCKET, not {0!r}'.format(
                pair))
        found[name] = path
    return found


def run_daemon(options, pairs):
    """``host --daemon``: serve guests until SIGTERM or SIGINT.

    :param pairs: ``{name: socket}`` from --guest, or None to find guests.
    """
    loop = Loop()
    commands = CommandSet(options.commands_dir, {},
                          "the host's commands directory")
    daemon = HostDaemon(loop, commands, pairs,
                        options.connect, options.channel_dir, options.rescan)
    try:
        loop.stop_on(signal.SIGTERM, signal.SIGINT)
        daemon.start()
        log.info('negotiator %s host daemon started (commands: %s)',
                 __version__, options.commands_dir)
        if not os.path.isdir(options.commands_dir):
            log.warning('commands directory %s does not exist: guests can '
                        'run no command', options.commands_dir)
        loop.run()
    finally:
        daemon.stop()
        loop.close()
    return 0


# ============================================================================
# Guest caller: one call to the host, from inside the guest
# ============================================================================

def run_guest_call(options, command):
    """``guest --call|--list|--ping``: one call; returns the exit status.

    Several processes in a guest may call at once, but a port has one
    opener at a time: callers queue on a lock file, and wait out EBUSY from
    anything else holding the port, and a port that no host daemon is
    connected to yet, within the call's timeout.  A caller that gives up
    sends 0xFF, so that the host daemon kills what it runs for it (the host
    never sees the guest close the port).
    """
    timeout = options.timeout or None
    started = monotonic()
    deadline = None
    if timeout:
        deadline = started + timeout
    stdin_data = read_input(options, started)
    device = options.device or find_port((GUEST_TO_HOST_PORT,),
                                         fallback=None)
    if device is None:
        raise ConnectError(
            'no virtio-serial port named {0} found: add the channel to the '
            'guest\'s definition (and load virtio_console), or give '
            '--device'.format(GUEST_TO_HOST_PORT))
    signal.signal(signal.SIGTERM, raise_interrupt)
    lock_fd = wait_for_lock(lock_path_for(device), deadline)
    try:
        fd = open_port(device, deadline)
        client = Client(fd, deadline, device)
        try:
            wait_for_daemon(fd, device, deadline, timeout)
            try:
                client.sync()
            except CallTimeout:
                raise ConnectError(
                    'the host daemon did not answer on {0} within {1:g} s'
                    .format(device, timeout))
            result = run_call(client, command, options, started,
                              'on the host', stdin_data)
        except (CallTimeout, OutputError, KeyboardInterrupt):
            abandon_call(fd)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(lock_fd)
    return result


def raise_interrupt(signum, frame):
    """SIGTERM ends a caller as Ctrl-C does: it cleans up first."""
    raise KeyboardInterrupt()


def abandon_call(fd):
    """Tell the host daemon to drop what it does for this caller."""
    try:
        write_fd(fd, RESYNC_BYTE)
    except (Disconnected, OSError):
        pass


def wait_for_lock(path, deadline):
    """Take the callers' lock on a port, waiting for earlier callers.

    :returns: the lock file's descriptor.
    :raises CallTimeout: when the deadline passes first.
    """
    try:
        fd = open_lock_file(path)
    except NegotiatorError as e:
        raise ConnectError(e.text)
    try:
        while not try_lock(fd):
            if deadline is not None and monotonic() >= deadline:
                raise CallTimeout(
                    'timed out waiting for other callers of this port (lock '
                    '{0})'.format(path))
            time.sleep(LOCK_RETRY)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_port(device, deadline):
    """Open the port, waiting while something else holds it (EBUSY).

    :returns: a non-blocking descriptor.
    """
    while True:
        fd, e = io_op(open_device, device)
        if e is None:
            return fd
        if e.errno != errno.EBUSY:
            raise ConnectError('cannot open port {0}: {1}'.format(
                device, e.strerror))
        if deadline is not None and monotonic() >= deadline:
            raise CallTimeout(
                'timed out: port {0} stayed busy (another process has it '
                'open: find it with fuser -v {0})'.format(device))
        time.sleep(LOCK_RETRY)


def wait_for_daemon(fd, device, deadline, timeout):
    """Wait, within the call's deadline, until a host daemon is connected
    to the open port.

    A port hangs up while no host is connected to it.  That is the case
    for a while after every start of QEMU, until the daemon's next try
    (RECONNECT_MAX at most), and a guest's first call may well come
    sooner: failing it at once would make every caller retry by itself.

    :raises ConnectError: when the deadline passes first.
    """
    while port_hung_up(fd):
        left = time_left(deadline, ConnectError(
            'no host daemon connected to {0} within {1:g} s: is '
            '"negotiator.py host --daemon" running on the host?'.format(
                device, timeout)))
        time.sleep(DAEMON_CHECK if left is None else min(DAEMON_CHECK, left))


# ============================================================================
# Command-line interface
# ============================================================================

MAIN_USAGE = """%prog [--version] MODE [OPTIONS] ...

Modes:
  guest   run the agent inside a guest (on its virtio-serial port),
          or call the host from inside a guest (guest --call)
  host    run a command in a guest from the host, or serve every
          guest's calls to the host (host --daemon)

Examples:
  %prog guest
  %prog host GUEST uptime
  %prog host /var/lib/libvirt/qemu/channel/target/domain-1-GUEST/negotiator-host-to-guest.0 uptime
  %prog host --list-guests
  %prog host --daemon
  %prog guest --call backup-done nightly

'%prog MODE --help' tells more about each mode."""

GUEST_USAGE = """%prog guest [OPTIONS]
       %prog guest --call [OPTIONS] COMMAND [ARG...]
       %prog guest --list | --ping

Without --call, --list or --ping: serve the virtio-serial port
negotiator-host-to-guest.0 (found through /sys/class/virtio-ports, or the
older name negotiator-channel.0, else /dev/vport0p1) until SIGTERM or
SIGINT.  The host may run every regular, executable file directly inside
the commands directory, and the built-ins (hostname, os-info,
ip-addresses, disk-usage, uptime); a file of the same name wins over a
built-in.  Commands get NEGOTIATOR_COMMAND and NEGOTIATOR_VERSION in their
environment, run in / with stdin from the request (or /dev/null), and are
killed with their whole process group when the host goes away or their
time is up.

With --call: run COMMAND with its ARGs on the host, through the port
negotiator-guest-to-host.0 and the host's "negotiator.py host --daemon".
Output and exit status are the host command's, as with "host" in the other
direction (same exit statuses).  Callers running at once take turns.  A
caller waits within its timeout for the host daemon to connect to the port
(after QEMU starts, it does within a second); if none does, it fails with
exit status 255."""

HOST_USAGE = """%prog host [OPTIONS] GUEST|SOCKET COMMAND [ARG...]
       %prog host --list | --ping GUEST|SOCKET
       %prog host --all [OPTIONS] COMMAND [ARG...]
       %prog host --list-guests
       %prog host --daemon [OPTIONS]

Run COMMAND with its ARGs in a guest: GUEST is the name of a running
libvirt guest (found with virsh, or in libvirt's channel directory),
SOCKET the UNIX socket of its negotiator-host-to-guest.0 port (a path
holding a slash, or a socket in the current directory).  Options go before
GUEST (or between GUEST and COMMAND); everything after COMMAND is passed on
verbatim.  The command's stdout and stderr arrive here as they are
produced; its exit status becomes this program's.  Standard input is
forwarded when it is not a terminal.

Exit statuses: the command's own (128+N when killed by signal N);
124 timed out; 126 not executable; 127 command not found;
141 the reader of the output went away;
253 the output cannot be written here; 254 protocol error or another
error reply; 255 cannot connect or no agent answering; 130 interrupted;
2 usage error; 1 standard input too long (nothing runs).

With --all: run COMMAND on every running guest with the port, --parallel
at a time, each line of output after its guest's name ("web1: ...");
with --json, one object per guest and line, with "guest" added.  The
exit status is the largest of the guests' (0: it succeeded on all).

With --daemon: serve the negotiator-guest-to-host.0 port of every running
guest from one process, running the commands directory's executables for
"guest --call" with NEGOTIATOR_GUEST (the guest's name), NEGOTIATOR_COMMAND
and NEGOTIATOR_VERSION in their environment.  Guests are the --guest pairs
given; else the sockets in --channel-dir when given; else libvirt's running
guests, from virsh (the sockets in libvirt's channel directory while virsh
has never worked).  It looks again every --rescan seconds, on SIGHUP, and
with libvirt at each lifecycle event (virsh event) and when a guest's
socket closes.
SIGTERM or SIGINT stop it and the commands it runs."""


def decimal_int(text):
    """``text`` as optparse's int type reads it, where that is int(): a
    leading 0 (hexadecimal 0x, binary 0b or octal to optparse) raises
    ValueError."""
    if text.startswith('0'):
        raise ValueError(text)
    return int(text)


class LazyOptionParser(object):
    """optparse's OptionParser as the modes declare it, but a command line
    that parses needs no optparse: it imports textwrap, gettext and locale,
    the largest cost left of a guest call's start-up on Python 2.

    Options are parsed here as optparse parses them, stopping at the first
    argument that is not an option (disable_interspersed_args).  Anything
    else -- --help, --version, an abbreviated long option, grouped short
    flags, an unknown option, a missing or wrong value -- is parsed by
    optparse itself, built from the same declarations, as are usage errors
    and help, so every message and exit status are optparse's.
    """

    #: The actions parsed here; optparse parses the others.
    QUICK_ACTIONS = ('store', 'store_const', 'store_true', 'append')

    #: How a value is read, by type (None: a flag, which takes none);
    #: optparse parses the other types.
    CONVERTERS = {None: None, 'string': lambda text: text,
                  'int': decimal_int, 'float': float}

    def __init__(self, **settings):
        """:param settings: optparse.OptionParser's keyword arguments."""
        self.settings = settings
        self.groups = []  # (title[, description]) of each, in order
        self.declared = []  # (group number, 0 for none; names; settings)
        self.defaults = {}
        self.quick_options = {}  # name -> (dest, convert, const, append)

    def add_option(self, *names, **settings):
        self.declare(0, names, settings)

    def add_option_group(self, *title_and_description):
        self.groups.append(title_and_description)
        return LazyOptionGroup(self, len(self.groups))

    def declare(self, group, names, settings):
        """Records an option; its dest and default as optparse sets them."""
        self.declared.append((group, names, settings))
        action = settings.get('action', 'store')
        kind = settings.get('type')
        if kind is None and action in ('store', 'append'):
            kind = 'string'
        dest = settings.get('dest')
        if dest is None:  # (every action declared here stores)
            long_names = [name for name in names if name.startswith('--')]
            dest = (long_names or names)[0].lstrip('-').replace('-', '_')
        if dest is not None:  # a dest declared again keeps its default
            self.defaults[dest] = settings.get('default',
                                               self.defaults.get(dest))
        if action in self.QUICK_ACTIONS and kind in self.CONVERTERS:
            const = True if action == 'store_true' else settings.get('const')
            for name in names:
                self.quick_options[name] = (dest, self.CONVERTERS[kind],
                                            const, action == 'append')

    def parse_args(self, args, values=None):
        """optparse's ``(values, rest)``; ``values``, when given, updated."""
        try:
            changes, rest = self.parse_quickly(args)
        except (LookupError, ValueError):  # unknown, missing, wrong: optparse
            return self.optparse_parser().parse_args(args, values)
        if values is None:
            values = OptionValues(self.defaults)
        for dest, value, append in changes:
            if append:
                values.ensure_value(dest, []).append(value)
            else:
                setattr(values, dest, value)
        return values, rest

    def parse_quickly(self, args):
        """``(changes, rest)``: each option's (dest, value, append) in
        order, then the arguments after the options.  Raises KeyError,
        IndexError or ValueError where optparse must decide."""
        changes = []
        rest = list(args)
        while rest and rest[0].startswith('-') and rest[0] != '-':
            arg = rest.pop(0)
            if arg == '--':
                break
            if arg.startswith('--'):
                name, _, value = arg.partition('=')
            else:
                name, value = arg[:2], arg[2:]
            dest, convert, const, append = self.quick_options[name]
            attached = len(arg) > len(name)
            if convert is not None:
                value = convert(value if attached else rest.pop(0))
            elif attached:  # --flag=VALUE, or grouped flags (-nv)
                raise ValueError(arg)
            else:
                value = const
            changes.append((dest, value, append))
        return changes, rest

    def optparse_parser(self):
        """The same parser in optparse (imported only here)."""
        import optparse

        class PlainFormatter(optparse.IndentedHelpFormatter):
            """Prints the description's paragraphs and line breaks as
            written."""

            def format_description(self, description):
                return description + '\n' if description else ''

        parser = optparse.OptionParser(formatter=PlainFormatter(),
                                       **self.settings)
        parser.disable_interspersed_args()
        containers = [parser] + [parser.add_option_group(*group)
                                 for group in self.groups]
        for group, names, settings in self.declared:
            containers[group].add_option(*names, **settings)
        return parser

    def error(self, message):
        """Prints the usage and ``message`` to stderr; exits with status 2."""
        self.optparse_parser().error(message)

    def print_help(self, file=None):
        self.optparse_parser().print_help(file)


class LazyOptionGroup(object):
    """What LazyOptionParser.add_option_group returns: its options are the
    parser's, shown under the group's title."""

    def __init__(self, parser, number):
        self.parser = parser
        self.number = number

    def add_option(self, *names, **settings):
        self.parser.declare(self.number, names, settings)


class OptionValues(object):
    """The options parsed, as optparse.Values: an attribute for each."""

    def __init__(self, defaults):
        self.__dict__.update(defaults)

    def ensure_value(self, name, value):
        """The attribute, set to ``value`` first if None (optparse's, used
        by append)."""
        if getattr(self, name, None) is None:
            setattr(self, name, value)
        return getattr(self, name)


def make_parser(text, mode_options=True):
    """A mode's parser: ``text`` is its usage lines, a blank line, then the
    description that --help prints (a usage error prints the usage only)."""
    usage, _, description = text.partition('\n\n')
    name = os.path.basename(sys.argv[0])
    if name == '-c':  # python -c 'import negotiator; negotiator.main_exit()'
        name = 'negotiator'
    parser = LazyOptionParser(usage=usage, description=description,
                              version='%prog ' + __version__, prog=name)
    if not mode_options:
        return parser
    parser.add_option('-v', '--verbose', action='store_const', const=2,
                      dest='verbosity', default=1,
                      help='log debugging details (and tracebacks)')
    parser.add_option('-q', '--quiet', action='store_const', const=0,
                      dest='verbosity', help='log only warnings and errors')
    return parser


def add_call_options(parser, other_side):
    group = parser.add_option_group('Calling the ' + other_side)
    group.add_option('-t', '--timeout', type='float', metavar='SECONDS',
                     default=DEFAULT_TIMEOUT,
                     help='give up after SECONDS, killing the command on the '
                     '{0} (default: %default; 0 = never)'.format(other_side))
    group.add_option('--stdin', action='store_true',
                     help='forward standard input even from a terminal')
    group.add_option('-n', '--no-stdin', action='store_true',
                     help='do not forward standard input')
    group.add_option('--list', action='store_true',
                     help='list the commands the {0} offers'.format(
                         other_side))
    group.add_option('--ping', action='store_true',
                     help='print the other side\'s version and round-trip '
                     'time')
    group.add_option('--json', action='store_true',
                     help='print one JSON object with the result instead '
                     'of the output')


def add_service_options(parser, who):
    parser.add_option('--commands-dir', metavar='DIR',
                      default=DEFAULT_COMMANDS_DIR,
                      help='directory of the commands {0} may run '
                      '(default: %default)'.format(who))
    parser.add_option('--syslog', action='store_true',
                      help='log to syslog instead of stderr')


def guest_parser():
    parser = make_parser(GUEST_USAGE)
    parser.add_option('--device', metavar='PATH',
                      help='the port\'s character device (default: found '
                      'by name)')
    parser.add_option('--listen', metavar='PATH',
                      help='serve a UNIX socket at PATH instead of a port '
                      '(to try negotiator without a VM)')
    add_service_options(parser, 'the host')
    group = parser.add_option_group(
        'Requests served (qemu-ga\'s options)',
        '    LIST: request names, comma-separated; the options may be\n'
        '    repeated; "help" prints the names.  Without either option,\n'
        '    guest-exec, guest-exec-status and guest-file-* are refused,\n'
        '    as RHEL and CentOS ship qemu-ga; a --block-rpcs replaces\n'
        '    that list (--block-rpcs "" refuses none).')
    group.add_option('-a', '--allow-rpcs', metavar='LIST', action='append',
                     help='serve only these requests')
    group.add_option('-b', '--block-rpcs', metavar='LIST', action='append',
                     help='refuse these requests ("Command ... has been '
                     'disabled")')
    parser.add_option('--call', action='store_true',
                      help='run COMMAND [ARG...] on the host')
    add_call_options(parser, 'host')
    return parser


def host_parser():
    parser = make_parser(HOST_USAGE)
    add_call_options(parser, 'guest')
    parser.add_option('--list-guests', action='store_true',
                      help='list the running guests with negotiator ports, '
                      'and whether their agents answer')
    parser.add_option('--all', action='store_true',
                      help='run COMMAND on every running guest')
    parser.add_option('--parallel', type='int', metavar='N',
                      default=DEFAULT_PARALLEL,
                      help='with --all, call N guests at once (default: '
                      '%default)')
    group = parser.add_option_group('Finding guests')
    group.add_option('--connect', metavar='URI',
                     help='libvirt URI for virsh (default: virsh\'s own)')
    group.add_option('--channel-dir', metavar='DIR',
                     help='look for guests\' sockets in DIR instead of '
                     'asking virsh (libvirt keeps them in {0}, which is '
                     'scanned when virsh fails)'.format(DEFAULT_CHANNEL_DIR))
    group = parser.add_option_group('Host daemon')
    group.add_option('--daemon', action='store_true',
                     help='serve every guest\'s calls to the host')
    group.add_option('--guest', metavar='NAME=SOCKET', action='append',
                     dest='guests', default=[],
                     help='serve this guest, whose '
                     'negotiator-guest-to-host.0 socket is SOCKET, instead '
                     'of finding guests (repeat for more)')
    group.add_option('--rescan', type='float', metavar='SECONDS',
                     default=DEFAULT_RESCAN,
                     help='look for guests that came or went every SECONDS '
                     '(virsh list, or the --guest pairs or --channel-dir '
                     'again; default: %default)')
    add_service_options(group, 'guests')
    return parser


def setup_logging(verbosity, use_syslog=False, now=True):
    """Log at the level of -q/-v; ``now=False`` (a short call) leaves the
    logging module to the first message."""
    log.setup((WARNING, INFO, DEBUG)[verbosity], use_syslog, now)


def add_log_handler(logger, level, use_syslog):
    """Log to stderr, or to syslog where the guest has a syslog socket.

    A logging failure (syslog restarted, stderr closed) must never print a
    traceback or stop the agent, so the logging module's are switched off.
    The lines show no thread, process or source line, so the logging module
    is told not to look them up for every line (its HOWTO, "Optimization").
    """
    import logging
    logging.raiseExceptions = False
    logging.logThreads = logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    logger.setLevel(level)
    if use_syslog and os.path.exists(SYSLOG_SOCKET):
        from logging.handlers import SysLogHandler
        handler = SysLogHandler(address=SYSLOG_SOCKET)
        handler.setFormatter(logging.Formatter(
            'negotiator[{0}]: %(message)s'.format(os.getpid())))
        logger.addHandler(handler)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('negotiator: %(message)s'))
    logger.addHandler(handler)
    if use_syslog:
        logger.warning('no syslog socket %s: logging to stderr',
                       SYSLOG_SOCKET)


def check_timeout(parser, options):
    if not 0 <= options.timeout <= MAX_TIMEOUT:
        parser.error('--timeout must be 0 (never) or a number of seconds')


def parse_guest_mode(args):
    """``(options, action)`` for ``guest ...``; usage errors exit 2."""
    parser = guest_parser()
    options, extra = parser.parse_args(args)
    calling = options.call or options.list or options.ping
    if options.call and not extra:
        parser.error('COMMAND is missing after --call')
    if extra and not options.call:
        parser.error('unexpected arguments: {0} (to run a command on the '
                     'host: --call COMMAND)'.format(' '.join(extra)))
    check_timeout(parser, options)
    lists = (options.allow_rpcs, options.block_rpcs)
    if calling and lists != (None, None):
        parser.error('--allow-rpcs and --block-rpcs are options of the '
                     'agent, not of --call, --list or --ping')
    options.allow_rpcs, options.block_rpcs = [
        None if values is None else
        [name for value in values for name in value.split(',') if name]
        for values in lists]
    if 'help' in (options.allow_rpcs or []) + (options.block_rpcs or []):
        return options, print_request_names
    setup_logging(options.verbosity, options.syslog, now=not calling)
    if calling:
        return options, lambda: run_guest_call(options, extra)
    return options, lambda: run_guest(options)


def print_request_names():
    """--allow-rpcs help: the requests the agent serves, one a line."""
    for request in Server.REQUESTS:
        print_out(request[0])
    return 0


def parse_host_mode(args):
    """``(options, action)`` for ``host ...``; usage errors exit 2."""
    parser = host_parser()
    options, extra = parser.parse_args(args)
    if not options.all and len(extra) > 1 and extra[1].startswith('-'):
        # Options between GUEST and COMMAND: forgiving, as ssh is.
        options, more = parser.parse_args(extra[1:], options)
        extra = extra[:1] + more
    check_timeout(parser, options)
    if options.daemon or options.list_guests:
        if extra:
            parser.error('unexpected arguments: {0}'.format(' '.join(extra)))
        if not 0 < options.rescan <= MAX_TIMEOUT:
            parser.error('--rescan must be a positive number of seconds')
        try:
            pairs = parse_guest_pairs(options.guests) or None
        except ValueError as e:
            parser.error(str(e))
        setup_logging(options.verbosity, options.syslog)
        if options.daemon:
            return options, lambda: run_daemon(options, pairs)
        return options, lambda: host_list_guests(options)
    if options.all:
        if options.list or options.ping or not extra:
            parser.error('--all takes COMMAND [ARG...]')
        if not 0 < options.parallel <= MAX_PARALLEL:
            parser.error('--parallel must be from 1 to {0}'.format(
                MAX_PARALLEL))
        setup_logging(options.verbosity, now=False)
        return options, lambda: run_all(options, extra)
    if not extra:
        parser.error('GUEST (or SOCKET) is missing')
    if len(extra) < 2 and not (options.list or options.ping):
        parser.error('COMMAND is missing (or use --list or --ping)')
    setup_logging(options.verbosity, now=False)
    return options, lambda: run_host(options, extra[0], extra[1:])


def main(argv=None):
    """The command-line interface; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    take_standard_fds()
    main_parser = make_parser(MAIN_USAGE, mode_options=False)
    _, rest = main_parser.parse_args(argv)
    if not rest:
        main_parser.print_help(sys.stderr)
        return EXIT_USAGE
    mode, rest = rest[0], rest[1:]
    if mode == 'guest':
        options, action = parse_guest_mode(rest)
    elif mode == 'host':
        options, action = parse_host_mode(rest)
    else:
        main_parser.error('unknown mode {0!r}: use guest or host'.format(mode))
    try:
        return action()
    except NegotiatorError as e:
        return report_error(e, options)
    except KeyboardInterrupt:
        return 130


def report_error(error, options):
    """Say why a mode failed, in its JSON object too with --json; returns
    the exit status."""
    if error.text:
        log.error('%s', error.text, exc_info=log.isEnabledFor(DEBUG))
    if getattr(options, 'json', False):
        try:
            print_json({'error': {'class': getattr(error, 'error_class',
                                                   type(error).__name__),
                                  'desc': error.text},
                        'status': error.status})
        except OutputError:
            pass  # what failed was stdout itself
    return error.status


def take_standard_fds():
    """Open /dev/null, read-only, as each of stdin, stdout and stderr that
    is closed: the port or a socket opened next would take its number and
    get the output or the log.  Writes to it fail (EBADF), as they would."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDONLY)


def main_exit():
    """Entry point of the installed ``negotiator`` script."""
    sys.exit(main())


if __name__ == '__main__':
    main_exit()
