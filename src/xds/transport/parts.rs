//! Bytes held in several pieces and read as one buffer, without joining them: a
//! response (its small fields around the shared secrets) and a request (the DATA
//! frames it came in).

use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `C` holds the pieces: a `Vec` for responses, which h2 queues per stream (an inline
/// array would make every idle stream bigger), an inline array for requests.
#[derive(Clone)]
pub struct Parts<C> {
    parts: C,
    /// Index of the first piece not yet consumed.
    at: usize,
    remaining: usize,
}

impl<C: AsRef<[Bytes]> + AsMut<[Bytes]>> Parts<C> {
    /// `parts` holding `remaining` bytes, none of them empty (an empty piece would end
    /// `chunk` early).
    pub fn new(parts: C, remaining: usize) -> Self {
        debug_assert!(parts.as_ref().iter().all(|p| !p.is_empty()), "an empty piece");
        debug_assert_eq!(parts.as_ref().iter().map(Bytes::len).sum::<usize>(), remaining);
        Self { parts, at: 0, remaining }
    }

    /// How many pieces are left.
    pub fn pieces(&self) -> usize {
        self.parts.as_ref().len() - self.at
    }
}

/// Counts only: the pieces may be secrets.
impl<C: AsRef<[Bytes]> + AsMut<[Bytes]>> std::fmt::Debug for Parts<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").field("pieces", &self.pieces()).field("remaining", &self.remaining).finish()
    }
}

impl<C: AsRef<[Bytes]> + AsMut<[Bytes]>> Buf for Parts<C> {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.as_ref().get(self.at).map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let part = &mut self.parts.as_mut()[self.at];
            let n = cnt.min(part.len());
            part.advance(n);
            cnt -= n;
            if part.is_empty() {
                self.at += 1;
            }
        }
    }

    /// A slice of the piece when the bytes are all in one (prost reads `bytes` fields
    /// this way); copied only when they straddle two.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(part) = self.parts.as_mut().get_mut(self.at)
            && len <= part.len()
        {
            let bytes = part.split_to(len);
            self.remaining -= len;
            if part.is_empty() {
                self.at += 1;
            }
            return bytes;
        }
        // What `Buf`'s own copy_to_bytes does.
        assert!(len <= self.remaining, "copy past the end");
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }

    /// The pieces as they are, for `writev`.
    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts.as_ref()[self.at..]) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(pieces: &[&'static [u8]]) -> Parts<Vec<Bytes>> {
        let pieces: Vec<Bytes> = pieces.iter().map(|p| Bytes::from_static(p)).collect();
        let remaining = pieces.iter().map(Bytes::len).sum();
        Parts::new(pieces, remaining)
    }

    #[test]
    fn bytes_within_a_piece_are_sliced_and_across_pieces_copied() {
        let mut m = parts(&[b"abcd", b"efgh"]);
        let first = m.chunk().as_ptr();
        let ab = m.copy_to_bytes(2);
        assert_eq!(ab.as_ptr(), first, "a slice of the piece");
        assert_eq!(&m.copy_to_bytes(4)[..], b"cdef");
        assert_eq!((m.remaining(), m.pieces()), (2, 1));
        assert_eq!(m.chunk(), b"gh");
        m.advance(2);
        assert_eq!((m.remaining(), m.chunk(), m.pieces()), (0, &b""[..], 0));
    }

    #[test]
    fn advance_crosses_pieces_and_vectored_shows_what_is_left() {
        let mut m = parts(&[b"a", b"bc", b"d"]);
        m.advance(2);
        assert_eq!(m.chunk(), b"c");
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(m.chunks_vectored(&mut slices), 2);
        assert_eq!((&*slices[0], &*slices[1]), (&b"c"[..], &b"d"[..]));
        assert_eq!(format!("{m:?}"), "Parts { pieces: 2, remaining: 2 }", "no bytes in Debug");
    }
}
