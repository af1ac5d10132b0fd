//! The `configserver` binary: starts, answers its admin API, stops cleanly
//! on SIGTERM, refuses bad configuration with a clear message, and keeps
//! rules written with `configserver rules` across a restart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tern_e2e::Process;

fn configserver() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_configserver"));
    command.env("RUST_LOG", "warn");
    command
}

/// A fresh directory for one test's data.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("configserver-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the server on free ports with its data in `data_dir`; returns
/// the process and the admin address.
fn start(data_dir: &Path) -> (Process, String) {
    let mut command = configserver();
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir);
    let (process, words) = Process::spawn_ready(&mut command).unwrap();
    // "configserver listening <addr> admin <addr>"
    let admin = words.get(4).expect("admin address").clone();
    (process, admin)
}

/// SIGTERM, then its exit status (at most 10 s later).
fn stop(mut process: Process) -> ExitStatus {
    process
        .terminate(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM")
}

/// `configserver rules ARGS` against `admin`: (success, stdout, stderr).
fn rules(admin: &str, args: &[&str]) -> (bool, String, String) {
    let output = configserver()
        .args(["rules", "--admin", &format!("http://{admin}"), "--actor", "tester"])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn rules_cli_writes_reads_audits_and_rules_survive_a_restart() {
    let dir = temp_dir("rules-cli");
    let (server, admin) = start(&dir);
    let rule = r#"{"kind":"access","deny_apps":["batch"]}"#;
    let (ok, out, err) = rules(&admin, &["put", "demo.Greeter:1.0.0", "no-batch", rule]);
    assert!(ok, "{err}");
    assert!(out.contains("\"revision\": 1") && out.contains("batch"), "{out}");

    // A bad rule: refused, exit status 1, the message names field and value.
    let (ok, _, err) = rules(
        &admin,
        &["put", "demo.Greeter:1.0.0", "bad", r#"{"kind":"qps_limit","qps":-3}"#],
    );
    assert!(!ok);
    assert!(err.contains("qps") && err.contains("-3"), "{err}");
    let (ok, _, err) = rules(&admin, &["get", "demo.Greeter:1.0.0", "bad"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, out, err) = rules(&admin, &["get", "demo.Greeter:1.0.0", "no-batch"]);
    assert!(ok, "{err}");
    assert!(out.contains("deny_apps") && out.contains("batch"), "{out}");

    let (ok, out, err) = rules(&admin, &["history", "--service", "demo.Greeter:1.0.0"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"actor\": \"tester\""), "{out}");
    assert!(stop(server).success());

    // The same data dir: the rule is still there.
    let (server, admin) = start(&dir);
    let (ok, out, err) = rules(&admin, &["list"]);
    assert!(ok, "{err}");
    assert!(out.contains("no-batch") && out.contains("batch"), "{out}");
    let (ok, out, err) = rules(&admin, &["delete", "demo.Greeter:1.0.0", "no-batch"]);
    assert!(ok && out.contains("\"revision\": 2"), "{out}{err}");
    let (ok, out, _) = rules(&admin, &["list"]);
    assert!(ok && out.trim() == "[]", "{out}");
    assert!(stop(server).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn serves_admin_api_and_exits_cleanly_on_sigterm() {
    let dir = temp_dir("sigterm");
    let (server, admin) = start(&dir);

    let mut http = TcpStream::connect(&admin).unwrap();
    http.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") && response.ends_with("ok\n"),
        "{response}"
    );

    let status = stop(server);
    assert!(status.success(), "exit status {status}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_configuration_is_refused_naming_the_value() {
    let dir = temp_dir("bad-config");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "heartbeat-intervl-ms = 500\n").unwrap();
    let output = configserver().arg("--config").arg(&file).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("heartbeat-intervl-ms"), "{stderr}");

    let output = configserver()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval-ms", "3000", "--heartbeat-timeout-ms", "1000"])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("heartbeat timeout 1s must be longer than the interval 3s"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `PUT path` with `body` over HTTP/1.0: the status code and body.
fn put(admin: &str, path: &str, body: &str) -> (u16, String) {
    let mut http = TcpStream::connect(admin).unwrap();
    let request = format!(
        "PUT {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, response)
}

#[test]
fn concurrent_rule_writes_on_the_default_store_all_succeed() {
    let dir = temp_dir("concurrent-writes");
    let (server, admin) = start(&dir);
    let writers: Vec<_> = (0..40)
        .map(|i| {
            let admin = admin.clone();
            std::thread::spawn(move || {
                let rule = format!(r#"{{"kind":"weight","overrides":[{{"address":"10.0.0.{i}:1","weight":50}}]}}"#);
                put(
                    &admin,
                    &format!("/api/rule?service=demo.Greeter:1.0.0&name=w{i}"),
                    &rule,
                )
            })
        })
        .collect();
    let failed: Vec<String> = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .filter(|(status, _)| *status != 200)
        .map(|(_, response)| response)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 40 writes failed: {:?}",
        failed.len(),
        failed.first()
    );
    let (ok, listed, _) = rules(&admin, &["list", "--service", "demo.Greeter:1.0.0"]);
    assert!(ok);
    assert_eq!(listed.matches("\"name\"").count(), 40, "{listed}");
    assert!(stop(server).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn credentials_without_an_admin_token_are_refused_at_start() {
    let dir = temp_dir("no-admin-token");
    let file = dir.join("credentials.toml");
    std::fs::write(&file, "[apps.web]\ntoken = \"t\"\n").unwrap();
    let output = configserver()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            "sqlite::memory:",
        ])
        .arg("--credentials")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started without an admin token");
    assert!(stderr.contains("no admin token"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
