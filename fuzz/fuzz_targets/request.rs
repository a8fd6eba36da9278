//! Decodes request headers in both styles from arbitrary bytes, re-encodes them, and runs
//! `validate()` with limits taken from the input.
//!
//! Input layout:
//! - byte 0: bit 0 structured replies, bit 1 a metadata context is selected.
//! - bytes 1..9: export size; 9..11: transmission flags; 11..15: maximum payload.
//! - the rest: wire bytes, decoded as a compact and as an extended header.

#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use strata::proto::consts::{
    EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, cmd_flags as cf, transmission_flags as tf,
};
use strata::proto::{Command, Limits, RequestHeader, validate};

fuzz_target!(|data: &[u8]| {
    if data.len() < 15 {
        return;
    }
    let size = u64::from_be_bytes(data[1..9].try_into().unwrap());
    let flags = u16::from_be_bytes(data[9..11].try_into().unwrap());
    let max_payload = u32::from_be_bytes(data[11..15].try_into().unwrap());
    let wire = &data[15..];

    for extended in [false, true] {
        let need = RequestHeader::wire_len(extended);
        let mut src = wire;
        let header = match RequestHeader::decode(&mut src, extended) {
            Ok(None) => {
                assert!(wire.len() < need);
                assert_eq!(src.len(), wire.len(), "nothing consumed");
                continue;
            }
            Err(_) => {
                let magic = if extended {
                    EXTENDED_REQUEST_MAGIC
                } else {
                    REQUEST_MAGIC
                };
                assert!(wire.len() >= need);
                assert_ne!(wire[..4], magic.to_be_bytes());
                continue;
            }
            Ok(Some(h)) => h,
        };
        assert_eq!(src.len(), wire.len() - need, "exactly one header consumed");

        // Re-encoding gives back the same bytes.
        let mut again = BytesMut::new();
        header.encode(&mut again, extended);
        assert_eq!(&again[..], &wire[..need]);

        // The same bytes split in two decode the same way.
        let at = usize::from(data[0] >> 2) % (need + 1);
        let mut chained = (&wire[..at]).chain(&wire[at..]);
        assert_eq!(
            RequestHeader::decode(&mut chained, extended),
            Ok(Some(header))
        );

        let payload = header.payload_len(extended);
        if header.command == Command::Write || (extended && header.flags & cf::PAYLOAD_LEN != 0) {
            assert_eq!(payload, header.length);
        } else {
            assert_eq!(payload, 0);
        }

        let limits = Limits {
            size,
            flags: flags | tf::HAS_FLAGS,
            max_payload,
            structured: extended || data[0] & 1 != 0,
            extended,
            has_contexts: data[0] & 2 != 0,
        };
        let Ok(()) = validate(&header, &limits) else {
            continue;
        };
        let command = header.command;
        if command == Command::Disconnect {
            continue;
        }
        assert_eq!(header.flags & !cf::KNOWN, 0);
        assert!(!matches!(command, Command::Resize | Command::Unknown(_)));
        if matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        ) {
            assert_eq!(limits.flags & tf::READ_ONLY, 0);
        }
        if command != Command::Flush {
            let end = header.offset.checked_add(header.length);
            assert!(end.is_some_and(|end| end <= size));
        }
        if matches!(command, Command::Read | Command::Write) {
            assert!(header.length <= u64::from(max_payload));
        }
        if header.flags & cf::DF != 0 {
            assert!(limits.structured && command == Command::Read);
        }
        if header.flags & cf::PAYLOAD_LEN != 0 {
            assert!(extended && command == Command::Write);
        }
        if command == Command::BlockStatus {
            assert!(limits.has_contexts && header.length > 0);
        }
    }
});
