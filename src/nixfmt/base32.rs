//! Nix's base32: the alphabet omits e, o, u and t, and the digits are
//! produced from the last bit group of the input to the first.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the base32 text for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = bytes[i] as u16 >> j;
        let hi = bytes.get(i + 1).map_or(0, |&x| (x as u16) << (8 - j));
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes `text` into exactly `n` bytes; None if it is not valid Nix base32
/// of that length (wrong length, bad character, or bits beyond `n` bytes).
pub fn decode(text: &str, n: usize) -> Option<Vec<u8>> {
    if text.len() != encoded_len(n) {
        return None;
    }
    let mut out = vec![0u8; n];
    for (k, c) in text.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = k * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < n {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

pub fn is_valid_char(c: u8) -> bool {
    ALPHABET.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") in Nix base32, as `nix hash to-base32` prints it.
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
            0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", 32).unwrap(),
            empty
        );
    }

    #[test]
    fn round_trips_and_rejects() {
        for n in [1usize, 5, 20, 32, 64] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(text.len(), encoded_len(n));
            assert_eq!(decode(&text, n).unwrap(), bytes);
        }
        assert!(decode("e000000000000000000000000000000000000000000000000000", 32).is_none());
        assert!(decode("00", 32).is_none());
        // 52 chars carry 260 bits; the top 4 must be zero for 32 bytes.
        assert!(decode("z000000000000000000000000000000000000000000000000000", 32).is_none());
    }
}
