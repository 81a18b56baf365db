"""Real libvirtd on a machine without systemd, and the test guest as a
libvirt domain under it, for tests and by hand.

    import sys; sys.path.insert(0, 'scripts/guest')
    from libvirtd import Libvirtd, Domain
    with Libvirtd() as libvirtd:           # virtlogd, then libvirtd
        with Domain(libvirtd) as dom:      # both agents answer through libvirt
            libvirtd.virsh('qemu-agent-command', dom.name,
                           '{"execute":"guest-ping"}').stdout

The machine's /etc is left as found: libvirtd runs in a private mount
namespace (unshare -m) over bind-mounted copies of /etc/passwd and
/etc/group holding the user Debian's libvirtd looks up before it reads
qemu.conf (libvirt-qemu), and of /etc/libvirt with a qemu.conf running
QEMU as root.  Files created elsewhere (sockets under /run/libvirt, logs,
the capabilities cache) are seen by everyone, as with any libvirtd.  A
libvirtd that already answers is used as it is, and left running.

Domain is qemu.Guest's domain twin: a transient domain (virsh create, so
nothing stays defined) booting the same kernel and initrd under TCG (KVM
where qemu.choose_accel() finds it), with a 16 MB ext4 virtio disk that
the guest's /init mounts, and three channels whose sockets libvirt makes:
org.qemu.guest_agent.0 (an agent serves it, as qemu-ga would),
negotiator-host-to-guest.0 and negotiator-guest-to-host.0.

Libvirtd.stop() and Domain.stop() (the context managers, Ctrl-C, the
interpreter's exit) stop what start() started: the domain (virsh destroy,
else its QEMU by pid), libvirtd, virtlogd, and their temporary directory.

Command line: python3 scripts/guest/libvirtd.py [--python 2|3]
    starts libvirtd, boots a domain, prints its name and waits (Ctrl-C
    stops everything).
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import qemu  # noqa: E402

URI = 'qemu:///system'
AGENT_PORT = 'org.qemu.guest_agent.0'
#: Where libvirtd keeps a running domain's QEMU pid.
PID_FILE = '/run/libvirt/qemu/{0}.pid'
#: libvirtd's log of a domain's QEMU (its command line and stderr).
QEMU_LOG = '/var/log/libvirt/qemu/{0}.log'
#: The user and group Debian's libvirtd resolves at start, before qemu.conf.
QEMU_USER = 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:' \
            '/usr/sbin/nologin\n'
QEMU_GROUP = 'libvirt-qemu:x:64055:libvirt-qemu\n'
#: qemu.conf: QEMU as root (no user of its own here).
QEMU_CONF = 'user = "root"\ngroup = "root"\n'
#: Run in the private mount namespace: $1-$3 over /etc's files, libvirtd.
BIND_AND_RUN = ('mount --bind "$1" /etc/passwd && '
                'mount --bind "$2" /etc/group && '
                'mount --bind "$3" /etc/libvirt && exec libvirtd')
DOMAIN_XML = """<domain type='{type}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
{channels}  </devices>
</domain>
"""
CHANNEL_XML = """    <channel type='unix'>
      <target type='virtio' name='{0}'/>
    </channel>
