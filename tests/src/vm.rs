//! A small Linux guest under qemu-system-x86_64, for the tests that need a real virtual
//! machine on our volumes (vhost-user-blk and NBD disks).
//!
//! The guest is a Debian kernel (`scripts/vm-guest-kernel.sh` fetches and unpacks it into the
//! cache, once) and an initramfs built here: busybox-static, the virtio modules, an `/init`
//! that loads them and runs the test's scenario script, printing its output on the serial
//! console, then powers off. Tests assert on the markers the scenario prints
//! (`EVS-SCENARIO-EXIT 0`, checksums) and on what the host reads back from the volume.
//!
//! Acceleration: KVM when `/dev/kvm` works here (probed once by booting the guest, the
//! answer cached per host kernel under the cache directory: a nested or sandboxed KVM may exist
//! and still not run a guest), else TCG. `EVS_VM_ACCEL=kvm|tcg` forces one.
//!
//! Cache: `EVS_VM_CACHE`, else `<target dir>/vm-guest` (next to the binaries' profile dir).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{format_output, output_with_timeout, require_tool};

/// The modules the guest loads, in dependency order.
pub const GUEST_MODULES: [&str; 6] =
    ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"];

/// The last line the guest's /init prints before powering off.
pub const EXIT_MARKER: &str = "EVS-SCENARIO-EXIT";

/// Guest RAM (MiB) unless a test asks for more: shared memfd memory, as vhost-user needs.
pub const GUEST_MEM_MIB: u32 = 256;

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A disk of the guest.
#[derive(Debug, Clone)]
pub enum Disk {
    /// A vhost-user-blk socket; `reconnect` seconds (QEMU's chardev option), 0 for none.
    VhostUser { socket: PathBuf, queues: u32, reconnect: u32 },
    /// An NBD URI as a virtio-blk drive (QEMU's own NBD client).
    Nbd { uri: String },
    /// A raw file as QEMU's own virtio-blk drive (the peer of the benchmarks).
    File { path: PathBuf },
}

/// The guest kernel and what the initramfs is built from.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
    pub cache: PathBuf,
}

/// The cache directory of the guest images.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EVS_VM_CACHE") {
        return PathBuf::from(d);
    }
    // bin_dir is target/<profile>; the cache lives beside the profiles.
    let bin = crate::daemon::bin_dir();
    bin.parent().unwrap_or(&bin).join("vm-guest")
}

/// The repository root (for scripts/).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

impl GuestImage {
    /// Finds (or fetches, through `scripts/vm-guest-kernel.sh`) the kernel, and the tools the
    /// VM tests need; a missing tool fails the test with its package.
    pub fn prepare() -> GuestImage {
        require_tool("qemu-system-x86_64");
        let busybox = ["/usr/bin/busybox", "/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file() && is_static(p))
            .unwrap_or_else(|| panic!("no static busybox: install the Debian package busybox-static"));
        let cache = cache_dir();
        let kdir = cache.join("kernel");
        let script = repo_root().join("scripts/vm-guest-kernel.sh");
        let out = output_with_timeout(Command::new("bash").arg(&script).arg(&kdir), Duration::from_secs(300));
        assert!(out.status.success(), "cannot fetch the guest kernel\n{}", format_output(&out));
        GuestImage { kernel: kdir.join("vmlinuz"), modules: kdir.join("modules"), busybox, cache }
    }

    /// Builds an initramfs (uncompressed newc cpio) whose /init runs `scenario` (a busybox sh
    /// script) and `extra` files (guest path, host file).
    pub fn initramfs(&self, dir: &Path, scenario: &str, extra: &[(String, PathBuf)]) -> PathBuf {
        let mut c = Cpio::default();
        for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules", "lib64", "usr", "usr/lib"] {
            c.dir(d);
        }
        c.file("bin/busybox", &fs::read(&self.busybox).expect("read busybox"), 0o755);
        for m in GUEST_MODULES {
            let p = self.modules.join(format!("{m}.ko"));
            c.file(&format!("lib/modules/{m}.ko"), &fs::read(&p).expect("read a guest module"), 0o644);
        }
        for (guest, host) in extra {
            let mut parts = String::new();
            let parent = Path::new(guest).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            for seg in parent.split('/').filter(|s| !s.is_empty()) {
                parts = if parts.is_empty() { seg.to_string() } else { format!("{parts}/{seg}") };
                c.dir(&parts);
            }
            c.file(guest, &fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display())), 0o755);
        }
        c.file("init", init_script().as_bytes(), 0o755);
        c.file("scenario.sh", scenario.as_bytes(), 0o755);
        let path = dir.join("initramfs.cpio");
        fs::write(&path, c.finish()).expect("write the initramfs");
        path
    }

    /// KVM if it runs the guest here, else TCG (see the module doc).
    pub fn accel(&self) -> Accel {
        match std::env::var("EVS_VM_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            return Accel::Tcg;
        }
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cached = self.cache.join(format!("kvm-probe-{}", release.trim()));
        if let Ok(s) = fs::read_to_string(&cached) {
            return if s.trim() == "kvm" { Accel::Kvm } else { Accel::Tcg };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = self.initramfs(dir.path(), "echo probe\n", &[]);
        let vm = Vm {
            image: self,
            accel: Accel::Kvm,
            smp: 1,
            disks: Vec::new(),
            initrd,
            mem_mib: GUEST_MEM_MIB,
            allow_reboot: false,
        };
        let ok = vm.run(dir.path(), Duration::from_secs(20)).is_ok();
        let accel = if ok { Accel::Kvm } else { Accel::Tcg };
        let _ = fs::create_dir_all(&self.cache);
        let _ = fs::write(&cached, accel.name());
        accel
    }
}

