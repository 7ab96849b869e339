"""Shared pieces of bench/run and scripts/crash-test (not run on its own).

Usage: import harness (from bench/run and scripts/crash-test).

Why a module: both scripts build crmgate and the load generator, start
daemons on free 127.0.0.1 ports with a config in a temporary directory,
start relay sinks, and read the SQLite log read-only; keeping that in one
place keeps the two scripts about what they measure. Python 3.11, stdlib
only (sqlite3 reads the WAL database while the daemon runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def target_dir() -> Path:
    """The cargo target directory: $CARGO_TARGET_DIR, else ./target."""
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def build() -> tuple[Path, Path]:
    """Build crmgate and the load generator; return their paths.

    Release mode, unless CRMGATE_PROFILE=debug (CI reuses the debug build of
    `cargo test` rather than compiling everything once more)."""
    profile = os.environ.get("CRMGATE_PROFILE", "release")
    log(f"building crmgate and examples/loadgen ({profile})…")
    flags = [] if profile == "debug" else ["--release"]
    subprocess.run(
        ["cargo", "build", *flags, "--bin", "crmgate", "--example", "loadgen"],
        cwd=REPO,
        check=True,
    )
    out = target_dir() / ("debug" if profile == "debug" else "release")
    return out / "crmgate", out / "examples" / "loadgen"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def postfix_tools() -> tuple[str, str]:
    """Paths of smtp-sink and smtp-source, installing Debian's postfix if needed.

    The system's postfix service must not run (it would take port 25): it is
    stopped if the install started it; the benchmark's Postfix is an instance
    of its own (`Postfix`).
    """
    def find(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}") if os.path.exists(p)),
            None,
        )

    sink, source = find("smtp-sink"), find("smtp-source")
    if sink and source and shutil.which("postfix"):
        return sink, source
    log("installing Debian's postfix (smtp-sink, smtp-source, and the Postfix the benchmark "
        "compares with: an instance of its own, the system's service is stopped)…")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "postfix"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    if subprocess.run(["postfix", "status"], capture_output=True).returncode == 0:
        subprocess.run(["postfix", "stop"], check=False)
    sink, source = find("smtp-sink"), find("smtp-source")
    if not (sink and source):
        raise RuntimeError("smtp-sink / smtp-source not found after installing postfix")
    return sink, source


def start_smtp_sink(sink: str, port: int) -> subprocess.Popen:
    """Postfix's smtp-sink on 127.0.0.1:port (it stores nothing)."""
    cmd = [sink]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
    cmd += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def write_config(directory: Path, listen_port: int, relay: str, store_url: str = "") -> Path:
    """A crmgate config for a load run: one agent on every work-notes list,
    caps raised so a load run is not throttled by the anti-ping-pong limits
    (a requester replying 20+ times an hour to one ticket is the load
    itself, not an auto-responder). Durability stays the default (FULL).
    `store_url`: the log in that PostgreSQL database instead of SQLite."""
    state = directory / "state"
    path = directory / "crmgate.toml"
    path.write_text(f"""\
[gateway]
hostname = "bench.test"
state_dir = "{state}"
language = "en"
display_name = "Bench Support"

[smtp]
listen = "127.0.0.1:{listen_port}"
max_sessions = 512

[addresses]
public = "support@localhost"
internal = "support-notes@localhost"

[relay]
url = "{relay}"
retry_initial_seconds = 1
retry_max_seconds = 5

[auto]
max_per_address_per_hour = 1000000
max_per_address_per_day = 1000000
max_resends_per_ticket_hour = 1000000

[store]
url = "{store_url}"

[[agents]]
name = "Jane Agent"
email = "jane.agent@example.org"
default_notes_list = true
""")
    return path


class Daemon:
    """`crmgate serve` on a config; stderr goes to a log file in its
    directory. `ready`: how to tell its schema is there (default: the
    SQLite log answers)."""

    def __init__(self, binary: Path, config: Path, port: int, ready=None):
        self.binary, self.config, self.port = binary, config, port
        self.proc: subprocess.Popen | None = None
        self.log_path = config.parent / "crmgate.log"
        self.ready = ready

    @property
    def db(self) -> Path:
        return self.config.parent / "state" / "crmgate.db"

    def start(self) -> None:
        logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config), "serve"],
            stdout=logfile, stderr=logfile,
        )
        logfile.close()
        wait_port(self.port, self.proc)
        # The listener is bound before the schema is migrated: wait for it,
        # so the scripts can read the log as soon as `start` returns.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.ready is not None:
                    self.ready()
                else:
                    query(self.db, "SELECT COUNT(*) FROM outbox")
                return
            except (sqlite3.Error, subprocess.CalledProcessError):
                time.sleep(0.05)
        raise RuntimeError(f"{self.db}: no schema 20 s after the listener was bound")

    def vm(self, key: str) -> int:
        """A /proc/<pid>/status figure in kB (VmHWM: peak RSS, VmRSS: now)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def kill(self) -> None:
        """SIGKILL: the crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), "--config", str(self.config), *args],
                              capture_output=True, text=True)


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the log read-only (WAL: the daemon may be writing)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def queued(db: Path) -> int:
    return query(db, "SELECT COUNT(*) FROM outbox WHERE status = 'queued'")[0][0]


