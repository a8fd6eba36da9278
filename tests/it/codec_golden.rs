//! Golden-byte tests: every message the codec emits or parses, checked against bytes
//! written out by hand from the NBD specification's field layout (doc/proto.md of
//! NetworkBlockDevice/nbd, including the extended-headers extension).

use crate::support::codec::*;
use crate::support::spec::*;
use crate::support::wire::*;
use bytes::BytesMut;
use strata::proto::consts::{self, cmd, cmd_flags, errno, reply_flags, reply_type, state};
use strata::proto::reply::{self, ChunkTarget, Descriptor, ReplyHeader, ReplyMode};
use strata::proto::{Command, RequestHeader, TlsPolicy};

const COOKIE: u64 = 0x0102_0304_0506_0708;

fn structured(offset: u64) -> ChunkTarget {
    ChunkTarget {
        mode: ReplyMode::Structured,
        cookie: COOKIE,
        offset,
    }
}

fn extended(offset: u64) -> ChunkTarget {
    ChunkTarget {
        mode: ReplyMode::Extended,
        cookie: COOKIE,
        offset,
    }
}

fn encoded(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b);
    b.to_vec()
}

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

#[test]
fn magics_match_the_spec() {
    assert_eq!(consts::NBDMAGIC.to_be_bytes(), *b"NBDMAGIC");
    assert_eq!(consts::IHAVEOPT.to_be_bytes(), *b"IHAVEOPT");
    assert_eq!(consts::OPTION_REPLY_MAGIC, 0x0003_e889_0455_65a9);
    assert_eq!(consts::CLISERV_MAGIC, 0x0000_4202_8186_1253);
    assert_eq!(consts::REQUEST_MAGIC, 0x2560_9513);
    assert_eq!(consts::EXTENDED_REQUEST_MAGIC, 0x21e4_1c71);
    assert_eq!(consts::SIMPLE_REPLY_MAGIC, 0x6744_6698);
    assert_eq!(consts::STRUCTURED_REPLY_MAGIC, 0x668e_33ef);
    assert_eq!(consts::EXTENDED_REPLY_MAGIC, 0x6e8a_278c);
}

#[test]
fn option_and_reply_codes_match_the_spec() {
    use consts::{info, opt, rep};
    assert_eq!(
        [
            opt::EXPORT_NAME,
            opt::ABORT,
            opt::LIST,
            opt::PEEK_EXPORT,
            opt::STARTTLS,
            opt::INFO,
            opt::GO,
            opt::STRUCTURED_REPLY,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
            opt::EXTENDED_HEADERS,
        ],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    );
    assert_eq!(
        [rep::ACK, rep::SERVER, rep::INFO, rep::META_CONTEXT],
        [REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT]
    );
    // Errors are 2^31 + n.
    assert_eq!(
        [
            rep::ERR_UNSUP,
            rep::ERR_POLICY,
            rep::ERR_INVALID,
            rep::ERR_PLATFORM,
            rep::ERR_TLS_REQD,
            rep::ERR_UNKNOWN,
            rep::ERR_SHUTDOWN,
            rep::ERR_BLOCK_SIZE_REQD,
            rep::ERR_TOO_BIG,
            rep::ERR_EXT_HEADER_REQD,
        ],
        [
            0x8000_0001,
            0x8000_0002,
            0x8000_0003,
            0x8000_0004,
            0x8000_0005,
            0x8000_0006,
            0x8000_0007,
            0x8000_0008,
            0x8000_0009,
            0x8000_000a,
        ]
    );
    assert_eq!(
        [
            info::EXPORT,
            info::NAME,
            info::DESCRIPTION,
            info::BLOCK_SIZE
        ],
        [0, 1, 2, 3]
    );
}

