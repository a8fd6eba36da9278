//! Several clients sharing the clusters of one overlay: concurrent writes, zeroes and
//! trims in stripes narrower than a cluster.

use std::fs;
use std::thread;

use crate::support::client::{Client, SIMPLE};
use crate::support::spec::{CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use crate::support::{Endpoint, MIB, assert_same_bytes, file, pattern, strata_at_ok, strata_only};

use super::{assert_clean, contents};

/// A barrier for the client threads that never leaves them waiting forever: a client
/// that fails (panics) while holding a [`Seat`] breaks it for the others, and waiting
/// gives up after a minute.
struct Rendezvous {
    parties: usize,
    /// (arrived, generation, broken)
    state: std::sync::Mutex<(usize, u64, bool)>,
    cv: std::sync::Condvar,
}

/// A client's place at a [`Rendezvous`].
struct Seat(std::sync::Arc<Rendezvous>);

impl Drop for Seat {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            st.2 = true;
            self.0.cv.notify_all();
        }
    }
}

impl Seat {
    fn wait(&self) {
        let r = &self.0;
        let mut st = r.state.lock().unwrap_or_else(|e| e.into_inner());
        let generation = st.1;
        st.0 += 1;
        if st.0 == r.parties {
            st.0 = 0;
            st.1 += 1;
            r.cv.notify_all();
            return;
        }
        let (st, timeout) =
            r.cv.wait_timeout_while(st, std::time::Duration::from_secs(60), |st| {
                st.1 == generation && !st.2
            })
            .unwrap_or_else(|e| e.into_inner());
        assert!(!st.2, "another client failed");
        assert!(!timeout.timed_out(), "another client never arrived");
    }
}

/// Four connections to one overlay write, zero and trim concurrently, each in its own
/// stripes of the disk, narrower than a cluster, so that clusters are shared by several
/// clients and copied up while their neighbours write. After each round every client
/// checks that its stripes hold exactly what it did to them, over the base's bytes;
/// then the whole disk is trimmed or zeroed, so that the next round allocates every
/// cluster again (reusing the space the trims freed).
fn concurrent_clients(cluster: &str, stripe: u64) {
    if !strata_only("Strata images") {
        return;
    }
    const CLIENTS: u64 = 4;
    const SIZE: u64 = MIB;
    const ROUNDS: u64 = 20;
    const OPS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = pattern(90, SIZE as usize);
    fs::write(d.join("base.raw"), &base).unwrap();
    strata_at_ok(
        d,
        &["create", "-b", "base.raw", "shared.strata", "-c", cluster],
    );
    let server = file(d.join("shared.strata")).start();
    let Endpoint::Tcp(addr) = server.endpoint().clone() else {
        panic!("TCP expected")
    };
    let name = server.export_name().to_owned();
    let meet = std::sync::Arc::new(Rendezvous {
        parties: CLIENTS as usize,
        state: std::sync::Mutex::new((0, 0, false)),
        cv: std::sync::Condvar::new(),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (name, meet, mut disk) = (name.clone(), Seat(meet.clone()), base.clone());
            thread::spawn(move || {
                let mine: Vec<u64> = (0..SIZE.div_ceil(stripe))
                    .filter(|s| s % CLIENTS == k)
                    .collect();
                let stripes = |s: u64| (s * stripe) as usize..((s + 1) * stripe).min(SIZE) as usize;
                let mut c = Client::tcp(addr).unwrap();
                c.handshake(&name, SIMPLE).unwrap();
                let mut x = 0x1234_5678 ^ ((k + 1) * 0x9E37_79B9);
                let mut next = |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                meet.wait();
                for round in 0..ROUNDS {
                    for i in 0..OPS {
                        let s = mine[next(mine.len() as u64) as usize];
                        let r = stripes(s);
                        let off = r.start as u64 + next((r.end - r.start) as u64);
                        let len = 1 + next(r.end as u64 - off);
                        let (cmd, payload) = match next(10) {
                            0 | 1 => (CMD_WRITE_ZEROES, Vec::new()),
                            2 => (CMD_TRIM, Vec::new()),
                            _ => (CMD_WRITE, pattern(1000 * k + 100 * round + i, len as usize)),
                        };
                        let errno = c.command(0, cmd, off, len, &payload).unwrap();
                        assert_eq!(errno, 0, "client {k}: command {cmd} at {off}+{len}");
                        let range = off as usize..(off + len) as usize;
                        if cmd == CMD_WRITE {
                            disk[range].copy_from_slice(&payload);
                        } else {
                            disk[range].fill(0);
                        }
                    }
                    meet.wait();
                    let got = c.read(0, 0, SIZE as usize).unwrap().expect("read");
                    for &s in &mine {
                        let r = stripes(s);
                        assert_same_bytes(
                            &format!("client {k}, round {round}, stripe at {}", r.start),
                            &got[r.clone()],
                            &disk[r],
                        );
                    }
                    if round + 1 == ROUNDS {
                        break;
                    }
                    meet.wait();
                    if k == 0 {
                        let cmd = if round % 2 == 0 {
                            CMD_TRIM
                        } else {
                            CMD_WRITE_ZEROES
                        };
                        assert_eq!(
                            c.command(0, cmd, 0, SIZE, &[]).unwrap(),
                            0,
                            "clearing the disk"
                        );
                        if round % 3 != 2 {
                            assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
                        }
                    }
                    disk.fill(0);
                    meet.wait();
                }
                assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
                (mine, disk)
            })
        })
        .collect();
    let mut expected = vec![0u8; SIZE as usize];
    for c in clients {
        let (mine, disk) = c.join().expect("client failed");
        for s in mine {
            let r = (s * stripe) as usize..((s + 1) * stripe).min(SIZE) as usize;
            expected[r.clone()].copy_from_slice(&disk[r]);
        }
    }
    drop(server);
    assert_clean(d, "shared.strata");
    assert_same_bytes("after shutdown", &contents(d, "shared.strata"), &expected);
    assert_eq!(
        fs::read(d.join("base.raw")).unwrap(),
        base,
        "the base changed"
    );
}

#[test]
fn concurrent_clients_share_small_clusters() {
    // 4 KiB clusters, 1000-byte stripes: most requests allocate a cluster that others
    // are allocating too.
    concurrent_clients("4K", 1000);
}

#[test]
fn concurrent_clients_share_large_clusters() {
    // 64 KiB clusters, stripes of 25576 bytes: requests cross cluster boundaries.
    concurrent_clients("64K", 25_576);
}