def wait_drained(db: Path, timeout: float) -> float | None:
    """Seconds until no outbox row is queued (None: still queued at timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if queued(db) == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def loadgen(binary: Path, port: int, *args: str, check: bool = True) -> dict:
    """Run `loadgen send` against 127.0.0.1:port; its JSON figures.

    `--retries 3`: crmgate closes a session after 1,000 commands (`421`), as
    a careful MTA does; the message in flight then goes again on a new
    session, as an MTA's would, instead of being counted lost."""
    out = subprocess.run([str(binary), "send", "--server", f"127.0.0.1:{port}", "--retries", "3",
                          *args],
                         capture_output=True, text=True)
    if out.returncode != 0 and check:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_ms(pid: int, children: bool = False) -> float:
    """User + system CPU time of a running process so far, in ms (with
    `children`, also that of its children it has waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks * 1000.0 / tick


def children_cpu_ms() -> float:
    """User + system CPU time of the children waited for so far, in ms: a
    load generator's, measured around its run."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000.0


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def machine_state() -> str:
    """One line on the machine: cores, load average, free memory."""
    load = os.getloadavg()
    mem = {l.split(":")[0]: l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()}
    return (f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"MemAvailable {int(mem.get('MemAvailable', 0)) // 1024} MiB")


# Postfix store-and-forward: the peer a helpdesk would otherwise put at its
# MX. An instance of its own (config, queue and data directories under
# `root`), listening on 127.0.0.1:port only, relaying everything to
# [127.0.0.1]:relay_port without DNS. It logs to syslog, which this machine
# may not run: its log then costs nothing, as a syslog daemon's writes are
# not Postfix's (`log_file` makes postlogd write one, counted as Postfix's).

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{relay_port}
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
smtpd_tls_security_level = none
smtp_tls_security_level = none
append_dot_mydomain = no
biff = no
{log}"""

# Debian's master.cf without chroot (a chroot needs copies of /etc inside the
# queue directory) and with the one inet service on the instance's port.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix:
    """A Postfix instance of its own under `root`, started and stopped by
    the caller (`stop` also when a run failed: `with Postfix(...)`)."""

    def __init__(self, root: Path, port: int, relay_port: int, log_file: bool = False):
        self.root, self.port = root, port
        self.conf, self.queue, self.data = root / "etc", root / "spool", root / "data"
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        # The postfix user's daemons go through every parent of the queue
        # directory: a temporary directory is 0700.
        top = Path(tempfile.gettempdir())
        for d in [root, *root.parents]:
            if d == top or d == Path("/"):
                break
            d.chmod(d.stat().st_mode | 0o755)
        shutil.chown(self.data, "postfix")
        log = (f"maillog_file = {root / 'maillog'}\nmaillog_file_prefixes = {root}\n"
               if log_file else "")
        (self.conf / "main.cf").write_text(POSTFIX_MAIN_CF.format(
            queue=self.queue, data=self.data, relay_port=relay_port, log=log))
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=port))
        self.started = False

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                              text=True, check=check)

    def __enter__(self) -> "Postfix":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.started = True
        out = self.postfix("start", check=False)
        if out.returncode != 0:
            raise RuntimeError(f"postfix start: {out.stderr.strip()}")
        wait_port(self.port)

    def stop(self) -> None:
        """`postfix stop`, then SIGKILL whatever of the instance is left."""
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        self.postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in ([pid, *self.children(pid)] if pid else []):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    @staticmethod
    def children(pid: int) -> list[int]:
        kids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                kids.append(int(p.name))
        return kids

    def queued(self) -> int:
        """Messages in the instance's queues (a queue file each)."""
        return sum(len(files) for q in POSTFIX_QUEUES
                   for _, _, files in os.walk(self.queue / q))

    def wait_empty(self, timeout: float) -> float | None:
        """Seconds until the queues are empty (None: not at timeout)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.queued() == 0:
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def totals(self) -> tuple[float, float]:
        """CPU ms and KiB written by all the instance's processes so far: the
        master's own and its waited-for children's (the kernel adds a reaped
        child's CPU and I/O to its parent's), and its live children's."""
        pid = self.master_pid()
        if pid is None:
            raise RuntimeError("postfix: no master process")
        cpu = cpu_ms(pid, children=True)
        disk = written_kib(pid)
        for kid in self.children(pid):
            try:
                cpu += cpu_ms(kid, children=True)
                disk += written_kib(kid)
            except (OSError, IndexError):
                pass  # exited meanwhile: now counted in the master's
        return cpu, disk


