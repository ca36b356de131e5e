//! Running external programs (qemu-img, qemu-io, nbdinfo, nbdcopy, evsctl) with a time limit
//! and failure messages that show everything the program printed.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default time limit of one external command.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(600);

/// The Debian package that provides a tool the tests use.
pub fn package_of(tool: &str) -> &str {
    match tool {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" | "nbdfuse" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "script" => "bsdutils",
        other => other,
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Returns the path of `tool`, or fails the test: a missing tool is a broken test setup, never
/// a reason to skip.
pub fn require_tool(tool: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| {
        panic!(
            "`{tool}` is not on PATH: install {} (the test command does it; on Debian: apt-get install {})",
            package_of(tool),
            package_of(tool)
        )
    })
}

/// `program arg arg ...`, quoted enough to paste into a shell.
pub fn describe(cmd: &Command) -> String {
    let mut s = shell_word(cmd.get_program());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_word(a));
    }
    s
}

fn shell_word(w: &OsStr) -> String {
    let w = w.to_string_lossy();
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c)) {
        w.into_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Exit status, stdout and stderr of a finished command, for failure messages.
pub fn format_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

fn spawn_reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and returns its output whatever its
/// exit status; panics if it cannot start or does not finish within `timeout` (it is killed).
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let out_t = spawn_reader(child.stdout.take());
    let err_t = spawn_reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                let out = Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() };
                panic!("`{what}` did not finish within {timeout:?} and was killed\n{}", format_output(&out));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{what}`: {e}"),
        }
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Runs an external tool that must succeed (exit 0) within the default time limit; the panic
/// message shows the command line, exit status, stdout and stderr.
pub fn run_tool(cmd: &mut Command) -> Output {
    run_tool_timeout(cmd, DEFAULT_TOOL_TIMEOUT)
}

pub fn run_tool_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let out = output_with_timeout(cmd, timeout);
    if !out.status.success() {
        panic!("`{}` failed\n{}", describe(cmd), format_output(&out));
    }
    out
}

/// `tool args...`, checking first that the tool is installed; must succeed.
pub fn tool(tool: &str, args: &[&str]) -> Output {
    let path = require_tool(tool);
    run_tool(Command::new(path).args(args))
}

/// Stdout of a finished command as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr of a finished command as text.
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
