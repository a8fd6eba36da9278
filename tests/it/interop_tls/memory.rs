//! Files in memory under TLS: a raw file and a Strata image truncated under a TLS reader.

use std::fs;

use crate::support::{
    CMD_TIMEOUT, MIB, file, memory_dir, nbdinfo, nbdsh_script, require_tools, strata_at_ok,
    strata_only, write_mixed_image,
};

use super::{Creds, Pki, nbds_uri};

/// Reads the whole export over TLS, in a loop, until the file `TRUNCATED` exists and one
/// more pass is done. Every read either fails or returns the bytes read before the
/// truncation, or, when `ZEROES` is set, zeroes (a Strata image reads clusters past the
/// end of its file as zeroes); prints `reads=N errors=M`.
const TLS_READ_LOOP: &str = r#"
h.set_tls(nbd.TLS_REQUIRE)
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
size = h.get_size()
step = 256 * 1024
before = [h.pread(step, off) for off in range(0, size, step)]
open(os.environ["READY"], "w").close()
reads = errors = 0
last_pass = False
while True:
    if os.path.exists(os.environ["TRUNCATED"]):
        last_pass = True
    for i, off in enumerate(range(0, size, step)):
        try:
            data = h.pread(step, off)
        except nbd.Error:
            errors += 1
            continue
        reads += 1
        zeroes = os.environ.get("ZEROES") and data == bytes(len(data))
        assert data == before[i] or zeroes, f"a read at {off} returned new bytes"
    if last_pass:
        break
print(f"reads={reads} errors={errors}")
"#;

/// A file in memory (where reads may point into a mapping of it) truncated by another
/// process while a TLS client reads it: TLS encrypts replies in user space, which must
/// never touch such a mapping (a fault there kills the server with SIGBUS). The server
/// survives and keeps serving; the client sees errors or the old bytes.
#[test]
fn a_file_in_memory_truncated_under_a_tls_reader() {
    if !strata_only("TLS options") || !require_tools(&["nbdsh", "nbdinfo"]) {
        return;
    }
    let Some(shm) = memory_dir() else {
        return;
    };
    let pki = Pki::new();
    for format in ["raw", "strata"] {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let raw = dir.path().join("disk.raw");
        write_mixed_image(&raw, 7, 4 * MIB as usize);
        let path = if format == "raw" {
            raw
        } else {
            let image = dir.path().join("disk.strata");
            strata_at_ok(dir.path(), &["convert", "disk.raw", "disk.strata"]);
            image
        };
        let mut server = file(&path)
            .args(["--format", format])
            .args(pki.server_args())
            .start();
        let ready = dir.path().join("ready");
        let truncated = dir.path().join("truncated");
        let uri = nbds_uri(&server, server.export_name(), &pki, Creds::Anonymous);
        let reader = std::thread::spawn({
            let (ready, truncated) = (ready.clone(), truncated.clone());
            move || {
                nbdsh_script(
                    &uri,
                    &[
                        ("READY", ready.display().to_string()),
                        ("TRUNCATED", truncated.display().to_string()),
                        ("ZEROES", if format == "strata" { "1" } else { "" }.into()),
                    ],
                    TLS_READ_LOOP,
                )
            }
        });
        let deadline = std::time::Instant::now() + CMD_TIMEOUT;
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline && !reader.is_finished(),
                "{format}: the TLS reader never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        fs::write(&truncated, "").unwrap();
        let out = reader.join().unwrap();
        assert!(out.stdout.contains("reads="), "{format}: {}", out.report());

        // Still serving: a new client is answered, and the server stops cleanly.
        let info = nbdinfo(&["--size", &server.uri()]).assert_success();
        assert!(
            info.stdout.trim().parse::<u64>().is_ok(),
            "{}",
            info.report()
        );
        server.stop_cleanly_with(libc::SIGTERM);
        assert!(
            !server.log().contains("panicked"),
            "{format}: {}",
            server.log()
        );
    }
}
