//! The guest: a Debian kernel and a busybox initramfs made here.

use std::path::{Path, PathBuf};

use crate::support::is_ci;

use super::{MARKER, MARKER_OFFSET, TICK_OFFSET};

pub(super) struct Guest {
    pub(super) kernel: PathBuf,
    pub(super) initrd: PathBuf,
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

pub(super) fn build_guest(dir: &Path) -> Option<Guest> {
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
