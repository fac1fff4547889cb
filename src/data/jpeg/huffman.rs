//! The entropy-coded data of a baseline scan: a bit reader over the byte-stuffed stream and
//! Huffman tables with a lookahead table that resolves most codes (and, for AC tables, the
//! coefficient's extra bits too) in one lookup.

/// Bits resolved by one table lookup: nearly every coefficient of a photo, code and extra bits
/// together. Longer codes take the canonical slow path.
const FAST_BITS: u32 = 11;

/// Reads the entropy-coded segment MSB first, dropping stuffed zero bytes after `0xFF`. At a
/// marker (or the end of the data) it reads zero bits, counting them, so that a scan which
/// consumes more bits than the file holds is caught by [`BitReader::overread`] instead of
/// decoding padding as image.
///
/// It is `Copy`, and the scan's loop keeps it in a local that no call takes the address of,
/// so that its fields stay in registers.
#[derive(Clone, Copy)]
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Unread bits, left-aligned.
    bits: u64,
    count: u32,
    /// Zero bits appended past a marker or the end; they sit at the tail of `bits`.
    padded: u64,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            bits: 0,
            count: 0,
            padded: 0,
        }
    }

    /// Fills the buffer to at least 57 bits.
    #[inline]
    fn refill(&mut self) {
        // Eight bytes without an 0xFF among them are all data: take as many as fit at once.
        if let Some(next) = self.data.get(self.pos..self.pos + 8) {
            let v = u64::from_be_bytes(next.try_into().unwrap());
            let x = !v;
            if x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080 == 0 {
                let n = (64 - self.count) / 8;
                self.bits |= (v >> (64 - 8 * n)) << (64 - self.count - 8 * n);
                self.count += 8 * n;
                self.pos += n as usize;
                return;
            }
        }
        while self.count <= 56 {
            let byte = match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                (Some(0xFF), Some(0x00)) => {
                    self.pos += 2;
                    0xFF
                }
                // A marker, or the end: stay there and read zeros.
                (Some(0xFF), _) | (None, _) => {
                    self.padded += 8;
                    0
                }
                (Some(&b), _) => {
                    self.pos += 1;
                    b
                }
            };
            self.bits |= (byte as u64) << (56 - self.count);
            self.count += 8;
        }
    }

    /// Makes at least `n` (up to 57) bits available.
    #[inline]
    fn ensure(&mut self, n: u32) {
        if self.count < n {
            self.refill();
        }
    }

    #[inline]
    fn peek(&self, n: u32) -> u32 {
        (self.bits >> (64 - n)) as u32
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.count -= n;
    }

    /// The next `n` (1 to 16) bits as a signed coefficient value (JPEG's `EXTEND`).
    #[inline]
    fn signed(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        self.ensure(n);
        let v = self.peek(n) as i32;
        self.consume(n);
        extend(v, n)
    }

    /// Whether the scan so far consumed bits the file does not have.
    pub(super) fn overread(&self) -> bool {
        self.padded > self.count as u64
    }

    /// Ends a restart interval: drops the byte's padding bits and expects restart marker
    /// `RST(n % 8)` next. Returns `None` where the data do not match.
    #[cold]
    pub(super) fn restart(mut self, n: u32) -> Option<Self> {
        if self.overread() {
            return None;
        }
        // Unread bytes before the marker are damage libjpeg skips with a warning; so do we.
        while !matches!(self.data.get(self.pos..self.pos + 2), Some([0xFF, m]) if *m != 0) {
            self.data.get(self.pos)?;
            self.pos += 1;
        }
        if self.data[self.pos + 1] != 0xD0 + (n % 8) as u8 {
            return None;
        }
        self.pos += 2;
        (self.bits, self.count, self.padded) = (0, 0, 0);
        Some(self)
    }
}

#[inline]
fn extend(v: i32, n: u32) -> i32 {
    if n == 0 {
        0
    } else if v < 1 << (n - 1) {
        v - (1 << n) + 1
    } else {
        v
    }
}

/// One Huffman table (a DHT segment's table) in the form decoding needs.
pub(super) struct Huffman {
    /// Per `FAST_BITS`-bit lookahead:
    /// - a whole coefficient, where the code and its extra bits fit: `value << 8 | run << 4 |
    ///   bits` (`bits` > 0). In an AC table `value` 0 is end-of-block (run 0) or sixteen zeros
    ///   (run 15); in a DC table it is a difference of 0.
    /// - a code whose extra bits do not fit: `symbol << 8 | length << 4`;
    /// - 0: a code longer than `FAST_BITS`.
    fast: Box<[i32; 1 << FAST_BITS]>,
    /// Largest code of each length (-1: none), and the offset from a code to its symbol.
    max_code: [i32; 17],
    offset: [i32; 17],
    symbols: Vec<u8>,
    /// AC tables: per lookahead, the whole coefficients it holds, to be skipped together:
    /// `end << 12 | advance << 4 | bits`, where `advance` is the zigzag positions they cover
    /// and `end` says the last one is end-of-block. 0 where not even one fits.
    skip: Box<[u32; 1 << FAST_BITS]>,
}

