//! Feeds arbitrary bytes to the image metadata readers: header and page decoding, and a
//! whole-image scan; an image that scans clean is then opened, read, written and scanned
//! again.
//!
//! Input layout:
//! - byte 0: bit 0: seal. Before scanning, both header slots (when they carry the magic)
//!   and every non-zero 4 KiB page after them get a correct checksum, so that inputs get
//!   past the checksums to the checks behind them. Bit 1: decode the page as an L2 page
//!   (else L1).
//! - bytes 1..5: the page index to decode the page at (little-endian).
//! - the rest: the bytes, decoded as one header slot and as one page, and scanned as a
//!   whole image file.
//!
//! Checks: no panic; a decoded header or page encodes back to what was decoded (the page
//! to the very bytes); an image that scans without problems opens read-only and
//! read-write, reads and reports its map anywhere, and after a write, a zeroing and a
//! flush still scans without problems and reads back the write.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use strata::image::format::{self, PAGE, PageKind, Slot};
use strata::image::sim::SimStorage;
use strata::image::{Chain, ZeroMode, layer};

const PATH: &str = "fuzz.strata";

/// Gives every header slot with the magic, and every non-zero page after the header,
/// the checksum its contents need.
fn seal(bytes: &mut [u8]) {
    let mut at = 0;
    while at + PAGE <= bytes.len() {
        let page = &mut bytes[at..at + PAGE];
        let header = at < format::L1_OFFSET as usize;
        if (header && format::has_magic(page)) || (!header && page.iter().any(|&b| b != 0)) {
            let crc = crc32fast::hash(&page[..PAGE - 4]);
            page[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
        }
        at += PAGE;
    }
}

fn check_codecs(bytes: &[u8], kind: PageKind, index: u64) {
    if let Ok(h) = format::decode_header(bytes) {
        assert_eq!(format::decode_header(&format::encode_header(&h)[..]), Ok(h));
    }
    if bytes.len() >= 2 * PAGE {
        let _ = format::current_header(&bytes[..PAGE], &bytes[PAGE..2 * PAGE]);
    }
    if let Slot::Valid { sequence, entries } = format::decode_page(bytes, kind, index) {
        let again = format::encode_page(kind, index, sequence, &entries[..]);
        assert_eq!(&again[..], &bytes[..PAGE]);
        for &raw in entries.iter() {
            if let Some(e) = format::Entry::decode(raw) {
                assert_eq!(e.encode(), raw);
            }
        }
    }
}

/// Reads and maps `chain` at a few places: its start, its end, and each range it reports
/// (the first few).
fn explore(chain: &Chain) {
    let size = chain.size();
    let ranges = chain.ranges(0, size).expect("ranges of a clean image");
    let mut spots = vec![(0, size.min(8192)), (size.saturating_sub(100), size.min(100))];
    spots.extend(ranges.iter().take(16).map(|r| (r.offset, r.length.min(8192))));
    for (at, len) in spots {
        if len == 0 {
            continue;
        }
        let mut buf = vec![0u8; len as usize];
        chain.read(at, &mut buf).expect("read of a clean image");
        chain.read_sparse(at, len as usize).expect("sparse read");
        chain.block_status(at, len).expect("block status");
        chain.allocation_depth(at, len).expect("allocation depth");
    }
}

fn check_image(bytes: Vec<u8>) {
    let path = Path::new(PATH);
    let storage = SimStorage::with_contents(bytes);
    let Ok(scan) = layer::scan(&storage, path) else {
        return;
    };
    // Overlays too: opened alone, as repairs do, their unallocated clusters read as zeroes.
    if !scan.problems.is_empty() {
        return;
    }
    let contents = storage.contents();
    let ro = Chain::new(Arc::new(storage), path, scan.clone(), None, false)
        .expect("a clean image opens");
    explore(&ro);

    // Written to, it stays clean.
    let storage = Arc::new(SimStorage::with_contents(contents));
    let rw = Chain::new(storage.clone(), path, scan, None, true).expect("opens read-write");
    let size = rw.size();
    if size == 0 {
        return;
    }
    let at = (size / 3).min(size - 1);
    let data: Vec<u8> = (0..(size - at).min(5000)).map(|i| i as u8 | 1).collect();
    rw.write(at, &data, false).expect("write");
    let z = size / 2;
    rw.zero(z, (size - z).min(3 * rw.cluster_size()), ZeroMode::Trim, false)
        .expect("trim");
    rw.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    rw.read(at, &mut back).expect("read back");
    let expected_zero = z.max(at)..(z + 3 * rw.cluster_size()).min(at + data.len() as u64);
    for (i, (&b, &d)) in back.iter().zip(&data).enumerate() {
        let pos = at + i as u64;
        assert_eq!(b, if expected_zero.contains(&pos) { 0 } else { d }, "byte {pos}");
    }
    drop(rw);
    let again = layer::scan(storage.as_ref(), path).expect("rescan");
    assert!(again.problems.is_empty(), "{:?}", again.problems);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let kind = if data[0] & 2 != 0 {
        PageKind::L2
    } else {
        PageKind::L1
    };
    let index = u64::from(u32::from_le_bytes(data[1..5].try_into().unwrap()));
    let mut bytes = data[5..].to_vec();
    if data[0] & 1 != 0 {
        seal(&mut bytes);
    }
    check_codecs(&bytes, kind, index);
    check_image(bytes);
});