#[test]
fn transmission_codes_match_the_spec() {
    use consts::transmission_flags as tf;
    assert_eq!(
        [
            tf::HAS_FLAGS,
            tf::READ_ONLY,
            tf::SEND_FLUSH,
            tf::SEND_FUA,
            tf::ROTATIONAL,
            tf::SEND_TRIM,
            tf::SEND_WRITE_ZEROES,
            tf::SEND_DF,
            tf::CAN_MULTI_CONN,
            tf::SEND_RESIZE,
            tf::SEND_CACHE,
            tf::SEND_FAST_ZERO,
            tf::BLOCK_STAT_PAYLOAD,
        ],
        [
            0x0001, 0x0002, 0x0004, 0x0008, 0x0010, 0x0020, 0x0040, 0x0080, 0x0100, 0x0200, 0x0400,
            0x0800, 0x1000
        ]
    );
    assert_eq!(
        [
            cmd::READ,
            cmd::WRITE,
            cmd::DISC,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::CACHE,
            cmd::WRITE_ZEROES,
            cmd::BLOCK_STATUS,
            cmd::RESIZE
        ],
        [0, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(
        [
            cmd_flags::FUA,
            cmd_flags::NO_HOLE,
            cmd_flags::DF,
            cmd_flags::REQ_ONE,
            cmd_flags::FAST_ZERO,
            cmd_flags::PAYLOAD_LEN
        ],
        [0x01, 0x02, 0x04, 0x08, 0x10, 0x20]
    );
    assert_eq!(reply_flags::DONE, 1);
    assert_eq!(
        [
            reply_type::NONE,
            reply_type::OFFSET_DATA,
            reply_type::OFFSET_HOLE,
            reply_type::BLOCK_STATUS,
            reply_type::BLOCK_STATUS_EXT,
            reply_type::ERROR,
            reply_type::ERROR_OFFSET,
        ],
        [0, 1, 2, 5, 6, 0x8001, 0x8002]
    );
    assert_eq!([state::HOLE, state::ZERO], [1, 2]);
    assert_eq!(
        [
            errno::EPERM,
            errno::EIO,
            errno::ENOMEM,
            errno::EINVAL,
            errno::ENOSPC,
            errno::EOVERFLOW,
            errno::ENOTSUP,
            errno::ESHUTDOWN
        ],
        [1, 5, 12, 22, 28, 75, 95, 108]
    );
}

// ---------------------------------------------------------------------------------------
// Handshake messages
// ---------------------------------------------------------------------------------------

#[test]
fn greeting() {
    let mut d = Driver::with_tls(TlsPolicy::Disabled);
    // NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    assert_eq!(d.take_sent(), hex("4e42444d41474943 49484156454f5054 0003"));
}

#[test]
fn ack_reply() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.feed(&hex("49484156454f5054 00000008 00000000"));
    assert_eq!(
        d.take_sent(),
        hex("0003e889045565a9 00000008 00000001 00000000")
    );
}

#[test]
fn list_replies_server_then_ack() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.feed(&hex("49484156454f5054 00000003 00000000"));
    let expected = [
        // REP_SERVER: name length, "disk", then the description "Test disk".
        "0003e889045565a9 00000003 00000002 00000011 00000004 6469736b 54657374206469736b",
        // REP_SERVER: name length, "ro", no description.
        "0003e889045565a9 00000003 00000002 00000006 00000002 726f",
        "0003e889045565a9 00000003 00000001 00000000",
    ]
    .concat();
    assert_eq!(d.take_sent(), hex(&expected));
}

/// INFO replies may come in any order; each must match its golden bytes and ACK comes last.
#[test]
fn info_replies_export_name_description_block_size() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    // INFO "disk", asking for NAME, DESCRIPTION and BLOCK_SIZE.
    d.feed(&hex(
        "49484156454f5054 00000006 00000010 00000004 6469736b 0003 0001 0002 0003",
    ));
    let (replies, rest) = parse_replies(&d.take_sent());
    assert!(rest.is_empty());
    let mut wire: Vec<Vec<u8>> = replies.iter().map(OptReply::to_wire).collect();
    assert_eq!(
        wire.pop().unwrap(),
        hex("0003e889045565a9 00000006 00000001 00000000"),
        "ACK last"
    );
    let mut expected = vec![
        // INFO_EXPORT: size 1 MiB, flags HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|WRITE_ZEROES.
        hex("0003e889045565a9 00000006 00000003 0000000c 0000 0000000000100000 006d"),
        // INFO_NAME "disk".
        hex("0003e889045565a9 00000006 00000003 00000006 0001 6469736b"),
        // INFO_DESCRIPTION "Test disk".
        hex("0003e889045565a9 00000006 00000003 0000000b 0002 54657374206469736b"),
        // INFO_BLOCK_SIZE 1 / 4096 / 32 MiB.
        hex("0003e889045565a9 00000006 00000003 0000000e 0003 00000001 00001000 02000000"),
    ];
    wire.sort();
    expected.sort();
    assert_eq!(wire, expected);
}

