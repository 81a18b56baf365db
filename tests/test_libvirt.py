"""Through a real libvirtd: the test guest as a libvirt domain, the agent
inside serving libvirt on org.qemu.guest_agent.0 as qemu-ga would, and
negotiator's own two channels found through libvirt.

scripts/test runs this module once, on one host interpreter, after the
real-guest tests; it needs root, libvirtd and virtlogd (Debian's
libvirt-daemon and libvirt-daemon-driver-qemu, which scripts/test
installs), QEMU and the guest image.  scripts/guest/libvirtd.py starts the
daemons (the machine's /etc left as found) and the domain, and stops them
all at the end: a libvirtd that does not start is a failure showing its
log, never a skip.  One domain serves every test: its agent runs on the
guest's Python 2.7, the oldest the guest has, as on the old guests
negotiator is for.

What virsh prints is asserted exactly, as libvirt 9.0 (Debian 12) prints
it.
"""

import concurrent.futures
import ctypes
import ctypes.util
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import negotiator
from helpers import ROOT, Workdir, assert_no_traceback, make_command

sys.path.insert(0, os.path.join(ROOT, 'scripts', 'guest'))
import guestimage  # noqa: E402
from libvirtd import AGENT_PORT, PID_FILE, Domain, Libvirtd  # noqa: E402

NAME = 'negotiator-test'
#: The guest's user besides root (scripts/guest/guestimage.py).
USER, USER_ID = guestimage.GUEST_USER[:2]
#: A shell line setting $home to the home of the user named by $1.
HOME_OF = 'home=$(grep "^$1:" /etc/passwd | cut -d: -f6)\n'

#: Guest commands (busybox sh).
COMMANDS = {
    'echo-args': '#!/bin/sh\nprintf "%s\\0" "$@"\nexec cat\n',
    'exit-with': '#!/bin/sh\nexit "$1"\n',
    # What guestinfo --os shows, as the guest's own tools tell it.
    'os-facts': ('#!/bin/sh\nuname -m\nuname -r\nuname -v\n'
                 'cat /etc/os-release\n'),
    'call-host': ('#!/bin/sh\nexec "$NEGOTIATOR_PYTHON" '
                  '/usr/lib/negotiator/negotiator.py guest --call "$@"\n'),
    # The guest's clock, set and read in seconds since the epoch.
    'set-clock': '#!/bin/sh\nexec date -u -s "@$1" > /dev/null\n',
    'clock': '#!/bin/sh\nexec date -u +%s\n',
    # A user's ~/.ssh and authorized_keys: modes, owners and lines.
    'user-keys': ('#!/bin/sh\n' + HOME_OF + 'cd "$home/.ssh" && '
                  'stat -c "%a %u %g %n" . authorized_keys && '
                  'cat authorized_keys\n'),
    # A user's authorized_keys made a symlink to $2.
    'link-keys': ('#!/bin/sh\n' + HOME_OF +
                  'ln -sfn "$2" "$home/.ssh/authorized_keys"\n'),
    # /etc/shadow: its mode and owner, and its lines.
    'shadow': '#!/bin/sh\nstat -c "%a %u %g" /etc/shadow && cat /etc/shadow\n',
}

#: The host daemon's command the guest calls.
HOST_COMMANDS = {
    'greet': '#!/bin/sh\necho "hello $NEGOTIATOR_GUEST: $*"\ncat\nexit 3\n',
}


@pytest.fixture(scope='module')
def libvirtd():
    daemons = Libvirtd().start()
    yield daemons
    daemons.stop()


@pytest.fixture(scope='module')
def commands():
    """The guests' commands directory, COMMANDS in it."""
    workdir = Workdir()
    for name, script in COMMANDS.items():
        make_command(workdir.commands, name, script)
    yield workdir.commands
    workdir.cleanup()


@pytest.fixture(scope='module')
def domain(libvirtd, commands):
    booted = Domain(libvirtd, name=NAME, python='2', commands=commands)
    try:
        booted.start()
        yield booted
        console = booted.console()
    finally:
        booted.stop()
    # The agents log to the console: whatever happened, never a traceback.
    assert_no_traceback(console)


