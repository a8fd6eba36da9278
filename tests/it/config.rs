//! `strata serve --config`: every kind of configuration error as the command prints it
//! (file, line, column, field), `--check-config`, how flags and the file combine, and
//! the shipped example. The validation rules themselves are unit-tested in
//! `src/config/`; these tests check what an operator sees.

use std::path::{Path, PathBuf};

use crate::support::client::{Client, SIMPLE};
use crate::support::daemon::Daemon;
use crate::support::{CmdOutput, run, strata};
use strata::config::{self, FileKind, Files, LogFormat, Overrides, TlsMode};

/// A configuration file in a temporary directory, with a raw image `disk.raw` beside it.
struct Setup {
    dir: tempfile::TempDir,
    file: PathBuf,
}

fn setup(text: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let file = dir.path().join("strata.toml");
    std::fs::write(&file, text).unwrap();
    Setup { dir, file }
}

impl Setup {
    /// `strata serve --config FILE --check-config EXTRA...`
    fn check(&self, extra: &[&str]) -> CmdOutput {
        let mut cmd = strata();
        cmd.args(["serve", "--config"]).arg(&self.file);
        run(cmd.arg("--check-config").args(extra))
    }

    fn path(&self) -> String {
        self.file.display().to_string()
    }
}

/// `--check-config` on `text` must exit 78 and print `FILE:expected` (the location and
/// the rest of the message).
#[track_caller]
fn refused(text: &str, expected: &str) {
    let s = setup(text);
    let out = s.check(&[]);
    let want = format!("strata: {}:{expected}", s.path());
    assert_eq!(
        out.code(),
        Some(78),
        "exit status for:\n{text}\n{}",
        out.stderr
    );
    assert!(
        out.stderr.lines().any(|l| l == want),
        "expected the line\n  {want}\nfor:\n{text}\ngot:\n{}",
        out.stderr
    );
}

const DISK: &str = "[[exports]]\nname = \"disk\"\nimage = \"disk.raw\"\n";

#[test]
fn syntax_errors_give_line_and_column() {
    refused(
        "listen = [\"127.0.0.1:1\"\n",
        "1:24: unclosed array, expected `]`",
    );
    refused(
        "handshake_timeout = 5\nhandshake_timeout = 6\n",
        "2:1: duplicate key",
    );
    refused(
        "[tls\nmode = \"off\"\n",
        "1:5: unclosed table, expected `]`",
    );
}

#[test]
fn unknown_keys_are_refused() {
    refused(
        &format!("{DISK}read-only = true\n"),
        "4:1: exports[0].read-only: unknown field `read-only`, expected one of `name`, `image`, \
         `read_only`, `format`, `description`, `allow`, `allow_identity`, `require_tls`, \
         `inject_errors`",
    );
    refused(
        "[control]\nsocket = \"/run/c.sock\"\ntoken = \"x\"\n",
        "3:1: control.token: unknown field `token`, expected one of `socket`, `listen`, `token_file`",
    );
}

#[test]
fn wrong_types_and_missing_fields_are_refused() {
    refused(
        "max_connections = \"many\"\n",
        "1:19: max_connections: invalid type: string \"many\", expected i64",
    );
    refused(
        &format!("{DISK}read_only = 1\n"),
        "4:13: exports[0].read_only: invalid type: integer `1`, expected a boolean",
    );
    refused(
        &format!("{DISK}[[exports]]\nimage = \"disk.raw\"\n"),
        "4:1: exports[1]: missing field `name`",
    );
    refused(
        "[tls]\nmode = \"sometimes\"\n",
        "2:8: tls.mode: unknown variant `sometimes`, expected one of `off`, `optional`, `require`",
    );
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    refused(
        &format!("{DISK}allow = [\"10.0.0.0/8\", \"10.1.0.0/8\"]\n"),
        "4:24: exports[0].allow[1]: invalid network \"10.1.0.0/8\": bits are set past the \
         prefix; the network is 10.0.0.0/8 (expected ADDR/PREFIX, e.g. 10.0.0.0/8 or fd00::/8)",
    );
    refused(
        "[[exports]]\nname = \"m\"\nimage = \"memory:12Q\"\n",
        "3:9: exports[0].image: invalid size \"12Q\": expected a number with an optional \
         K/M/G/T suffix",
    );
    refused(
        &format!("{DISK}[[exports]]\nname = \"disk\"\nimage = \"memory:1M\"\n"),
        "5:8: exports[1].name: \"disk\" is the name of exports[0] already",
    );
    refused(
        "[[exports]]\nname = \"vm 1\"\nimage = \"memory:1M\"\n",
        "2:8: exports[0].name: invalid export name \"vm 1\": use 1 to 64 ASCII letters, \
         digits, '.', '_', '-' and '@', not starting with '.' or '-'",
    );
    refused(
        "handshake_timeout = 0\n",
        "1:21: handshake_timeout: must be at least 1 second",
    );
    refused(
        "listen = [\"127.0.0.1:10809\", \"somewhere\"]\n",
        "1:30: listen[1]: invalid listen address \"somewhere\": expected HOST:PORT, [V6]:PORT \
         or unix:PATH",
    );
    refused(
        "[log]\nlevel = \"chatty\"\n",
        "2:9: log.level: \"chatty\" is not a level: use off, error, warn, info, debug or trace, \
         or directives such as \"info,strata::server=debug\"",
    );
}

