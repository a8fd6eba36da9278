//! The metadata codecs of `image::format`, by property tests: headers and map pages
//! round-trip, any single flipped bit is detected, and the newer valid copy wins. The seed
//! corpus of the `image_meta` fuzz target is made here too.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use strata::ErrorKind;
use strata::image::format::{
    self, Backing, BackingKind, Current, ENTRIES, Entry, FormatError, Header, L1Entry, PAGE,
    PageKind, Slot,
};
use strata::image::sim::SimStorage;
use strata::image::{self, Chain, CreateOptions, ZeroMode, layer};

use crate::support::images_open;

use super::{open_sim, pattern, refused};

fn backing() -> impl Strategy<Value = Backing> {
    (
        prop_oneof![Just(BackingKind::Raw), Just(BackingKind::Strata)],
        "[a-zA-Z0-9 ._/é-]{1,300}",
        any::<u64>(),
        any::<[u8; 16]>(),
    )
        .prop_filter("path fits", |(_, p, _, _)| {
            p.len() <= format::MAX_BACKING_PATH
        })
        .prop_map(|(kind, path, size, identity)| Backing {
            kind,
            path,
            size,
            identity,
        })
}

/// Any header this version can write: every cluster size, any size up to the largest
/// the format allows.
fn header() -> impl Strategy<Value = Header> {
    let bits = format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS;
    (bits, 0..u64::MAX, any::<u64>())
        .prop_flat_map(|(bits, sequence, compatible)| {
            let max = format::max_virtual_size(bits);
            let size = prop_oneof![0..=max, (max - 1000)..=max, 0..=1u64 << 40];
            (
                Just(bits),
                Just(sequence),
                Just(compatible),
                size,
                any::<[u8; 16]>(),
                proptest::option::of(backing()),
            )
        })
        .prop_map(
            |(cluster_bits, sequence, compatible, virtual_size, image_id, backing)| Header {
                sequence,
                virtual_size,
                cluster_bits,
                incompatible: 0,
                compatible,
                image_id,
                backing,
            },
        )
}

fn entries() -> impl Strategy<Value = Vec<u64>> {
    let entry = prop_oneof![
        Just(0u64),
        Just(Entry::Zero.encode()),
        (1u64..1 << 40).prop_map(|h| Entry::Data(h << 12).encode()),
        any::<u64>(),
    ];
    proptest::collection::vec(entry, ENTRIES)
}

fn kind() -> impl Strategy<Value = PageKind> {
    prop_oneof![Just(PageKind::L1), Just(PageKind::L2)]
}