def virsh(libvirtd, *args):
    """virsh's (status, stdout, stderr), as text."""
    done = libvirtd.virsh(*args, check=False)
    return done.returncode, done.stdout, done.stderr


def agent_command(libvirtd, request):
    return virsh(libvirtd, 'qemu-agent-command', NAME, json.dumps(request))


def host(*args, **kwargs):
    """``negotiator.py host ARGS`` on the host: (status, stdout, stderr)."""
    if 'input' not in kwargs:
        kwargs['stdin'] = subprocess.DEVNULL
    done = subprocess.run(
        [sys.executable, negotiator.__file__, 'host'] + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
        **kwargs)
    return done.returncode, done.stdout, done.stderr


def test_guest_ping(libvirtd, domain):
    assert agent_command(libvirtd, {'execute': 'guest-ping'}) == (
        0, '{"return":{}}\n\n', '')


def test_guest_info_names_negotiators_version_and_requests(libvirtd, domain):
    status, out, err = agent_command(libvirtd, {'execute': 'guest-info'})
    assert (status, err) == (0, '')
    info = json.loads(out)['return']
    assert info['version'] == negotiator.__version__
    assert info['supported_commands'] == [
        {'enabled': name not in negotiator.DEFAULT_BLOCKED_RPCS,
         'name': name, 'success-response': name != 'guest-shutdown'}
        for name, _, _ in negotiator.Server.REQUESTS]


def test_domhostname(libvirtd, domain):
    assert virsh(libvirtd, 'domhostname', '--source', 'agent', NAME) == (
        0, 'negotiator-guest\n\n', '')


def test_domifaddr_lists_the_guests_interfaces(libvirtd, domain):
    """The guest has only its loopback interface (no network device)."""
    assert virsh(libvirtd, 'domifaddr', '--source', 'agent', NAME) == (0, (
        ' Name       MAC address          Protocol     Address\n'
        '-------------------------------------------------------------------'
        '------------\n'
        ' lo         00:00:00:00:00:00    ipv4         127.0.0.1/8\n'
        ' -          -                    ipv6         ::1/128\n\n'), '')


def guestinfo_lines(fields):
    """FIELDS as virsh guestinfo prints them."""
    return ''.join('{0:<20}: {1}\n'.format(key, value)
                   for key, value in fields)


def os_timezone_hostname():
    """What guestinfo --os --timezone --hostname should print, from the
    guest's uname and os-release (the host's copy); its clock runs in UTC."""
    status, out, err = host(NAME, 'os-facts')
    assert (status, err) == (0, b'')
    machine, release, version, os_release = out.decode().split('\n', 3)
    fields = dict(re.findall(r'^([A-Z_]+)="?(.*?)"?$', os_release, re.M))
    return guestinfo_lines([
        ('os.id', fields['ID']), ('os.name', fields['NAME']),
        ('os.pretty-name', fields['PRETTY_NAME']),
        ('os.version', fields['VERSION']),
        ('os.version-id', fields['VERSION_ID']), ('os.machine', machine),
        ('os.kernel-release', release), ('os.kernel-version', version),
        ('timezone.name', 'UTC'), ('timezone.offset', '0'),
        ('hostname', 'negotiator-guest')])


def test_guestinfo_os_hostname_timezone(libvirtd, domain):
    assert virsh(libvirtd, 'guestinfo', '--os', '--hostname', '--timezone',
                 NAME) == (0, os_timezone_hostname() + '\n', '')


def test_guestinfo_leaves_out_what_is_not_served(libvirtd, domain):
    """Plain guestinfo asks for users, file systems and disks too, and
    prints what it got (which blocks: the agent's choice)."""
    status, out, err = virsh(libvirtd, 'guestinfo', NAME)
    assert (status, err) == (0, '')
    assert os_timezone_hostname() in out
    assert guestinfo_lines([
        ('if.count', 1), ('if.0.name', 'lo'),
        ('if.0.hwaddr', '00:00:00:00:00:00'), ('if.0.addr.count', 2),
        ('if.0.addr.0.type', 'ipv4'), ('if.0.addr.0.addr', '127.0.0.1'),
        ('if.0.addr.0.prefix', 8), ('if.0.addr.1.type', 'ipv6'),
        ('if.0.addr.1.addr', '::1'), ('if.0.addr.1.prefix', 128)]) + '\n' \
        in out


