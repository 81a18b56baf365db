# -*- coding: utf-8 -*-
"""The built-in commands and the qemu-ga "facts" requests.

os_identity() is checked against release-file trees as real distributions
ship them (tests/fixtures/os/<name>/), disk_usage() against a mounts file and
os.statvfs()/df, network_interfaces() against ``ip -j addr`` and sysfs, and
the built-ins end to end through a real agent and the host CLI.

Runs on Python 2.7 and 3.6+: no f-strings, no pathlib/tmp_path.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

import negotiator
from helpers import Agent, Workdir, make_command

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, 'fixtures')
OS_TREES = os.path.join(FIXTURES, 'os')

#: statvfs() of a live filesystem moves between two calls: tolerated drift of
#: used/available, in bytes (see also while_disks_move()).
DRIFT = 16 * 1024 * 1024

STAT_KEYS = ['rx-bytes', 'rx-dropped', 'rx-errs', 'rx-packets',
             'tx-bytes', 'tx-dropped', 'tx-errs', 'tx-packets']
SYSFS_STAT = {'rx-bytes': 'rx_bytes', 'rx-packets': 'rx_packets',
              'rx-errs': 'rx_errors', 'rx-dropped': 'rx_dropped',
              'tx-bytes': 'tx_bytes', 'tx-packets': 'tx_packets',
              'tx-errs': 'tx_errors', 'tx-dropped': 'tx_dropped'}


def tree(name):
    return os.path.join(OS_TREES, name)


def identity(id_, name, release, codename, pretty):
    return {'id': id_, 'name': name, 'release': release,
            'codename': codename, 'pretty-name': pretty}


def read(path):
    with open(path) as handle:
        return handle.read()


def is_int(value):
    return (isinstance(value, negotiator.integer_types) and
            not isinstance(value, bool))


@pytest.fixture
def scratch():
    path = tempfile.mkdtemp(prefix='negb', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_root(monkeypatch):
    """Make every read_text('/x') of the module read FIXTURE_TREE/x."""
    original = negotiator.read_text

    def use(name):
        root = tree(name)

        def read_text(path):
            assert os.path.isabs(path), path
            return original(os.path.join(root, path.lstrip('/')))
        monkeypatch.setattr(negotiator, 'read_text', read_text)
    return use


# ---------------------------------------------------------------------------
# os_identity over real distributions' release files
# ---------------------------------------------------------------------------

EXPECTED_IDENTITY = {
    'centos-5': identity('centos', 'CentOS', '5.11', 'Final',
                         'CentOS release 5.11 (Final)'),
    'centos-6': identity('centos', 'CentOS', '6.10', 'Final',
                         'CentOS release 6.10 (Final)'),
    'rhel-6': identity('rhel', 'Red Hat Enterprise Linux Server', '6.10',
                       'Santiago',
                       'Red Hat Enterprise Linux Server release 6.10 '
                       '(Santiago)'),
    # os-release has no VERSION_CODENAME; redhat-release's "(Core)" is the
    # codename, as "(Final)" is on CentOS 6 (and lsb_release -c says Core).
    'centos-7': identity('centos', 'CentOS Linux', '7', 'Core',
                         'CentOS Linux 7 (Core)'),
    # Same: Fedora 20 ships redhat-release "Fedora release 20 (Heisenbug)".
    'fedora-20': identity('fedora', 'Fedora', '20', 'Heisenbug',
                          'Fedora 20 (Heisenbug)'),
    # debian_version "squeeze/sid" must not turn Ubuntu into Debian.
    'ubuntu-10.04': identity('ubuntu', 'Ubuntu', '10.04', 'lucid',
                             'Ubuntu 10.04.4 LTS'),
    # 12.04's os-release lacks VERSION_CODENAME: lsb-release supplies it.
    'ubuntu-12.04': identity('ubuntu', 'Ubuntu', '12.04', 'precise',
                             'Ubuntu precise (12.04.5 LTS)'),
    'ubuntu-22.04': identity('ubuntu', 'Ubuntu', '22.04', 'jammy',
                             'Ubuntu 22.04.4 LTS'),
    'debian-6': identity('debian', 'Debian GNU/Linux', '6.0.10', 'squeeze',
                         'Debian GNU/Linux 6.0.10'),
    # wheezy's os-release lacks VERSION_CODENAME: debian_version 7.11 -> 7.
    'debian-7': identity('debian', 'Debian GNU/Linux', '7', 'wheezy',
                         'Debian GNU/Linux 7 (wheezy)'),
    'debian-12': identity('debian', 'Debian GNU/Linux', '12', 'bookworm',
                          'Debian GNU/Linux 12 (bookworm)'),
    'alpine': identity('alpine', 'Alpine Linux', '3.19.1', '',
                       'Alpine Linux v3.19'),
    'empty': identity('', '', '', '', ''),
    'usrlib-only': identity('opensuse-leap', 'openSUSE Leap', '15.5', '',
                            'openSUSE Leap 15.5'),
}


def test_every_fixture_tree_has_an_expectation():
    assert sorted(os.listdir(OS_TREES)) == sorted(EXPECTED_IDENTITY)


@pytest.mark.parametrize('name', sorted(EXPECTED_IDENTITY))
def test_os_identity(name):
    assert negotiator.os_identity(tree(name)) == EXPECTED_IDENTITY[name]


def test_os_identity_prefers_etc_over_usr_lib(scratch):
    os.makedirs(os.path.join(scratch, 'etc'))
    os.makedirs(os.path.join(scratch, 'usr', 'lib'))
    shutil.copy(os.path.join(tree('debian-12'), 'etc', 'os-release'),
                os.path.join(scratch, 'etc', 'os-release'))
    shutil.copy(os.path.join(tree('usrlib-only'), 'usr', 'lib', 'os-release'),
                os.path.join(scratch, 'usr', 'lib', 'os-release'))
    assert negotiator.os_identity(scratch) == EXPECTED_IDENTITY['debian-12']


def test_os_identity_of_a_missing_root_is_empty(scratch):
    assert negotiator.os_identity(os.path.join(scratch, 'nothing')) == \
        EXPECTED_IDENTITY['empty']


# ---------------------------------------------------------------------------
# parse_redhat_release, parse_shell_assignments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('CentOS release 5.11 (Final)',
     identity('centos', 'CentOS', '5.11', 'Final',
              'CentOS release 5.11 (Final)')),
    ('Red Hat Enterprise Linux AS release 4 (Nahant Update 9)',
     identity('rhel', 'Red Hat Enterprise Linux AS', '4', 'Nahant Update 9',
              'Red Hat Enterprise Linux AS release 4 (Nahant Update 9)')),
    ('Red Hat Enterprise Linux release 8.10 (Ootpa)',
     identity('rhel', 'Red Hat Enterprise Linux', '8.10', 'Ootpa',
              'Red Hat Enterprise Linux release 8.10 (Ootpa)')),
    ('Fedora release 20 (Heisenbug)',
     identity('fedora', 'Fedora', '20', 'Heisenbug',
              'Fedora release 20 (Heisenbug)')),
    ('Scientific Linux release 6.10 (Carbon)',
     identity('scientific', 'Scientific Linux', '6.10', 'Carbon',
              'Scientific Linux release 6.10 (Carbon)')),
    ('Rocky Linux release 8.9 (Green Obsidian)',
     identity('rocky', 'Rocky Linux', '8.9', 'Green Obsidian',
              'Rocky Linux release 8.9 (Green Obsidian)')),
    ('CentOS Stream release 9',
     identity('centos', 'CentOS Stream', '9', '', 'CentOS Stream release 9')),
    ('Mystery Linux',
     identity('mystery', 'Mystery Linux', '', '', 'Mystery Linux')),
])
def test_parse_redhat_release(text, expected):
    assert negotiator.parse_redhat_release(text) == expected


def test_parse_redhat_release_of_the_file_as_read():
    """The file's text ends in a newline; it must not leak into the fields."""
    text = read(os.path.join(tree('centos-6'), 'etc', 'redhat-release'))
    assert text == 'CentOS release 6.10 (Final)\n'
    assert negotiator.parse_redhat_release(text) == \
        EXPECTED_IDENTITY['centos-6']