proptest! {
    #![proptest_config(crate::support::proptest_cases(256))]

    #[test]
    fn headers_round_trip(h in header()) {
        let bytes = format::encode_header(&h);
        prop_assert!(format::has_magic(&bytes[..]));
        prop_assert_eq!(format::decode_header(&bytes[..]), Ok(h));
    }

    #[test]
    fn any_flipped_bit_of_a_header_is_detected(h in header(), bit in 0..PAGE * 8) {
        let mut bytes = format::encode_header(&h);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(format::decode_header(&bytes[..]).is_err());
    }

    #[test]
    fn sizes_past_what_the_map_can_address_are_refused(
        h in header(),
        excess in prop_oneof![1u64..1000, any::<u64>()],
    ) {
        let max = format::max_virtual_size(h.cluster_bits);
        let size = max.saturating_add(excess).max(max + 1);
        let mut page = format::encode_header(&h);
        page[24..32].copy_from_slice(&size.to_le_bytes());
        let crc = crc32fast::hash(&page[..PAGE - 4]);
        page[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
        prop_assert_eq!(
            format::decode_header(&page[..]),
            Err(FormatError::BadField("virtual size", size))
        );
    }

    #[test]
    fn short_or_foreign_bytes_are_not_headers(bytes in proptest::collection::vec(any::<u8>(), 0..PAGE + 10)) {
        prop_assert!(format::decode_header(&bytes).is_err());
    }

    #[test]
    fn pages_round_trip(kind in kind(), index in 0u64..1 << 28, sequence in 0..u64::MAX, e in entries()) {
        let bytes = format::encode_page(kind, index, sequence, &e);
        match format::decode_page(&bytes[..], kind, index) {
            Slot::Valid { sequence: s, entries } => {
                prop_assert_eq!(s, sequence);
                prop_assert_eq!(&entries[..], &e[..]);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        // Anywhere else, or as the other kind of page, it is misplaced.
        let other_kind = match kind { PageKind::L1 => PageKind::L2, PageKind::L2 => PageKind::L1 };
        for (k, i) in [(kind, index ^ 1), (other_kind, index)] {
            let misplaced = matches!(
                format::decode_page(&bytes[..], k, i),
                Slot::Invalid(FormatError::Misplaced { .. })
            );
            prop_assert!(misplaced);
        }
    }

    #[test]
    fn any_flipped_bit_of_a_page_is_detected(
        kind in kind(),
        index in 0u64..1 << 28,
        sequence in 0..u64::MAX,
        e in entries(),
        bit in 0..PAGE * 8,
    ) {
        let mut bytes = format::encode_page(kind, index, sequence, &e);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let invalid = matches!(format::decode_page(&bytes[..], kind, index), Slot::Invalid(_));
        prop_assert!(invalid);
    }

    #[test]
    fn the_last_sequence_number_is_never_valid(h in header(), kind in kind(), e in entries()) {
        let header = Header { sequence: u64::MAX, ..h };
        prop_assert_eq!(
            format::decode_header(&format::encode_header(&header)[..]),
            Err(FormatError::BadField("sequence", u64::MAX))
        );
        let page = format::encode_page(kind, 3, u64::MAX, &e);
        let invalid = matches!(
            format::decode_page(&page[..], kind, 3),
            Slot::Invalid(FormatError::BadField("sequence", u64::MAX))
        );
        prop_assert!(invalid);
    }

    #[test]
    fn the_newer_valid_slot_wins(
        seqs in (0..u64::MAX, 0..u64::MAX),
        damage in (0u8..3, 0u8..3),
        bit in 0..PAGE * 8,
    ) {
        // Each slot: 0 valid, 1 damaged, 2 never written.
        let slot = |seq: u64, d: u8, fill: u64| {
            let mut b = format::encode_page(PageKind::L2, 7, seq, &[fill; ENTRIES]);
            match d {
                1 => b[bit / 8] ^= 1 << (bit % 8),
                2 => b.fill(0),
                _ => {}
            }
            format::decode_page(&b[..], PageKind::L2, 7)
        };
        let got = format::current(slot(seqs.0, damage.0, 1), slot(seqs.1, damage.1, 3));
        let valid = [damage.0 == 0, damage.1 == 0];
        let expected_slot = match valid {
            [true, true] => Some(usize::from(seqs.1 > seqs.0)),
            [true, false] => Some(0),
            [false, true] => Some(1),
            [false, false] => None,
        };
        match (got, expected_slot) {
            (Current::Valid { slot, sequence, entries, other_invalid }, Some(s)) => {
                prop_assert_eq!(slot, s);
                prop_assert_eq!(sequence, [seqs.0, seqs.1][s]);
                prop_assert_eq!(entries[0], [1, 3][s]);
                prop_assert_eq!(other_invalid, [damage.0, damage.1][1 - s] == 1);
            }
            (Current::Lost(_), None) => prop_assert!(damage.0 == 1 || damage.1 == 1),
            (Current::Empty, None) => prop_assert!(damage == (2, 2)),
            (got, s) => prop_assert!(false, "{:?} where slot {:?} was expected", got, s),
        }
    }

    #[test]
    fn the_newer_header_wins_unless_torn(h in header(), s0 in 0u64..1 << 62, s1 in 0u64..1 << 62, tear in 0u8..3) {
        let slot = |s| {
            let mut v = h.clone();
            v.sequence = s;
            format::encode_header(&v)
        };
        let (a, mut b) = (slot(s0), slot(s1));
        match tear {
            // Torn: the slot's last sector never reached the disk.
            1 => b[PAGE - 512..].fill(0),
            // Intact, newer, and with a feature this version does not know.
            2 => {
                let mut v = h.clone();
                v.sequence = s0 + 1;
                v.incompatible = 1;
                let mut page = format::encode_header(&h);
                page.copy_from_slice(&format::encode_header(&Header { incompatible: 0, ..v })[..]);
                page[40] = 1;
                let crc = crc32fast::hash(&page[..PAGE - 4]);
                page[PAGE - 4..].copy_from_slice(&crc.to_le_bytes());
                b = page;
            }
            _ => {}
        }
        let got = format::current_header(&a[..], &b[..]);
        match tear {
            0 => prop_assert_eq!(got.unwrap().0, usize::from(s1 > s0)),
            1 => prop_assert_eq!(got.unwrap().0, 0),
            _ => prop_assert_eq!(got.unwrap_err(), FormatError::UnknownFeatures(1)),
        }
    }

    #[test]
    fn entries_decode_to_what_encodes_them(raw: u64, host in 1u64..1 << 50) {
        if let Some(e) = Entry::decode(raw) {
            prop_assert_eq!(e.encode(), raw);
        }
        if let Some(e) = L1Entry::decode(raw) {
            prop_assert_eq!(e.encode(), raw);
        }
        let data = Entry::Data(host << 12);
        prop_assert_eq!(Entry::decode(data.encode()), Some(data));
        // Unaligned host offsets and stray bits are not entries.
        prop_assert_eq!(Entry::decode((host << 12) | 2 | 4), None);
    }
}

#[test]
fn the_map_limit_is_the_tags_and_every_cluster_size_reaches_it() {
    for bits in format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS {
        let max = format::max_virtual_size(bits);
        let h = Header {
            sequence: 1,
            virtual_size: max,
            cluster_bits: bits,
            incompatible: 0,
            compatible: 0,
            image_id: [0; 16],
            backing: None,
        };
        assert_eq!(h.l2_pages(), format::MAX_L2_PAGES, "{bits}");
        assert_eq!(format::decode_header(&format::encode_header(&h)[..]), Ok(h));
    }
}

#[test]
fn create_refuses_sizes_the_map_cannot_address() {
    let _images = images_open();
    let dir = tempfile::tempdir().unwrap();
    for (size, cluster) in [(1u64 << 62, 4096u64), ((1 << 40) * 511, 4096)] {
        let path = dir.path().join("huge.strata");
        let r = image::create(
            &path,
            &CreateOptions {
                size: Some(size),
                cluster_size: Some(cluster),
                backing: None,
            },
        );
        refused(
            r,
            ErrorKind::InvalidInput,
            &path,
            &[&format!("size {size} is too large for 4096 byte clusters")],
        );
        assert!(!path.exists());
    }
}

/// Seeds for `fuzz/fuzz_targets/image_meta.rs`: small valid images, made
/// deterministically, behind the target's 5-byte prefix (flags, then a page index).
fn image_meta_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let make = |cluster_bits: u32, size: u64, backing: Option<Backing>, work: &dyn Fn(&Chain)| {
        let disk = Arc::new(SimStorage::new());
        image::write_new(
            disk.as_ref(),
            &super::header(size, cluster_bits, 0x5e, backing),
        )
        .unwrap();
        let chain = open_sim(disk.clone(), None, "seed");
        work(&chain);
        chain.flush().unwrap();
        disk.contents()
    };
    let seed = |flags: u8, index: u32, image: Vec<u8>| {
        let mut v = vec![flags];
        v.extend_from_slice(&index.to_le_bytes());
        v.extend_from_slice(&image);
        v
    };
    let busy = |chain: &Chain| {
        let cs = chain.cluster_size();
        chain.write(0, &pattern(1, 0, 3 * cs), false).unwrap();
        chain
            .write(10 * cs + 100, &pattern(2, 10 * cs + 100, 300), false)
            .unwrap();
        chain.zero(20 * cs, cs, ZeroMode::Zero, false).unwrap();
        chain.zero(cs, cs, ZeroMode::Trim, false).unwrap();
        chain.flush().unwrap();
        // A second version of the map page.
        chain
            .write(30 * cs, &pattern(3, 30 * cs, 10), false)
            .unwrap();
    };
    let raw = Backing {
        kind: BackingKind::Raw,
        path: "base.raw".into(),
        size: 100_000,
        identity: [7; 16],
    };
    vec![
        ("empty", seed(0, 0, make(12, 1 << 20, None, &|_| {}))),
        (
            "standalone-4k",
            seed(0, 0, make(12, 256 << 10, None, &busy)),
        ),
        (
            "overlay-4k-l2",
            seed(2, 0, make(12, 256 << 10, Some(raw), &busy)),
        ),
        (
            "sealed-8k-two-pages",
            seed(
                3,
                1,
                make(13, 5 << 20, None, &|c| {
                    busy(c);
                    c.write(600 * 8192, &[9; 8192], false).unwrap();
                }),
            ),
        ),
    ]
}

#[test]
fn image_meta_fuzz_seeds_are_current() {
    let seeds = image_meta_seeds();
    for (name, bytes) in &seeds {
        // Each is a clean image.
        let scan = layer::scan(
            &SimStorage::with_contents(bytes[5..].to_vec()),
            Path::new(name),
        );
        assert!(scan.unwrap().problems.is_empty(), "{name}");
    }
    crate::support::check_fuzz_seeds("image_meta", &seeds);
}
