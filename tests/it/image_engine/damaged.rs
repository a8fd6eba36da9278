//! Bad input: truncated files, damaged headers and map pages, other tools' images, and
//! missing, changed or looping backing files are refused with an error that names the
//! file and the problem; a single torn or damaged copy of a page is survived, by reading
//! the other.

use std::path::{Path, PathBuf};

use strata::ErrorKind;
use strata::image::format::{self, Header};
use strata::image::{self, CreateOptions, layer};
use tempfile::TempDir;

use crate::support::{images_open, scratch, spawn};

use super::{create, open_rw, pattern, read_at, refused};

/// Opens `path` both ways the command line does, expecting the same refusal.
#[track_caller]
fn refused_both_ways(path: &Path, kind: ErrorKind, file: &Path, words: &[&str]) {
    refused(image::open(path, false), kind, file, words);
    refused(
        strata::backend::open(path.to_str().unwrap(), false),
        kind,
        file,
        words,
    );
}

/// A copy of `src` at `dst` with `edit` applied to its bytes.
fn edited(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    std::fs::write(dst, &bytes).unwrap();
    dst.to_path_buf()
}

/// A new image `disk.strata` in a scratch directory, of `size` bytes with `cluster`-byte
/// clusters (the default for `None`), and each of `writes`, `(seed, offset, length)`,
/// committed in turn. The caller holds `images_open()`.
fn written_image(
    size: u64,
    cluster: Option<u64>,
    writes: &[(u64, u64, u64)],
) -> (TempDir, PathBuf) {
    let (dir, path) = scratch("disk.strata");
    create(&path, Some(size), cluster, None);
    let chain = open_rw(&path);
    for &(seed, at, len) in writes {
        chain.write(at, &pattern(seed, at, len), true).unwrap();
    }
    (dir, path)
}

/// The metadata of the image at `path`.
fn scan_file(path: &Path) -> layer::Scan {
    let storage = strata::image::storage::FileStorage::open_unlocked(path).unwrap();
    layer::scan(&storage, path).unwrap()
}

#[test]
fn truncated_images_are_refused() {
    const CS: u64 = 4096;
    let _images = images_open();
    // Three clusters, then their map page pair, then one more cluster.
    let (dir, path) = written_image(4 << 20, Some(CS), &[(1, 0, 3 * CS), (2, 10 * CS, CS)]);
    let scan = scan_file(&path);
    let pair = scan.pairs[&0].offset;
    let last = std::fs::metadata(&path).unwrap().len() - CS;
    // Copies cut short at four places, each named for the part the cut falls in.
    let cuts: [(&str, u64, &[&str]); 4] = [
        ("header.strata", 5000, &["truncated: 5000 bytes", "header"]),
        (
            "table.strata",
            scan.header.data_start() - 100,
            &["corrupt image", "truncated", "map table"],
        ),
        (
            "data.strata",
            last,
            &["corrupt image", "cluster 10", "past the end of the file"],
        ),
        (
            "map.strata",
            pair + 100,
            &["corrupt image", "map page 0", "outside the file"],
        ),
    ];
    for (name, len, words) in cuts {
        let cut = edited(&path, &dir.path().join(name), |b| b.truncate(len as usize));
        refused_both_ways(&cut, ErrorKind::Corrupt, &cut, words);
    }
}