def process_tree_totals(pid: int) -> tuple[float, float]:
    """CPU ms and KiB written so far by a process and all its children,
    live or reaped (the kernel adds a reaped child's CPU and I/O to its
    parent's)."""
    cpu = cpu_ms(pid, children=True)
    disk = written_kib(pid)
    for kid in Postfix.children(pid):
        try:
            cpu += cpu_ms(kid, children=True)
            disk += written_kib(kid)
        except (OSError, IndexError):
            pass  # exited meanwhile: now counted in the parent's
    return cpu, disk


class PgCluster:
    """A throw-away PostgreSQL cluster, as the tests start one (src/store/
    test_cluster.rs): Debian's initdb and postgres, in a temporary
    directory, on a Unix socket there and nothing on the network, as
    `nobody` when run as root. Unlike the tests' cluster it keeps the
    server's defaults that make a commit durable (fsync, synchronous_commit
    on, full_page_writes), so crmgate's `250` promises the same as on SQLite.
    One database per run (`create`)."""

    USER = "crmgate"
    # More `-c name=value` for the server (bench/pg-stats loads its statistics).
    SETTINGS: tuple[str, ...] = ()

    def __init__(self, root: Path):
        self.bin = self.bin_dir()
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.owner = (65534, 65534) if os.geteuid() == 0 else None
        if self.owner:
            os.chown(self.root, *self.owner)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def bin_dir() -> Path:
        on_path = shutil.which("initdb")
        if on_path:  # a link into Debian's directory, or a build of its own
            directory = Path(on_path).resolve().parent
            if all((directory / b).exists() for b in ("postgres", "psql")):
                return directory
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                          key=lambda p: int(p.parent.parent.name))
        if not versions:
            log("installing Debian's postgresql (the benchmark starts a cluster of its own; "
                "the system's service is not used)…")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                              key=lambda p: int(p.parent.parent.name))
        return versions[-1].parent

    def _as_owner(self) -> dict:
        if not self.owner:
            return {}
        uid, gid = self.owner
        return {"user": uid, "group": gid, "extra_groups": []}

    def start(self) -> None:
        subprocess.run([str(self.bin / "initdb"), "-A", "trust", "-U", self.USER, "-E", "UTF8",
                        "-D", str(self.data)], check=True, cwd=self.root,
                       env=dict(os.environ, LC_ALL="C"), stdout=subprocess.DEVNULL,
                       **self._as_owner())
        logfile = open(self.log, "ab")
        if self.owner:
            os.chown(self.log, *self.owner)
        # Two instances of crmgate and the commands: a few dozen clients.
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.root),
             "-c", "listen_addresses=", "-c", "max_connections=200",
             *[arg for setting in self.SETTINGS for arg in ("-c", setting)]],
            stdout=logfile, stderr=logfile, cwd=self.root, **self._as_owner())
        logfile.close()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
                try:
                    self.sql("postgres", "SELECT 1")
                    return
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            raise RuntimeError("postgres did not answer in 60 s")
        except BaseException:
            self.stop()  # not left running when the caller never gets it
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def version(self) -> str:
        return self.sql("postgres", "SHOW server_version")[0][0].split()[0]

    def url(self, db: str) -> str:
        """`postgres://crmgate@%2Fpath/db`: the socket directory as the host."""
        from urllib.parse import quote
        return f"postgres://{self.USER}@{quote(str(self.root), safe='')}/{db}"

    def sql(self, db: str, statement: str) -> list[list[str]]:
        """One statement through psql; its rows, each a list of fields."""
        out = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-F", "\t",
                              "-h", str(self.root), "-U", self.USER, "-d", db,
                              "-v", "ON_ERROR_STOP=1", "-c", statement],
                             capture_output=True, text=True, check=True)
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def create(self, db: str) -> str:
        self.sql("postgres", f"CREATE DATABASE {db}")
        return self.url(db)

    def drop(self, db: str) -> None:
        self.sql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    def totals(self) -> tuple[float, float]:
        """CPU ms and KiB written by the server's processes so far: the
        postmaster, its background processes and every backend."""
        assert self.proc is not None
        return process_tree_totals(self.proc.pid)


def written_kib(pid: int) -> float:
    """KiB a process (with its waited-for children) has caused to be written
    to storage so far: /proc/PID/io write_bytes."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1]) / 1024
    return 0.0