impl Huffman {
    /// From a DHT table's 16 code counts and its symbols; `None` for a table no baseline
    /// JPEG has (more codes than fit, or sizes over 11 bits for DC and 10 for AC).
    pub(super) fn new(counts: &[u8; 16], symbols: &[u8], dc: bool) -> Option<Self> {
        let mut fast = Box::new([0i32; 1 << FAST_BITS]);
        let (mut max_code, mut offset) = ([-1i32; 17], [0i32; 17]);
        let (mut code, mut k) = (0u32, 0usize);
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            offset[len as usize] = k as i32 - code as i32;
            for _ in 0..n {
                let symbol = *symbols.get(k)? as u32;
                let (run, size) = (symbol >> 4, symbol & 15);
                if code >= 1 << len || (dc && symbol > 11) || (!dc && size > 10) {
                    return None;
                }
                if len <= FAST_BITS {
                    let first = code << (FAST_BITS - len);
                    for i in first..first + (1 << (FAST_BITS - len)) {
                        fast[i as usize] = if len + size <= FAST_BITS {
                            let extra = (i >> (FAST_BITS - len - size)) & ((1 << size) - 1);
                            extend(extra as i32, size) << 8 | (run << 4 | (len + size)) as i32
                        } else {
                            (symbol << 8 | len << 4) as i32
                        };
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                max_code[len as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        let mut skip = Box::new([0u32; 1 << FAST_BITS]);
        if !dc {
            for (i, entry) in skip.iter_mut().enumerate() {
                let (mut bits, mut advance, mut end) = (0u32, 0u32, 0u32);
                while bits < FAST_BITS {
                    // The next coefficient, from the bits after those taken (zeros after the
                    // lookahead's end: a code that fits does not read them).
                    let e = fast[(i << bits) & ((1 << FAST_BITS) - 1)];
                    let len = (e & 15) as u32;
                    if len == 0 || bits + len > FAST_BITS {
                        break;
                    }
                    bits += len;
                    let (run, value) = ((e >> 4 & 15) as u32, e >> 8);
                    if value == 0 && run != 15 {
                        end = 1;
                        break;
                    }
                    advance += run + 1;
                }
                *entry = end << 12 | advance << 4 | bits;
            }
        }
        Some(Self {
            fast,
            max_code,
            offset,
            symbols: symbols[..k].to_vec(),
            skip,
        })
    }

    /// The next coefficient: its run of zeros before it and its value (see `fast` for value 0).
    /// `None` for a bit pattern that is no code of this table.
    #[inline(always)]
    fn coefficient(&self, r: &mut BitReader) -> Option<(usize, i32)> {
        // The longest code and its extra bits: 16 + 11.
        r.ensure(27);
        let e = self.fast[r.peek(FAST_BITS) as usize];
        if e & 15 != 0 {
            r.consume((e & 15) as u32);
            return Some(((e >> 4 & 15) as usize, e >> 8));
        }
        let symbol = if e != 0 {
            r.consume((e >> 4 & 15) as u32);
            (e >> 8) as u32
        } else {
            let (symbol, len) = self.long_code(r.bits)?;
            r.consume(len);
            symbol as u32
        };
        let size = symbol & 15;
        Some(((symbol >> 4) as usize, r.signed(size)))
    }

    /// The symbol of a code longer than `FAST_BITS` at the top of `bits`, and its length: the
    /// canonical way (libjpeg's `jpeg_huff_decode`).
    #[cold]
    fn long_code(&self, bits: u64) -> Option<(u8, u32)> {
        for len in FAST_BITS + 1..=16 {
            let code = (bits >> (64 - len)) as i32;
            if code <= self.max_code[len as usize] {
                let symbol = self
                    .symbols
                    .get((code + self.offset[len as usize]) as usize);
                return Some((*symbol?, len));
            }
        }
        None
    }
}

/// Zigzag position -> natural (row-major) position in the 8x8 block.
const ZIGZAG: [u8; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Where each zigzag coefficient goes in an `n x n` reduced block (row-major), or `NONE` for
/// the frequencies a reduced inverse DCT does not use.
pub(super) struct Slots {
    slot: [u8; 64],
    /// The last zigzag position kept.
    last: usize,
}

const NONE: u8 = u8::MAX;

impl Slots {
    pub(super) fn new(n: usize) -> Self {
        let mut slot = [NONE; 64];
        for (k, &z) in ZIGZAG.iter().enumerate() {
            let (row, col) = (z as usize / 8, z as usize % 8);
            if row < n && col < n {
                slot[k] = (row * n + col) as u8;
            }
        }
        let last = (0..64).rev().find(|&k| slot[k] != NONE).unwrap_or(0);
        Self { slot, last }
    }
}

/// Decodes one block, keeping the dequantized coefficients `slots` selects in `block` (which
/// the caller zeroed) and skipping the rest; says whether the block is flat (every kept
/// coefficient but the DC is zero). `quant` is in zigzag order, as a DQT segment stores it.
/// `None` for data no valid block has.
#[inline(always)]
pub(super) fn decode_block(
    r: &mut BitReader,
    dc: &Huffman,
    ac: &Huffman,
    predictor: &mut i32,
    quant: &[u16; 64],
    slots: &Slots,
    block: &mut [i32; 16],
) -> Option<bool> {
    let (_, diff) = dc.coefficient(r)?;
    // Damaged data can drive the predictor anywhere: wrap rather than overflow.
    *predictor = predictor.wrapping_add(diff);
    block[0] = predictor.wrapping_mul(quant[0] as i32);
    let mut k = 1usize;
    let mut flat = true;
    while k <= slots.last {
        let (run, value) = ac.coefficient(r)?;
        if value == 0 {
            // End of block, or sixteen zeros.
            if run != 15 {
                return Some(flat);
            }
            k += 16;
            continue;
        }
        k += run;
        let slot = *slots.slot.get(k)?;
        if slot != NONE {
            block[slot as usize] = value * quant[k] as i32;
            flat = false;
        }
        k += 1;
    }
    // Past the last kept frequency only the codes' lengths and runs matter: skip all the
    // coefficients a lookahead holds at once (two or three in a photo), one at a time only
    // where a code is long or the block ends without end-of-block.
    while k < 64 {
        r.ensure(27);
        let e = ac.skip[r.peek(FAST_BITS) as usize];
        let advance = (e >> 4 & 0xFF) as usize;
        // An end-of-block at position 64 would be the next block's bits: a full block has none.
        if e != 0 && k + advance + (e >> 12) as usize <= 64 {
            r.consume(e & 15);
            if e >> 12 != 0 {
                break;
            }
            k += advance;
            continue;
        }
        let (run, value) = ac.coefficient(r)?;
        if value == 0 && run != 15 {
            break;
        }
        k += run + 1;
    }
    Some(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's codes decode to their coefficients through each path: code and extra bits in
    /// one lookup, a short code with long extra bits, a code longer than the lookahead.
    #[test]
    fn codes_decode_to_their_coefficients() {
        // Canonical codes: 00 (EOB), 010 (run 1, size 2), 0110 (run 3, size 10),
        // 0111_0000_0000 (sixteen zeros), 0111_0000_0001_0000 (size 5).
        let mut counts = [0u8; 16];
        for len in [2, 3, 4, 12, 16] {
            counts[len - 1] = 1;
        }
        let table = Huffman::new(&counts, &[0x00, 0x12, 0x3A, 0xF0, 0x05], false).unwrap();
        let bits = [
            "00",
            "010",
            "01",
            "0110",
            "1000000001",
            "011100000000",
            "0111000000010000",
            "10110",
        ];
        let bits = bits.concat();
        let mut bytes: Vec<u8> = bits
            .as_bytes()
            .chunks(8)
            .map(|c| {
                u8::from_str_radix(&format!("{:1<8}", std::str::from_utf8(c).unwrap()), 2).unwrap()
            })
            .collect();
        bytes.extend([0xFF, 0xD9]);
        let mut r = BitReader::new(&bytes);
        for want in [(0, 0), (1, -2), (3, 513), (15, 0), (0, 22)] {
            assert_eq!(table.coefficient(&mut r), Some(want));
        }
        assert!(!r.overread());
        assert_eq!(
            table.coefficient(&mut r),
            None,
            "the byte's 1-bit padding is no code"
        );
        // Four end-of-blocks in a byte; a fifth reads past the data (zeros at the marker).
        let mut r = BitReader::new(&[0x00, 0xFF, 0xD9]);
        for _ in 0..4 {
            assert_eq!(table.coefficient(&mut r), Some((0, 0)));
        }
        assert!(!r.overread());
        assert_eq!(table.coefficient(&mut r), Some((0, 0)));
        assert!(r.overread());
    }

    #[test]
    fn tables_no_baseline_jpeg_has_are_refused() {
        let mut counts = [0u8; 16];
        counts[0] = 3;
        assert!(
            Huffman::new(&counts, &[1, 2, 3], false).is_none(),
            "3 codes of 1 bit"
        );
        counts[0] = 1;
        assert!(
            Huffman::new(&counts, &[12], true).is_none(),
            "a 12-bit DC difference"
        );
        assert!(
            Huffman::new(&counts, &[0x1B], false).is_none(),
            "an 11-bit AC value"
        );
        assert!(Huffman::new(&counts, &[11], true).is_some());
    }
}