def test_domtime_is_the_guests_clock(libvirtd, domain):
    status, out, err = virsh(libvirtd, 'domtime', NAME)
    assert (status, err) == (0, '')
    match = re.match(r'^Time: (\d+)\n$', out)
    assert match, out
    assert abs(int(match.group(1)) - time.time()) < 30, out


def test_negotiator_execute_shows_only_the_exit_code(libvirtd, domain):
    """libvirt takes the output's events for its own: only the final
    reply reaches the user, its exit code."""
    for args, reply in ((['echo-args', 'a'], '{"return":{"exitcode":0}}'),
                        (['exit-with', '3'], '{"return":{"exitcode":3}}')):
        assert agent_command(libvirtd, {
            'execute': 'negotiator-execute',
            'arguments': {'command': args[0], 'args': args[1:]}}) == (
                0, reply + '\n\n', '')


def test_negotiator_execute_error_reaches_the_user(libvirtd, domain):
    assert agent_command(libvirtd, {
        'execute': 'negotiator-execute',
        'arguments': {'command': 'no-such'}}) == (
            1, '\n', "error: internal error: unable to execute QEMU agent "
            "command 'negotiator-execute': Command 'no-such' not found in "
            "/usr/lib/negotiator/commands; available: {0}\n".format(
                ', '.join(sorted(list(COMMANDS) + list(negotiator.BUILTINS)))))


def test_host_runs_a_guest_command_by_the_domains_name(domain):
    """`host GUEST` finds the socket through virsh (its default URI)."""
    assert host(NAME, 'echo-args', 'a b', '') == (
        0, b'a b\0\0', b'')


def test_list_guests_finds_the_domains_ports(libvirtd, domain):
    """Through virsh list and dumpxml of the real libvirtd: the paths
    libvirt chose, negotiator's two channels (not qemu-ga's)."""
    status, out, err = host('--connect', libvirtd.uri, '--list-guests',
                            '--json')
    assert (status, err) == (0, b'')
    guests = [guest for guest in json.loads(out.decode())['guests']
              if guest['name'] == NAME]
    assert guests[0]['agent'].pop('round-trip-ms') > 0
    assert guests == [{
        'name': NAME, 'state': 'running',
        'ports': {'negotiator-host-to-guest.0': domain.socket,
                  'negotiator-guest-to-host.0': domain.guest_to_host_socket},
        'agent': {'version': negotiator.__version__}, 'error': None}]


class HostDaemon(object):
    """``host --daemon -v --connect URI`` serving HOST_COMMANDS, its log
    lines read as they come, each with the time it came."""

    def __init__(self, libvirtd):
        self.workdir = Workdir()
        for name, script in HOST_COMMANDS.items():
            make_command(self.workdir.commands, name, script)
        self.lines = []  # (time.time(), line)
        self.process = subprocess.Popen(
            [sys.executable, negotiator.__file__, 'host', '--daemon', '-v',
             '--connect', libvirtd.uri, '--commands-dir',
             self.workdir.commands],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True)
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.time(), line))

    def connected(self, path, timeout=30):
        """When the daemon logged its connection to the guest's socket
        PATH (waiting up to TIMEOUT seconds for it)."""
        wanted = 'guest {0}: connected to {1}\n'.format(NAME, path)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for when, line in list(self.lines):
                if line.endswith(wanted):
                    return when
            time.sleep(0.05)
        raise AssertionError('no {0!r} within {1} s:\n{2}'.format(
            wanted, timeout, self.log()))

    def log(self):
        return ''.join(line for _, line in self.lines)

    def stop(self):
        """Stop it; its whole log, which must hold no traceback."""
        self.process.terminate()
        try:
            assert self.process.wait(30) == 0
        finally:
            self.reader.join()
            self.process.stdout.close()
            self.workdir.cleanup()
        assert_no_traceback(self.log())
        return self.log()


@pytest.fixture
def host_daemon(libvirtd):
    daemon = HostDaemon(libvirtd)
    try:
        yield daemon
    finally:
        daemon.stop()


