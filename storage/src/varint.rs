//! LEB128 varints (unsigned) and zigzag varints (signed), used inside records.
//! Decoders never panic: every read is bounds-checked, and an encoding that
//! runs past 10 bytes or overflows 64 bits is rejected (a value padded with
//! extra zero groups, still within 10 bytes, is read as its value).

/// The longest LEB128 encoding of a `u64`.
pub(crate) const VARINT_BYTES_MAX: usize = 10;

pub(crate) fn put_u64(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

pub(crate) fn put_i64(buf: &mut Vec<u8>, value: i64) {
    put_u64(buf, zigzag(value));
}

pub(crate) fn len_u64(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

pub(crate) fn len_i64(value: i64) -> usize {
    len_u64(zigzag(value))
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// A cursor over a byte slice whose reads fail instead of panicking.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, position: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.position
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    pub(crate) fn u64(&mut self) -> Result<u64, &'static str> {
        // Most fields of a record (lengths, counts, small deltas) fit one byte.
        if let Some(&byte @ 0..=0x7f) = self.bytes.get(self.position) {
            self.position += 1;
            return Ok(u64::from(byte));
        }
        let mut value: u64 = 0;
        for index in 0..VARINT_BYTES_MAX {
            let byte = *self.bytes.get(self.position).ok_or("varint runs past the end")?;
            self.position += 1;
            let bits = u64::from(byte & 0x7f);
            if index == VARINT_BYTES_MAX - 1 && bits > 1 {
                return Err("varint overflows 64 bits");
            }
            value |= bits << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes")
    }

    pub(crate) fn i64(&mut self) -> Result<i64, &'static str> {
        self.u64().map(unzigzag)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, &'static str> {
        let byte = *self.bytes.get(self.position).ok_or("byte runs past the end")?;
        self.position += 1;
        Ok(byte)
    }

    /// The bytes read since `start` (an earlier position).
    pub(crate) fn consumed_since(&self, start: usize) -> &'a [u8] {
        self.bytes.get(start..self.position).unwrap_or_default()
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], &'static str> {
        let end = self.position.checked_add(len).ok_or("length overflows")?;
        let slice = self.bytes.get(self.position..end).ok_or("field runs past the end")?;
        self.position = end;
        Ok(slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edge_values() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_u64(&mut buf, value);
            assert_eq!(buf.len(), len_u64(value));
            assert_eq!(Reader::new(&buf).u64(), Ok(value));
        }
        for value in [0i64, -1, 1, i64::MIN, i64::MAX, -300] {
            let mut buf = Vec::new();
            put_i64(&mut buf, value);
            assert_eq!(buf.len(), len_i64(value));
            assert_eq!(Reader::new(&buf).i64(), Ok(value));
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        assert!(Reader::new(&[0x80; 11]).u64().is_err());
        assert!(Reader::new(&[0xff; 9]).u64().is_err());
        assert!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
                .u64()
                .is_err()
        );
    }
}
