//! The `configserver` binary: starts, answers its admin API, stops cleanly
//! on SIGTERM, and refuses bad configuration with a clear message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn configserver() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_configserver"));
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn serves_admin_api_and_exits_cleanly_on_sigterm() {
    let mut child = configserver()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "configserver listening <addr> admin <addr>"
    let admin = line.split_whitespace().nth(4).expect("admin address").to_owned();

    let mut http = TcpStream::connect(&admin).unwrap();
    http.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") && response.ends_with("ok\n"),
        "{response}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_configuration_is_refused_naming_the_value() {
    let dir = std::env::temp_dir().join(format!("configserver-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "heartbeat-intervl-ms = 500\n").unwrap();
    let output = configserver().arg("--config").arg(&file).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("heartbeat-intervl-ms"), "{stderr}");

    let output = configserver()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval-ms", "3000", "--heartbeat-timeout-ms", "1000"])
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