def call_host(word, timeout=50):
    """From inside the guest, `guest --call greet WORD` with the caller's
    TIMEOUT: once, however long the daemon takes to come."""
    assert host('--stdin', '-t', str(timeout + 10), NAME, 'call-host', '-t',
                str(timeout), '--stdin', 'greet', word,
                input=b'from the guest\n') == (3, (
                    'hello {0}: {1}\nfrom the guest\n'.format(
                        NAME, word)).encode(), b'')


def test_host_daemon_finds_the_domain_and_serves_its_calls(domain,
                                                           host_daemon):
    """`host --daemon` finds the domain's negotiator-guest-to-host.0 by
    `virsh list` and `virsh dumpxml`; a call from inside the guest runs
    the host's command with the domain's name."""
    call_host('x')
    host_daemon.connected(domain.guest_to_host_socket)


def test_guestinfo_user(libvirtd, domain):
    """Nobody is logged in to the test guest (it has no utmp)."""
    assert virsh(libvirtd, 'guestinfo', '--user', NAME) == (
        0, 'user.count          : 0\n\n', '')


def test_domfsinfo_lists_the_disk(libvirtd, domain):
    assert virsh(libvirtd, 'domfsinfo', NAME) == (0, (
        ' Mountpoint   Name   Type   Target\n'
        '------------------------------------\n'
        ' /mnt/disk    vda    ext4   vda\n\n'), '')


def test_guestinfo_filesystem_and_disk(libvirtd, domain):
    status, out, err = virsh(libvirtd, 'guestinfo', '--filesystem',
                             '--disk', NAME)
    assert (status, err) == (0, '')
    sizes = re.findall(r'^fs\.0\.(total|used)-bytes +: (\d+)$', out, re.M)
    total, used = int(sizes[0][1]), int(sizes[1][1])
    assert 0 < used < total < 16 * 1024 * 1024, out
    assert out == guestinfo_lines([
        ('fs.count', 1), ('fs.0.name', 'vda'),
        ('fs.0.mountpoint', '/mnt/disk'), ('fs.0.fstype', 'ext4'),
        ('fs.0.total-bytes', total), ('fs.0.used-bytes', used),
        ('fs.0.disk.count', 1), ('fs.0.disk.0.alias', 'vda'),
        ('fs.0.disk.0.device', '/dev/vda'), ('disk.count', 1),
        ('disk.0.name', '/dev/vda'), ('disk.0.partition', 'no'),
        ('disk.0.alias', 'vda')]) + '\n'


def test_guestvcpus(libvirtd, domain):
    """One processor, 0, online; x86 cannot take cpu0 offline."""
    assert virsh(libvirtd, 'guestvcpus', NAME) == (
        0, 'vcpus          : 0\nonline         : 0\nofflinable     : \n\n',
        '')


def test_domfstrim(libvirtd, domain):
    assert virsh(libvirtd, 'domfstrim', NAME) == (0, '\n', '')


def guest_clock():
    status, out, err = host(NAME, 'clock')
    assert (status, err) == (0, b'')
    return int(out)


def test_domtime_sync_sets_the_clock_from_the_hardware_clock(libvirtd,
                                                             domain):
    """guest-set-time without a time: the guest's hwclock -s puts back the
    clock a day wrong (the hardware clock is the host's)."""
    assert host(NAME, 'set-clock', str(int(time.time()) - 86400)) == (
        0, b'', b'')
    assert abs(guest_clock() - (time.time() - 86400)) < 60
    assert virsh(libvirtd, 'domtime', '--sync', NAME) == (0, '\n', '')
    assert abs(guest_clock() - time.time()) < 30


def test_domtime_sets_the_guests_clock(libvirtd, domain):
    """guest-set-time with a time, then hwclock -w: the guest's clock is
    what virsh gave."""
    assert virsh(libvirtd, 'domtime', '--time', '2000000000', NAME) == (
        0, '\n', '')
    assert abs(guest_clock() - 2000000000) < 30
    assert virsh(libvirtd, 'domtime', '--now', NAME) == (0, '\n', '')
    assert abs(guest_clock() - time.time()) < 30


#: Two public keys, as a key file holds them.
KEYS = ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 one@host',
        'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQKey2 two@host']


