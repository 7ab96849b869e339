//! A throw-away PostgreSQL cluster for the tests: started once per test
//! binary (initdb in a temporary directory, the server on a Unix socket in
//! that directory, nothing on the network), one database per test. Shared
//! by the store's unit tests and the integration tests (tests/common).
//!
//! When PostgreSQL cannot be started the tests fail with the reason;
//! `CRMGATE_TEST_NO_PG=1` skips the PostgreSQL half of each test instead,
//! for a machine without it (CI never sets it).

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The running cluster: its socket directory and the pipe whose end stops
/// it (the shell that runs the server reads it; at exit the pipe closes).
struct Cluster {
    dir: PathBuf,
    /// Its socket's port number (5432 but for the TLS cluster).
    port: u16,
    _stop: Mutex<std::process::ChildStdin>,
}

const USER: &str = "crmgate";

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static TLS_CLUSTER: OnceLock<Result<(Cluster, Tls), String>> = OnceLock::new();

/// The TLS cluster's port on 127.0.0.1 and the CA that signed its
/// certificate (for `localhost` and `127.0.0.1`).
#[derive(Clone)]
pub struct Tls {
    pub port: u16,
    pub ca_pem: String,
}
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether the PostgreSQL half of the tests is to be skipped.
pub fn skipped() -> bool {
    std::env::var("CRMGATE_TEST_NO_PG").is_ok_and(|v| v == "1")
}

/// A fresh, empty database on the shared cluster: its URL, for `[store]
/// url`. `None` only when `CRMGATE_TEST_NO_PG=1`.
///
/// # Panics
/// PostgreSQL cannot be started or the database cannot be created: the
/// test fails with the reason.
pub fn database() -> Option<String> {
    if skipped() {
        eprintln!("CRMGATE_TEST_NO_PG=1: the PostgreSQL half of this test is skipped");
        return None;
    }
    // On a thread of its own: the sync client runs a runtime of its own,
    // which a tokio test's thread may not start.
    Some(
        std::thread::spawn(create_database)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e)),
    )
}

/// A fresh database on a second cluster that also listens on 127.0.0.1,
/// with TLS, its certificate signed by a CA made for it: the database's
/// name, the port and the CA. `None` only when `CRMGATE_TEST_NO_PG=1`.
///
/// # Panics
/// As [`database`].
pub fn tls_database() -> Option<(String, Tls)> {
    if skipped() {
        eprintln!("CRMGATE_TEST_NO_PG=1: the PostgreSQL half of this test is skipped");
        return None;
    }
    Some(
        std::thread::spawn(|| {
            let (cluster, tls) = match TLS_CLUSTER.get_or_init(start_with_tls) {
                Ok(c) => c,
                Err(why) => panic!("cannot start a PostgreSQL cluster with TLS: {why}"),
            };
            (create_database_on(cluster).1, tls.clone())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e)),
    )
}

fn create_database() -> String {
    let cluster = match CLUSTER.get_or_init(|| start(None)) {
        Ok(c) => c,
        Err(why) => panic!("cannot start a PostgreSQL cluster for the tests: {why}"),
    };
    let (dir, name) = create_database_on(cluster);
    url(&dir, &name)
}

/// A database made on `cluster`: its socket directory and name.
fn create_database_on(cluster: &Cluster) -> (PathBuf, String) {
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = postgres::Config::new()
        .host_path(&cluster.dir)
        .port(cluster.port)
        .user(USER)
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot reach the test cluster: {e}"));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    (cluster.dir.clone(), name)
}

/// `postgres://crmgate@%2Fpath%2Fto%2Fdir/name`: a Unix socket directory as
/// the URL's host, percent-encoded.
fn url(dir: &Path, name: &str) -> String {
    let host: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' | '_' | '~' => c.to_string(),
            c => {
                let mut b = [0; 4];
                c.encode_utf8(&mut b)
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect()
            }
        })
        .collect();
    format!("postgres://{USER}@{host}/{name}")
}

