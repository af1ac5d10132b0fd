//! A child process owned by its handle: signalled through `kill(2)` (rustix),
//! killed and reaped when the handle is dropped, its stdout read line by line.
//!
//! The demo, the end-to-end tests and the benchmarks start providers and
//! ConfigServers as child processes; this is their one way of doing it.

use std::io::{self, BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process};

/// A child process; SIGKILLed (after a SIGCONT, in case it was stopped) and
/// reaped when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: Option<Lines<BufReader<ChildStdout>>>,
}

impl Process {
    /// Starts `command` with its stdout piped to [`Process::next_line`]
    /// (stdin from /dev/null; stderr as the command sets it).
    ///
    /// # Errors
    ///
    /// The program cannot be started.
    pub fn spawn(command: &mut Command) -> io::Result<Process> {
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
        let lines = child.stdout.take().map(|out| BufReader::new(out).lines());
        Ok(Process { child, lines })
    }

    /// Starts `command` and reads the first line it prints (its ready line,
    /// e.g. `listening 127.0.0.1:20880`), split into words.
    ///
    /// # Errors
    ///
    /// The program cannot be started, or it ended before printing a line.
    pub fn spawn_ready(command: &mut Command) -> io::Result<(Process, Vec<String>)> {
        let mut process = Process::spawn(command)?;
        let line = process.next_line()?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{:?} ended before printing its ready line", command.get_program()),
            )
        })?;
        Ok((process, line.split_whitespace().map(str::to_owned).collect()))
    }

    /// The next line of its stdout; `None` at its end.
    ///
    /// # Errors
    ///
    /// Reading failed, or the line is not UTF-8.
    pub fn next_line(&mut self) -> io::Result<Option<String>> {
        match &mut self.lines {
            Some(lines) => lines.next().transpose(),
            None => Ok(None),
        }
    }

    /// Its stderr, once, if the command piped it.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Its process id (e.g. to read `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rustix_pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// Sends `signal` (e.g. [`Signal::TERM`], [`Signal::STOP`]).
    ///
    /// # Errors
    ///
    /// The process is gone (and reaped) or may not be signalled.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        kill_process(self.rustix_pid(), signal).map_err(io::Error::from)
    }

    /// SIGKILL, then reap.
    ///
    /// # Errors
    ///
    /// Waiting for it failed.
    pub fn kill_hard(&mut self) -> io::Result<ExitStatus> {
        let _ = self.signal(Signal::CONT);
        self.child.kill()?;
        self.child.wait()
    }

    /// Its exit status if it has ended.
    ///
    /// # Errors
    ///
    /// Waiting for it failed.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits, at most `limit`, for it to end.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::TimedOut`] if it still runs after `limit` (it is left
    /// running; dropping the handle kills it).
    pub fn wait_exit(&mut self, limit: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("process {} still running after {limit:?}", self.pid()),
                ));
            }
            // A child's exit has no portable wake-up short of SIGCHLD; a
            // bounded poll keeps this free of signal handlers.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits, at most `limit`, for it to end.
    ///
    /// # Errors
    ///
    /// As [`Process::signal`] and [`Process::wait_exit`].
    pub fn terminate(&mut self, limit: Duration) -> io::Result<ExitStatus> {
        self.signal(Signal::TERM)?;
        self.wait_exit(limit)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill_hard();
        }
    }
}