#[test]
fn damaged_headers_are_refused_and_one_torn_copy_is_survived() {
    let _images = images_open();
    let (dir, path) = written_image(1 << 20, None, &[(1, 0, 5000)]);
    // A second header version (an unknown compatible feature bit: kept, ignored), in
    // slot 1.
    {
        let (mut chain, _) = image::open_standalone(&path, true, false).unwrap();
        let mut h = chain.header().clone();
        h.compatible = 1 << 7;
        chain.rewrite_header(h).unwrap();
    }
    let at = |name: &str| dir.path().join(name);
    let flip = |b: &mut Vec<u8>, i: usize| b[i] ^= 0x20;

    let both = edited(&path, &at("both.strata"), |b| {
        flip(b, 30);
        flip(b, 4096 + 30);
    });
    refused_both_ways(
        &both,
        ErrorKind::Corrupt,
        &both,
        &["unreadable header", "checksum mismatch"],
    );

    // One copy bad: the other is used, be it the newer or the older.
    let newer_bad = edited(&path, &at("newer.strata"), |b| flip(b, 4096 + 30));
    let torn = edited(&path, &at("torn.strata"), |b| b[4096 + 3584..8192].fill(0));
    for (p, sequence) in [(&newer_bad, 1), (&torn, 1)] {
        let chain = image::open(p, false).unwrap();
        assert_eq!(chain.header().sequence, sequence, "{}", p.display());
        assert_eq!(chain.header().compatible, 0);
        assert!(read_at(&chain, 0, 5000) == pattern(1, 0, 5000));
    }
    let older_bad = edited(&path, &at("older.strata"), |b| flip(b, 30));
    let chain = image::open(&older_bad, false).unwrap();
    assert_eq!(chain.header().sequence, 2);
    assert_eq!(chain.header().compatible, 1 << 7);

    // A newer header version, intact but with values this version cannot read, written
    // on purpose (by a later version): refused, not passed over for the older one.
    let h = scan_file(&path).header;
    let features = edited(&path, &at("features.strata"), |b| {
        let mut v = h.clone();
        v.incompatible = 1 << 3;
        v.sequence = 9;
        b[..4096].copy_from_slice(&format::encode_header(&v)[..]);
    });
    refused_both_ways(
        &features,
        ErrorKind::Corrupt,
        &features,
        &["unknown incompatible feature bits 0x8"],
    );
    let version = edited(&path, &at("version.strata"), |b| {
        let mut v = h.clone();
        v.sequence = 9;
        let mut page = format::encode_header(&v);
        page[8] = 2;
        let crc = crc32fast::hash(&page[..4092]);
        page[4092..].copy_from_slice(&crc.to_le_bytes());
        b[..4096].copy_from_slice(&page[..]);
    });
    refused_both_ways(
        &version,
        ErrorKind::Corrupt,
        &version,
        &["format version 2 is not supported"],
    );
}

#[test]
fn damaged_map_pages_are_refused_and_one_torn_copy_is_survived() {
    const CS: u64 = 4096;
    let _images = images_open();
    // Three commits: map page 0 twice (its second version adds cluster 1), then page 1,
    // which rewrites the L1 page.
    let writes = [(1, 0, CS), (2, CS, CS), (3, 600 * CS, CS)];
    let (dir, path) = written_image(4 << 20, Some(CS), &writes);
    let scan = scan_file(&path);
    let slot = |offset: u64, newest: usize, which: usize| {
        (offset + [newest, 1 - newest][which] as u64 * 4096) as usize
    };
    let l1 = scan.l1[0];
    let (l1_new, l1_old) = (slot(l1.offset, l1.newest, 0), slot(l1.offset, l1.newest, 1));
    let p0 = scan.pairs[&0];
    let (p0_new, p0_old) = (slot(p0.offset, p0.newest, 0), slot(p0.offset, p0.newest, 1));
    let p1 = scan.pairs[&1];
    let p1_new = slot(p1.offset, p1.newest, 0);
    let at = |name: &str| dir.path().join(name);
    let flip = |b: &mut Vec<u8>, i: usize| b[i + 8] ^= 0x01;
    let reads = |p: &Path, present: &[(u64, u64)], absent: &[u64]| {
        let chain = image::open(p, false).unwrap_or_else(|e| panic!("{e}"));
        for &(seed, c) in present {
            assert!(
                read_at(&chain, c * CS, CS) == pattern(seed, c * CS, CS),
                "cluster {c}"
            );
        }
        for &c in absent {
            assert!(
                read_at(&chain, c * CS, CS).iter().all(|&b| b == 0),
                "cluster {c}"
            );
        }
    };

    let l1_both = edited(&path, &at("l1.strata"), |b| {
        flip(b, l1_new);
        flip(b, l1_old);
    });
    refused_both_ways(
        &l1_both,
        ErrorKind::Corrupt,
        &l1_both,
        &[
            "corrupt image",
            "L1 page 0",
            "both copies unreadable",
            "checksum",
        ],
    );
    // The newest L1 version torn: the one before knows only page 0.
    let l1_torn = edited(&path, &at("l1-torn.strata"), |b| flip(b, l1_new));
    reads(&l1_torn, &[(1, 0), (2, 1)], &[600]);

    let l2_both = edited(&path, &at("l2.strata"), |b| {
        flip(b, p0_new);
        flip(b, p0_old);
    });
    refused_both_ways(
        &l2_both,
        ErrorKind::Corrupt,
        &l2_both,
        &["corrupt image", "map page 0", "both copies unreadable"],
    );
    // The newest version of page 0 torn: the one before maps cluster 0 only.
    let l2_torn = edited(&path, &at("l2-torn.strata"), |b| {
        b[p0_new + 3584..p0_new + 4096].fill(0);
    });
    reads(&l2_torn, &[(1, 0), (3, 600)], &[1]);

    // A valid page in the wrong place is not taken for the page that belongs there.
    let misplaced = edited(&path, &at("misplaced.strata"), |b| {
        let page1 = b[p1_new..p1_new + 4096].to_vec();
        b[p0_new..p0_new + 4096].copy_from_slice(&page1);
        b[p0_old..p0_old + 4096].copy_from_slice(&page1);
    });
    refused_both_ways(
        &misplaced,
        ErrorKind::Corrupt,
        &misplaced,
        &["map page 0", "page tag 0x20000001 where 0x20000000 belongs"],
    );
}