fn is_static(p: &Path) -> bool {
    // An ELF without a PT_INTERP program header: look for the interpreter path string.
    fs::read(p).map(|b| !b.windows(14).any(|w| w == b"/lib64/ld-linux")).unwrap_or(false)
}

/// The guest's /init: mounts, modules, the scenario, its exit status on the console, power off.
fn init_script() -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin:/usr/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n",
    );
    for m in GUEST_MODULES {
        s.push_str(&format!("insmod /lib/modules/{m}.ko\n"));
    }
    s.push_str("echo EVS-GUEST-UP\nsh /scenario.sh\n");
    s.push_str(&format!("echo \"{EXIT_MARKER} $?\"\nsync\npoweroff -f\n"));
    s
}

/// A newc cpio archive.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// One run of the guest.
pub struct Vm<'a> {
    pub image: &'a GuestImage,
    pub accel: Accel,
    pub smp: u32,
    pub disks: Vec<Disk>,
    pub initrd: PathBuf,
    /// Guest RAM in MiB (the initramfs lives in it).
    pub mem_mib: u32,
    /// A guest reboot resets the machine and boots again (QEMU without `-no-reboot`);
    /// otherwise it ends QEMU.
    pub allow_reboot: bool,
}

/// What a guest run printed.
#[derive(Debug)]
pub struct Console {
    pub text: String,
}

impl Console {
    /// The scenario's exit status, from the exit marker.
    pub fn exit_status(&self) -> Option<i32> {
        self.text.lines().find_map(|l| l.trim().strip_prefix(EXIT_MARKER).and_then(|r| r.trim().parse().ok()))
    }

    /// The values of the lines `KEY value...` the scenario printed, in order.
    pub fn values(&self, key: &str) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key).filter(|r| r.starts_with(' ')).map(|r| r.trim().to_string()))
            .collect()
    }
}

impl Vm<'_> {
    /// The qemu command line.
    pub fn command(&self, console: &Path) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        let (machine, cpu) = match self.accel {
            Accel::Kvm => ("pc,accel=kvm", "host"),
            Accel::Tcg => ("pc,accel=tcg", "max"),
        };
        c.args(["-nodefaults", "-no-user-config", "-machine", machine, "-cpu", cpu])
            .args(["-smp", &self.smp.to_string(), "-m", &format!("{}M", self.mem_mib)])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", self.mem_mib)])
            .args(["-numa", "node,memdev=mem"])
            .args(if self.allow_reboot { &[][..] } else { &["-no-reboot"][..] })
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
        for (i, d) in self.disks.iter().enumerate() {
            match d {
                Disk::VhostUser { socket, queues, reconnect } => {
                    let mut chardev = format!("socket,id=vu{i},path={}", socket.display());
                    if *reconnect > 0 {
                        chardev.push_str(&format!(",reconnect={reconnect}"));
                    }
                    c.arg("-chardev").arg(chardev);
                    c.arg("-device").arg(format!("vhost-user-blk-pci,chardev=vu{i},num-queues={queues}"));
                }
                Disk::Nbd { uri } => {
                    c.arg("-drive").arg(format!("file={uri},format=raw,if=virtio,cache=none,discard=unmap"));
                }
                Disk::File { path } => {
                    c.arg("-drive").arg(format!(
                        "file={},format=raw,if=virtio,cache=none,aio=io_uring,discard=unmap",
                        path.display()
                    ));
                }
            }
        }
        c
    }

    /// Boots the guest and waits for it to power off (at most `timeout`). Err with the console
    /// and qemu's output when qemu fails, times out, or the scenario never reports its exit.
    pub fn run(&self, dir: &Path, timeout: Duration) -> Result<Console, String> {
        let console = dir.join(format!("console-{}.log", std::process::id()));
        let _ = fs::remove_file(&console);
        let qemu_log = dir.join(format!("qemu-{}.log", std::process::id()));
        let log = fs::File::create(&qemu_log).expect("create the qemu log");
        let mut child = self
            .command(&console)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for qemu: {e}"),
            }
        };
        let c = Console { text: fs::read_to_string(&console).unwrap_or_default() };
        let ok = status.is_some_and(|s| s.success()) && c.exit_status().is_some();
        if !ok {
            let what = match status {
                None => format!("did not power off within {timeout:?} (killed)"),
                Some(s) => format!("exited with {s}"),
            };
            return Err(format!(
                "the guest did not finish its scenario: qemu {what}\n--- qemu ---\n{}\n--- console ---\n{}",
                fs::read_to_string(&qemu_log).unwrap_or_default(),
                c.text
            ));
        }
        Ok(c)
    }
}

/// A program and the shared libraries it loads (from `ldd`), as (guest path, host path) pairs
/// for [`GuestImage::initramfs`]: the guest gets the host's binary and libraries at the same
/// paths.
pub fn program_with_libs(program: &Path) -> Vec<(String, PathBuf)> {
    let out = output_with_timeout(Command::new("ldd").arg(program), Duration::from_secs(30));
    assert!(out.status.success(), "ldd {}\n{}", program.display(), format_output(&out));
    let mut files = vec![(program.to_string_lossy().trim_start_matches('/').to_string(), program.to_path_buf())];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").nth(1).unwrap_or(line).split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            let host = fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
            files.push((path.trim_start_matches('/').to_string(), host));
        }
    }
    files
}

/// Writes `text` to a new file (scripts, configs).
pub fn write_file(path: &Path, text: &str) {
    let mut f = fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}
