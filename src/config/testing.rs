//! Shorthands for the configuration's unit tests: a file system with a fixed answer,
//! and functions that load a file's text and return the configuration or its problems.

pub(super) use std::path::Path;
pub(super) use std::time::Duration;

pub(super) use super::*;

/// Every path is a regular file except those listed.
pub(super) struct Fake(pub(super) Vec<(&'static str, FileKind)>);

impl Files for Fake {
    fn kind(&self, path: &Path) -> FileKind {
        self.0
            .iter()
            .find(|(p, _)| Path::new(p) == path)
            .map_or(FileKind::File, |(_, k)| k.clone())
    }
}

pub(super) const FILE: &str = "/etc/strata/strata.toml";

pub(super) fn parse(text: &str) -> Result<Config, ConfigErrors> {
    load(text, Path::new(FILE), &Overrides::default(), &Fake(vec![]))
}

pub(super) fn parse_ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("{e}"))
}

/// The messages of a configuration that must fail.
#[track_caller]
pub(super) fn errors_with(text: &str, flags: &Overrides, files: &Fake) -> Vec<String> {
    match load(text, Path::new(FILE), flags, files) {
        Ok(c) => panic!("should fail: {c:?}"),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

#[track_caller]
pub(super) fn errors(text: &str) -> Vec<String> {
    errors_with(text, &Overrides::default(), &Fake(vec![]))
}

/// The one problem of `text`, which must be exactly `expected`.
#[track_caller]
pub(super) fn fails(text: &str, expected: &str) {
    assert_eq!(errors(text), vec![expected.to_owned()], "for:\n{text}");
}

pub(super) const EXPORT: &str = "[[exports]]\nname = \"vm1\"\nimage = \"/tank/vm1.strata\"\n";