def test_parse_shell_assignments_lsb_release():
    text = read(os.path.join(tree('ubuntu-10.04'), 'etc', 'lsb-release'))
    assert negotiator.parse_shell_assignments(text) == {
        'DISTRIB_ID': 'Ubuntu', 'DISTRIB_RELEASE': '10.04',
        'DISTRIB_CODENAME': 'lucid',
        'DISTRIB_DESCRIPTION': 'Ubuntu 10.04.4 LTS'}


def test_parse_shell_assignments_os_release_with_blank_lines():
    text = read(os.path.join(tree('centos-7'), 'etc', 'os-release'))
    assert negotiator.parse_shell_assignments(text) == {
        'NAME': 'CentOS Linux', 'VERSION': '7 (Core)', 'ID': 'centos',
        'ID_LIKE': 'rhel fedora', 'VERSION_ID': '7',
        'PRETTY_NAME': 'CentOS Linux 7 (Core)', 'ANSI_COLOR': '0;31',
        'CPE_NAME': 'cpe:/o:centos:centos:7',
        'HOME_URL': 'https://www.centos.org/',
        'BUG_REPORT_URL': 'https://bugs.centos.org/',
        'CENTOS_MANTISBT_PROJECT': 'CentOS-7',
        'CENTOS_MANTISBT_PROJECT_VERSION': '7',
        'REDHAT_SUPPORT_PRODUCT': 'centos',
        'REDHAT_SUPPORT_PRODUCT_VERSION': '7'}


