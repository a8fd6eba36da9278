//! `[[exports]]`: names, images, formats, access rules and injected faults. The command
//! line's exports are checked where they are parsed; both follow the same name rule.

use std::collections::BTreeMap;

use super::access::rules;
use super::files::{FileKind, Files};
use crate::access::Access;
use crate::config::error::Problems;
use crate::config::file::{RawConfig, RawExport, Source};
use crate::config::model::{ExportAt, ExportDef, ServerSettings};
use crate::names;

pub(in crate::config) fn exports(
    raw: &RawConfig,
    source: &Source<'_>,
    server: Option<&ServerSettings>,
    files: &dyn Files,
    problems: &mut Problems,
) -> Vec<ExportDef> {
    let defaults = server.map_or_else(Access::open, |s| s.api_access.clone());
    let mut out: Vec<ExportDef> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in raw.exports.iter().enumerate() {
        let field = format!("exports[{i}]");
        let e = entry.get_ref();
        let name = e.name.get_ref();
        if name.is_empty() {
            problems.add(source.at_of(&e.name), format!("{field}.name"), "is empty");
        } else if let Err(why) = names::EXPORT.check(name) {
            problems.add(
                source.at_of(&e.name),
                format!("{field}.name"),
                why.to_string(),
            );
        } else if let Some(first) = names.get(name) {
            problems.add(
                source.at_of(&e.name),
                format!("{field}.name"),
                format!("{name:?} is the name of exports[{first}] already"),
            );
        } else {
            names.insert(name.clone(), i);
        }
        let image = export_image(e, &field, source, files, problems);
        let format = e.format.as_ref().and_then(|f| f.get_ref().forced());
        if format.is_some() && image.starts_with("memory:") {
            problems.add(
                e.format.as_ref().and_then(|f| source.at_of(f)),
                format!("{field}.format"),
                "applies to files; a memory: disk has no format",
            );
        }
        let (own, set) = rules(
            e.allow.as_ref(),
            e.allow_identity.as_ref(),
            e.require_tls.as_ref(),
            &field,
            source,
            problems,
        );
        // Each part an export sets replaces that part of [access]; the rest is inherited.
        let access = Access::new(
            if set[0] {
                own.networks().to_vec()
            } else {
                defaults.networks().to_vec()
            },
            if set[1] {
                own.identities().to_vec()
            } else {
                defaults.identities().to_vec()
            },
        )
        .with_tls_required(if set[2] {
            own.tls_required()
        } else {
            defaults.tls_required()
        });
        let at = ExportAt {
            field: field.clone(),
            require_tls: e
                .require_tls
                .as_ref()
                .filter(|r| *r.get_ref())
                .and_then(|r| source.at_of(r)),
            allow_identity: e
                .allow_identity
                .as_ref()
                .filter(|l| !l.get_ref().is_empty())
                .and_then(|l| source.at_of(l)),
        };
        let mut faults = Vec::new();
        for (j, rule) in e.inject_errors.iter().enumerate() {
            match crate::backend::parse_fault_rule(rule.get_ref()) {
                Ok(_) => faults.push(rule.get_ref().clone()),
                Err(err) => problems.add(
                    source.at_of(rule),
                    format!("{field}.inject_errors[{j}]"),
                    err.to_string(),
                ),
            }
        }
        out.push(ExportDef {
            name: name.clone(),
            image,
            read_only: e.read_only,
            format,
            description: e.description.clone(),
            access,
            faults,
            at,
        });
    }
    out
}

/// The image spec of an export: `memory:SIZE` with a valid size, or a path resolved
/// against the file's directory.
fn export_image(
    e: &RawExport,
    field: &str,
    source: &Source<'_>,
    files: &dyn Files,
    problems: &mut Problems,
) -> String {
    let text = e.image.get_ref();
    let at = source.at_of(&e.image);
    if text.is_empty() {
        problems.add(at, format!("{field}.image"), "is empty");
        return String::new();
    }
    if let Some(size) = text.strip_prefix("memory:") {
        match crate::size::parse_size(size) {
            Ok(0) => problems.add(
                at,
                format!("{field}.image"),
                "a memory: disk needs a size above 0",
            ),
            Ok(_) => {}
            Err(e) => problems.add(at, format!("{field}.image"), e.to_string()),
        }
        return text.clone();
    }
    let path = source.path(text);
    let problem = match files.kind(&path) {
        FileKind::File | FileKind::BlockDevice => None,
        FileKind::Missing => Some(format!("file {} does not exist", path.display())),
        FileKind::Directory => Some(format!(
            "{} is a directory, not an image, raw file or block device",
            path.display()
        )),
        FileKind::Other => Some(format!(
            "{} is not a regular file or block device",
            path.display()
        )),
        FileKind::Unreadable(why) => Some(format!("cannot look at {}: {why}", path.display())),
    };
    if let Some(problem) = problem {
        problems.add(at, format!("{field}.image"), problem);
    }
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn bad_exports_name_the_export() {
        let text = format!("{EXPORT}allow = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:24: exports[0].allow[1]: invalid network \"10.1.2.3/8\""
            ),
            "{e:?}"
        );
        assert!(e[0].contains("10.0.0.0/8"), "{e:?}");
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:lots\"\n",
            "/etc/strata/strata.toml:3:9: exports[0].image: invalid size \"lots\": expected a number \
             with an optional K/M/G/T suffix",
        );
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:0\"\n",
            "/etc/strata/strata.toml:3:9: exports[0].image: a memory: disk needs a size above 0",
        );
        fails(
            "[[exports]]\nname = \"m\"\nimage = \"memory:1G\"\nformat = \"raw\"\n",
            "/etc/strata/strata.toml:4:10: exports[0].format: applies to files; a memory: disk has no format",
        );
        fails(
            "[[exports]]\nname = \"\"\nimage = \"memory:1G\"\n",
            "/etc/strata/strata.toml:2:8: exports[0].name: is empty",
        );
        fails(
            "[[exports]]\nname = \"a/b\"\nimage = \"memory:1G\"\n",
            "/etc/strata/strata.toml:2:8: exports[0].name: invalid export name \"a/b\": use 1 \
             to 64 ASCII letters, digits, '.', '_', '-' and '@', not starting with '.' or '-'",
        );
        let text = format!("{EXPORT}\n[[exports]]\nname = \"vm1\"\nimage = \"memory:1M\"\n");
        fails(
            &text,
            "/etc/strata/strata.toml:6:8: exports[1].name: \"vm1\" is the name of exports[0] already",
        );
        let text = format!("{EXPORT}allow_identity = [\"\"]\n");
        assert_eq!(
            errors(&text)[0],
            "/etc/strata/strata.toml:4:19: exports[0].allow_identity[0]: is empty"
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let c = load(
            EXPORT.replace("/tank/", "").as_str(),
            Path::new("strata.toml"),
            &Overrides::default(),
            &Fake(vec![]),
        )
        .unwrap();
        assert_eq!(c.exports[0].image, "vm1.strata");
        let c = load(
            EXPORT.replace("/tank/", "").as_str(),
            Path::new("conf/strata.toml"),
            &Overrides::default(),
            &Fake(vec![]),
        )
        .unwrap();
        assert_eq!(c.exports[0].image, "conf/vm1.strata");
    }
}