/// A map page copy claiming the last possible sequence number cannot be followed by a
/// newer one: it is not taken for the current version, or every later commit of the
/// page would be written under it and lost at the next open.
#[test]
fn a_page_whose_sequence_number_cannot_be_followed_is_not_current() {
    const CS: u64 = 4096;
    let _images = images_open();
    let (_dir, path) = written_image(1 << 20, Some(CS), &[(1, 0, CS)]);
    let scan = scan_file(&path);
    let pair = scan.pairs[&0];
    // The pair's unused slot gets the same entries under sequence u64::MAX.
    let mut entries = [0u64; format::ENTRIES];
    entries[0] = format::Entry::Data(scan.used[1].0).encode();
    let other = pair.offset as usize + (1 - pair.newest) * 4096;
    edited(&path, &path, |b| {
        let page = format::encode_page(format::PageKind::L2, 0, u64::MAX, &entries);
        b[other..other + 4096].copy_from_slice(&page[..]);
    });
    {
        let chain = open_rw(&path);
        assert!(read_at(&chain, 0, CS) == pattern(1, 0, CS));
        chain.write(CS, &pattern(2, CS, CS), true).unwrap();
    }
    let chain = image::open(&path, false).unwrap();
    assert!(read_at(&chain, 0, CS) == pattern(1, 0, CS));
    assert!(
        read_at(&chain, CS, CS) == pattern(2, CS, CS),
        "the commit was lost"
    );
    drop(chain);

    // The same for the header, whose rewrite follows its sequence number too.
    let h = scan_file(&path).header;
    edited(&path, &path, |b| {
        let v = Header {
            sequence: u64::MAX,
            ..h.clone()
        };
        b[4096..8192].copy_from_slice(&format::encode_header(&v)[..]);
    });
    refused_both_ways(
        &path,
        ErrorKind::Corrupt,
        &path,
        &["unreadable header", "invalid sequence"],
    );
}

/// An image made by another tool: qemu-img's qcow2 when qemu-img is installed.
fn foreign_image(dir: &Path) -> (PathBuf, &'static str) {
    let path = dir.join("disk.qcow2");
    let mut qemu_img = std::process::Command::new("qemu-img");
    qemu_img
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M");
    let made = spawn(&mut qemu_img)
        .and_then(|mut c| c.wait())
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("qemu-img is not installed: using a hand-made qcow2 header");
        let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
        bytes.resize(65536, 0);
        std::fs::write(&path, bytes).unwrap();
    }
    (path, "qcow2")
}

#[test]
fn foreign_images_are_refused_as_disks_and_as_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let (path, name) = foreign_image(dir.path());
    let _images = images_open();
    for read_only in [false, true] {
        refused(
            strata::backend::open(path.to_str().unwrap(), read_only),
            ErrorKind::InvalidInput,
            &path,
            &[&format!("this is a {name} image"), "convert it first"],
        );
    }
    let vhdx = edited(&path, &dir.path().join("disk.vhdx"), |b| {
        b[..8].copy_from_slice(b"vhdxfile");
    });
    refused(
        strata::backend::open(vhdx.to_str().unwrap(), true),
        ErrorKind::InvalidInput,
        &vhdx,
        &["this is a vhdx image"],
    );
    let overlay = dir.path().join("over.strata");
    let r = image::create(
        &overlay,
        &CreateOptions {
            backing: Some(path.clone()),
            ..CreateOptions::default()
        },
    );
    refused(r, ErrorKind::InvalidInput, &path, &["qcow2"]);
    assert!(!overlay.exists());
}