def test_parse_shell_assignments_syntax():
    text = ('# comment line\n'
            '   \n'
            'not an assignment\n'
            'PLAIN=value\n'
            '  SPACED = padded  \n'
            "SINGLE='single quoted'\n"
            'EMPTY=\n'
            'EMPTY_QUOTED=""\n'
            'WITH_EQUALS="a=b=c"\n'
            'LONE_QUOTE="\n'
            'ESCAPED="say \\"hi\\" C:\\\\dir"\n'
            'PLAIN=last wins\n')
    assert negotiator.parse_shell_assignments(text) == {
        'PLAIN': 'last wins', 'SPACED': 'padded', 'SINGLE': 'single quoted',
        'EMPTY': '', 'EMPTY_QUOTED': '', 'WITH_EQUALS': 'a=b=c',
        'LONE_QUOTE': '"', 'ESCAPED': 'say "hi" C:\\dir'}


def test_parse_shell_assignments_dollar_and_backtick_escapes():
    """os-release(5): "$", quotes, backslash and backtick are escaped with
    a backslash, shell style, inside double quotes."""
    text = 'PRETTY_NAME="Costs \\$5 \\`now\\`"\n'
    assert negotiator.parse_shell_assignments(text) == {
        'PRETTY_NAME': 'Costs $5 `now`'}


@pytest.mark.parametrize('text', [None, ''])
def test_parse_shell_assignments_nothing(text):
    assert negotiator.parse_shell_assignments(text) == {}


# ---------------------------------------------------------------------------
# os-info built-in and guest-get-osinfo over the fixture trees
# ---------------------------------------------------------------------------

def os_info_text(info):
    uname = os.uname()
    values = [info['id'], info['name'], info['release'], info['codename'],
              info['pretty-name'], uname[2], uname[4]]
    keys = ['id', 'name', 'release', 'codename', 'pretty-name', 'kernel',
            'machine']
    return ''.join('{0}={1}\n'.format(k, v) for k, v in zip(keys, values))


@pytest.mark.parametrize('name', ['centos-5', 'ubuntu-10.04', 'debian-7',
                                  'ubuntu-22.04', 'empty'])
def test_os_info_builtin_over_fixture(fake_root, name):
    fake_root(name)
    output, status = negotiator.builtin_os_info([])
    assert status == 0
    assert output.decode('utf-8') == os_info_text(EXPECTED_IDENTITY[name])


def kernel_fields():
    uname = os.uname()
    return {'kernel-release': uname[2], 'kernel-version': uname[3],
            'machine': uname[4]}


def bare_server():
    """A Server without a channel: enough for the stateless rpc_ methods."""
    return negotiator.Server.__new__(negotiator.Server)