@pytest.fixture(scope='module')
def key_files():
    """Key files for virsh set-user-sshkeys --file: {'all': KEYS, one a
    line, 'first': the first}."""
    workdir = Workdir()
    paths = {}
    for name, keys in (('all', KEYS), ('first', KEYS[:1])):
        paths[name] = workdir.join(name)
        with open(paths[name], 'w') as handle:
            handle.write(''.join(key + '\n' for key in keys))
    yield paths
    workdir.cleanup()


def test_user_sshkeys_through_libvirt(libvirtd, domain, key_files):
    """virsh set-user-sshkeys and get-user-sshkeys: root's authorized_keys,
    made as sshd wants it, and read back."""
    assert virsh(libvirtd, 'set-user-sshkeys', NAME, 'root', '--reset',
                 '--file', key_files['all']) == (0, '\n', '')
    # Listed last line first, as qemu-ga lists them; virsh prints them
    # as they come, with no line ends.
    assert virsh(libvirtd, 'get-user-sshkeys', NAME, 'root') == (
        0, ''.join(reversed(KEYS)) + '\n', '')
    assert host(NAME, 'user-keys', 'root') == (0, (
        '700 0 0 .\n600 0 0 authorized_keys\n' + '\n'.join(KEYS) + '\n'
    ).encode(), b'')


def test_negotiator_execute_output_in_the_reply(libvirtd, domain):
    """With capture-output, libvirt shows the output, base64."""
    assert agent_command(libvirtd, {
        'execute': 'negotiator-execute', 'arguments': {
            'command': 'echo-args', 'args': ['x'], 'capture-output': True}}
    ) == (0, '{"return":{"out-truncated":false,"out-data":"eAA=",'
          '"exitcode":0}}\n\n', '')


def test_host_all_runs_on_the_domain(libvirtd, domain):
    """host --all finds every running domain with the port through the
    real libvirtd: this one."""
    assert host('--all', '--connect', libvirtd.uri, 'echo-args', 'a') == (
        0, b'negotiator-test: a\x00\n', b'')


#: The C qemu-ga of the host (Debian's qemu-guest-agent, which scripts/test
#: installs), copied into a guest with its libraries, as scripts/bench does.
QEMU_GA = '/usr/sbin/qemu-ga'
#: The domain's twin, whose libvirt channel qemu-ga serves.
TWIN = NAME + '-qemu-ga'
#: That guest's program: qemu-ga serves libvirt's channel, negotiator
#: its own (Domain waits for both).
QEMU_GA_INIT = """#!/bin/sh
{0} -m virtio-serial -p /dev/virtio-ports/{1} -t /tmp &
exec "$NEGOTIATOR_PYTHON" /usr/lib/negotiator/negotiator.py guest
""".format(QEMU_GA, AGENT_PORT)

#: virsh calls that must succeed and print the same through qemu-ga and
#: negotiator, each followed by --domain NAME.
SAME_AS_QEMU_GA = [
    ['domhostname', '--source', 'agent'], ['domifaddr', '--source', 'agent'],
    ['guestinfo'], ['guestinfo', '--os', '--timezone', '--hostname'],
    ['guestinfo', '--user'], ['guestinfo', '--filesystem', '--disk'],
    ['domfsinfo'], ['guestvcpus'], ['domtime'], ['domtime', '--sync'],
    ['domfstrim'],
    ['qemu-agent-command', '--cmd', '{"execute":"guest-ping"}']]


def same_shape(text):
    """TEXT with what differs between two guests or two moments (times,
    byte counts: numbers of 6 digits or more) left out."""
    return re.sub(r'\d{6,}', 'N', text)


@pytest.fixture(scope='class')
def twin(libvirtd, domain, commands):
    """The domain's twin, whose libvirt channel the C qemu-ga 7.2 serves
    (the same guest image, disk and commands): up for one class's tests,
    gone before the domain's lifecycle tests."""
    files = dict((path, path) for path in
                 [QEMU_GA] + guestimage.ldd(QEMU_GA))
    booted = Domain(libvirtd, name=TWIN, python='2', guest_init=QEMU_GA_INIT,
                    files=files, commands=commands)
    try:
        booted.start()
        yield booted
    finally:
        booted.stop()


