//! The launcher end to end: `strata vm` boots a real Linux kernel under QEMU (software
//! emulation) with its disk on a Strata overlay of a golden image built here, the guest
//! writes to the disk and powers off, the bytes are checked through Strata, then the
//! VM boots again, is suspended to a checkpoint and resumed from it, its memory and its
//! disk matching. Also: what the launcher says about bad input, and about a disk server
//! that vanishes under a running VM.
//!
//! Needs qemu-system-x86_64, a Debian kernel in /boot with its modules (virtio_blk and
//! its dependencies, found through modules.dep) and a static busybox; scripts/test.sh
//! installs them (qemu-system-x86, linux-image-cloud-amd64, busybox-static). Nothing
//! leaves the machine: the guest has no network device.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{harden, is_ci, poll, run_timeout, scratch, spawn, strata};

const MIB: u64 = 1 << 20;
/// The guest writes its marker here (sector 2048) and its tick counter at 2 MiB.
const MARKER_OFFSET: u64 = MIB;
const TICK_OFFSET: u64 = 2 * MIB;
const MARKER: &str = "STRATA-E2E-MARKER-1";
const GOLDEN: &[u8] = b"GOLDEN-IMAGE-0001";
/// A boot of the test guest to its first output takes a few seconds under TCG;
/// everything waits at most this long for the guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// The guest: a Debian kernel and a busybox initramfs made here
// ---------------------------------------------------------------------------------------

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Says why the guest cannot be built: under CI a failure, elsewhere a loud skip.
fn missing(what: &str) -> Option<Guest> {
    let msg = format!(
        "{what} (scripts/test.sh installs qemu-system-x86, qemu-utils, linux-image-cloud-amd64 \
         and busybox-static)"
    );
    if is_ci() {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    None
}

/// A kernel in /boot whose modules are installed, newest first; STRATA_VM_KERNEL
/// names one instead.
fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    if let Some(k) = std::env::var_os("STRATA_VM_KERNEL") {
        let k = PathBuf::from(k);
        let version = k
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")?
            .to_owned();
        return Some((k, PathBuf::from("/lib/modules").join(version)));
    }
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let version = name.strip_prefix("vmlinuz-")?;
            let modules = PathBuf::from("/lib/modules").join(version);
            let readable = std::fs::File::open(e.path()).is_ok();
            (readable && modules.join("modules.dep").is_file()).then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Is this ELF file statically linked (no program interpreter)?
fn is_static(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).all(|i| {
        let at = phoff + i * size;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// `modules` in load order (dependencies first) from modules.dep, as paths relative to
/// the modules directory; built-in modules are left out.
fn module_order(dir: &Path, modules: &[&str]) -> Vec<String> {
    let dep = std::fs::read_to_string(dir.join("modules.dep")).expect("modules.dep");
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let stem = |p: &str| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .split('.')
            .next()
            .unwrap()
            .replace('-', "_")
    };
    let table: Vec<(String, String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                stem(module),
                module.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect();
    fn visit(path: &str, table: &[(String, String, Vec<String>)], out: &mut Vec<String>) {
        if out.iter().any(|p| p == path) {
            return;
        }
        let (_, _, deps) = table
            .iter()
            .find(|(_, p, _)| p == path)
            .unwrap_or_else(|| panic!("{path} is not in modules.dep"));
        for d in deps {
            visit(d, table, out);
        }
        out.push(path.to_owned());
    }
    let mut out = Vec::new();
    for m in modules {
        if builtin.lines().any(|l| stem(l) == *m) {
            continue;
        }
        let (_, path, _) = table
            .iter()
            .find(|(s, _, _)| s == m)
            .unwrap_or_else(|| panic!("module {m} is neither built in nor in modules.dep"));
        visit(path, &table, &mut out);
    }
    out
}

/// A cpio archive in the "newc" format, which the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data, (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// The guest's /init. On a disk without the marker it reports what the golden image
/// holds, writes the marker and powers off; on a disk with it, it counts ticks on the
/// console and on the disk until it is stopped.
fn init_script(modules: &[String]) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| {
            let file = Path::new(m)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            format!("insmod /lib/modules/{file} || echo \"STRATA-E2E: insmod {file} failed\"\n")
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "STRATA-E2E: init"
{insmods}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
if [ ! -b /dev/vda ]; then echo "STRATA-E2E: no disk"; poweroff -f; fi
marker=$(dd if=/dev/vda bs=512 skip={marker_sector} count=1 2>/dev/null | tr -d '\000\n')
case "$marker" in
  STRATA-E2E-MARKER*)
    echo "STRATA-E2E: found $marker"
    n=0
    while true; do
      n=$((n+1))
      echo "TICK $n" | dd of=/dev/vda bs=512 seek={tick_sector} conv=notrunc 2>/dev/null
      sync
      echo "STRATA-E2E-TICK $n"
      usleep 200000
    done ;;
  *)
    echo "STRATA-E2E: golden says $(dd if=/dev/vda bs=17 count=1 2>/dev/null)"
    echo "{MARKER}" | dd of=/dev/vda bs=512 seek={marker_sector} conv=notrunc 2>/dev/null
    sync
    echo "STRATA-E2E: wrote the marker"
    poweroff -f ;;
esac
"#,
        marker_sector = MARKER_OFFSET / 512,
        tick_sector = TICK_OFFSET / 512,
    )
}

