//! The queue's on-disk formats: a record frame, a segment's header and the cursor file. Each is
//! checked by a CRC-32C, so a torn or damaged write is recognised instead of being delivered.
//!
//! ```text
//! segment file  segment-<id, 20 digits>.log: SEGMENT_MAGIC (8 bytes), then frames back to back
//! frame         len: u32 LE | crc: u32 LE | enqueued: u64 LE (µs since the Unix epoch) | payload (len bytes)
//!               crc = CRC-32C of len, enqueued and payload
//! cursor file   CURSOR_MAGIC (8) | segment id: u64 LE | offset: u64 LE | CRC-32C of the 24 bytes before
//! ```
//!
//! The CRC is computed here (slicing-by-8, about 1-2 GB/s) rather than by a new dependency: the
//! writer thread and the recovery scan are its only users, never a request.

/// First bytes of every segment file; the last byte is the format version.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"MGOTRQ\x00\x01";
/// First bytes of the cursor file; the last byte is the format version.
pub(super) const CURSOR_MAGIC: [u8; 8] = *b"MGOCUR\x00\x01";
/// Offset of a segment's first frame.
pub(super) const SEGMENT_HEADER: u64 = SEGMENT_MAGIC.len() as u64;
/// Bytes of a frame before its payload.
pub(super) const FRAME_HEADER: usize = 16;
/// Bytes of the cursor file.
pub(super) const CURSOR_LEN: usize = 28;

/// A frame's header, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub len: u32,
    pub crc: u32,
    pub enqueued_us: u64,
}

impl FrameHeader {
    pub fn parse(bytes: &[u8; FRAME_HEADER]) -> Self {
        let [l0, l1, l2, l3, c0, c1, c2, c3, t @ ..] = *bytes;
        FrameHeader {
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            crc: u32::from_le_bytes([c0, c1, c2, c3]),
            enqueued_us: u64::from_le_bytes(t),
        }
    }

    /// Whether `payload` is the one this header was written for.
    pub fn matches(&self, payload: &[u8]) -> bool {
        payload.len() == self.len as usize
            && frame_crc(self.len, self.enqueued_us, payload) == self.crc
    }
}

/// Appends one frame to `out`. The caller keeps `payload.len()` within `u32::MAX`.
pub(super) fn encode_frame(out: &mut Vec<u8>, enqueued_us: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, enqueued_us, payload).to_le_bytes());
    out.extend_from_slice(&enqueued_us.to_le_bytes());
    out.extend_from_slice(payload);
}

fn frame_crc(len: u32, enqueued_us: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..].copy_from_slice(&enqueued_us.to_le_bytes());
    crc32c(crc32c(0, &head), payload)
}

/// The cursor file's bytes for the position `(segment, offset)`.
pub(super) fn encode_cursor(segment: u64, offset: u64) -> [u8; CURSOR_LEN] {
    let mut out = [0u8; CURSOR_LEN];
    out[..8].copy_from_slice(&CURSOR_MAGIC);
    out[8..16].copy_from_slice(&segment.to_le_bytes());
    out[16..24].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c(0, &out[..24]);
    out[24..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The position a cursor file holds; None when it is not one this format wrote whole.
pub(super) fn decode_cursor(bytes: &[u8]) -> Option<(u64, u64)> {
    let bytes: &[u8; CURSOR_LEN] = bytes.try_into().ok()?;
    let (body, crc) = bytes.split_at(24);
    if body[..8] != CURSOR_MAGIC || crc32c(0, body).to_le_bytes() != crc {
        return None;
    }
    let segment = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let offset = u64::from_le_bytes(body[16..24].try_into().ok()?);
    Some((segment, offset))
}

/// CRC-32C (Castagnoli), continuing from `crc` (0 to start): `crc32c(crc32c(0, a), b)` is the
/// CRC of `a` followed by `b`.
pub(super) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !crc;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    const POLY: u32 = 0x82F6_3B78; // Castagnoli, reflected
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 8 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(crc32c(0, b"1234"), b"56789"), 0xE306_9283);
        assert_eq!(crc32c(0, b""), 0);
    }

    #[test]
    fn a_frame_reads_back_and_a_changed_byte_is_caught() {
        let mut out = Vec::new();
        encode_frame(&mut out, 1_700_000_000_000_000, b"payload");
        let header = FrameHeader::parse(out[..FRAME_HEADER].try_into().unwrap());
        assert_eq!(header.len, 7);
        assert_eq!(header.enqueued_us, 1_700_000_000_000_000);
        assert!(header.matches(&out[FRAME_HEADER..]));
        let mut bad = out[FRAME_HEADER..].to_vec();
        bad[3] ^= 1;
        assert!(!header.matches(&bad));
    }

    #[test]
    fn a_cursor_reads_back_and_a_torn_one_is_refused() {
        let bytes = encode_cursor(7, 4096);
        assert_eq!(decode_cursor(&bytes), Some((7, 4096)));
        assert_eq!(decode_cursor(&bytes[..20]), None);
        let mut bad = bytes;
        bad[10] ^= 1;
        assert_eq!(decode_cursor(&bad), None);
    }
}