#[test]
fn log_filters_are_read_as_the_logger_reads_them() {
    let s = setup(&format!(
        "[log]\nlevel = \"info,strata::server[session{{peer}}]=trace\"\n{DISK}"
    ));
    // A filter with a span and a field.
    s.check(&[]).assert_success();
    refused(
        "[log]\nlevel = \"info,strata[session=trace\"\n",
        "2:9: log.level: \"strata[session=trace\" is not a valid directive (invalid filter \
         directive): write LEVEL, TARGET=LEVEL or TARGET[SPAN{FIELD}]=LEVEL, such as \
         \"strata::server=debug\"",
    );
}

#[test]
fn missing_files_are_refused_where_they_are_named() {
    let s = setup("[[exports]]\nname = \"vm\"\nimage = \"/nonexistent/vm.strata\"\n");
    s.check(&[]).assert_code(78).assert_stderr(&[&format!(
        "{}:3:9: exports[0].image: file /nonexistent/vm.strata does not exist",
        s.path()
    )]);
    // Relative paths are looked up beside the file.
    let s = setup("[tls]\ncert = \"cert.pem\"\nkey = \"disk.raw\"\n");
    let out = s.check(&[]).assert_code(78);
    let want = format!(
        "strata: {}:2:8: tls.cert: file {}/cert.pem does not exist",
        s.path(),
        s.dir.path().display()
    );
    assert!(
        out.stderr.lines().any(|l| l == want),
        "want {want}\n{}",
        out.stderr
    );
}

#[test]
fn contradictions_are_refused() {
    refused(
        "[control]\nlisten = \"127.0.0.1:10810\"\n",
        "2:10: control.listen: the control API on TCP needs a bearer token: set control.token_file",
    );
    refused(
        "[tls]\nmode = \"require\"\n",
        "2:8: tls.mode: tls.mode = \"require\" needs tls.cert and tls.key",
    );
    refused(
        &format!("{DISK}require_tls = true\n"),
        "4:15: exports[0].require_tls: needs TLS on the server: set tls.cert and tls.key",
    );
}

#[test]
fn every_problem_is_printed() {
    let s = setup(
        "max_connections = 0\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\nallow = [\"x\"]\n\
         [[exports]]\nname = \"a\"\nimage = \"nothing.raw\"\n",
    );
    let out = s.check(&[]).assert_code(78);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stderr);
    for (line, field) in lines.iter().zip([
        "max_connections",
        "exports[0].allow[0]",
        "exports[1].name",
        "exports[1].image",
    ]) {
        assert!(line.contains(&format!(": {field}: ")), "{line}");
    }
}

#[test]
fn check_config_accepts_a_valid_file() {
    let s = setup(&format!(
        "{DISK}[[exports]]\nname = \"m\"\nimage = \"memory:1G\"\n"
    ));
    let out = s.check(&[]).assert_success();
    assert_eq!(out.stdout, format!("{}: valid (2 exports)\n", s.path()));
}

#[test]
fn flags_that_describe_exports_are_refused_with_a_file() {
    let s = setup(DISK);
    for extra in [
        &["memory:1M"][..],
        &["--export", "x=memory:1M"],
        &["--read-only"],
        &["--allow", "127.0.0.1"],
        &["--description", "d"],
    ] {
        s.check(extra)
            .assert_code(2)
            .assert_stderr(&["cannot be combined with --config"]);
    }
}

#[test]
fn flags_win_over_the_file_or_are_refused_when_they_contradict_it() {
    // The file listens on a Unix socket; --listen replaces it.
    let s = setup(&format!("listen = [\"unix:nbd.sock\"]\n{DISK}"));
    let mut server = Daemon::serve_config(&s.file, &["--listen", "127.0.0.1:0"]);
    let addr = server.tcp_addr();
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("disk", SIMPLE).unwrap();
    assert!(
        !s.dir.path().join("nbd.sock").exists(),
        "the file's address was replaced by the flag's"
    );
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success());

    // --tls off contradicts a certificate in the file.
    let s = setup("[tls]\ncert = \"disk.raw\"\nkey = \"disk.raw\"\n");
    s.check(&["--tls", "off"])
        .assert_code(78)
        .assert_stderr(&["--tls: --tls off contradicts tls.cert: drop one of them"]);
}