#[test]
fn go_reply_after_structured_sets_send_df() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.option(OPT_STRUCTURED_REPLY, &[]);
    // GO "disk" with no information requests.
    let outcome = d.feed(&hex(
        "49484156454f5054 00000007 0000000a 00000004 6469736b 0000",
    ));
    assert!(matches!(outcome, Outcome::Done(_)));
    let (replies, rest) = parse_replies(&d.take_sent());
    assert!(rest.is_empty(), "no padding after GO's ACK");
    let wire: Vec<Vec<u8>> = replies.iter().map(OptReply::to_wire).collect();
    assert!(wire.contains(&hex(
        "0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 00ed"
    )));
    assert_eq!(
        wire.last().unwrap(),
        &hex("0003e889045565a9 00000007 00000001 00000000")
    );
}

#[test]
fn meta_context_replies() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    d.option(OPT_STRUCTURED_REPLY, &[]);
    // LIST_META_CONTEXT "disk", one query "base:": the id is reserved and zero.
    d.feed(&hex(
        "49484156454f5054 00000009 00000015 00000004 6469736b 00000001 00000005 626173653a",
    ));
    assert_eq!(
        d.take_sent(),
        hex(&[
            "0003e889045565a9 00000009 00000004 00000013 00000000 626173653a616c6c6f636174696f6e",
            "0003e889045565a9 00000009 00000001 00000000",
        ]
        .concat())
    );
    // SET_META_CONTEXT "disk", "base:allocation": id 1.
    d.feed(&hex(
        "49484156454f5054 0000000a 0000001f 00000004 6469736b 00000001 \
         0000000f 626173653a616c6c6f636174696f6e",
    ));
    assert_eq!(
        d.take_sent(),
        hex(&[
            "0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e",
            "0003e889045565a9 0000000a 00000001 00000000",
        ]
        .concat())
    );
}

/// Every error the handshake emits: header layout, code, and a UTF-8 message as data.
#[test]
fn error_replies() {
    let check = |sent: Vec<u8>, option: &str, code: &str| {
        let header = hex(&format!("0003e889045565a9 {option} {code}"));
        assert_eq!(&sent[..16], &header[..], "reply header");
        let len = u32::from_be_bytes(sent[16..20].try_into().unwrap()) as usize;
        assert_eq!(
            sent.len(),
            20 + len,
            "one reply, length field covers the message"
        );
        let msg = std::str::from_utf8(&sent[20..]).expect("UTF-8 message");
        assert!(!msg.is_empty() && msg.len() <= 4096);
    };

    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    // Option 0x42 is unknown: ERR_UNSUP.
    d.feed(&hex("49484156454f5054 00000042 00000000"));
    check(d.take_sent(), "00000042", "80000001");
    // LIST with data: ERR_INVALID.
    d.feed(&hex("49484156454f5054 00000003 00000001 00"));
    check(d.take_sent(), "00000003", "80000003");
    // INFO for an unknown export: ERR_UNKNOWN.
    d.feed(&hex(
        "49484156454f5054 00000006 00000009 00000003 6e6f70 0000",
    ));
    check(d.take_sent(), "00000006", "80000006");
    // STARTTLS without TLS configured: ERR_UNSUP.
    d.feed(&hex("49484156454f5054 00000005 00000000"));
    check(d.take_sent(), "00000005", "80000001");
    // EXTENDED_HEADERS then STRUCTURED_REPLY: ERR_EXT_HEADER_REQD.
    d.feed(&hex("49484156454f5054 0000000b 00000000"));
    assert_eq!(
        d.take_sent(),
        hex("0003e889045565a9 0000000b 00000001 00000000")
    );
    d.feed(&hex("49484156454f5054 00000008 00000000"));
    check(d.take_sent(), "00000008", "8000000a");

    // Over max_option_len: ERR_TOO_BIG.
    let mut d = Driver::new(strata::proto::HandshakeConfig {
        tls: TlsPolicy::Disabled,
        max_option_len: 4,
    });
    d.feed(&hex("00000001"));
    d.take_sent();
    d.feed(&hex("49484156454f5054 00000006 00000005 0000000000"));
    check(d.take_sent(), "00000006", "80000009");

    // TLS required: ERR_TLS_REQD.
    let mut d = Driver::started(TlsPolicy::Required, C_FIXED);
    d.feed(&hex("49484156454f5054 00000003 00000000"));
    check(d.take_sent(), "00000003", "80000005");
}