def at_once(function):
    """[FUNCTION(TWIN), FUNCTION(NAME)], the two called at once: each
    domain has a QEMU of its own."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(function, (TWIN, NAME)))


def on_both(libvirtd, *args):
    """virsh ARGS, DOM standing for a domain's name, to the twin and to
    the domain: [their (status, stdout, stderr), ours], each domain's name
    given back as DOM."""
    def call(name):
        status, out, err = virsh(libvirtd, *[name if arg == 'DOM' else arg
                                              for arg in args])
        return status, out.replace(name, 'DOM'), err.replace(name, 'DOM')
    return at_once(call)


def guest_output(name, *args):
    """What the guest command ARGS writes in domain NAME, which must
    succeed and write nothing on stderr."""
    status, out, err = host(name, *args)
    assert (status, err) == (0, b''), (args, status, out, err)
    return out.decode()


def in_both(*args):
    """[What the guest command ARGS writes in the twin, in the domain]."""
    return at_once(lambda name: guest_output(name, *args))


def shadows():
    """The twin's /etc/shadow and the domain's: [(its mode and owner, its
    lines)] of each."""
    return [(text.split('\n', 1)[0], text.splitlines()[1:])
            for text in in_both('shadow')]


def password_fields(user):
    """The password field of USER's line in the twin's /etc/shadow and in
    the domain's."""
    return [[line.split(':')[1] for line in lines
             if line.startswith(user + ':')][0] for _, lines in shadows()]


def keys_listing(content, link=False):
    """What the guest command user-keys shows of USER's ~/.ssh when its
    authorized_keys is a file of the user's holding CONTENT or (LINK) a
    symlink of root's to what holds CONTENT."""
    return '700 {0} {0} .\n{1} authorized_keys\n{2}'.format(
        USER_ID, '777 0 0' if link else '600 {0} {0}'.format(USER_ID),
        content)


def crypt(password, setting):
    """crypt(3) of the host's libcrypt, which knows the hashes Debian's
    PAM makes (Python 3.13 has no crypt module)."""
    function = ctypes.CDLL(ctypes.util.find_library('crypt')).crypt
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return function(password.encode(), setting.encode()).decode()


#: A password with a space and a colon (chpasswd splits at the first).
PASSWORD = 'top secret:42'
#: A hashed password, for --encrypted: SHA-512 crypt of "another secret".
HASH = ('$6$negotiator$/AdDp7hkLAV3rQ9oEaJCSw1LEbYKcd8XN/VXVGiERwoNeMg5v1CG'
        'zk8uNVjU6rqs6JqbCkNkoeXGLJd5v3YjQ1')
PASSWORD_SET = (0, 'Password set successfully for root in DOM\n', '')