/// The directory of `initdb` and `postgres`: on PATH, or Debian's
/// /usr/lib/postgresql/<version>/bin (the newest).
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no initdb on PATH nor /usr/lib/postgresql ({e}): install postgresql")
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb: install postgresql".into())
}

/// PostgreSQL refuses to run as root: then the cluster runs as `nobody`,
/// in a directory it owns.
fn unprivileged() -> Option<(u32, u32)> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1);
    (uid == 0).then_some((65534, 65534))
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A CA and the server certificate it signs, a free port on 127.0.0.1,
/// and a cluster listening there with TLS on.
fn start_with_tls() -> Result<(Cluster, Tls), String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let fail = |e: rcgen::Error| format!("test PKI: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "crmgate test database CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(fail)?)
        .map_err(fail)?;
    let server_key = KeyPair::generate().map_err(fail)?;
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .map_err(fail)?
        .signed_by(&server_key, &ca)
        .map_err(fail)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port: {e}"))?
        .port();
    let files = TlsFiles {
        certificate: format!("{}{}", server.pem(), ca.pem()),
        key: server_key.serialize_pem(),
        port,
    };
    let cluster = start(Some(&files))?;
    Ok((
        cluster,
        Tls {
            port,
            ca_pem: ca.pem(),
        },
    ))
}

/// The server's certificate chain and key (PEM), and its port on 127.0.0.1.
struct TlsFiles {
    certificate: String,
    key: String,
    port: u16,
}

fn start(tls: Option<&TlsFiles>) -> Result<Cluster, String> {
    let bin = bin_dir()?;
    let owner = unprivileged();
    let dir = tempfile::Builder::new()
        .prefix("crmgate-pg-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?
        .keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let out = as_owner(&mut Command::new(bin.join("initdb")), owner)
        .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync", "-D"])
        .arg(&data)
        .env("LC_ALL", "C")
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("{}: {e}", bin.join("initdb").display()))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // With TLS, also on 127.0.0.1: the key must be the server user's own,
    // unreadable by others, or PostgreSQL refuses it.
    let network = match tls {
        None => "-c listen_addresses=".to_string(),
        Some(files) => {
            use std::os::unix::fs::PermissionsExt as _;
            let (certificate, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&certificate, &files.certificate)
                .and_then(|()| std::fs::write(&key, &files.key))
                .and_then(|()| {
                    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| format!("the server's certificate: {e}"))?;
            if let Some((uid, gid)) = owner {
                for file in [&certificate, &key] {
                    std::os::unix::fs::chown(file, Some(uid), Some(gid))
                        .map_err(|e| format!("chown {}: {e}", file.display()))?;
                }
            }
            format!(
                "-c listen_addresses=127.0.0.1 -c port={} -c ssl=on \
                 -c ssl_cert_file={} -c ssl_key_file={}",
                files.port,
                certificate.display(),
                key.display()
            )
        }
    };
    // The shell runs the server until its stdin closes (this process
    // exits), then stops it and removes the cluster. `$3`: the network
    // options, split into words.
    let script = r#"
        "$1/postgres" -D "$2/data" -k "$2" $3 -c fsync=off \
            -c max_connections=200 -c shared_buffers=32MB >"$2/log" 2>&1 &
        pid=$!
        cat >/dev/null
        kill -INT "$pid"; wait "$pid"; rm -rf "$2"
    "#;
    let mut child = as_owner(&mut Command::new("sh"), owner)
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&bin)
        .arg(&dir)
        .arg(&network)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("sh: {e}"))?;
    let stop = child.stdin.take().ok_or("no stdin")?;
    let port = tls.map_or(5432, |files| files.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ok = postgres::Config::new()
            .host_path(&dir)
            .port(port)
            .user(USER)
            .dbname("postgres")
            .connect(postgres::NoTls)
            .is_ok();
        if ok {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited ({status}): {}", log(&dir)));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("the server did not answer in 60 s: {}", log(&dir)));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(Cluster {
        dir,
        port,
        _stop: Mutex::new(stop),
    })
}

fn log(dir: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(dir.join("log")) {
        let _ = f.read_to_string(&mut text);
    }
    text
}