#[test]
fn an_unreadable_file_is_a_configuration_error() {
    run(strata().args(["serve", "--config", "/nonexistent/strata.toml"]))
        .assert_code(78)
        .assert_stderr(&["cannot read /nonexistent/strata.toml"]);
}

/// Every file the example names exists, as far as validation is concerned.
struct Everything;

impl Files for Everything {
    fn kind(&self, _: &Path) -> FileKind {
        FileKind::File
    }
}

#[test]
fn the_example_configuration_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/strata.toml.example");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = config::load(&text, &path, &Overrides::default(), &Everything)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.server.listen.len(), 3);
    assert_eq!(c.server.tls.mode, TlsMode::Optional);
    assert!(c.server.tls.client_ca.is_some());
    assert_eq!(c.server.log.format, LogFormat::Text);
    assert!(c.server.control.socket.is_some());
    let names: Vec<&str> = c.exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["vm1", "vm2", "debian-13", "backup", "scratch"]);
    let backup = &c.exports[3];
    assert!(backup.access.tls_required());
    assert_eq!(backup.access.identities(), ["vmhost1", "vmhost2"]);
    assert!(c.exports[2].read_only);
    assert_eq!(c.exports[0].access.networks().len(), 3, "inherits [access]");
}

#[test]
fn limits_metrics_and_fault_rules_are_read_and_checked() {
    let text = format!(
        "metrics = \"127.0.0.1:0\"\n\n[limits]\nmax_connections_per_client = 4\nidle_timeout = 600\n\
         max_in_flight = \"32M\"\nmax_in_flight_total = \"256M\"\n\n{DISK}\
         inject_errors = [\"write:EIO:offset=1M,length=64K\"]\n"
    );
    let s = setup(&text);
    let c = config::load(&text, &s.file, &Overrides::default(), &config::SystemFiles).unwrap();
    let l = &c.server.limits;
    assert_eq!(l.max_connections_per_client, 4);
    assert_eq!(l.idle_timeout, Some(std::time::Duration::from_secs(600)));
    assert_eq!(l.max_in_flight, 32 << 20);
    assert_eq!(l.max_in_flight_total, Some(256 << 20));
    assert_eq!(
        c.server
            .metrics
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("127.0.0.1:0")
    );
    assert_eq!(c.exports[0].faults, ["write:EIO:offset=1M,length=64K"]);
    // Flags win over the file.
    let flags = Overrides {
        idle_timeout: Some(0),
        max_in_flight_total: Some(0),
        ..Overrides::default()
    };
    let c = config::load(&text, &s.file, &flags, &config::SystemFiles).unwrap();
    assert_eq!(c.server.limits.idle_timeout, None);
    assert_eq!(c.server.limits.max_in_flight_total, None);

    refused(
        "[limits]\nmax_in_flight = \"1M\"\n",
        "2:17: limits.max_in_flight: must be at least 32M, the largest request",
    );
    refused(
        "[limits]\nmax_in_flight_total = \"lots\"\n",
        "2:23: limits.max_in_flight_total: invalid size \"lots\": expected a number with \
         an optional K/M/G/T suffix",
    );
    refused(
        "[limits]\nmax_in_flight_total = \"1M\"\n",
        "2:23: limits.max_in_flight_total: must be 0 (no limit) or at least 32M, the largest \
         request",
    );
    refused(
        "[limits]\nidle_timeout = -1\n",
        "2:16: limits.idle_timeout: must be 0 (never) or a number of seconds",
    );
    refused(
        "metrics = \"nowhere\"\n",
        "1:11: metrics: invalid listen address \"nowhere\": expected HOST:PORT, [V6]:PORT \
         or unix:PATH",
    );
    refused(
        &format!("{DISK}inject_errors = [\"write:EBOGUS\"]\n"),
        "4:18: exports[0].inject_errors[0]: invalid fault rule \"write:EBOGUS\": unknown \
         error \"EBOGUS\"; one of EIO, ENOSPC, EPERM, EINVAL, ENOMEM, ENOTSUP, EOVERFLOW, \
         ESHUTDOWN (expected OPS:ERROR[:CONDITION,...], e.g. write:EIO:offset=1M,length=64K)",
    );
}
