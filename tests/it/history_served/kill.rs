//! `kill -9` under load, a hundred times: each time the volume reopens as the disk after
//! an exact prefix of the writes sent, holding every write acknowledged before the last
//! acknowledged flush or FUA write.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata::history::History;
use strata::image::sim::Rng;

use super::{serve, volume};
use crate::support::spec::FLAG_FUA;
use crate::support::{KIB, images_open, pattern, strata_only};

const SIZE: usize = 256 * KIB as usize;
const ROUNDS: u64 = 100;

/// What the writer did: the writes in the order sent, and how many of them were
/// durable (acknowledged before an acknowledged flush, or FUA).
#[derive(Default)]
struct Sent {
    writes: Vec<(u64, Vec<u8>)>,
    durable: usize,
}

#[test]
fn kill_9_under_load_leaves_an_exact_prefix_holding_every_durable_write() {
    if !strata_only("volumes with history") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "256K");
    let mut disk = vec![0u8; SIZE];
    let mut rng = Rng::new(0x9a11);
    let mut lost_total = 0;
    for round in 0..ROUNDS {
        let (mut server, mut c) = serve(&vol);
        let sent = Arc::new(Mutex::new(Sent::default()));
        let seed = rng.next_u64();
        let writer = {
            let sent = Arc::clone(&sent);
            std::thread::spawn(move || {
                let mut r = Rng::new(seed);
                loop {
                    let at = r.below(SIZE as u64 - 1);
                    let len = 1 + r.below((SIZE as u64 - at).min(12 * KIB)) as usize;
                    let data = pattern(r.next_u64(), len);
                    let fua = r.below(10) == 0;
                    sent.lock().unwrap().writes.push((at, data.clone()));
                    if !matches!(
                        c.write(if fua { FLAG_FUA } else { 0 }, at, &data),
                        Ok(Ok(()))
                    ) {
                        return;
                    }
                    let n = sent.lock().unwrap().writes.len();
                    if fua {
                        sent.lock().unwrap().durable = n;
                    } else if r.below(4) == 0 {
                        if !matches!(c.flush(), Ok(Ok(()))) {
                            return;
                        }
                        sent.lock().unwrap().durable = n;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5 + rng.below(40)));
        server.stop_with(libc::SIGKILL);
        writer.join().unwrap();
        let sent = std::mem::take(&mut *sent.lock().unwrap());

        let recovered = {
            let _guard = images_open();
            let h = History::open(&vol, false).unwrap();
            let mut buf = vec![0u8; SIZE];
            h.read(0, &mut buf).unwrap();
            buf
        };
        // The disk after the first k writes, for k from the durable ones to all sent.
        let mut state = disk.clone();
        let mut matched = None;
        for k in 0..=sent.writes.len() {
            if k > 0 {
                let (at, data) = &sent.writes[k - 1];
                state[*at as usize..*at as usize + data.len()].copy_from_slice(data);
            }
            if k >= sent.durable && state == recovered {
                matched = Some(k);
            }
        }
        let Some(k) = matched else {
            panic!(
                "round {round}: the reopened disk is no prefix of the {} writes sent holding the {} durable ones",
                sent.writes.len(),
                sent.durable
            );
        };
        lost_total += sent.writes.len() - k;
        disk = recovered;
    }
    eprintln!("{ROUNDS} kill -9 rounds: {lost_total} writes sent but not durable were lost");
}
