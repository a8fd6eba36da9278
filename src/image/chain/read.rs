//! The read path: a request is planned into pieces by where their bytes come from (a
//! layer's file, the raw base, or zeroes), then each piece is read into a buffer, or
//! mapped when only the kernel will read it.

use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;

use super::{Chain, lock_err};
use crate::block::ReadChunk;
use crate::error::{Error, Result};
use crate::image::map::{MergedMap, entry};
use crate::image::storage::as_uninit;

/// Where the bytes of a stretch of the virtual disk come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Src {
    Zero,
    Raw(u64),
    Host(u16, u64),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub(super) len: u64,
    pub(super) src: Src,
}

fn push_piece(out: &mut Vec<Piece>, len: u64, src: Src) {
    if let Some(last) = out.last_mut() {
        let joins = match (last.src, src) {
            (Src::Zero, Src::Zero) => true,
            (Src::Raw(a), Src::Raw(b)) => a + last.len == b,
            (Src::Host(la, a), Src::Host(lb, b)) => la == lb && a + last.len == b,
            _ => false,
        };
        if joins {
            last.len += len;
            return;
        }
    }
    out.push(Piece { len, src });
}

impl Chain {
    fn src_of(&self, e: u64, pos: u64, within: u64) -> Src {
        if let Some(host) = entry::host(e) {
            Src::Host(entry::layer(e), host + within)
        } else if entry::is_zero(e) || self.raw.is_none() {
            Src::Zero
        } else {
            Src::Raw(pos)
        }
    }

    /// Splits `[offset, offset + len)` into pieces by where their bytes come from.
    pub(super) fn plan(&self, map: &MergedMap, offset: u64, len: u64) -> Vec<Piece> {
        let bits = self.header.cluster_bits;
        let mask = self.cluster_size() - 1;
        let mut out = Vec::with_capacity(1);
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let within = pos & mask;
            let n = (mask + 1 - within).min(end - pos);
            let src = self.src_of(map.get(pos >> bits), pos, within);
            push_piece(&mut out, n, src);
            pos += n;
        }
        out
    }

    fn read_piece(&self, piece: Piece, buf: &mut [MaybeUninit<u8>], offset: u64) -> Result<()> {
        match piece.src {
            Src::Zero => buf.fill(MaybeUninit::new(0)),
            Src::Raw(lba) => {
                let (storage, size) = self.raw.as_ref().expect("raw source needs a raw base");
                let n = size.saturating_sub(lba).min(buf.len() as u64) as usize;
                buf[n..].fill(MaybeUninit::new(0));
                if n > 0 {
                    storage.read_uninit(&mut buf[..n], lba).map_err(|e| {
                        Error::from(e)
                            .with_op("read")
                            .with_range(lba, n as u64)
                            .with_path(self.layers[0].path.clone())
                    })?;
                }
            }
            Src::Host(layer, host) => {
                let layer = &self.layers[usize::from(layer)];
                layer.storage.read_uninit(buf, host).map_err(|e| {
                    Error::from(e)
                        .with_op("read")
                        .with_range(offset, buf.len() as u64)
                        .with_path(layer.path.clone())
                })?;
            }
        }
        Ok(())
    }

    /// Reads pieces of `[offset, offset + buf.len())` into `buf`, initialising all of it
    /// on success.
    pub(super) fn read_pieces(
        &self,
        pieces: &[Piece],
        offset: u64,
        buf: &mut [MaybeUninit<u8>],
    ) -> Result<()> {
        let mut at = 0usize;
        for &p in pieces {
            let n = p.len as usize;
            self.read_piece(p, &mut buf[at..at + n], offset + at as u64)?;
            at += n;
        }
        Ok(())
    }

    pub(super) fn read_locked(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, buf.len() as u64)
        };
        // SAFETY: read_pieces only stores bytes read from storage or zeroes through the
        // view, so `buf` stays initialised.
        self.read_pieces(&pieces, offset, unsafe { as_uninit(buf) })
    }

    /// Reads `len` bytes at `offset` into a new buffer (not cleared first).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        read_into_new(len, |buf| self.read_pieces(&pieces, offset, buf))
    }

    /// Fills `buf` from `offset` of the virtual disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        self.read_locked(offset, buf)
    }

    /// Reads `len` bytes at `offset`, reporting runs of zeroes without materialising
    /// them.
    pub fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        let mut out = Vec::with_capacity(pieces.len());
        let mut pos = offset;
        let mut i = 0;
        while i < pieces.len() {
            if pieces[i].src == Src::Zero {
                out.push(ReadChunk::Zero(pieces[i].len));
                pos += pieces[i].len;
                i += 1;
                continue;
            }
            // Gather consecutive data pieces into one buffer.
            let mut j = i;
            let mut n = 0u64;
            while j < pieces.len() && pieces[j].src != Src::Zero {
                n += pieces[j].len;
                j += 1;
            }
            let buf = read_into_new(n as usize, |buf| self.read_pieces(&pieces[i..j], pos, buf))?;
            out.push(ReadChunk::Data(Bytes::from(buf)));
            pos += n;
            i = j;
        }
        Ok(out)
    }

    /// Like [`Chain::read_sparse`], but on a chain whose layers are all in memory the
    /// data points into the layers' mappings instead of being copied, one chunk per
    /// piece. Such bytes must only ever be read by the kernel, as when writing them to a
    /// socket: see [`crate::mapping`].
    pub fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        if !self.in_memory() {
            return self.read_sparse(offset, len);
        }
        let _io = self.gate.read().map_err(|_| lock_err())?;
        let pieces = {
            let st = self.state.read().map_err(|_| lock_err())?;
            self.plan(&st.map, offset, len as u64)
        };
        self.read_mapped(&pieces, offset)
    }

    /// The chunks of [`Chain::read_sparse_for_kernel`]: each piece points into its
    /// layer's mapping when it can, and is copied otherwise. Caller holds the gate.
    fn read_mapped(&self, pieces: &[Piece], offset: u64) -> Result<Vec<ReadChunk>> {
        // Taken under the gate: a flush that frees clusters swaps generations under the
        // gate held exclusively, so this pin covers every cluster these pieces name.
        let pin = Arc::clone(&self.pins.lock().map_err(|_| lock_err())?.current);
        let mut out = Vec::with_capacity(pieces.len());
        let mut pos = offset;
        for &p in pieces {
            let n = p.len as usize;
            let mapped = match p.src {
                Src::Zero => {
                    out.push(ReadChunk::Zero(p.len));
                    pos += p.len;
                    continue;
                }
                Src::Host(layer, host) => self.layers[usize::from(layer)]
                    .storage
                    .map_slice(host, n, &pin),
                Src::Raw(lba) => match &self.raw {
                    Some((storage, size)) if lba + p.len <= *size => {
                        storage.map_slice(lba, n, &pin)
                    }
                    _ => None,
                },
            };
            let data = match mapped {
                Some(d) => d,
                None => Bytes::from(read_into_new(n, |buf| self.read_piece(p, buf, pos))?),
            };
            out.push(ReadChunk::Data(data));
            pos += p.len;
        }
        Ok(out)
    }
}

/// A new buffer of `len` bytes filled by `fill`, which must initialise all of it when it
/// succeeds: the buffer is not cleared first.
pub(super) fn read_into_new(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len])?;
    // SAFETY: `fill` succeeded, so it initialised all `len` bytes.
    unsafe { v.set_len(len) };
    Ok(v)
}