class TestSameAsQemuGa(object):
    """The same virsh calls to the domain and to its twin: the same status
    and output, and the same effect inside the guests, unless a test says
    how and why they differ."""

    def test_virsh_prints_the_same(self, libvirtd, twin):
        """Times and byte counts aside."""
        differences = []
        for args in SAME_AS_QEMU_GA:
            replies = on_both(libvirtd, *args + ['--domain', 'DOM'])
            theirs, ours = [(status, same_shape(out), same_shape(err))
                            for status, out, err in replies]
            if ours != theirs or theirs[0]:
                differences.append((args, theirs, ours))
        assert differences == [], '\n'.join(map(repr, differences))

    def test_set_user_password(self, libvirtd, twin):
        """chpasswd (through PAM's pam_unix) puts a hash of the password
        in root's shadow entry; /etc/shadow keeps its mode and owner."""
        assert on_both(libvirtd, 'set-user-password', 'DOM', 'root',
                       PASSWORD) == [PASSWORD_SET] * 2
        for hashed in password_fields('root'):
            assert crypt(PASSWORD, hashed) == hashed
        assert [mode for mode, _ in shadows()] == ['640 0 42'] * 2

    def test_set_user_password_encrypted(self, libvirtd, twin):
        """--encrypted: chpasswd -e writes the hash as given."""
        assert on_both(libvirtd, 'set-user-password', '--encrypted', 'DOM',
                       'root', HASH) == [PASSWORD_SET] * 2
        assert password_fields('root') == [HASH] * 2

    def test_set_user_password_of_no_such_user(self, libvirtd, twin):
        """chpasswd fails: the same error, to which negotiator adds what
        chpasswd said (qemu-ga 7.2 sends its output to /dev/null)."""
        before = shadows()
        theirs, ours = on_both(libvirtd, 'set-user-password', 'DOM',
                               'nosuch', PASSWORD)
        error = ("error: internal error: unable to execute QEMU agent "
                 "command 'guest-set-user-password': child process has "
                 "failed to set user password")
        assert theirs == (1, '\n', error + '\n')
        assert ours == (1, '\n', error + (
            ": chpasswd: (user nosuch) pam_chauthtok() failed, error:\n"
            "Authentication token manipulation error\n"
            "chpasswd: (line 1, user nosuch) password not changed\n"))
        assert shadows() == before

    def test_user_sshkeys(self, libvirtd, twin, key_files):
        """set-user-sshkeys (keys added, removed, reset) and
        get-user-sshkeys of a user's keys: ~/.ssh (0700) and
        authorized_keys (0600) made the user's, as sshd wants them.  virsh
        sends a key file's lines, the empty one after the last newline
        too: both agents keep it, an empty line."""
        one, two = KEYS
        for args, content in (
                (['--file', key_files['first']], one + '\n'),
                (['--file', key_files['all']], one + '\n\n' + two),
                (['--remove', '--file', key_files['first']], two),
                (['--reset', '--file', key_files['all']],
                 one + '\n' + two + '\n'),
                (['--reset'], '')):
            assert on_both(libvirtd, 'set-user-sshkeys', 'DOM', USER,
                           *args) == [(0, '\n', '')] * 2
            listed = ''.join(reversed([key for key in content.split('\n')
                                       if key]))
            assert on_both(libvirtd, 'get-user-sshkeys', 'DOM', USER) == [
                (0, listed + '\n', '')] * 2
            assert in_both('user-keys', USER) == [
                keys_listing(content)] * 2, args

    def test_user_sshkeys_symlink_to_a_root_only_file(self, libvirtd, twin,
                                                      key_files):
        """The user's authorized_keys a symlink to /etc/shadow, which the
        user cannot read (0640, root's, group shadow).  A difference, on
        purpose: qemu-ga, as root, follows it: get-user-sshkeys lists
        shadow's lines to the host, and adding or removing keys copies
        them into the user's own authorized_keys (0600, the user's: the
        user may then read root's password hash).  negotiator acts as the
        user: the kernel refuses, the link stays.  With --reset (nothing
        read) both replace the link, not following it.  /etc/shadow never
        changes."""
        before = shadows()
        their_shadow, our_shadow = ['\n'.join(lines) + '\n'
                                    for _, lines in before]
        refused = ("error: internal error: unable to execute QEMU agent "
                   "command '{0}': failed to read '{1}/.ssh/authorized_keys'"
                   ": Failed to open file \u201c{1}/.ssh/authorized_keys"
                   "\u201d: Permission denied\n")
        for args, request, reply, written in (
                (['get-user-sshkeys', 'DOM', USER],
                 'guest-ssh-get-authorized-keys',
                 ''.join(reversed(before[0][1])) + '\n', None),
                (['set-user-sshkeys', 'DOM', USER, '--file', key_files['all']],
                 'guest-ssh-add-authorized-keys', '\n',
                 their_shadow + '\n' + '\n'.join(KEYS)),
                (['set-user-sshkeys', 'DOM', USER, '--remove', '--file',
                  key_files['all']],
                 'guest-ssh-remove-authorized-keys', '\n',
                 their_shadow[:-1])):
            in_both('link-keys', USER, '/etc/shadow')
            assert on_both(libvirtd, *args) == [
                (0, reply, ''),
                (1, '\n', refused.format(request, guestimage.GUEST_USER[2]))]
            assert in_both('user-keys', USER) == [
                keys_listing(their_shadow, link=True) if written is None
                else keys_listing(written),
                keys_listing(our_shadow, link=True)]
        in_both('link-keys', USER, '/etc/shadow')
        assert on_both(libvirtd, 'set-user-sshkeys', 'DOM', USER, '--reset',
                       '--file', key_files['all']) == [(0, '\n', '')] * 2
        assert in_both('user-keys', USER) == [
            keys_listing('\n'.join(KEYS) + '\n')] * 2
        assert shadows() == before