"""

#: What is running, stopped at the interpreter's exit, last started first
#: (domains before the libvirtd that runs them).
_LIVE = []


@atexit.register
def _stop_all():
    for thing in reversed(list(_LIVE)):
        thing.stop()


class LibvirtError(Exception):
    pass


def virsh(uri, args, check=True, timeout=60):
    """``virsh -c URI ARGS...`` as a CompletedProcess with text output;
    LibvirtError when CHECK and it fails."""
    try:
        done = subprocess.run(
            ['virsh', '-c', uri] + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LibvirtError('virsh %s: no answer within %g s' % (
            ' '.join(args), timeout))
    if check and done.returncode:
        raise LibvirtError('virsh %s: exit %d: %s' % (
            ' '.join(args), done.returncode, done.stderr.strip()))
    return done


def _terminate(process):
    """SIGTERM, and SIGKILL if PROCESS has not exited within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Libvirtd(object):
    """virtlogd and libvirtd, started by start() unless libvirtd answers
    already; stop() stops what start() started."""

    def __init__(self, uri=URI, timeout=60, quiet=False):
        self.uri = uri
        self.timeout = timeout
        self.quiet = quiet
        self.tmpdir = None
        self.processes = []  # (name, Popen, log path), in start order
        self._libvirtd_args = None

    def virsh(self, *args, **kwargs):
        return virsh(self.uri, args, **kwargs)

    def answers(self):
        return self.virsh('version', check=False, timeout=10).returncode == 0

    def start(self):
        if self.answers():
            return self
        self.tmpdir = tempfile.mkdtemp(prefix='negotiator-libvirtd.')
        _LIVE.append(self)
        try:
            self._spawn('virtlogd', ['virtlogd'])
            self._libvirtd_args = ['unshare', '-m', 'sh', '-c', BIND_AND_RUN,
                                   'sh'] + self._private_etc()
            self._spawn('libvirtd', self._libvirtd_args)
            self._wait_answer()
        except BaseException:
            self.stop()
            raise
        return self

    def _private_etc(self):
        """Copies of /etc/passwd, /etc/group and /etc/libvirt for libvirtd."""
        copies = []
        for name, extra in (('passwd', QEMU_USER), ('group', QEMU_GROUP)):
            copy = os.path.join(self.tmpdir, name)
            with open('/etc/' + name) as f:
                text = f.read()
            with open(copy, 'w') as f:
                f.write(text if 'libvirt-qemu:' in text else text + extra)
            copies.append(copy)
        etc = os.path.join(self.tmpdir, 'etc-libvirt')
        shutil.copytree('/etc/libvirt', etc, symlinks=True)
        with open(os.path.join(etc, 'qemu.conf'), 'w') as f:
            f.write(QEMU_CONF)
        return copies + [etc]

    def restart(self):
        """Stop libvirtd and start it again, as an upgrade would: virtlogd
        and the domains' QEMU run on, and the new libvirtd takes them over.
        Only a libvirtd that start() started."""
        if not self.processes:
            raise LibvirtError('libvirtd was running already: not ours to '
                               'restart')
        _terminate(self.processes.pop()[1])
        self._spawn('libvirtd', self._libvirtd_args)
        self._wait_answer()

    def _spawn(self, name, args):
        log = os.path.join(self.tmpdir, name + '.log')
        with open(log, 'ab') as f:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=qemu._die_with_parent)
        self.processes.append((name, process, log))

    def _wait_answer(self):
        """Until virsh gets an answer; libvirtd's exit or silence is an
        error showing its log (its exit status says nothing: 0 even when
        it could not start)."""
        t0 = time.time()
        while not self.answers():
            if self.processes[-1][1].poll() is not None:
                raise LibvirtError('libvirtd exited (status %d) before it '
                                   'answered:\n%s' % (
                                       self.processes[-1][1].returncode,
                                       self.log()))
            if time.time() > t0 + self.timeout:
                raise LibvirtError('libvirtd did not answer within %g s:\n%s'
                                   % (self.timeout, self.log()))
            time.sleep(0.1)
        if not self.quiet:
            sys.stderr.write('libvirtd: answering after %.1f s\n'
                             % (time.time() - t0))

    def log(self):
        """The logs of the daemons start() started (text)."""
        parts = []
        for name, _, path in self.processes:
            with open(path, 'rb') as f:
                parts.append('--- %s\n%s' % (
                    name, f.read().decode('utf-8', 'replace')))
        return ''.join(parts)

    def stop(self):
        """SIGTERM to libvirtd, then virtlogd (SIGKILL after 10 s each).
        Safe to call twice."""
        while self.processes:
            _terminate(self.processes.pop()[1])
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Domain(qemu.Guest):
    """The test guest as a transient libvirt domain (see the module's
    docstring).  LIBVIRTD is a started Libvirtd; NAME the domain's name;
    the other arguments are qemu.Guest's (reboot and extra_args aside).
    start() returns once the agents answer on negotiator-host-to-guest.0
    and, through libvirt, on org.qemu.guest_agent.0 (wait='agent')."""

    def __init__(self, libvirtd, name='negotiator-test', disk_mb=16,
                 **kwargs):
        kwargs.setdefault('timeout', 90)
        qemu.Guest.__init__(self, **kwargs)
        self.libvirtd = libvirtd
        self.name = name
        self.disk_mb = disk_mb
        #: {channel name: socket path}, from virsh dumpxml once started.
        self.sockets = {}
        self.created = False

    @property
    def socket(self):
        return self.sockets[qemu.HOST_TO_GUEST]

    @property
    def guest_to_host_socket(self):
        return self.sockets[qemu.GUEST_TO_HOST]

    @property
    def disk(self):
        return os.path.join(self.tmpdir, 'disk.raw')

    def xml(self, kernel, initrd):
        channels = ''.join(CHANNEL_XML.format(name) for name in (
            AGENT_PORT, qemu.HOST_TO_GUEST, qemu.GUEST_TO_HOST))
        return DOMAIN_XML.format(
            type='kvm' if self.accel == 'kvm' else 'qemu', name=self.name,
            memory=self.memory, kernel=kernel, initrd=initrd,
            cmdline=self.kernel_command_line(), disk=self.disk,
            console=self.console_log, channels=channels)

    def _make_disk(self):
        with open(self.disk, 'wb') as f:
            f.truncate(self.disk_mb << 20)
        subprocess.run(['mkfs.ext4', '-q', '-F', '-L', 'negotiator',
                        self.disk], check=True)

    def _boot(self, wait):
        if self.libvirtd.virsh('domstate', self.name, check=False) \
                .returncode == 0:
            sys.stderr.write('domain %s left running: destroying it\n'
                             % self.name)
            self.libvirtd.virsh('destroy', self.name)
        if not os.path.exists(self.disk):
            self._make_disk()
        path = os.path.join(self.tmpdir, 'domain.xml')
        with open(path, 'w') as f:
            f.write(self.xml(*self._images_built))
        if not self.quiet:
            sys.stderr.write('domain %s: %s, python %s, in %s\n' % (
                self.name, self.accel.upper(), self.python, self.tmpdir))
        self._console_start = 0  # libvirt empties the file at each start
        t0 = time.time()
        self.libvirtd.virsh('create', path)
        self.created = True
        _LIVE.append(self)
        self.sockets = self.channel_sockets()
        if wait:
            self.wait_console('negotiator-guest: starting', t0)
        if wait == 'agent':
            self.wait_agent(t0)
            self.wait_libvirt_agent(t0)
        self.boot_seconds = time.time() - t0

    def channel_sockets(self):
        """{channel name: socket path} of the running domain."""
        root = ElementTree.fromstring(
            self.libvirtd.virsh('dumpxml', self.name).stdout)
        return dict((channel.find('target').get('name'),
                     channel.find('source').get('path'))
                    for channel in root.iter('channel'))

    def wait_libvirt_agent(self, t0=None):
        """Until libvirt gets an answer from the agent on its channel
        (it connects only once the guest opened the port)."""
        deadline = (t0 or time.time()) + self.timeout
        while self.agent_command('guest-ping', check=False).returncode:
            self._check_alive()
            if time.time() > deadline:
                raise qemu.GuestError(
                    'no answer through libvirt on %s within %g s:\n%s' % (
                        AGENT_PORT, self.timeout, self.console()))
            time.sleep(0.2)

    def agent_command(self, execute, arguments=None, **kwargs):
        """``virsh qemu-agent-command`` (libvirt's own 5 s timeout)."""
        request = {'execute': execute}
        if arguments is not None:
            request['arguments'] = arguments
        return self.libvirtd.virsh('qemu-agent-command', self.name,
                                   json.dumps(request), **kwargs)

    def _check_alive(self):
        state = self.libvirtd.virsh('domstate', self.name, check=False)
        if state.stdout.strip() != 'running':
            try:
                with open(QEMU_LOG.format(self.name), 'rb') as f:
                    log = f.read().decode('utf-8', 'replace')
            except IOError:
                log = ''
            raise qemu.GuestError('domain %s is not running (%s)\nqemu '
                                  'log:\n%s\nconsole:\n%s' % (
                                      self.name, (state.stdout +
                                                  state.stderr).strip(),
                                      log, self.console()))

    def kill(self):
        """virsh destroy; its QEMU killed by pid if libvirtd cannot."""
        if not getattr(self, 'created', False):
            return
        self.created = False
        _LIVE.remove(self)
        if self.libvirtd.virsh('destroy', self.name, check=False).returncode:
            try:
                with open(PID_FILE.format(self.name)) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (IOError, OSError, ValueError):
                pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    import argparse
    # SIGTERM, and SIGINT even where a shell left it ignored, stop it all.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    p = argparse.ArgumentParser(description='libvirtd and a test domain')
    p.add_argument('--python', default='3', choices=['2', '3'])
    p.add_argument('--name', default='negotiator-test')
    a = p.parse_args()
    with Libvirtd() as libvirtd:
        with Domain(libvirtd, name=a.name, python=a.python) as dom:
            print('domain %s up after %.2f s (virsh -c %s ...); Ctrl-C '
                  'stops it and libvirtd' % (dom.name, dom.boot_seconds,
                                              libvirtd.uri))
            sys.stdout.flush()
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == '__main__':
    main()