@pytest.mark.parametrize('name, expected', [
    ('debian-12', {'id': 'debian', 'name': 'Debian GNU/Linux',
                   'pretty-name': 'Debian GNU/Linux 12 (bookworm)',
                   'version-id': '12', 'version': '12 (bookworm)'}),
    ('ubuntu-12.04', {'id': 'ubuntu', 'name': 'Ubuntu',
                      'pretty-name': 'Ubuntu precise (12.04.5 LTS)',
                      'version-id': '12.04',
                      'version': '12.04.5 LTS, Precise Pangolin'}),
    ('centos-6', {'id': 'centos', 'name': 'CentOS',
                  'pretty-name': 'CentOS release 6.10 (Final)',
                  'version-id': '6.10'}),
    ('ubuntu-10.04', {'id': 'ubuntu', 'name': 'Ubuntu',
                      'pretty-name': 'Ubuntu 10.04.4 LTS',
                      'version-id': '10.04'}),
    ('empty', {}),
    # os-release(5): /usr/lib/os-release is the fallback for /etc/os-release;
    # os_identity() uses it, so the "version" must come from it too.
    ('usrlib-only', {'id': 'opensuse-leap', 'name': 'openSUSE Leap',
                     'pretty-name': 'openSUSE Leap 15.5',
                     'version-id': '15.5', 'version': '15.5'}),
])
def test_rpc_osinfo_over_fixture(fake_root, name, expected):
    fake_root(name)
    expected = dict(expected)
    expected.update(kernel_fields())
    assert bare_server().rpc_osinfo({}, 1) == expected


# ---------------------------------------------------------------------------
# disk_usage and the disk-usage built-in
# ---------------------------------------------------------------------------

def as_bytes(text):
    """A path or name as disk_usage() gives it: bytes, on every Python."""
    return text if isinstance(text, bytes) else text.encode('utf-8')


def statvfs_row(device, mountpoint, fstype):
    usage = os.statvfs(mountpoint)
    device, mountpoint, fstype = [as_bytes(field) for field in
                                  (device, mountpoint, fstype)]
    return (device, mountpoint, fstype, usage.f_blocks * usage.f_frsize,
            (usage.f_blocks - usage.f_bfree) * usage.f_frsize,
            usage.f_bavail * usage.f_frsize)


def free_blocks(mountpoints):
    """Each mount point's free and available blocks now (None: gone)."""
    result = []
    for path in mountpoints:
        try:
            usage = os.statvfs(path)
        except OSError:
            result.append(None)
        else:
            result.append((usage.f_bfree, usage.f_bavail))
    return result


def while_disks_move(check, mountpoints, attempts=20):
    """Run ``check()`` again when it failed while other processes changed
    what is free on these mount points (a big file written or deleted
    between two readings may pass DRIFT): only a failure while the disks
    stood still, or the last of ``attempts``, counts."""
    for attempt in range(attempts):
        before = free_blocks(mountpoints)
        try:
            return check()
        except AssertionError:
            if (attempt == attempts - 1 or
                    free_blocks(mountpoints) == before):
                raise


def assert_rows_match(rows, expected):
    """Same rows; sizes exact, used/available within DRIFT (live disks)."""
    assert sorted(r[:4] for r in rows) == sorted(e[:4] for e in expected)
    actual = dict((r[1], r) for r in rows)
    for row in expected:
        got = actual[row[1]]
        assert all(is_int(v) for v in got[3:]), got
        assert abs(got[4] - row[4]) <= DRIFT, (got, row)
        assert abs(got[5] - row[5]) <= DRIFT, (got, row)


def test_disk_usage_over_mounts_fixture():
    """Pseudo and network filesystems skipped, a missing mount point skipped,
    "/" once: the mount that is on top (the ext4 one, not the initramfs
    rootfs listed first as on CentOS 6 / Debian 7 kernels), as df shows."""
    def check():
        rows = negotiator.disk_usage(os.path.join(FIXTURES, 'mounts-rootfs'))
        expected = [statvfs_row('/dev/vda1', '/', 'ext4')]
        if os.path.isdir('/dev/shm') and os.statvfs('/dev/shm').f_blocks:
            expected.append(statvfs_row('tmpfs', '/dev/shm', 'tmpfs'))
        assert_rows_match(rows, expected)
    while_disks_move(check, ['/', '/dev/shm'])


def test_disk_usage_duplicate_lines_and_skips(scratch):
    mounts = os.path.join(scratch, 'mounts')
    with open(mounts, 'w') as handle:
        handle.write(
            'proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n'
            'sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n'
            '/dev/sda1 / ext4 rw,relatime 0 0\n'
            'server:/export /tmp nfs4 rw,relatime,vers=4.2 0 0\n'
            '//server/share {0} cifs rw,relatime 0 0\n'
            '/dev/sdb1 /no/such/negotiator/mount xfs rw,relatime 0 0\n'
            '/dev/sda1 / ext4 rw,relatime 0 0\n'
            'short line\n'
            '\n'
            '/dev/sdc1 {0} xfs rw,relatime 0 0\n'.format(scratch))
    while_disks_move(lambda: assert_rows_match(
        negotiator.disk_usage(mounts),
        [statvfs_row('/dev/sda1', '/', 'ext4'),
         statvfs_row('/dev/sdc1', scratch, 'xfs')]), ['/', scratch])