#[test]
fn backing_file_problems_are_refused_naming_the_backing_file() {
    const MIB: u64 = 1 << 20;
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let raw = |name: &str, len: u64| {
        std::fs::write(p(name), pattern(1, 0, len)).unwrap();
        p(name)
    };
    let overlay = |name: &str, base: &Path| {
        create(&p(name), None, None, Some(base));
        p(name)
    };

    // Missing.
    let gone = raw("gone.raw", MIB);
    let over_gone = overlay("over-gone.strata", &gone);
    std::fs::remove_file(&gone).unwrap();
    refused_both_ways(
        &over_gone,
        ErrorKind::NotFound,
        &gone,
        &["backing file", "cannot be opened", "No such file"],
    );

    // Resized.
    let resized = raw("resized.raw", MIB + 3);
    let over_resized = overlay("over-resized.strata", &resized);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&resized)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    refused_both_ways(
        &over_resized,
        ErrorKind::InvalidInput,
        &resized,
        &[
            "backing file has changed",
            "size was 1048579 and is now 2097152",
        ],
    );

    // Changed where the fingerprint looks: in its first 64 KiB, and at one of the blocks
    // sampled across it.
    let len = 4 * MIB;
    let step = (len - 4096) / 63;
    for (i, at) in [(0, 1000), (1, 10 * step + 7)] {
        let changed = raw(&format!("changed{i}.raw"), len);
        let over_changed = overlay(&format!("over-changed{i}.strata"), &changed);
        edited(&changed, &changed, |b| b[at as usize] ^= 0xff);
        refused_both_ways(
            &over_changed,
            ErrorKind::InvalidInput,
            &changed,
            &["backing file has changed", "contents no longer match"],
        );
    }

    // Replaced by another image of the same size.
    let base = p("base.strata");
    create(&base, Some(MIB), None, None);
    let over_base = overlay("over-base.strata", &base);
    let expected = strata::image::tools::header(&over_base)
        .unwrap()
        .backing
        .unwrap();
    std::fs::remove_file(&base).unwrap();
    create(&base, Some(MIB), None, None);
    let now = strata::image::tools::header(&base).unwrap().image_id;
    refused_both_ways(
        &over_base,
        ErrorKind::InvalidInput,
        &base,
        &[
            "backing file has changed",
            &format!(
                "it is image {} where image {} was expected",
                image::format_id(&now),
                image::format_id(&expected.identity)
            ),
        ],
    );

    // Replaced by a raw file.
    std::fs::remove_file(&base).unwrap();
    raw("base.strata", MIB);
    refused_both_ways(
        &over_base,
        ErrorKind::InvalidInput,
        &base,
        &["it was a Strata image and is now a Raw one"],
    );

    // A chain that comes back to where it started.
    let a = p("a.strata");
    create(&a, Some(MIB), None, None);
    let b = overlay("b.strata", &a);
    // `strata rebase` refuses to close a loop, so write the header directly.
    {
        let b_header = strata::image::tools::header(&b).unwrap();
        let backing = strata::image::format::Backing {
            kind: strata::image::format::BackingKind::Strata,
            path: "b.strata".to_owned(),
            size: b_header.virtual_size,
            identity: b_header.image_id,
        };
        let (mut chain, _) = strata::image::open_standalone(&a, true, false).unwrap();
        let mut header = chain.header().clone();
        header.backing = Some(backing);
        chain.rewrite_header(header).unwrap();
    }
    refused_both_ways(
        &b,
        ErrorKind::Corrupt,
        &b,
        &["backing chain loops back on itself"],
    );

    // An overlay whose clusters differ from its Strata backing's.
    let big = p("big.strata");
    create(&big, Some(MIB), Some(65536), None);
    let r = image::create(
        &p("small.strata"),
        &CreateOptions {
            cluster_size: Some(4096),
            backing: Some(big),
            ..CreateOptions::default()
        },
    );
    refused(
        r,
        ErrorKind::InvalidInput,
        &p("small.strata"),
        &["cluster size 4096 differs from the backing image's 65536"],
    );
}