#[test]
fn export_name_reply_with_zeroes() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED);
    let outcome = d.feed(&hex("49484156454f5054 00000001 00000004 6469736b"));
    assert!(matches!(outcome, Outcome::Done(_)));
    let mut expected = hex("0000000000100000 006d");
    expected.extend_from_slice(&[0; 124]);
    assert_eq!(d.take_sent(), expected);
}

#[test]
fn export_name_reply_without_zeroes() {
    let mut d = Driver::started(TlsPolicy::Disabled, C_FIXED_NO_ZEROES);
    let outcome = d.feed(&hex("49484156454f5054 00000001 00000002 726f"));
    assert!(matches!(outcome, Outcome::Done(_)));
    // Read-only export: HAS_FLAGS | READ_ONLY | SEND_FLUSH.
    assert_eq!(d.take_sent(), hex("0000000000002000 0007"));
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

fn request(flags: u16, command: Command, cookie: u64, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

/// Each header decodes from its golden bytes, using all of them, and encodes back to them.
#[test]
fn request_headers() {
    use cmd_flags::{FUA, PAYLOAD_LEN, REQ_ONE};
    let cases = [
        // WRITE with FUA, cookie 0x0102..08, offset 0x1000, length 0x200.
        (
            "compact WRITE with FUA",
            false,
            "25609513 0001 0001 0102030405060708 0000000000001000 00000200",
            request(FUA, Command::Write, COOKIE, 0x1000, 0x200),
            0x200,
        ),
        (
            "compact READ with every field at its maximum",
            false,
            "25609513 0000 0000 ffffffffffffffff ffffffffffffffff ffffffff",
            request(0, Command::Read, u64::MAX, u64::MAX, u64::from(u32::MAX)),
            0,
        ),
        // BLOCK_STATUS with REQ_ONE at 4 GiB for 8 GiB: a 64-bit effect length.
        (
            "extended BLOCK_STATUS",
            true,
            "21e41c71 0008 0007 a1a2a3a4a5a6a7a8 0000000100000000 0000000200000000",
            request(
                REQ_ONE,
                Command::BlockStatus,
                0xa1a2_a3a4_a5a6_a7a8,
                1 << 32,
                2 << 32,
            ),
            0,
        ),
        // WRITE with PAYLOAD_LEN, 0x200 bytes of payload follow.
        (
            "extended WRITE with PAYLOAD_LEN",
            true,
            "21e41c71 0020 0001 0102030405060708 0000000000000000 0000000000000200",
            request(PAYLOAD_LEN, Command::Write, COOKIE, 0, 0x200),
            0x200,
        ),
        // A non-write carrying a payload (which the server must still consume).
        (
            "extended BLOCK_STATUS with PAYLOAD_LEN",
            true,
            "21e41c71 0020 0007 0102030405060708 0000000000000000 0000000000000010",
            request(PAYLOAD_LEN, Command::BlockStatus, COOKIE, 0, 0x10),
            0x10,
        ),
    ];
    for (name, extended, wire, header, payload_len) in cases {
        let wire = hex(wire);
        assert_eq!(wire.len(), if extended { 32 } else { 28 }, "{name}");
        let mut src = &wire[..];
        let decoded = RequestHeader::decode(&mut src, extended);
        assert_eq!(decoded, Ok(Some(header)), "{name}");
        assert!(src.is_empty(), "{name}: the whole header is used");
        assert_eq!(encoded(|b| header.encode(b, extended)), wire, "{name}");
        assert_eq!(header.payload_len(extended), payload_len, "{name}");
        if extended {
            // Compact headers have no PAYLOAD_LEN: only a WRITE's length is a payload.
            let compact = if header.command == Command::Write {
                header.length
            } else {
                0
            };
            assert_eq!(header.payload_len(false), compact, "{name}");
        }
    }
}

#[test]
fn request_magic_must_match_header_style() {
    let compact = hex("25609513 0000 0000 0102030405060708 0000000000000000 00000200 00000000");
    let extended = hex("21e41c71 0000 0000 0102030405060708 0000000000000000 0000000000000200");
    assert!(RequestHeader::decode(&mut &compact[..], true).is_err());
    assert!(RequestHeader::decode(&mut &extended[..28], false).is_err());
    let unknown = hex("21e41c71 0000 0063 0102030405060708 0000000000000000 0000000000000000");
    let h = RequestHeader::decode(&mut &unknown[..], true)
        .unwrap()
        .unwrap();
    assert_eq!(h.command, Command::Unknown(0x63));
}

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

#[test]
fn simple_reply() {
    assert_eq!(
        encoded(|b| reply::encode_simple(b, COOKIE, 0)),
        hex("67446698 00000000 0102030405060708")
    );
    assert_eq!(
        encoded(|b| reply::encode_simple(b, COOKIE, errno::EINVAL)),
        hex("67446698 00000016 0102030405060708")
    );
    let wire = hex("67446698 0000001c 0102030405060708");
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        assert_eq!(
            ReplyHeader::decode(&mut &wire[..], mode),
            Ok(Some(ReplyHeader::Simple {
                errno: errno::ENOSPC,
                cookie: COOKIE
            }))
        );
    }
    // Extended headers forbid simple replies.
    assert!(ReplyHeader::decode(&mut &wire[..], ReplyMode::Extended).is_err());
}

/// The empty last chunk decodes only in its own reply mode; an extended header echoes
/// the request's offset, a structured one has no room for it.
#[test]
fn done_chunk_decodes_only_in_its_own_mode() {
    use ReplyMode::{Extended, Simple, Structured};
    let cases = [
        (
            Structured,
            "668e33ef 0001 0000 0102030405060708 00000000",
            0,
            [Simple, Extended],
        ),
        (
            Extended,
            "6e8a278c 0001 0000 0102030405060708 0000000000001000 0000000000000000",
            0x1000,
            [Simple, Structured],
        ),
    ];
    for (mode, wire, offset, other_modes) in cases {
        let wire = hex(wire);
        assert_eq!(
            wire.len(),
            if mode == Extended { 32 } else { 20 },
            "{mode:?}"
        );
        let chunk = ReplyHeader::Chunk {
            flags: 1,
            ty: 0,
            cookie: COOKIE,
            offset,
            payload_len: 0,
        };
        assert_eq!(
            ReplyHeader::decode(&mut &wire[..], mode),
            Ok(Some(chunk)),
            "{mode:?}"
        );
        for other in other_modes {
            let decoded = ReplyHeader::decode(&mut &wire[..], other);
            assert!(decoded.is_err(), "{mode:?} chunk in {other:?} mode");
        }
    }
}

/// Every chunk encoder, in both header styles, against its golden bytes.
#[test]
fn reply_chunks() {
    let status = [
        Descriptor {
            length: 0x1000,
            flags: 0,
        },
        Descriptor {
            length: 0x2000,
            flags: u64::from(state::HOLE | state::ZERO),
        },
    ];
    let status_ext = [
        Descriptor {
            length: 1 << 32,
            flags: u64::from(state::HOLE | state::ZERO),
        },
        Descriptor {
            length: 0x1000,
            flags: 0,
        },
    ];
    let cases = [
        (
            "structured done",
            encoded(|b| reply::encode_done(b, structured(0x1000))),
            "668e33ef 0001 0000 0102030405060708 00000000",
        ),
        (
            "structured chunk header",
            encoded(|b| reply::encode_chunk_header(b, structured(9), 0, 0x1234, 0xdead_beef)),
            "668e33ef 0000 1234 0102030405060708 deadbeef",
        ),
        (
            "extended done",
            encoded(|b| reply::encode_done(b, extended(0x1000))),
            "6e8a278c 0001 0000 0102030405060708 0000000000001000 0000000000000000",
        ),
        (
            "extended chunk header",
            encoded(|b| reply::encode_chunk_header(b, extended(7), 0, 0x1234, 1 << 40)),
            "6e8a278c 0000 1234 0102030405060708 0000000000000007 0000010000000000",
        ),
        // 0x200 bytes at 0x1200 of a read at 0x1000; payload length 8 + 0x200.
        (
            "structured OFFSET_DATA header",
            encoded(|b| {
                reply::encode_offset_data_header(b, structured(0x1000), false, 0x1200, 0x200)
            }),
            "668e33ef 0000 0001 0102030405060708 00000208 0000000000001200",
        ),
        // Extended: the header echoes the request offset, the payload has the data offset.
        (
            "extended OFFSET_DATA header",
            encoded(|b| reply::encode_offset_data_header(b, extended(0x1000), true, 0x1200, 0x200)),
            "6e8a278c 0001 0001 0102030405060708 0000000000001000 0000000000000208 \
             0000000000001200",
        ),
        (
            "structured OFFSET_HOLE",
            encoded(|b| reply::encode_offset_hole(b, structured(0x3000), true, 0x3000, 0x1000)),
            "668e33ef 0001 0002 0102030405060708 0000000c 0000000000003000 00001000",
        ),
        (
            "extended OFFSET_HOLE",
            encoded(|b| reply::encode_offset_hole(b, extended(0x2000), false, 0x3000, 0x1000)),
            "6e8a278c 0000 0002 0102030405060708 0000000000002000 000000000000000c \
             0000000000003000 00001000",
        ),
        // Context id, then (32-bit length, 32-bit flags) pairs: 4 + 2 * 8 = 20 bytes.
        (
            "BLOCK_STATUS",
            encoded(|b| reply::encode_block_status(b, structured(0), true, 1, &status)),
            "668e33ef 0001 0005 0102030405060708 00000014 00000001 \
             00001000 00000000 00002000 00000003",
        ),
        // Context id, descriptor count, then (64-bit length, 64-bit flags) pairs:
        // 8 + 2 * 16 = 40 bytes.
        (
            "BLOCK_STATUS_EXT",
            encoded(|b| reply::encode_block_status(b, extended(0x8000), false, 1, &status_ext)),
            "6e8a278c 0000 0006 0102030405060708 0000000000008000 0000000000000028 \
             00000001 00000002 \
             0000000100000000 0000000000000003 \
             0000000000001000 0000000000000000",
        ),
        // errno, message length, message: 6 + 3 bytes.
        (
            "structured ERROR",
            encoded(|b| reply::encode_error(b, structured(0), true, errno::EIO, "bad", None)),
            "668e33ef 0001 8001 0102030405060708 00000009 00000005 0003 626164",
        ),
        (
            "extended ERROR without a message",
            encoded(|b| reply::encode_error(b, extended(0x40), true, errno::EINVAL, "", None)),
            "6e8a278c 0001 8001 0102030405060708 0000000000000040 0000000000000006 \
             00000016 0000",
        ),
        // errno, message length, message, offset: 6 + 3 + 8 bytes.
        (
            "structured ERROR_OFFSET",
            encoded(|b| {
                reply::encode_error(
                    b,
                    structured(0x1000),
                    false,
                    errno::EIO,
                    "bad",
                    Some(0x1800),
                )
            }),
            "668e33ef 0000 8002 0102030405060708 00000011 00000005 0003 626164 0000000000001800",
        ),
        (
            "extended ERROR_OFFSET",
            encoded(|b| {
                reply::encode_error(b, extended(0x1000), true, errno::EIO, "bad", Some(0x1800))
            }),
            "6e8a278c 0001 8002 0102030405060708 0000000000001000 0000000000000011 \
             00000005 0003 626164 0000000000001800",
        ),
    ];
    for (name, wire, golden) in cases {
        assert_eq!(wire, hex(golden), "{name}");
    }
}

#[test]
fn error_message_is_clamped_to_4096_bytes_on_a_char_boundary() {
    let long = "x".repeat(5000);
    let wire = encoded(|b| reply::encode_error(b, structured(0), true, errno::EIO, &long, None));
    assert_eq!(&wire[16..20], &hex("00001006")[..], "payload 6 + 4096");
    assert_eq!(&wire[24..26], &hex("1000")[..], "message length 4096");
    assert_eq!(wire.len(), 20 + 6 + 4096);

    // 4095 ASCII bytes then a two-byte character straddling the limit.
    let straddle = format!("{}é", "x".repeat(4095));
    let wire =
        encoded(|b| reply::encode_error(b, structured(0), true, errno::EIO, &straddle, Some(7)));
    assert_eq!(&wire[16..20], &hex("0000100d")[..], "payload 6 + 4095 + 8");
    assert_eq!(&wire[24..26], &hex("0fff")[..]);
    assert_eq!(&wire[wire.len() - 8..], &hex("0000000000000007")[..]);
}