fn build_guest(dir: &Path) -> Option<Guest> {
    if std::env::var("STRATA_TEST_VM").as_deref() == Ok("later") {
        eprintln!("VM boots deferred: scripts/test.sh runs them in its vm-e2e step");
        return None;
    }
    if !crate::support::require_tool("qemu-system-x86_64") {
        return None;
    }
    let Some((kernel, modules_dir)) = find_kernel() else {
        return missing("no kernel with installed modules in /boot");
    };
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(busybox) = busybox else {
        return missing("busybox is not installed");
    };
    let busybox = std::fs::read(busybox).unwrap();
    if !is_static(&busybox) {
        return missing("busybox is not statically linked");
    }
    let modules = module_order(&modules_dir, &["virtio_pci", "virtio_blk"]);
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.entry("dev/console", 0o020_600, &[], (5, 1));
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init_script(&modules).as_bytes());
    for m in &modules {
        let data = std::fs::read(modules_dir.join(m)).unwrap();
        assert!(
            m.ends_with(".ko"),
            "{m}: compressed modules are not handled by this test"
        );
        let file = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        cpio.file(&format!("lib/modules/{file}"), 0o644, &data);
    }
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, cpio.finish()).unwrap();
    Some(Guest { kernel, initrd })
}

// ---------------------------------------------------------------------------------------
// Driving the launcher
// ---------------------------------------------------------------------------------------

/// A `strata vm` process running in the background, its stderr in a file; killed with
/// its process group if still running when dropped.
struct Launcher {
    child: Child,
    log: PathBuf,
}