def test_disk_usage_skips_network_cluster_and_fuse_filesystems(scratch):
    """Their statvfs() can hang on a dead server or FUSE daemon: they are
    skipped by type, though the mount point exists."""
    mounts = os.path.join(scratch, 'mounts')
    with open(mounts, 'w') as handle:
        for fstype in ('fuse.sshfs', 'fuse', 'fuseblk', 'fuse.glusterfs',
                       'ceph', 'glusterfs', 'lustre', 'nfs', 'nfs4', 'cifs',
                       'smb3', '9p', 'virtiofs', 'afs', 'gfs2', 'ocfs2'):
            handle.write('remote {0} {1} rw 0 0\n'.format(scratch, fstype))
    assert negotiator.disk_usage(mounts) == []


def test_disk_usage_of_mount_points_that_are_not_utf8(scratch):
    """Mount points are bytes end to end, on every Python and locale."""
    directory = as_bytes(scratch) + b'/\xff\xc3\xa9'
    os.mkdir(directory)
    mounts = os.path.join(scratch, 'mounts')
    with open(mounts, 'wb') as handle:
        handle.write(b'/dev/vdc1 ' + directory + b' ext4 rw 0 0\n')
    rows = negotiator.disk_usage(mounts)
    assert [row[:3] for row in rows] == [(b'/dev/vdc1', directory, b'ext4')]
    output, status = negotiator.builtin_disk_usage([], mounts)
    assert status == 0
    assert [row[:3] for row in parse_disk_usage_output(output)] == [
        (b'/dev/vdc1', directory, b'ext4')]


def test_disk_usage_of_a_missing_mounts_file(scratch):
    assert negotiator.disk_usage(os.path.join(scratch, 'none')) == []


@pytest.mark.parametrize('char, escape', [
    (' ', '\\040'), ('\t', '\\011'), ('\n', '\\012'), ('\\', '\\134')])
def test_disk_usage_decodes_mount_point_escapes(scratch, char, escape):
    """The kernel writes space, tab, newline and backslash in mount points
    as octal escapes (proc(5), getmntent(3))."""
    directory = os.path.join(scratch, 'a{0}b'.format(char))
    os.mkdir(directory)
    mounts = os.path.join(scratch, 'mounts')
    with open(mounts, 'w') as handle:
        handle.write('/dev/vdc1 {0} ext4 rw 0 0\n'.format(
            os.path.join(scratch, 'a{0}b'.format(escape))))
    while_disks_move(lambda: assert_rows_match(
        negotiator.disk_usage(mounts),
        [statvfs_row('/dev/vdc1', directory, 'ext4')]), [directory])


DISK_HEADER = (b'Filesystem               Type          1K-blocks         Used'
               b'    Available Use% Mounted on')


def parse_disk_usage_output(text):
    lines = text.split(b'\n')
    assert lines[-1] == b''
    assert lines[0] == DISK_HEADER
    rows = []
    for line in lines[1:-1]:
        device, fstype, size, used, available, percent, mountpoint = \
            line.split(None, 6)
        rows.append((device, mountpoint, fstype, int(size), int(used),
                     int(available), percent))
    return rows