# The domain's lifecycle: destroyed and created again, libvirtd restarted
# under it, rebooted and shut down by the agent.  Last: the domain is gone
# after the shutdown.

def test_host_daemon_follows_the_domain_through_destroy_and_create(
        domain, host_daemon, figures):
    """virsh destroy, then virsh create: the domain comes back with a new
    id, so its sockets at new paths.  The daemon follows libvirt's
    lifecycle events: a call from inside the guest made as soon as the
    agents answer succeeds at its first try within its 10 s timeout (the
    bound only catches a daemon that hangs or waits for its next rescan:
    the connection comes within a second of virsh create)."""
    old_socket = domain.guest_to_host_socket
    host_daemon.connected(old_socket)
    domain.restart()
    created = time.time() - domain.boot_seconds
    assert domain.guest_to_host_socket != old_socket
    called = time.time()
    call_host('again', timeout=10)
    answered = time.time()
    connected = host_daemon.connected(domain.guest_to_host_socket)
    figures('from virsh create: the daemon connected after {0:.2f} s, the '
            'agents answered after {1:.2f} s; the first call took {2:.2f} '
            's'.format(connected - created, called - created,
                       answered - called))
    assert connected - created < 10, host_daemon.log()


def test_libvirtd_restarted_under_the_running_domain(libvirtd, domain,
                                                     host_daemon):
    """libvirtd stopped and started again, its domain running on: `host
    GUEST` (virsh finds the socket), virsh's agent commands and the guest's
    calls to the host daemon all work at once."""
    if not libvirtd.processes:
        pytest.skip('libvirtd was running already: not ours to restart')
    host_daemon.connected(domain.guest_to_host_socket)
    libvirtd.restart()
    assert host(NAME, 'echo-args', 'a') == (0, b'a\0', b'')
    assert agent_command(libvirtd, {'execute': 'guest-ping'}) == (
        0, '{"return":{}}\n\n', '')
    call_host('restarted', timeout=10)


def guest_uptime():
    """Seconds since the guest booted: the agent's uptime command."""
    status, out, err = host(NAME, 'uptime')
    assert (status, err) == (0, b'')
    return float(re.search(br'^uptime-seconds=(.*)$', out, re.M).group(1))


def test_reboot_mode_agent_boots_the_guest_again(libvirtd, domain,
                                                 figures):
    """virsh reboot --mode agent: guest-shutdown {"mode":"reboot"}; with
    no shutdown in the guest, busybox's reboot signals PID 1 (SIGTERM) and
    /init reboots as busybox init does.  The domain runs on, in the same
    QEMU, with a guest booted after the call whose agents answer."""
    with open(PID_FILE.format(NAME)) as f:
        qemu_pid = f.read()
    asked = time.time()
    assert virsh(libvirtd, 'reboot', '--mode', 'agent', NAME) == (
        0, "Domain '{0}' is being rebooted\n\n".format(NAME), '')
    domain.wait_console('negotiator-guest: starting', asked, count=2)
    domain.wait_agent(asked)
    domain.wait_libvirt_agent(asked)
    figures('the agents answered {0:.2f} s after virsh reboot'.format(
        time.time() - asked))
    assert guest_uptime() < time.time() - asked
    assert 'SIGTERM: rebooting' in domain.console()
    with open(PID_FILE.format(NAME)) as f:
        assert f.read() == qemu_pid


def test_shutdown_mode_agent_powers_the_guest_off(libvirtd, domain,
                                                  figures):
    """virsh shutdown --mode agent: guest-shutdown {"mode":"powerdown"};
    busybox's poweroff signals PID 1 (SIGUSR2) and /init powers off: the
    transient domain is gone within 30 s.  The last test of the module."""
    asked = time.time()
    assert virsh(libvirtd, 'shutdown', '--mode', 'agent', NAME) == (
        0, "Domain '{0}' is being shutdown\n\n".format(NAME), '')
    while virsh(libvirtd, 'domstate', NAME)[0] == 0:
        assert time.time() < asked + 30, domain.console()
        time.sleep(0.2)
    figures('the domain was gone {0:.2f} s after virsh shutdown'.format(
        time.time() - asked))
    assert 'SIGUSR2: powering off' in domain.console()