impl Launcher {
    fn spawn(mut cmd: Command, log: PathBuf) -> Launcher {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        harden(&mut cmd);
        Launcher {
            child: spawn(&mut cmd).expect("strata vm starts"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the launcher to exit; panics with its log after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let exited = poll(timeout, || self.child.try_wait().unwrap());
        exited.unwrap_or_else(|| {
            panic!(
                "the launcher did not exit within {timeout:?}\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the launcher's own process group (it leads it).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("STRATA_TEST_SHOW_LOG").is_some() {
            eprintln!("--- launcher log ---\n{}", self.log());
        }
    }
}

/// Waits until `file` holds a line containing `want`; returns the file's contents.
fn wait_for(file: &Path, want: &str, timeout: Duration, context: &dyn Fn() -> String) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{want:?} did not appear in {} within {timeout:?}\n--- it holds ---\n{text}\n{}",
            file.display(),
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The highest tick the guest printed in `console`.
fn last_tick(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("STRATA-E2E-TICK ")?
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// The disk image `image` (a Strata image, any chain) as raw bytes, through
/// `strata convert`.
fn raw_copy(image: &Path, out: &Path) -> PathBuf {
    let _ = std::fs::remove_file(out);
    let r = run_timeout(
        strata().args(["convert", "-O", "raw"]).arg(image).arg(out),
        Duration::from_secs(60),
    );
    assert!(r.success(), "{}", r.report());
    out.to_path_buf()
}

fn golden(dir: &Path) -> PathBuf {
    let path = dir.join("golden.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(GOLDEN, 0).unwrap();
    path
}

struct Vm {
    root: PathBuf,
    name: &'static str,
}

impl Vm {
    fn cmd(&self) -> Command {
        let mut c = strata();
        c.arg("vm").arg("--bundles").arg(&self.root);
        c
    }

    fn bundle(&self) -> PathBuf {
        self.root.join(self.name)
    }

    fn console(&self) -> PathBuf {
        self.bundle().join("console.log")
    }

    fn create(&self, guest: &Guest, disk: &str, extra: &[&str]) {
        let r = run_timeout(
            self.cmd()
                .args(["create", self.name, "--disk", disk])
                .args([
                    "--cpus",
                    "1",
                    "--memory",
                    "256M",
                    "--headless",
                    "--accel",
                    "tcg",
                ])
                .arg("--kernel")
                .arg(&guest.kernel)
                .arg("--initrd")
                .arg(&guest.initrd)
                .args(["--cmdline", "console=ttyS0 quiet"])
                .args(extra),
            Duration::from_secs(30),
        );
        assert!(r.success(), "{}", r.report());
    }

    fn launch(&self, args: &[&str], log: &str) -> Launcher {
        let mut c = self.cmd();
        c.args(args);
        Launcher::spawn(c, self.root.join(log))
    }

    fn ctl(&self, args: &[&str]) -> crate::support::CmdOutput {
        run_timeout(self.cmd().args(args), Duration::from_secs(120))
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn boot_write_poweroff_checkpoint_resume() {
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = build_guest(dir.path()) else {
        return;
    };
    let golden = golden(dir.path());
    let vm = Vm {
        root: dir.path().join("vms"),
        name: "e2e",
    };
    vm.create(&guest, golden.to_str().unwrap(), &["--overlay"]);
    let overlay = vm.bundle().join("disk.strata");
    assert!(overlay.is_file());

    // Boot 1: the guest writes its marker and powers off.
    let start = Instant::now();
    let mut first = vm.launch(&["run", "e2e"], "run1.log");
    let status = first.wait(GUEST_TIMEOUT);
    let boot_to_poweroff = start.elapsed();
    let console = std::fs::read_to_string(vm.console()).unwrap_or_default();
    assert!(
        status.success(),
        "{}\n--- console ---\n{console}",
        first.log()
    );
    assert!(
        console.contains("STRATA-E2E: wrote the marker"),
        "--- console ---\n{console}"
    );
    assert!(
        console.contains("golden says GOLDEN-IMAGE-0001"),
        "{console}"
    );
    assert!(
        first.log().contains("VM stopped: the guest powered off"),
        "{}",
        first.log()
    );
    eprintln!(
        "TIMING boot to poweroff: {:.2} s",
        boot_to_poweroff.as_secs_f64()
    );

    // The bytes, through Strata: the marker in the overlay, the golden image untouched.
    let raw = raw_copy(&overlay, &dir.path().join("after-boot1.raw"));
    assert_eq!(read_at(&raw, 0, GOLDEN.len()), GOLDEN);
    assert_eq!(
        read_at(&raw, MARKER_OFFSET, MARKER.len()),
        MARKER.as_bytes()
    );
    assert_eq!(
        read_at(&golden, MARKER_OFFSET, MARKER.len()),
        vec![0; MARKER.len()]
    );

    // Boot 2: the guest finds the marker and ticks; a checkpoint stops it.
    let mut second = vm.launch(&["run", "e2e"], "run2.log");
    let context = || second_log(&vm);
    wait_for(
        &vm.console(),
        &format!("found {MARKER}"),
        GUEST_TIMEOUT,
        &context,
    );
    wait_for(&vm.console(), "STRATA-E2E-TICK 3", GUEST_TIMEOUT, &context);
    let start = Instant::now();
    let r = vm.ctl(&["suspend", "e2e", "--stop"]);
    let suspend_time = start.elapsed();
    assert!(r.success(), "{}\n{}", r.report(), second.log());
    assert!(
        r.stdout.contains("checkpoint ckpt-1 of e2e saved"),
        "{}",
        r.stdout
    );
    let status = second.wait(Duration::from_secs(30));
    assert!(status.success(), "{}", second.log());
    assert!(
        second.log().contains("suspended to checkpoint ckpt-1"),
        "{}",
        second.log()
    );
    eprintln!(
        "TIMING suspend (pause + snapshot + state + stop): {:.2} s: {}",
        suspend_time.as_secs_f64(),
        r.stdout.trim()
    );
    let console = std::fs::read_to_string(vm.console()).unwrap();
    let at_suspend = last_tick(&console);
    assert!(at_suspend >= 3);

    // The checkpoint: listed, its state saved, its snapshot holding the marker and the
    // last tick the guest wrote.
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("ckpt-1") && r.stdout.contains("vm.ckpt-1"),
        "{}",
        r.report()
    );
    let state = vm.bundle().join("checkpoints/ckpt-1.state");
    assert!(std::fs::metadata(&state).unwrap().len() > 0);
    let snapshot = vm.bundle().join("disk.strata@vm.ckpt-1");
    let raw = raw_copy(&snapshot, &dir.path().join("ckpt-1.raw"));
    assert_eq!(
        read_at(&raw, MARKER_OFFSET, MARKER.len()),
        MARKER.as_bytes()
    );
    let tick = String::from_utf8_lossy(&read_at(&raw, TICK_OFFSET, 16)).into_owned();
    let disk_tick: u64 = tick
        .trim_matches(char::from(0))
        .trim()
        .strip_prefix("TICK ")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tick on the disk: {tick:?}"));
    assert!(
        disk_tick == at_suspend || disk_tick + 1 == at_suspend || disk_tick == at_suspend + 1,
        "the disk's tick {disk_tick} is not the guest's last one, {at_suspend}"
    );
    let listed = vm.ctl(&["list"]);
    assert!(
        listed.stdout.contains("e2e") && listed.stdout.contains("stopped"),
        "{}",
        listed.stdout
    );

    // Resume: the guest counts on from where it was, without booting again.
    let boots_before = console.matches("STRATA-E2E: init").count();
    let start = Instant::now();
    let mut third = vm.launch(&["resume", "e2e"], "resume.log");
    let next = format!("STRATA-E2E-TICK {}", at_suspend + 2);
    let context = || third_log(&vm);
    let console = wait_for(&vm.console(), &next, GUEST_TIMEOUT, &context);
    eprintln!(
        "TIMING resume to the guest's next ticks: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        console.matches("STRATA-E2E: init").count(),
        boots_before,
        "the guest booted again instead of resuming\n{console}"
    );
    assert!(
        third.log().contains("resumed from checkpoint ckpt-1"),
        "{}",
        third.log()
    );
    let r = vm.ctl(&["status", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("\"running\""),
        "{}",
        r.report()
    );
    // A second checkpoint, the VM running on; then back to the first one, which needs
    // the second one deleted.
    let r = vm.ctl(&["suspend", "e2e"]);
    assert!(
        r.success() && r.stdout.contains("checkpoint ckpt-2"),
        "{}",
        r.report()
    );
    let r = vm.ctl(&["stop", "e2e", "--force"]);
    assert!(r.success(), "{}", r.report());
    assert!(
        third.wait(Duration::from_secs(30)).success(),
        "{}",
        third.log()
    );
    assert!(!vm.bundle().join("launcher.sock").exists());
    assert!(!vm.bundle().join("nbd.sock").exists());
    let r = vm.ctl(&["resume", "e2e", "--checkpoint", "ckpt-1"]);
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(
        r.stderr.contains("newer checkpoints exist (ckpt-2)"),
        "{}",
        r.report()
    );
    assert!(vm.bundle().join("checkpoints/ckpt-2.state").is_file());

    let seen = std::fs::read_to_string(vm.console()).unwrap().len();
    let mut fourth = vm.launch(
        &["resume", "e2e", "--checkpoint", "ckpt-1", "--destroy-newer"],
        "resume2.log",
    );
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let fresh = loop {
        let text = std::fs::read_to_string(vm.console()).unwrap();
        let fresh = text[seen.min(text.len())..].to_owned();
        if last_tick(&fresh) > 0 {
            break fresh;
        }
        assert!(
            Instant::now() < deadline,
            "no tick after the second resume\n{}",
            fourth.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_tick = fresh
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("STRATA-E2E-TICK ")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    assert_eq!(
        first_tick,
        at_suspend + 1,
        "the guest should go on from checkpoint ckpt-1\n{fresh}"
    );
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(
        r.stdout.contains("ckpt-1") && !r.stdout.contains("ckpt-2"),
        "{}",
        r.report()
    );
    assert!(!vm.bundle().join("checkpoints/ckpt-2.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.ckpt-2").exists());

    // Deleting checkpoints: one of the running VM (through its launcher), then, with the
    // VM stopped, the last one; the disk reads as before.
    let r = vm.ctl(&["suspend", "e2e", "--checkpoint", "scratch"]);
    assert!(r.success(), "{}", r.report());
    let r = vm.ctl(&["delete-checkpoint", "e2e", "scratch"]);
    assert!(r.success(), "{}\n{}", r.report(), fourth.log());
    assert!(!vm.bundle().join("checkpoints/scratch.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.scratch").exists());
    let r = vm.ctl(&["stop", "e2e", "--force"]);
    assert!(r.success(), "{}", r.report());
    assert!(
        fourth.wait(Duration::from_secs(30)).success(),
        "{}",
        fourth.log()
    );
    let before = raw_copy(&overlay, &dir.path().join("before-delete.raw"));
    let r = vm.ctl(&["delete-checkpoint", "e2e", "ckpt-1"]);
    assert!(r.success(), "{}", r.report());
    let r = vm.ctl(&["checkpoints", "e2e"]);
    assert!(!r.stdout.contains("ckpt-1"), "{}", r.report());
    assert!(!vm.bundle().join("checkpoints/ckpt-1.state").exists());
    assert!(!vm.bundle().join("disk.strata@vm.ckpt-1").exists());
    let after = raw_copy(&overlay, &dir.path().join("after-delete.raw"));
    assert!(
        std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap(),
        "deleting a checkpoint changed the disk"
    );
    let r = vm.ctl(&["delete-checkpoint", "e2e", "ckpt-1"]);
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(
        r.stderr.contains("has no checkpoint \"ckpt-1\""),
        "{}",
        r.report()
    );
}

/// Waits until the launcher says the VM runs and the guest has ticked `ticks` times
/// since the console held `seen` bytes.
fn wait_running(vm: &Vm, launcher: &Launcher, seen: usize, ticks: u64) {
    let fresh = || {
        let console = std::fs::read_to_string(vm.console()).unwrap_or_default();
        console[seen.min(console.len())..].to_owned()
    };
    let running = poll(GUEST_TIMEOUT, || {
        (launcher.log().contains("is running") && last_tick(&fresh()) >= ticks).then_some(())
    });
    assert!(
        running.is_some(),
        "the VM did not run\n{}\n--- console ---\n{}",
        launcher.log(),
        fresh()
    );
}

/// A launcher that dies in the middle of a suspend (`STRATA_FAILPOINT`, which aborts it
/// there) leaves no checkpoint listed, a bundle that runs again, and nothing in the way
/// of taking the same checkpoint afterwards.
#[test]
fn a_crashed_suspend_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = build_guest(dir.path()) else {
        return;
    };
    // A golden image that has the marker already: the guest ticks at once.
    let golden = golden(dir.path());
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&golden)
            .unwrap();
        f.write_all_at(format!("{MARKER}\n").as_bytes(), MARKER_OFFSET)
            .unwrap();
    }
    let vm = Vm {
        root: dir.path().join("vms"),
        name: "crash",
    };
    vm.create(&guest, golden.to_str().unwrap(), &["--overlay"]);
    for (round, failpoint) in ["vm-suspend-snapshotted", "vm-suspend-saved"]
        .iter()
        .enumerate()
    {
        let seen = std::fs::read_to_string(vm.console()).map_or(0, |t| t.len());
        let mut cmd = vm.cmd();
        cmd.args(["run", "crash"])
            .env("STRATA_FAILPOINT", failpoint);
        let mut run = Launcher::spawn(cmd, vm.root.join(format!("crash-{round}.log")));
        wait_running(&vm, &run, seen, 2);
        let r = vm.ctl(&["suspend", "crash", "--checkpoint", "c1"]);
        assert!(!r.success(), "{}", r.report());
        let status = run.wait(Duration::from_secs(30));
        assert!(!status.success(), "{}", run.log());
        assert!(
            run.log().contains(&format!("failpoint {failpoint}")),
            "{}",
            run.log()
        );
        // Nothing listed; the bundle is whole and not locked.
        let r = vm.ctl(&["checkpoints", "crash"]);
        assert!(r.success() && !r.stdout.contains("c1"), "{}", r.report());
        let r = vm.ctl(&["list"]);
        assert!(
            r.success() && r.stdout.contains("stopped"),
            "{}",
            r.report()
        );
    }
    // The same checkpoint, taken properly now.
    let seen = std::fs::read_to_string(vm.console()).map_or(0, |t| t.len());
    let mut run = vm.launch(&["run", "crash"], "crash-ok.log");
    wait_running(&vm, &run, seen, 2);
    let r = vm.ctl(&["suspend", "crash", "--checkpoint", "c1", "--stop"]);
    assert!(r.success(), "{}\n{}", r.report(), run.log());
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.log());
    let r = vm.ctl(&["checkpoints", "crash"]);
    assert!(r.stdout.contains("c1"), "{}", r.report());
    let r = run_timeout(
        strata().arg("check").arg(vm.bundle().join("disk.strata")),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
}

fn second_log(vm: &Vm) -> String {
    std::fs::read_to_string(vm.root.join("run2.log")).unwrap_or_default()
}

fn third_log(vm: &Vm) -> String {
    std::fs::read_to_string(vm.root.join("resume.log")).unwrap_or_default()
}

/// A throwaway VM from a golden image in one command, and a disk server that vanishes
/// under a running VM: the guest's I/O errors are reported, a suspend then fails
/// cleanly, and the checkpoint taken before is still there.
#[test]
fn serve_discard_and_a_vanishing_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = build_guest(dir.path()) else {
        return;
    };
    let golden = golden(dir.path());

    // run --serve --discard: boots on a fresh overlay, which is gone afterwards.
    let vm = Vm {
        root: dir.path().join("vms"),
        name: "tmp",
    };
    vm.create(&guest, golden.to_str().unwrap(), &[]);
    let mut run = vm.launch(
        &[
            "run",
            "tmp",
            "--serve",
            golden.to_str().unwrap(),
            "--discard",
        ],
        "serve.log",
    );
    assert!(run.wait(GUEST_TIMEOUT).success(), "{}", run.log());
    assert!(run.log().contains("discarded"), "{}", run.log());
    assert!(!vm.bundle().join("disk.strata").exists());
    assert_eq!(
        read_at(&golden, MARKER_OFFSET, 4),
        vec![0; 4],
        "golden untouched"
    );

    // An external server with a control API, serving an image that already has the
    // marker, so that the guest ticks.
    let image = dir.path().join("remote.strata");
    let r = run_timeout(
        strata()
            .arg("create")
            .arg(&image)
            .arg("--backing")
            .arg(&golden),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    write_marker(&image, dir.path());
    let nbd = dir.path().join("remote.sock");
    let control = dir.path().join("remote-control.sock");
    let mut server = strata();
    server
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", nbd.display()))
        .arg("--control")
        .arg(&control)
        .args(["--name", "remote"])
        .arg(&image);
    let mut server = Launcher::spawn(server, dir.path().join("server.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let remote = Vm {
        root: dir.path().join("vms"),
        name: "remote",
    };
    let url = format!("nbd+unix:///remote?socket={}", nbd.display());
    remote.create(
        &guest,
        &url,
        &["--control", control.to_str().unwrap(), "--timeout", "1"],
    );
    let mut run = remote.launch(&["run", "remote"], "remote.log");
    let context = || std::fs::read_to_string(dir.path().join("vms/remote.log")).unwrap_or_default();
    wait_for(
        &remote.console(),
        "STRATA-E2E-TICK 2",
        GUEST_TIMEOUT,
        &context,
    );
    let r = remote.ctl(&["suspend", "remote", "--checkpoint", "before"]);
    assert!(r.success(), "{}\n{}", r.report(), run.log());

    // The server goes away.
    // SAFETY: kill(2) on the server we started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
    let _ = server.child.wait();
    wait_for(
        &run.log,
        "error on the disk",
        Duration::from_secs(60),
        &|| remote_console(&remote),
    );
    wait_for(
        &run.log,
        "the disk server does not answer: cannot reach the NBD server",
        Duration::from_secs(30),
        &|| remote_console(&remote),
    );
    let r = remote.ctl(&["suspend", "remote", "--checkpoint", "after"]);
    assert!(!r.success(), "{}", r.report());
    assert!(
        r.stderr.contains("cannot reach the control API"),
        "{}",
        r.report()
    );
    let r = remote.ctl(&["checkpoints", "remote"]);
    assert!(
        r.stdout.contains("before") && !r.stdout.contains("after"),
        "{}",
        r.report()
    );
    assert!(remote.bundle().join("checkpoints/before.state").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(remote.bundle().join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "before.state")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let r = remote.ctl(&["stop", "remote", "--force"]);
    assert!(r.success(), "{}", r.report());
    run.wait(Duration::from_secs(30));
}

fn remote_console(vm: &Vm) -> String {
    std::fs::read_to_string(vm.console()).unwrap_or_default()
}

/// Writes the guest's marker into `image` through a short-lived server and qemu-io-free
/// means: `strata convert` to raw, patch, convert back would lose the chain, so the
/// marker goes in with the NBD crate's client instead.
fn write_marker(image: &Path, dir: &Path) {
    let sock = dir.join("marker.sock");
    let mut server = strata();
    server
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg(image);
    let mut server = Launcher::spawn(server, dir.join("marker-server.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stream = stream;
    let name = image.file_stem().unwrap().to_string_lossy().into_owned();
    let export = nbd::client::handshake(&mut stream, name.as_bytes()).expect("handshake");
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    use std::io::{Seek as _, SeekFrom, Write as _};
    client.seek(SeekFrom::Start(MARKER_OFFSET)).unwrap();
    client.write_all(format!("{MARKER}\n").as_bytes()).unwrap();
    client.flush().unwrap();
    drop(stream);
    // SAFETY: SIGTERM to the server we started; it flushes and exits.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(
        server.wait(Duration::from_secs(20)).success(),
        "{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------
// Bad input: no VM needed
// ---------------------------------------------------------------------------------------

fn vm_cmd(root: &Path) -> Command {
    let mut c = strata();
    c.arg("vm").arg("--bundles").arg(root);
    c
}

fn fails_with(cmd: &mut Command, want: &str) -> crate::support::CmdOutput {
    let r = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(r.code(), Some(1), "{}", r.report());
    assert!(r.stderr.contains(want), "{want:?} missing\n{}", r.report());
    r
}

/// Runs without QEMU (scripts/test.sh runs it before QEMU is installed): the VMs that
/// would need one name `/bin/true`, which is never started.
#[test]
fn bad_input_gets_clear_messages() {
    let (dir, root) = scratch("vms");
    let image = golden(dir.path());

    fails_with(vm_cmd(&root).args(["run", "nope"]), "no VM named \"nope\"");
    fails_with(
        vm_cmd(&root).args(["suspend", "nope"]),
        "no VM named \"nope\"",
    );
    fails_with(vm_cmd(&root).args(["checkpoints", "nope"]), "no VM named");
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "nbd://nas:0/x"]),
        "not a number from 1 to 65535",
    );
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "nbd+unix:///x"]),
        "the socket is missing",
    );
    fails_with(
        vm_cmd(&root).args(["create", "bad", "--disk", "/no/such/image"]),
        "no such image",
    );
    fails_with(
        vm_cmd(&root)
            .args(["create", "bad/name", "--disk"])
            .arg(&image),
        "invalid VM name",
    );
    fails_with(
        vm_cmd(&root)
            .args(["create", "bad", "--memory", "1M", "--disk"])
            .arg(&image),
        "at least 64 MiB",
    );
    // None of that left a bundle, finished or not.
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // An unreachable server: the VM never starts, the bundle is as it was.
    let url = format!("nbd+unix:///x?socket={}/nothing.sock", dir.path().display());
    let r = run_timeout(
        vm_cmd(&root).args(["create", "far", "--qemu", "/bin/true", "--disk", &url]),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    let config = std::fs::read(root.join("far/config.json")).unwrap();
    fails_with(
        vm_cmd(&root).args(["run", "far"]),
        "cannot reach the NBD server",
    );
    assert_eq!(std::fs::read(root.join("far/config.json")).unwrap(), config);
    fails_with(vm_cmd(&root).args(["suspend", "far"]), "is not running");
    fails_with(vm_cmd(&root).args(["stop", "far"]), "is not running");
    fails_with(
        vm_cmd(&root).args(["resume", "far"]),
        "cannot reach the NBD server",
    );

    // A server that answers but has no such export.
    let sock = dir.path().join("s.sock");
    let mut server = strata();
    server
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg(&image);
    let server = Launcher::spawn(server, dir.path().join("s.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///wrong?socket={}", sock.display());
    let r = run_timeout(
        vm_cmd(&root).args(["create", "wrong", "--qemu", "/bin/true", "--disk", &url]),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    fails_with(
        vm_cmd(&root).args(["run", "wrong"]),
        "has no export named \"wrong\"",
    );
    // A disk that is not a Strata server's or has no control API: no checkpoints.
    drop(server);

    // Hosts that cannot run the VM.
    let r = run_timeout(
        vm_cmd(&root)
            .args(["create", "mac", "--platform", "macos", "--disk"])
            .arg(&image),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    if cfg!(not(target_os = "macos")) {
        fails_with(
            vm_cmd(&root).args(["run", "mac"]),
            "macOS VMs run only on a Mac",
        );
        fails_with(
            vm_cmd(&root).args(["install", "mac", "--ipsw", "/x.ipsw"]),
            "installing macOS needs a Mac",
        );
    }
    let r = run_timeout(
        vm_cmd(&root)
            .args([
                "create",
                "noqemu",
                "--qemu",
                "qemu-system-nonesuch",
                "--disk",
            ])
            .arg(&image),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    fails_with(
        vm_cmd(&root).args(["run", "noqemu"]),
        "qemu-system-nonesuch is not installed",
    );
    // A QEMU that fails at once: reported, and the overlay made for the run is gone.
    let r = run_timeout(
        vm_cmd(&root)
            .args(["create", "badqemu", "--qemu", "/bin/false", "--disk"])
            .arg(&image),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    fails_with(
        vm_cmd(&root)
            .args(["run", "badqemu", "--serve"])
            .arg(&image),
        "QEMU exited at once",
    );
    assert!(!root.join("badqemu/disk.strata").exists());
    let config = std::fs::read_to_string(root.join("badqemu/config.json")).unwrap();
    assert!(!config.contains("disk.strata"), "{config}");
    let r = run_timeout(
        vm_cmd(&root).args(["run", "noqemu", "--discard"]),
        Duration::from_secs(30),
    );
    assert!(
        r.code() == Some(2) && r.stderr.contains("--serve"),
        "{}",
        r.report()
    );
    let r = run_timeout(vm_cmd(&root).arg("list"), Duration::from_secs(30));
    assert!(r.success(), "{}", r.report());
    for name in ["far", "wrong", "mac", "noqemu"] {
        assert!(r.stdout.contains(name), "{}", r.stdout);
    }
    // Resume without checkpoints.
    let r = run_timeout(
        vm_cmd(&root)
            .args([
                "create",
                "local",
                "--qemu",
                "/bin/true",
                "--overlay",
                "--disk",
            ])
            .arg(&image),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{}", r.report());
    fails_with(vm_cmd(&root).args(["resume", "local"]), "has no checkpoint");
    fails_with(
        vm_cmd(&root).args(["run", "local", "--serve"]).arg(&image),
        "has a disk overlay already",
    );
}