def test_disk_usage_builtin_lines_follow_disk_usage():
    def check():
        output, status = negotiator.builtin_disk_usage([])
        assert status == 0
        rows = parse_disk_usage_output(output)
        expected = negotiator.disk_usage()
        assert len(rows) == len(expected)
        assert [r[:3] for r in rows] == [e[:3] for e in expected]
        for row, want in zip(rows, expected):
            assert row[3] == want[3] // 1024
            assert abs(row[4] - want[4] // 1024) <= DRIFT // 1024
            assert abs(row[5] - want[5] // 1024) <= DRIFT // 1024
            used, available = row[4], row[5]
            if used + available:
                assert row[6].endswith(b'%')
                percent = int(row[6][:-1])
                exact = used * 100.0 / (used + available)
                assert abs(percent - exact) <= 1, (row, exact)
            else:
                assert row[6] == b'-'
    while_disks_move(check, [row[1] for row in negotiator.disk_usage()])


def test_disk_usage_builtin_matches_df_for_root():
    def check():
        try:
            process = subprocess.Popen(['df', '-P', '-k', '/'],
                                       stdout=subprocess.PIPE)
        except OSError:
            pytest.skip('df is not installed')
        df_out = process.communicate()[0]
        assert process.returncode == 0
        output, status = negotiator.builtin_disk_usage([])
        assert status == 0
        df_line = df_out.splitlines()[1]
        device, rest = df_line.rsplit(None, 5)[0], df_line.rsplit(None, 5)[1:]
        size, used, available, capacity, mountpoint = rest
        assert mountpoint == b'/'
        ours = [r for r in parse_disk_usage_output(output) if r[1] == b'/']
        assert len(ours) == 1
        ours = ours[0]
        assert ours[0] == device
        assert ours[3] == int(size)
        assert abs(ours[4] - int(used)) <= DRIFT // 1024
        assert abs(ours[5] - int(available)) <= DRIFT // 1024
        assert abs(int(ours[6][:-1]) - int(capacity[:-1])) <= 1
    while_disks_move(check, ['/'])


# ---------------------------------------------------------------------------
# network_interfaces, ip-addresses, against ip(8) and sysfs
# ---------------------------------------------------------------------------

SYS_NET = '/sys/class/net'


def ip_json():
    try:
        process = subprocess.Popen(['ip', '-j', 'addr', 'show'],
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    except OSError:
        pytest.skip('ip (iproute2) is not installed')
    out, err = process.communicate()
    if process.returncode != 0:
        pytest.skip('ip -j addr show failed (iproute2 too old for -j?): '
                    '{0}'.format(err.decode('utf-8', 'replace')))
    return json.loads(out.decode('utf-8'))


def ip_view(links):
    families = {'inet': 'ipv4', 'inet6': 'ipv6'}
    return [(link['ifname'],
             [(families[a['family']], a['local'], a['prefixlen'])
              for a in link.get('addr_info', []) if a['family'] in families])
            for link in links]


def our_view(interfaces):
    return [(i['name'], [(a['ip-address-type'], a['ip-address'], a['prefix'])
                         for a in i.get('ip-addresses', [])])
            for i in interfaces]


def sysfs_counters(name):
    values = {}
    for ours, kernel in SYSFS_STAT.items():
        values[ours] = int(read(os.path.join(SYS_NET, name, 'statistics',
                                             kernel)))
    return values


def test_network_interfaces_match_ip():
    links = ip_json()
    interfaces = negotiator.network_interfaces()
    assert our_view(interfaces) == ip_view(links)
    for interface in interfaces:
        for address in interface.get('ip-addresses', []):
            assert sorted(address) == ['ip-address', 'ip-address-type',
                                       'prefix']
            assert is_int(address['prefix'])


def test_network_interfaces_hardware_addresses():
    interfaces = negotiator.network_interfaces()
    assert sorted(i['name'] for i in interfaces) == \
        sorted(os.listdir(SYS_NET))
    for interface in interfaces:
        hardware = read(os.path.join(SYS_NET, interface['name'],
                                     'address')).strip()
        keys = ['name']
        if hardware:
            assert interface['hardware-address'] == hardware
            keys.append('hardware-address')
        # Like qemu-ga: no list and no counters without an address.
        if interface.get('ip-addresses'):
            keys.extend(['ip-addresses', 'statistics'])
        assert sorted(interface) == sorted(keys)


def test_network_interfaces_statistics():
    names = sorted(os.listdir(SYS_NET))
    before = dict((name, sysfs_counters(name)) for name in names)
    interfaces = negotiator.network_interfaces()
    after = dict((name, sysfs_counters(name)) for name in names)
    assert sorted(i['name'] for i in interfaces) == names
    with_addresses = [i for i in interfaces if 'ip-addresses' in i]
    assert with_addresses
    for interface in with_addresses:
        name = interface['name']
        statistics = interface['statistics']
        assert sorted(statistics) == STAT_KEYS
        for key in STAT_KEYS:
            assert is_int(statistics[key]), (name, key, statistics[key])
            assert before[name][key] <= statistics[key] <= after[name][key], \
                (name, key)


def test_interface_statistics_of_a_fake_sysfs(scratch):
    stats = os.path.join(scratch, 'eth9', 'statistics')
    os.makedirs(stats)
    for number, kernel in enumerate(sorted(SYSFS_STAT.values())):
        with open(os.path.join(stats, kernel), 'w') as handle:
            handle.write('{0}\n'.format(1000 + number))
    os.remove(os.path.join(stats, 'tx_dropped'))
    with open(os.path.join(stats, 'rx_errors'), 'w') as handle:
        handle.write('garbage\n')
    assert negotiator.interface_statistics(scratch, 'eth9') == {
        'rx-bytes': 1000, 'rx-dropped': 1001, 'rx-errs': 0,
        'rx-packets': 1003, 'tx-bytes': 1004, 'tx-dropped': 0,
        'tx-errs': 1006, 'tx-packets': 1007}


def test_ip_addresses_builtin_matches_ip():
    links = ip_json()
    expected = ''.join(
        '{0} {1} {2}/{3}\n'.format(name, family.replace('ipv4', 'inet')
                                   .replace('ipv6', 'inet6'), address, prefix)
        for name, addresses in ip_view(links)
        for family, address, prefix in addresses)
    output, status = negotiator.builtin_ip_addresses([])
    assert status == 0
    assert output.decode('utf-8') == expected


def test_ip_addresses_builtin_without_addresses(monkeypatch):
    """No address at all: no output, not one empty line."""
    monkeypatch.setattr(negotiator, 'netlink_addresses', lambda: [])
    assert negotiator.builtin_ip_addresses([]) == (b'', 0)


# ---------------------------------------------------------------------------
# hostname, uptime, os-info on this machine
# ---------------------------------------------------------------------------

def test_hostname_builtin():
    assert negotiator.builtin_hostname([]) == (
        (socket.gethostname() + '\n').encode('utf-8'), 0)


def test_rpc_host_name():
    assert bare_server().rpc_host_name({}, 1) == {
        'host-name': socket.gethostname()}


def test_uptime_builtin():
    # The load averages change every 5 s: a call between two readings
    # that agree saw them too.
    for _ in range(100):
        uptime_before = float(read('/proc/uptime').split()[0])
        load_before = read('/proc/loadavg').split()[:3]
        output, status = negotiator.builtin_uptime([])
        uptime_after = float(read('/proc/uptime').split()[0])
        load_after = read('/proc/loadavg').split()[:3]
        if load_before == load_after:
            break
    assert status == 0
    text = output.decode('ascii')
    assert text.endswith('\n')
    pairs = [line.split('=', 1) for line in text[:-1].split('\n')]
    assert [k for k, _ in pairs] == ['uptime-seconds', 'load-1', 'load-5',
                                     'load-15']
    values = dict(pairs)
    assert uptime_before <= float(values['uptime-seconds']) <= uptime_after
    loads = [values['load-1'], values['load-5'], values['load-15']]
    assert loads in (load_before, load_after)
    assert all(float(load) >= 0 for load in loads)


def test_os_info_builtin_on_this_machine():
    output, status = negotiator.builtin_os_info([])
    assert status == 0
    text = output.decode('utf-8')
    assert text.endswith('\n')
    pairs = [line.split('=', 1) for line in text[:-1].split('\n')]
    assert [k for k, _ in pairs] == ['id', 'name', 'release', 'codename',
                                     'pretty-name', 'kernel', 'machine']
    values = dict(pairs)
    assert values['kernel'] == os.uname()[2]
    assert values['machine'] == os.uname()[4]
    assert text == os_info_text(negotiator.os_identity('/'))


def test_os_info_on_this_machine_agrees_with_os_release():
    """An independent reading of this machine's os-release."""
    path = '/etc/os-release'
    if not os.path.exists(path):
        pytest.skip('this machine has no /etc/os-release')
    import shlex
    release = {}
    for line in read(path).splitlines():
        if '=' in line and not line.startswith('#'):
            key, value = line.split('=', 1)
            release[key] = ''.join(shlex.split(value)) if value else ''
    info = negotiator.os_identity('/')
    assert info['id'] == release.get('ID', '')
    assert info['name'] == release.get('NAME', '')
    assert info['release'] == release.get('VERSION_ID', '')
    assert info['pretty-name'] == release.get('PRETTY_NAME', '')
    if release.get('VERSION_CODENAME'):
        assert info['codename'] == release['VERSION_CODENAME']
    expected = {'id': release.get('ID'), 'name': release.get('NAME'),
                'pretty-name': release.get('PRETTY_NAME'),
                'version-id': release.get('VERSION_ID'),
                'version': release.get('VERSION')}
    expected = dict((k, v) for k, v in expected.items() if v)
    expected.update(kernel_fields())
    assert bare_server().rpc_osinfo({}, 1) == expected


def test_builtins_table():
    assert sorted(negotiator.BUILTINS) == [
        'disk-usage', 'hostname', 'ip-addresses', 'os-info', 'uptime']


# ---------------------------------------------------------------------------
# Through a real agent and the host CLI
# ---------------------------------------------------------------------------

@pytest.fixture
def agent():
    workdir = Workdir()
    running = None
    try:
        running = Agent(workdir)
        yield running
    finally:
        if running is not None:
            running.stop()
        workdir.cleanup()


def test_cli_hostname(agent):
    assert agent.host('hostname') == (
        0, negotiator.builtin_hostname([])[0], b'')


def test_cli_os_info(agent):
    assert agent.host('os-info') == (
        0, negotiator.builtin_os_info([])[0], b'')


def test_cli_ip_addresses(agent):
    assert agent.host('ip-addresses') == (
        0, negotiator.builtin_ip_addresses([])[0], b'')


def test_cli_disk_usage_header(agent):
    status, out, err = agent.host('disk-usage')
    assert (status, err) == (0, b'')
    rows = parse_disk_usage_output(out)
    assert [r[:3] for r in rows] == [e[:3] for e in negotiator.disk_usage()]


def test_cli_user_command_wins_over_builtin(agent):
    make_command(agent.workdir.commands, 'hostname',
                 '#!/bin/sh\necho "user hostname $#"\n')
    assert agent.host('hostname', 'a', 'b') == (0, b'user hostname 2\n', b'')
    assert agent.host(options=['-n', '--list']) == (0, (
        b'disk-usage  (built-in)\n'
        b'hostname\n'
        b'ip-addresses  (built-in)\n'
        b'os-info  (built-in)\n'
        b'uptime  (built-in)\n'), b'')
    status, out, err = agent.host(options=['-n', '--list', '--json'])
    assert (status, err) == (0, b'')
    assert json.loads(out.decode('utf-8')) == {'commands': [
        {'name': 'disk-usage', 'kind': 'builtin'},
        {'name': 'hostname', 'kind': 'user'},
        {'name': 'ip-addresses', 'kind': 'builtin'},
        {'name': 'os-info', 'kind': 'builtin'},
        {'name': 'uptime', 'kind': 'builtin'}]}


def test_cli_unrunnable_file_of_a_builtins_name_is_refused(agent):
    """The file wins over the built-in even when it cannot run: the host
    learns why rather than getting a built-in it did not expect."""
    make_command(agent.workdir.commands, 'uptime', '#!/bin/sh\necho no\n',
                 mode=0o644)
    assert agent.host('uptime') == (126, b'', (
        "negotiator: Command 'uptime' is not executable: {0} is not a "
        'regular file with execute permission (chmod +x it)\n'.format(
            os.path.join(agent.workdir.commands, 'uptime'))).encode('utf-8'))


def test_cli_list_builtins_only(agent):
    assert agent.host(options=['-n', '--list']) == (0, (
        b'disk-usage  (built-in)\n'
        b'hostname  (built-in)\n'
        b'ip-addresses  (built-in)\n'
        b'os-info  (built-in)\n'
        b'uptime  (built-in)\n'), b'')


def test_qemu_ga_fact_requests(agent):
    client = agent.client()
    try:
        assert client.call({'execute': 'guest-get-host-name', 'id': 7}) == {
            'return': {'host-name': socket.gethostname()}, 'id': 7}
        reply = client.call({'execute': 'guest-get-osinfo', 'id': 8})
        assert reply == {'return': bare_server().rpc_osinfo({}, 8), 'id': 8}
        reply = client.call({'execute': 'guest-network-get-interfaces',
                             'id': 9})
        assert sorted(reply) == ['id', 'return']
        assert reply['id'] == 9
        ours = negotiator.network_interfaces()
        assert our_view(reply['return']) == our_view(ours)
        for got, want in zip(reply['return'], ours):
            assert got.get('hardware-address') == want.get('hardware-address')
            assert sorted(got.get('statistics', STAT_KEYS)) == STAT_KEYS
    finally:
        client.close()
